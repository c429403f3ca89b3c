"""TensorBoard scalars (rank 0 only) with the stable tag names of ARCHITECTURE.md, and the log line.

* :class:`Metrics`: the writer. Besides the scalars it writes the hparams plugin's session (variant,
  sizes, sequence length, ZeRO stage, ...) and a custom-scalars layout; every ``train/loss`` and
  ``val/loss`` is also written as ``loss_vs_gflops/{train,val}_loss`` whose STEP axis is the cumulative
  training compute in GFLOPs, so TensorBoard draws loss against FLOPs for several runs side by side.
* :class:`Throughput`: tokens, samples, step time, data wait and ETA over a logging window.
* :class:`TrainMonitor`: what the trainer adds per logging step: compute/* (pretrain.compute's
  analytic FLOPs of the batches trained on and of their softmax equivalent), perf/tflops_per_device and
  perf/mfu against the per-device peak, memory/peak_gb and perf/data_wait_pct as the maximum over ranks.

Units: compute/*_flops are FLOPs per optimizer step of the global batch (all data-parallel ranks,
forward + backward), averaged over the logging window; compute/cumulative_*pflops are PFLOPs since step
0; perf/tflops_per_device is the window's FLOPs / seconds / world size; perf/mfu a fraction (0..1);
memory/peak_gb GB (1e9 bytes), the peak since the previous logging step.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence

import torch

from pretrain.compute import FLOP_FIELDS, FlopsTracker, MemorySampler, device_peak_tflops, variant_name

logger = logging.getLogger(__name__)

LOSS_VS_FLOPS = {"train/loss": "loss_vs_gflops/train_loss", "val/loss": "loss_vs_gflops/val_loss"}

# The metrics the hparams plugin shows per run (values come from the run's own scalars).
HPARAM_METRICS = ("val/loss", "train/loss", "perf/tokens_per_sec", "perf/mfu", "compute/model_saved_pct",
                  "compute/attention_saved_pct", "compute/cumulative_saved_pflops", "memory/peak_gb")


def _exact(*tags: str) -> list[str]:
    """Custom-scalars tags are regular expressions: match these names exactly."""
    return ["^" + t.replace(".", r"\.") + "$" for t in tags]


CUSTOM_SCALARS_LAYOUT = {
    "Loss vs compute": {
        "loss vs cumulative training GFLOPs (x axis: GFLOPs)": [
            "Multiline", _exact(*LOSS_VS_FLOPS.values())],
        "validation loss vs step": ["Multiline", _exact("val/loss")],
    },
    "Compute saved vs softmax": {
        "saved % (attention blocks, whole model)": [
            "Multiline", _exact("compute/attention_saved_pct", "compute/model_saved_pct")],
        "cumulative saved PFLOPs": ["Multiline", _exact("compute/cumulative_saved_pflops")],
        "FLOPs per step: variant vs softmax": [
            "Multiline", _exact("compute/model_flops", "compute/softmax_model_flops",
                                "compute/attention_flops", "compute/softmax_attention_flops")],
    },
    "Throughput and memory": {
        "MFU": ["Multiline", _exact("perf/mfu")],
        "tokens/s": ["Multiline", _exact("perf/tokens_per_sec")],
        "peak memory (GB, max over ranks)": ["Multiline", _exact("memory/peak_gb")],
    },
}


class Metrics:
    """Writes scalars under ``<run_dir>/tb`` on rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: str, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.log_dir = os.path.join(run_dir, "tb")
        self.flops_axis: Callable[[], float] | None = None  # cumulative GFLOPs now (set by TrainMonitor)
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
        if self.flops_axis is not None:
            for tag, flops_tag in LOSS_VS_FLOPS.items():
                if values.get(tag) is not None:
                    self.writer.add_scalar(flops_tag, float(values[tag]), int(self.flops_axis()))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def hparams_start(self, hparams: dict, metric_tags: Sequence[str] = HPARAM_METRICS) -> None:
        """The hparams plugin's experiment and session start, in this run's own event file; the
        metric values are read by TensorBoard from the run's scalars of the same tags."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        # torch files bools as numbers (its int check comes first): write them as "true"/"false"
        clean = {k: (str(v).lower() if isinstance(v, bool) else v if isinstance(v, (int, float, str)) else str(v))
                 for k, v in hparams.items()}
        exp, ssi, _ = hparams_summary(clean, dict.fromkeys(metric_tags, 0.0))
        fw = self.writer._get_file_writer()
        fw.add_summary(exp)
        fw.add_summary(ssi)

    def hparams_end(self, status: str = "success") -> None:
        """The hparams session end: ``success``, ``failure``, ``running`` (anything else: unknown)."""
        if self.writer is None:
            return
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

        code = {"success": api_pb2.STATUS_SUCCESS, "failure": api_pb2.STATUS_FAILURE,
                "running": api_pb2.STATUS_RUNNING}.get(status, api_pb2.STATUS_UNKNOWN)
        content = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=time.time()),
            version=metadata.PLUGIN_DATA_VERSION)
        smd = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(
            plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()))
        self.writer._get_file_writer().add_summary(
            Summary(value=[Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=smd)]))

    def custom_scalars(self, layout: dict | None = None) -> None:
        if self.writer is not None:
            self.writer.add_custom_scalars(layout or CUSTOM_SCALARS_LAYOUT)

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
        """Rates over the window (``world_*``: totals over all data-parallel ranks). Keys other than
        perf/*: ``eta_s``, ``window_s`` (seconds) and ``window_steps`` of the window."""
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
            "window_s": dt,
            "window_steps": float(steps),
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


def _all_reduce_max(values: list[float]) -> list[float]:
    """Maximum over every rank of the world (a no-op without torch.distributed)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized():
        from pretrain.checkpoint import comm_device

        t = t.to(comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


class TrainMonitor:
    """Compute, MFU and memory of the training loop (every rank calls every method: some reduce).

    Usage in the trainer: ``start()`` before training, ``local_flops()`` appended to the per-window
    data-parallel sum, ``window_values(...)`` merged into the logged values, ``close()`` at the end.
    """

    def __init__(self, cfg, model: torch.nn.Module, dist_info, metrics: Metrics) -> None:
        self.cfg, self.dist, self.metrics = cfg, dist_info, metrics
        self.flops = FlopsTracker(cfg, int(getattr(model, "vocab_size", 0) or cfg.model.vocab_size or
                                           cfg.data.vocab_size))
        self._hook = self.flops.attach(model)
        self.memory = MemorySampler(dist_info.device)
        self.peak_tflops = 0.0
        self.peak_source = ""
        self._peak_logged = False
        metrics.flops_axis = lambda: self.flops.current_gflops(self.dist.dp_size)

    def hparams(self) -> dict:
        c, m, t = self.cfg, self.cfg.model, self.cfg.train
        return {
            "variant": variant_name(c), "attention": json.dumps(m.attention, sort_keys=True),
            "layer_attention": json.dumps(m.layer_attention or [], sort_keys=True),
            "num_layers": m.num_layers, "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
            "ffn_hidden_size": m.ffn_hidden_size or 4 * m.hidden_size, "seq_len": c.data.seq_len,
            "vocab_rows": self.flops.vocab_rows, "zero_stage": t.zero_stage, "bf16": t.bf16,
            "micro_batch_size": t.micro_batch_size, "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "global_batch": t.micro_batch_size * t.gradient_accumulation_steps * self.dist.dp_size,
            "dp_size": self.dist.dp_size, "tp_size": self.dist.tp_size, "lr": t.lr, "steps": t.steps,
            "experiment": c.name, "attention_params_saved_pct": self.flops.attention_params_saved_pct,
            "device": self.dist.device.type, "peak_tflops_per_device": self.peak_tflops,
        }

    def start(self) -> None:
        """Measure (or look up) the per-device peak once, agreed by all ranks (the maximum); write the
        hparams session and the custom-scalars layout."""
        dtype = torch.bfloat16 if self.cfg.train.bf16 else torch.float32
        peak, self.peak_source = device_peak_tflops(self.dist.device, dtype)
        self.peak_tflops = _all_reduce_max([peak])[0]
        if self.dist.is_main:
            logger.info("MFU peak: %.4g TFLOP/s per device (%s, %s; max over ranks)", self.peak_tflops,
                        self.peak_source, str(dtype).replace("torch.", ""))
            self.metrics.hparams_start(self.hparams())
            self.metrics.custom_scalars()
            self.metrics.text("mfu_peak", f"{self.peak_tflops:.4g} TFLOP/s per device: {self.peak_source}")

    def local_flops(self) -> list[float]:
        """This rank's FLOPs of the window (``FLOP_FIELDS``), to be summed over the data-parallel group."""
        return self.flops.local_window()

    def window_values(self, step: int, summed_flops: Sequence[float], perf: dict, start_step: int = 0) -> dict:
        """compute/*, perf/tflops_per_device, perf/mfu, memory/peak_gb and the world maximum of
        perf/data_wait_pct for the window that ends at ``step`` (collective: every rank calls it)."""
        mem, wait = _all_reduce_max([self.memory.window_peak_gb(), perf.get("perf/data_wait_pct", 0.0)])
        if start_step > 0 and not self.flops.restored and self.dist.is_main:
            self.flops.restore_from_events(self.metrics.log_dir, start_step)
        out = self.flops.window_values(summed_flops, int(perf.get("window_steps", 1)))
        model = float(summed_flops[FLOP_FIELDS.index("model")])
        tflops = model / max(perf.get("window_s", 0.0), 1e-9) / max(self.dist.world_size, 1) / 1e12
        out.update({"perf/tflops_per_device": tflops,
                    "perf/mfu": tflops / self.peak_tflops if self.peak_tflops > 0 else None,
                    "perf/data_wait_pct": wait, "memory/peak_gb": mem})
        if not self._peak_logged:
            out["perf/peak_tflops_per_device"] = self.peak_tflops
            self._peak_logged = True
        return out

    def close(self, run_dir: str | None = None) -> None:
        """Stop the memory sampler; end the hparams session with the state of ``status.json``
        (finished: success, failed: failure, preempted: running, as the run goes on after a resume).
        Never raises: it runs while the trainer unwinds."""
        self._hook.remove()
        self.memory.close()
        if not self.dist.is_main:
            return
        state = None
        try:
            with open(os.path.join(run_dir or os.path.dirname(self.metrics.log_dir), "status.json")) as f:
                state = json.load(f).get("state")
        except (OSError, ValueError, AttributeError):
            pass
        try:
            self.metrics.hparams_end({"finished": "success", "preempted": "running", "failed": "failure"}
                                     .get(state, "unknown"))
        except Exception:
            logger.warning("could not write the hparams session end", exc_info=True)
