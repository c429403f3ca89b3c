"""TensorBoard scalars (rank 0 only) with the stable tag names of ARCHITECTURE.md, and the log line."""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)


class Metrics:
    """Writes scalars under ``<run_dir>/tb`` on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.log_dir = os.path.join(run_dir, "tb")
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(self.log_dir, exist_ok=True)
            self.writer = SummaryWriter(self.log_dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, v in values.items():
            if v is not None:
                self.writer.add_scalar(tag, float(v), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Throughput:
    """Tokens and samples per second, step time and ETA over the window since the last report."""

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.total_steps = total_steps
        self.t0 = self.window_start = time.perf_counter()
        self.start_step = self.window_step = start_step
        self.tokens = self.samples = 0
        self.data_wait = 0.0

    def add(self, tokens: int, samples: int, data_wait: float = 0.0) -> None:
        self.tokens += tokens
        self.samples += samples
        self.data_wait += data_wait

    def report(self, step: int, world_tokens: float, world_samples: float) -> dict[str, float]:
        """Rates over the window (``world_*``: totals over all data-parallel ranks)."""
        now = time.perf_counter()
        dt = max(now - self.window_start, 1e-9)
        steps = max(step - self.window_step, 1)
        elapsed = now - self.t0
        done = max(step - self.start_step, 1)
        out = {
            "perf/tokens_per_sec": world_tokens / dt,
            "perf/samples_per_sec": world_samples / dt,
            "perf/step_time_s": dt / steps,
            "perf/data_wait_pct": 100.0 * self.data_wait / dt,
            "eta_s": elapsed / done * (self.total_steps - step),
        }
        self.window_start, self.window_step = now, step
        self.tokens = self.samples = 0
        self.data_wait = 0.0
        return out


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"
