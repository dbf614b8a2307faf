"""The package's error policy: what counts as the user's mistake, and how a command reports it.

Every error caused by what a user gave (a config, a set, a file, a model the engine cannot track, a damaged
history) is a :class:`UserError`. Every command line of the package (``swift-study``, ``python -m
swift_callbacks.training.train`` under ``accelerate launch``, ``python -m swift_callbacks.scoring``) runs through
:func:`run_command`: a user error prints one line naming the problem and exits 2, never a traceback; a bug still
shows its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from collections.abc import Callable

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
HTTP_THREAD_PREFIX = "swift-http"  # name prefix of the HTTP worker threads (an interrupt does not wait for them)
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


class UserError(ValueError):
    """A problem with the user's input; its message says what is wrong, where, and what to do."""


def run_command(prog: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run one command with the package's logging and error policy; returns the exit status.

    Args:
        prog: The command's name in messages (``swift-study train``).
        func: The command; returns an exit status (None: 0).
        args: Its parsed arguments.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("swift_callbacks").setLevel(logging.INFO)  # one line per influence computation
    try:
        return int(func(args) or 0)
    except UserError as err:
        return _fail(prog, str(err))
    except _PATH_ERRORS as err:
        where = f"{err.filename}: " if getattr(err, "filename", None) else ""
        return _fail(prog, f"{where}{err.strerror or err}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        _exit_now_if_threads_would_hold_it()
        return EXIT_INTERRUPTED


def _exit_now_if_threads_would_hold_it() -> None:
    """After Ctrl-C, exit at once when HTTP worker threads are still waiting for an answer: the interpreter would
    join them at exit, which lasts until their HTTP timeout. Everything finished is already on disk (the cache
    and the evaluation records are flushed in ``finally`` blocks, which have run). Only our own HTTP workers
    count: other threads (a logger's, say) are left to finish normally, with the exit handlers they rely on."""
    busy = [t for t in threading.enumerate() if t.name.startswith(HTTP_THREAD_PREFIX) and t.is_alive()]
    if busy:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever the message
    return EXIT_USER_ERROR
