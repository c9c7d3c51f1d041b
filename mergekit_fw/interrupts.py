"""SIGINT and SIGTERM as exceptions, so a stopped run unwinds like a failed one.

A job scheduler sends SIGTERM before it preempts; Python's default for it kills the
process where it stands, with no ``finally`` run: the output lock and the hidden
output folder stay behind. Raised as :class:`Interrupted` instead, the signal
unwinds through the same clean-ups as an error (the solve has checkpointed every
finished iteration already), and the command exits with the shell's status for
the signal (130 for SIGINT, 143 for SIGTERM).

The exception is raised wherever the interpreter next runs Python, and that can be
a callback inside C code (a safetensors read building its torch storage) that turns
any exception into its own ``ValueError``. So the block remembers the signal: once
one has arrived, whatever ends the block is reported as that signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)
RESUME_HINT = "rerun the same command to resume (the finished iterations, or the finished solve, are kept)"


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal. A ``KeyboardInterrupt`` so that code which
    already lets Ctrl-C through (no ``except Exception`` catches it) lets this through."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted`; a Ctrl-C that
    arrives as a plain ``KeyboardInterrupt`` is turned into one too. The handlers
    before the block are put back after it. Outside the main thread (where Python
    cannot install handlers) the block runs unchanged.

    An exception of any kind (an ``Exception``, a ``SystemExit`` made from one) that
    ends the block after a signal arrived is the signal's, rewrapped by the code it
    passed through, and is raised as :class:`Interrupted` for that signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def _raise(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, _raise) for signum in HANDLED}
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT) from None
    except BaseException:
        if received:
            raise Interrupted(received[0]) from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
