"""How a run ends early without losing work: a clean stop on SIGINT / SIGTERM, and the errors that say where the
last good state was written."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

#: Ctrl-C, and what a cluster scheduler (SLURM, Kubernetes) sends before it pre-empts a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(RuntimeError):
    """Training ended before ``max_train_steps``; ``checkpoint`` is the folder to resume from (``None`` if none
    could be written) and ``step`` the number of updates done."""

    def __init__(self, message: str, *, checkpoint: str | None, step: int):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


class TrainingInterrupted(TrainingStopped):
    """Stopped by a signal (``signal_number``; ``None`` on a process that did not receive it itself)."""

    def __init__(self, message: str, *, checkpoint: str | None, step: int, signal_number: int | None):
        super().__init__(message, checkpoint=checkpoint, step=step)
        self.signal_number = signal_number


class NonFiniteUpdatesError(TrainingStopped):
    """Stopped after ``max_consecutive_skips`` updates in a row with a non-finite loss, reward or gradient."""


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
def stop_on_signals(update_label: Callable[[], str]) -> Iterator[StopRequest]:
    """Turn the first SIGINT or SIGTERM into a :class:`StopRequest` instead of an exception in the middle of an
    update; the handlers as found are put back at once (so a second signal acts as it did before: Ctrl-C twice stops
    at once) and at the end. ``update_label()`` names the update in progress for the log line.

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
        for restored, handler in previous.items():
            signal.signal(restored, handler)
        logger.warning(
            "received %s: finishing %s, then writing a checkpoint (send it again to stop at once)",
            signal.Signals(number).name, update_label(),
        )  # fmt: skip

    for number in STOP_SIGNALS:
        signal.signal(number, handle)
    try:
        yield request
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
