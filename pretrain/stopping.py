"""Stop requests: SIGUSR1/SIGTERM at any rank, the file ``<run_dir>/STOP``, or a wall-clock budget.

A handler only records the request (Megatron's DistributedSignalHandler pattern); the trainer turns
:meth:`StopRequest.local_code` into a collective flag once per step (all_reduce MAX), so every rank
sees the same decision at the same step, saves and exits 0. The deepspeed launcher forwards SIGTERM
to its workers (and SIGKILLs them 30 s later) but dies of SIGUSR1 itself, so a batch script sends
SIGUSR1 to the workers (``--signal=USR1@600`` to the step) or touches the stop file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

logger = logging.getLogger(__name__)

STOP_FILE = "STOP"
# Codes ordered by precedence (the all_reduce keeps the largest): a signal beats the file beats time.
NONE, TIME_BUDGET, STOP_FILE_CODE, SIGNAL = 0, 1, 2, 3
REASONS = {TIME_BUDGET: "time budget (train.exit_after_minutes)", STOP_FILE_CODE: "stop file", SIGNAL: "signal"}
SIGNALS = ("SIGUSR1", "SIGTERM")


def process_start_time() -> float:
    """When this process started (epoch seconds), from /proc when available."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # psutil missing or /proc unreadable: count from now
        return time.time()


class StopRequest:
    """Collects this rank's stop requests; :meth:`local_code` is what the rank votes each step.

    Args:
        run_dir: where ``STOP`` is looked for (by the main rank only: one stat per step, not one per rank).
        exit_after_minutes: wall-clock budget from the process start (0 = none).
        check_file: whether this rank looks for the stop file.
    """

    def __init__(self, run_dir: str, exit_after_minutes: float = 0.0, check_file: bool = True,
                 start_time: float | None = None) -> None:
        self.stop_file = os.path.join(run_dir, STOP_FILE)
        self.deadline = ((start_time or process_start_time()) + 60.0 * exit_after_minutes
                         if exit_after_minutes > 0 else None)
        self.check_file = check_file
        self.signal_name: str | None = None
        self.signal_number: int | None = None
        self.signal_time: float | None = None
        self._old: dict[int, object] = {}

    def install(self) -> None:
        """Handle SIGUSR1 and SIGTERM in this (main) thread; the previous handlers come back on uninstall."""
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self.signal_number, self.signal_time = name, int(signum), time.time()
            logger.warning("received %s: will save a checkpoint and exit after the current step", name)

    def local_code(self) -> int:
        """This rank's vote: SIGNAL, STOP_FILE_CODE, TIME_BUDGET or NONE."""
        if self.signal_name is not None:
            return SIGNAL
        if self.check_file and os.path.exists(self.stop_file):
            return STOP_FILE_CODE
        if self.deadline is not None and time.time() >= self.deadline:
            return TIME_BUDGET
        return NONE

    def consume_stop_file(self) -> None:
        """Remove the stop file once acted on, so the requeued job runs (status.json says what happened)."""
        if self.check_file:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.stop_file)
