"""SIGKILL this process at the k-th file-system operation of ``swift_callbacks.store`` (crash-safety tests).

Counted operations, each counted *before* it runs (killed at k, the disk holds the state after operation k-1):
``os.replace``, ``os.rename``, ``os.link``, ``os.unlink``, ``os.rmdir``, ``os.mkdir``, ``os.fsync`` called from the
store (directly or through ``pathlib`` / ``shutil``), and the store's ``_write_new`` (file creation). In ``"torn"``
mode only ``_write_new`` calls are counted: the k-th writes half of its bytes, then the process dies.

With ``method`` (an ``InfluenceStore`` method name) and optionally ``step`` (its step argument), only operations
inside that call are counted.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

from swift_callbacks import store

OS_OPS = ("replace", "rename", "link", "unlink", "rmdir", "mkdir", "fsync")
_STEP_ARG = {"write_step": 0, "snapshot": 1, "resume": 1, "discard_sidecar": None}


class Harness:
    def __init__(self, kill_at: int, mode: str = "before", method: str | None = None, step: int | None = None):
        self.kill_at, self.mode, self.method, self.step = kill_at, mode, method, step
        self.count = 0
        self.active = method is None

    def tick(self, kind: str = "os") -> bool:
        if not self.active or (self.mode == "torn" and kind != "write") or not _called_from_store():
            return False
        self.count += 1
        return self.count == self.kill_at


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _called_from_store() -> bool:
    frame = sys._getframe(2)
    for _ in range(12):
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == store.__name__:
            return True
        frame = frame.f_back
    return False


def install(
    kill_at: int, mode: str = "before", method: str | None = None, step: int | None = None, skip_fsync: bool = False
) -> Harness:
    """Patch the operations; ``kill_at`` 0 only counts (``harness.count`` at the end is the total).

    ``skip_fsync``: count each fsync as a kill point but skip the system call. A SIGKILL loses nothing the kernel
    holds (only a power cut loses unsynced data, which these tests do not simulate), so the states reachable by a
    kill are the same, and playing a scenario hundreds of times no longer waits on the disk.
    """
    h = Harness(kill_at, mode, method, step)

    def wrap(name):
        original = getattr(os, name)

        @functools.wraps(original)
        def op(*args, **kwargs):
            if h.tick():
                die()
            if name == "fsync" and skip_fsync:
                return None
            return original(*args, **kwargs)

        setattr(os, name, op)

    for name in OS_OPS:
        wrap(name)

    original_write = store._write_new

    def write_new(path, data):
        if h.tick("write"):
            if h.mode == "torn":
                with open(path, "xb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
            die()
        return original_write(path, data)

    store._write_new = write_new

    if method is not None:
        original_method = getattr(store.InfluenceStore, method)
        index = _STEP_ARG.get(method)

        @functools.wraps(original_method)
        def traced(self, *args, **kwargs):
            if h.step is not None and index is not None and args[index] != h.step:
                return original_method(self, *args, **kwargs)
            h.active = True
            try:
                return original_method(self, *args, **kwargs)
            finally:
                h.active = False

        setattr(store.InfluenceStore, method, traced)
    return h
