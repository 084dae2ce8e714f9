"""The graceful stop: a first SIGINT or SIGTERM ends training after the current step, with a checkpoint."""

from __future__ import annotations

import signal
import threading

__all__ = ["GracefulStop"]


class GracefulStop:
    """SIGINT and SIGTERM during training: the first asks the loop to stop after the current step and save a
    checkpoint (a cluster scheduler sends SIGTERM before it preempts a job); the second aborts at once, with
    the last complete checkpoint intact (every write is atomic).

    Installed only in the main thread, and not over a signal that was ignored when the process started (a
    job started with ``nohup``, or in the background of a script, keeps ignoring SIGINT).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoints_dir):
        self.checkpoints_dir = checkpoints_dir
        self.signum = 0  # the first signal received (0: none)
        self._previous: dict = {}

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:  # the second: no more waiting (printing is left to the CLI: not safe in a handler)
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name} aborted training at once; the last "
                                    f"complete checkpoint in {self.checkpoints_dir} is intact")
        self.signum = signum
