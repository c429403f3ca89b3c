"""What the training loop computes and what the hardware could: analytic FLOPs of the batches
actually trained on, the per-device peak for MFU, and the peak memory of this process.

* :class:`FlopsTracker` hooks the model's forward and records the shape of every training micro
  batch (sequences, PADDED length, predicted tokens). Every PyTorch attention path in this repository
  computes the padding (a key-padding mask, not variable-length packing), so FLOPs are counted on
  the padded length; the MLM head only at the predicted tokens, as model/bert.py runs it. The FLOPs
  are model/flops.py's (forward + backward, GEMMs plus its elementwise estimates), for the variant
  and for the same model with softmax attention everywhere.
* :func:`device_peak_tflops`: the per-device peak used for MFU. GPUs: a table of dense tensor-core
  peaks by device name (fp32 without TF32: the CUDA-core peak); CPU or an unknown GPU: a short GEMM
  probe at start-up. ``BERTFORGE_PEAK_TFLOPS`` (TFLOP/s per device) overrides both.
* :class:`MemorySampler`: peak memory of this rank since the last read; CUDA: max allocated; CPU:
  resident set size sampled by a background thread every ``interval`` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence

import torch

from model.attention.registry import layer_configs
from model.flops import model_flops, model_params

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PEAK_ENV = "BERTFORGE_PEAK_TFLOPS"

# Dense (no sparsity) peaks per device, TFLOP/s: (bf16/fp16 tensor cores, fp32 on CUDA cores).
# fp32 training with torch.backends.cuda.matmul.allow_tf32 uses TF32 tensor cores: half the bf16 peak.
# Matched against torch.cuda.get_device_name() upper-cased, first match wins (specific names first).
GPU_PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("GH200", 989.0, 67.0),
    ("H200", 989.0, 67.0),
    ("H100 PCIE", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),
    ("H800", 989.0, 67.0),
    ("A100", 312.0, 19.5),
    ("A800", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),
    ("L4", 121.0, 30.3),
    ("A10G", 70.0, 31.2),
    ("A10", 125.0, 31.2),
    ("V100", 125.0, 15.7),
]

# Order of the per-rank FLOPs vector that the trainer sums over the data-parallel group.
FLOP_FIELDS = ("attention", "softmax_attention", "model", "softmax_model")


def variant_name(cfg) -> str:
    """The attention of the model in one word: the variant's name, or ``hybrid(a,b,...)`` per layer."""
    m = cfg.model
    names = [c.name for c in layer_configs(m.attention, m.layer_attention or [], m.num_layers)]
    if len(set(names)) == 1:
        return names[0]
    return "hybrid(" + ",".join(names) + ")"


class FlopsTracker:
    """Analytic FLOPs of the training micro batches seen by a forward pre-hook.

    Args:
        cfg: the ExperimentConfig (model.* shapes and attention).
        vocab_rows: rows of the output embedding, all tensor-parallel shards together (padded vocab).
    """

    def __init__(self, cfg, vocab_rows: int) -> None:
        self.cfg, self.vocab_rows = cfg, int(vocab_rows)
        self._window: dict[tuple[int, int], list] = {}  # (batch, padded len) -> [micro batches, predicted]
        self.cumulative = dict.fromkeys(FLOP_FIELDS, 0.0)  # world FLOPs since step 0 (rank 0 logs them)
        p = model_params(cfg, self.vocab_rows)
        self.attention_params_saved_pct = 100.0 * (1.0 - p["attention"] / p["softmax_attention"])
        self.restored = False

    def attach(self, model: torch.nn.Module):
        """Count every forward of ``model`` in training mode; returns the hook handle."""
        return model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        if not module.training:
            return None  # evaluation passes are not training compute
        ids = kwargs.get("input_ids", args[0] if args else None)
        labels = kwargs.get("labels", args[3] if len(args) > 3 else None)
        if ids is None or labels is None:
            return None
        predicted = (labels != IGNORE_INDEX).sum()  # a device tensor: read once per window, no sync here
        self.observe(ids.shape[0], ids.shape[-1], predicted)
        return None

    def observe(self, batch: int, seq_len: int, predicted) -> None:
        """One micro batch of ``batch`` sequences padded to ``seq_len`` with ``predicted`` MLM targets."""
        slot = self._window.setdefault((int(batch), int(seq_len)), [0, 0])
        slot[0] += 1
        slot[1] = slot[1] + predicted

    @property
    def pending(self) -> bool:
        return bool(self._window)

    def local_window(self, reset: bool = True) -> list[float]:
        """FLOPs (``FLOP_FIELDS``) of this rank's micro batches since the last call.

        model/flops.py is linear in the batch and in the predicted tokens, so the micro batches of one
        shape are counted as one batch of their summed sizes.
        """
        out = dict.fromkeys(FLOP_FIELDS, 0.0)
        for (b, s), (count, predicted) in self._window.items():
            f = model_flops(self.cfg, b * count, s, int(predicted), self.vocab_rows)
            out["attention"] += f["attention_total"]
            out["softmax_attention"] += f["softmax_attention_total"]
            out["model"] += f["total"]
            out["softmax_model"] += f["softmax_total"]
        if reset:
            self._window = {}
        return [out[k] for k in FLOP_FIELDS]

    def window_values(self, summed: Sequence[float], steps: int) -> dict[str, float]:
        """compute/* tags from the world FLOPs of a logging window of ``steps`` optimizer steps
        (``summed``: ``local_window`` summed over the data-parallel group). Adds them to the totals."""
        w = dict(zip(FLOP_FIELDS, (float(x) for x in summed)))
        for k in FLOP_FIELDS:
            self.cumulative[k] += w[k]
        steps = max(int(steps), 1)
        c = self.cumulative
        return {
            "compute/attention_flops": w["attention"] / steps,
            "compute/softmax_attention_flops": w["softmax_attention"] / steps,
            "compute/attention_saved_pct": _saved_pct(w["attention"], w["softmax_attention"]),
            "compute/model_flops": w["model"] / steps,
            "compute/softmax_model_flops": w["softmax_model"] / steps,
            "compute/model_saved_pct": _saved_pct(w["model"], w["softmax_model"]),
            "compute/cumulative_pflops": c["model"] / 1e15,
            "compute/cumulative_saved_pflops": (c["softmax_model"] - c["model"]) / 1e15,
            "compute/attention_params_saved_pct": self.attention_params_saved_pct,
        }

    def restore_from_events(self, log_dir: str, step: int) -> bool:
        """After a resume at ``step``: continue the cumulative totals from the event files of the
        earlier launches (their last values at or before ``step``). Returns whether any were found."""
        from pretrain.report import read_scalars

        self.restored = True
        try:
            s = read_scalars(log_dir, ("compute/cumulative_pflops", "compute/cumulative_saved_pflops"))
        except Exception:  # a missing or unreadable directory: start the totals at zero
            logger.warning("could not read %s to continue the cumulative FLOPs; they restart at 0", log_dir,
                           exc_info=True)
            return False
        total = [v for st, v in s.get("compute/cumulative_pflops", []) if st <= step]
        saved = [v for st, v in s.get("compute/cumulative_saved_pflops", []) if st <= step]
        if not total:
            return False
        self.cumulative["model"] += total[-1] * 1e15
        self.cumulative["softmax_model"] += (total[-1] + (saved[-1] if saved else 0.0)) * 1e15
        return True

    def current_gflops(self, dp_size: int = 1) -> float:
        """Cumulative world training GFLOPs now: the logged totals plus this rank's pending micro
        batches times the data-parallel size (an estimate between two logging steps)."""
        pending = self.local_window(reset=False)[FLOP_FIELDS.index("model")] * dp_size if self._window else 0.0
        return (self.cumulative["model"] + pending) / 1e9


def _saved_pct(actual: float, softmax: float) -> float:
    return 100.0 * (1.0 - actual / softmax) if softmax > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# Peak FLOP/s per device
# ------------------------------------------------------------------------------------------------


def table_peak_tflops(device_name: str, dtype: torch.dtype, allow_tf32: bool = False) -> float | None:
    """Dense peak of a known GPU for ``dtype`` (TFLOP/s), or None for a device not in the table."""
    name = device_name.upper()
    for key, half, fp32 in GPU_PEAK_TFLOPS:
        if key in name:
            if dtype in (torch.bfloat16, torch.float16):
                return half
            return half / 2 if allow_tf32 else fp32
    return None


def gemm_probe_tflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024,
                      seconds: float = 0.3, chunks: int = 5) -> float:
    """Achieved TFLOP/s of an ``n x n`` GEMM on ``device``: the best of ``chunks`` timed chunks of
    about ``seconds / chunks`` each (the best, not the mean: a shared machine only slows chunks down)."""
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b, out=c)  # warm-up: allocations, kernel selection, thread pool start
    sync()
    best = 0.0
    per_chunk = seconds / max(chunks, 1)
    for _ in range(max(chunks, 1)):
        reps = 0
        t0 = time.perf_counter()
        while True:
            torch.mm(a, b, out=c)
            reps += 1
            if reps % 4 == 0 or device.type != "cuda":
                sync()
                dt = time.perf_counter() - t0
                if dt >= per_chunk:
                    break
        best = max(best, 2.0 * n ** 3 * reps / dt / 1e12)
    return best


def device_peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak TFLOP/s of one device for ``dtype``, where the number comes from)."""
    env = os.environ.get(PEAK_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={env!r} must be a number (TFLOP/s per device)") from None
        if value <= 0:
            raise ValueError(f"{PEAK_ENV}={env!r} must be positive")
        return value, f"${PEAK_ENV}"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        value = table_peak_tflops(name, dtype, torch.backends.cuda.matmul.allow_tf32)
        if value is not None:
            return value, f"table: {name} {str(dtype).replace('torch.', '')}"
        return gemm_probe_tflops(device, dtype, n=4096), f"GEMM probe on {name} (not in the table)"
    return gemm_probe_tflops(device, dtype), f"GEMM probe on {device.type} ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; elsewhere the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class MemorySampler:
    """Peak memory of this rank between two reads (:meth:`window_peak_gb`), in GB (1e9 bytes)."""

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.interval = interval
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.cuda:
            self._peak = rss_bytes()
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        if self.cuda:
            return
        now = rss_bytes()
        with self._lock:
            if now > self._peak:
                self._peak = now

    def window_peak_gb(self) -> float:
        """Peak since the previous call (CUDA: max allocated; CPU: sampled RSS); starts a new window."""
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak / 1e9
        self.sample()
        with self._lock:
            peak, self._peak = self._peak, rss_bytes()
        return peak / 1e9

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
