"""How a run ends early without losing work: a clean stop on SIGINT / SIGTERM, and the errors that say where the
last good state was written."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

logger = logging.getLogger(__name__)

#: Ctrl-C, and what a cluster scheduler (SLURM, Kubernetes) sends before it pre-empts a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(RuntimeError):
    """Training ended before ``max_train_steps``; ``checkpoint`` is the folder to resume from and ``step`` the
    number of updates done. ``reason`` is the message without the advice on how to resume (which the command
    line words its own way)."""

    def __init__(self, reason: str, *, checkpoint: str, step: int, resume_hint: str):
        super().__init__(f"{reason}: {resume_hint}")
        self.reason = reason
        self.checkpoint = checkpoint
        self.step = step


class TrainingInterrupted(TrainingStopped):
    """Stopped by a signal (``signal_number``; ``None`` on a process that did not receive it itself)."""

    def __init__(self, reason: str, *, checkpoint: str, step: int, resume_hint: str, signal_number: int | None):
        super().__init__(reason, checkpoint=checkpoint, step=step, resume_hint=resume_hint)
        self.signal_number = signal_number


class NonFiniteUpdatesError(TrainingStopped):
    """Stopped after ``max_consecutive_skips`` updates in a row with a non-finite loss, reward or gradient."""


class NonFiniteWeightsError(ValueError):
    """Trained weights hold a NaN or an infinity: they were not written."""


class StopRequest:
    """Set by the first SIGINT or SIGTERM while :func:`stop_on_signals` is active; read after each update."""

    def __init__(self) -> None:
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signal_number).name if self.requested else None


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn the first SIGINT or SIGTERM into a :class:`StopRequest` instead of an exception in the middle of an
    update. After it, Ctrl-C acts as it did before (twice stops at once), while further SIGTERMs are ignored: a
    scheduler (SLURM, torchrun forwarding its own) may send one to every process more than once. The handlers as
    found are put back at the end; a signal that was ignored stays ignored.

    Signal handlers can only be set from the main thread; elsewhere the request never fires.
    """
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    # getsignal() is None for a handler not set from Python: the default is the nearest one to put back.
    previous = {number: signal.getsignal(number) or signal.SIG_DFL for number in STOP_SIGNALS}

    def handle(number, frame):
        if request.requested:
            return
        request.signal_number = number
        signal.signal(signal.SIGINT, previous[signal.SIGINT])
        logger.warning(
            "received %s: the run stops once the update in progress is done, with a checkpoint%s",
            signal.Signals(number).name, " (Ctrl-C again stops at once)" if number == signal.SIGINT else "",
        )  # fmt: skip

    watched = [number for number in STOP_SIGNALS if previous[number] is not signal.SIG_IGN]
    for number in watched:
        signal.signal(number, handle)
    try:
        yield request
    finally:
        for number in watched:
            signal.signal(number, previous[number])
