"""The DeepSpeed config, DERIVED from ours (never hand-edited); ``deepspeed.extra`` is merged last."""

from __future__ import annotations

import copy

from launch.config import ExperimentConfig


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_deepspeed_config(cfg: ExperimentConfig, dp_size: int) -> dict:
    """DeepSpeed config dict for ``deepspeed.initialize(config=...)``.

    The optimizer and LR schedule are ours (passed to ``initialize``), so the dict holds batch
    sizes, ZeRO, precision and clipping only.
    """
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
    if t.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=0)
    if t.offload_optimizer:  # ZeRO-Offload with our torch AdamW (DeepSpeed refuses it unless told)
        from deepspeed.accelerator import get_accelerator

        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": get_accelerator().device_name() == "cuda"}
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * dp_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.bf16},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,  # our own log line replaces DeepSpeed's
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"tag_validation": "Warn"},
    }
    if t.offload_optimizer:
        ds["zero_force_ds_cpu_optimizer"] = False
    return _merge(ds, cfg.deepspeed.extra)
