"""Stopping a run: Ctrl-C or SIGTERM ask the loop to stop after the current step
(:class:`StopRequest`), and work dropped whole when stopped, the final test, is interrupted
at once (:func:`interrupts_raise`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cifar_inception.runs import LAST


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step; a second one stops now."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; nothing to install
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt in the block (SIGTERM would otherwise end
    the process with no word), for work that is dropped whole when stopped: the test."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_message(stopped: str, run_dir: Path | None, *, saved: bool) -> str:
    """How the run stopped, the last.pt it saved (``saved``), and the command that continues it."""
    if run_dir is None:  # a rank other than 0 under torchrun: rank 0 saves and says where
        return f"{stopped}; rank 0 saved the run"
    kept = f"; saved {run_dir / LAST}" if saved else ""
    return f"{stopped}{kept}; continue with: cifar-inception train --resume {run_dir}"


def diverged_message(run_dir: Path | None, epoch: int, step: int, lr: float) -> str:
    last = run_dir / LAST if run_dir is not None else None
    kept = (f"the last good checkpoint is {last}" if last is not None and last.exists()
            else "no checkpoint was written")
    return (f"the loss became NaN or infinite in epoch {epoch + 1} (by step {step + 1}), "
            f"learning rate {lr:.3g}; stopped, {kept}. Try a lower --lr")
