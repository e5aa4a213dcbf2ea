"""What SIGTERM and SIGUSR1 do to a run: stop at the next step, say so, then go.

A cluster scheduler sends SIGTERM (SLURM, at a time limit or on preemption) or SIGUSR1
(``--signal=USR1@90``; submitit's requeue) a while before it kills a job. While a cell
trains, :func:`catch` turns either into a flag that the step loop reads after every step
(:func:`check` raises :class:`Interrupted`); the trainer then writes ``result.json`` with
``status: interrupted`` (the checkpoint of the last finished epoch is kept: resuming
loses at most one epoch) and, once the record is on disk, :func:`redeliver` hands the
signal to whoever handled it before (submitit requeues the job) or, by default, lets it
end the process, whose exit status then says "killed by SIGTERM" (143 in a shell), as a
scheduler's requeue expects.

Under torchrun the handlers are not installed: every rank must stop at the same step,
and the agent already forwards signals to all of them (they die; ``last.pt`` resumes).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

__all__ = ["CAUGHT", "Interrupted", "catch", "check", "redeliver"]

CAUGHT = (signal.SIGTERM, signal.SIGUSR1)
_state: dict[str, Any] = {"signum": None}


class Interrupted(BaseException):  # noqa: N818 (not an error: a request to stop)
    """A caught signal stopped the run at a step boundary."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def _handler(signum: int, frame: Any) -> None:
    _state["signum"] = signum


@contextlib.contextmanager
def catch(enabled: bool = True) -> Iterator[None]:
    """Turn SIGTERM and SIGUSR1 into a flag for the block (main thread only).

    Blocks nest (``flexexp.tune`` holds one around the trials, each cell its own): an
    inner block keeps a flag the outer one raised, and each block puts back the handlers
    it found."""
    import threading

    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not _handler:  # the outermost block
        _state["signum"] = None
    previous = {s: signal.signal(s, _handler) for s in CAUGHT}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def check() -> None:
    """Raise :class:`Interrupted` if a signal arrived since the block began."""
    if _state["signum"] is not None:
        raise Interrupted(_state["signum"])


def pending() -> int | None:
    """The signal caught and not yet redelivered, if any."""
    return _state["signum"]


def redeliver() -> None:
    """Send the caught signal again to this process, now that the handlers of before
    (or the default action: exit) are back; a no-op when none was caught."""
    signum, _state["signum"] = _state["signum"], None
    if signum is not None:
        os.kill(os.getpid(), signum)
