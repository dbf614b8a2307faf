"""Whole-file outputs written atomically: a reader (or a rerun after a kill) sees the old file or the new one,
never a part.

The influence history (``store``) has its own protocol on top of this idea (named temporary files it can
recognise and clean up after a crash, a manifest); everything else the package writes whole goes through
:func:`write_atomic`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

Writer = Callable[[IO[bytes]], Any]


def write_atomic(path: str | os.PathLike, content: bytes | str | Writer) -> Path:
    """Replace ``path`` with ``content``: a temporary file in the same folder, fsynced, then renamed over it.

    The file gets the mode ``open()`` would give it under the process umask (not ``mkstemp``'s 0600); the folder
    is created if missing; the temporary file is removed if writing fails or is interrupted.

    Args:
        path: The file to write.
        content: Bytes, text (written as UTF-8), or a function that writes to the open binary file.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; set it straight back
    os.umask(mask)
    return mask
