"""The pretraining loop: DeepSpeed engine around model.build_model(cfg); step, eval, save, log.

Written for one device; DeepSpeed (ZeRO, data parallelism, clipping, accumulation) wraps it in
``build_engine`` and megatron-core's layers carry tensor parallelism.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time

import torch

from launch.config import ExperimentConfig
from launch.distributed import DistInfo, all_reduce_sum, barrier, data_parallel_group, seed_everything
from pretrain import checkpoint, faults, stopping
from pretrain.ds_config import to_deepspeed_config
from pretrain.metrics import Metrics, Throughput, TrainMonitor, format_eta

logger = logging.getLogger(__name__)


def lr_lambda(cfg: ExperimentConfig):
    """Multiplier of the peak lr at optimizer step ``s``: linear warm-up, then linear/cosine decay."""
    t = cfg.train
    floor = t.min_lr / t.lr

    def f(s: int) -> float:
        if t.warmup_steps and s < t.warmup_steps:
            return (s + 1) / t.warmup_steps
        if t.lr_decay == "constant":
            return 1.0
        span = max((t.lr_decay_steps or t.steps) - t.warmup_steps, 1)
        frac = min(max(s - t.warmup_steps, 0) / span, 1.0)
        shape = 1.0 - frac if t.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
        return floor + (1.0 - floor) * shape

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and 1-D scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _fused_adamw(model: torch.nn.Module) -> bool:
    """Whether torch's fused AdamW kernel serves every parameter's device (CPU and CUDA in torch >= 2.4):
    one kernel per step instead of a Python loop over tensors (5x quicker on CPU for a 8M-parameter model)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:
        return False
    return all(p.device.type in supported and p.dtype.is_floating_point for p in model.parameters())


def build_engine(cfg: ExperimentConfig, model: torch.nn.Module, dist_info: DistInfo):
    """Wrap ``model`` in a DeepSpeed engine with our AdamW and LR schedule (the one place DeepSpeed enters)."""
    import deepspeed

    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, fused=_fused_adamw(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    mpu = None
    if cfg.parallel.tensor_model_parallel_size > 1:
        from launch.mpu import MegatronMPU

        mpu = MegatronMPU()
    if t.zero_stage == 3 and getattr(model, "share_embeddings_and_output_weights", False):
        # The tied output projection reads the embedding's weight outside the embedding module.
        deepspeed.zero.register_external_parameter(model.output_layer, model.shared_embedding_or_output_weight())
    ds_config = to_deepspeed_config(cfg, dist_info.dp_size)
    if t.load_universal:  # DeepSpeed reads the universal layout only when its config says so
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu, config=ds_config)
    return engine, optimizer, scheduler


def _install_step_guard(engine, inner: torch.optim.Optimizer, skip) -> None:
    """Make the update of a step skippable on every ZeRO stage and precision.

    Every DeepSpeed wrapper (ZeRO 1-3, bf16, none) ends in ``inner.step()`` (our AdamW holding the fp32
    weights or partitions). When ``skip()`` says so, or a gradient reaching it is not finite, the guard
    returns without touching weights or Adam moments and marks the wrapper's ``overflow`` so DeepSpeed
    counts the step in ``engine.skipped_steps`` and leaves the LR schedule where it is (as it does for
    its own fp16/fp32 overflow skips).
    """
    orig = inner.step

    @functools.wraps(orig)  # keeps the LR scheduler's step-counting marks
    def guarded_step(*args, **kwargs):
        outer = engine.optimizer
        bad = skip() or _nonfinite_grads(inner)
        if bad:
            outer.overflow = True
            return None
        if outer is inner:
            inner.overflow = False
        return orig(*args, **kwargs)

    inner.step = guarded_step


def _nonfinite_grads(opt: torch.optim.Optimizer) -> bool:
    flags = [torch.isfinite(p.grad).all() for g in opt.param_groups for p in g["params"] if p.grad is not None]
    return bool(flags) and not bool(torch.stack(flags).all())


def _param_norm(engine, cfg: ExperimentConfig) -> float | None:
    """L2 norm of the weights (float64) as a cheap fingerprint of a checkpoint; None where the module
    does not hold the full weights on every rank (ZeRO-3, tensor parallelism)."""
    if cfg.train.zero_stage == 3 or cfg.parallel.tensor_model_parallel_size > 1:
        return None
    total = torch.zeros((), dtype=torch.float64)
    for p in engine.module.parameters():
        total += p.detach().double().pow(2).sum().cpu()
    return float(total.sqrt())


def check_checkpoint_compat(cfg: ExperimentConfig, dp_size: int, tp_size: int, marker: dict,
                            where: str) -> dict[str, tuple]:
    """Whether a run of ``cfg`` on ``dp_size`` x ``tp_size`` ranks can resume the checkpoint whose
    COMPLETE marker is ``marker``; returns the optimizer/schedule settings that changed (allowed) as
    ``{dotted key: (old, new)}``.

    Raises:
        ValueError: one line naming the model-shaping keys that differ (old and new values), or the
            data-parallel sizes when they differ without train.load_universal.
    """
    saved = marker.get("model_shape")
    mine = cfg.model_shape()
    if saved is not None:
        diff = [f"{k}={saved.get(k)!r} (now {mine.get(k)!r})" for k in sorted(set(saved) | set(mine))
                if saved.get(k) != mine.get(k)]
        if diff:
            raise ValueError(f"checkpoint {where} was trained with a different model shape: {'; '.join(diff)}; "
                             "restore these settings or use a new train.run_dir")
    elif marker.get("model_shape_hash") not in (None, cfg.model_shape_hash()):
        raise ValueError(f"checkpoint {where} was trained with a different model shape; "
                         "use a new train.run_dir or restore the model settings")
    t = cfg.train
    if t.load_universal and (tp_size > 1 or marker.get("tp_size", 1) > 1 or t.zero_stage not in (1, 2)
                             or marker.get("zero_stage", 1) not in (1, 2)):
        raise ValueError("train.load_universal works here without tensor parallelism and with ZeRO 1 or 2 "
                         f"(checkpoint {where}: tp {marker.get('tp_size', 1)}, ZeRO {marker.get('zero_stage')}; "
                         f"this run: tp {tp_size}, ZeRO {t.zero_stage})")
    dp = marker.get("dp_size", dp_size)
    if dp != dp_size and not t.load_universal:
        raise ValueError(f"checkpoint {where} was written with {dp} data-parallel ranks, this run has {dp_size}; "
                         "launch the same number of ranks, or resume through a universal checkpoint with "
                         "train.load_universal=true")
    old = marker.get("optimizer_settings") or {}
    return {k: (old[k], v) for k, v in cfg.optimizer_settings().items() if k in old and old[k] != v}


def data_resume_on_new_dp(cfg: ExperimentConfig, loader_state: dict, saved_dp: int, dp_size: int, tag: str) -> str:
    """How the data continues when a checkpoint of ``saved_dp`` data-parallel ranks resumes on ``dp_size``:
    ``exact`` (the global order, whose samples depend on the position alone) or ``approximate`` (a
    streamed order with data.resume=approximate: same epoch position, other samples).

    Raises:
        ValueError: a streamed order without data.resume=approximate (one line, with both ways out).
    """
    if cfg.data.order == "global" and loader_state.get("order") == "global":
        return "exact"
    if cfg.data.resume == "approximate":
        return "approximate"
    raise ValueError(f"checkpoint {tag} was written with {saved_dp} data-parallel ranks and a streamed data order "
                     f"(data.order={loader_state.get('order', 'stream')}), which depends on that number; this run "
                     f"has {dp_size}: set data.resume=approximate to continue at the same epoch position (other "
                     f"samples), or launch {saved_dp} data-parallel ranks")


class _RngUntouched:
    """Keep the global torch RNG out of data loading: a DataLoader draws a base seed from it whenever
    an iterator starts, which a resumed run does once more than an uninterrupted one. With this, only
    the model (dropout) consumes it, so the restored state continues the same sequence."""

    def __enter__(self):
        self.state = torch.get_rng_state()

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)
        return False


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _grad_norm(model: torch.nn.Module) -> float:
    """Global L2 norm of the (already data-parallel reduced) gradients, before clipping."""
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine, batch: dict):
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  tokentype_ids=batch["token_type_ids"], labels=batch["labels"])


class Trainer:
    """Runs ``cfg.train.steps`` optimizer steps, resuming from ``<run_dir>/checkpoints``."""

    def __init__(self, cfg: ExperimentConfig, dist_info: DistInfo) -> None:
        from data_pipeline.loader import read_manifest
        from model.bert import attention_modules, build_model

        self.cfg, self.dist = cfg, dist_info
        self.run_dir = cfg.train.run_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.manifest = read_manifest(cfg.data.data_dir)
        self.vocab_size = int(self.manifest["vocab_size"])
        if dist_info.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            cfg.dump(os.path.join(self.run_dir, "config.yaml"))
        self.model = build_model(cfg, self.vocab_size)
        checkpoint.prepare_module(self.model)  # state dicts that ds_to_universal can convert
        self.attention_classes = [type(m).__name__ for m in attention_modules(self.model)]
        # Dropout masks differ across data-parallel ranks, agree within a tensor-parallel group.
        torch.manual_seed(cfg.train.seed + 1000 * dist_info.dp_rank)
        self.engine, self.optimizer, self.scheduler = build_engine(cfg, self.model, dist_info)
        self.metrics = Metrics(self.run_dir, dist_info.is_main)
        self.monitor = TrainMonitor(cfg, self.model, dist_info, self.metrics)  # FLOPs, MFU, memory
        self.step = 0
        self.consumed_micro_batches = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self.loader = None
        self._loader_state: dict | None = None
        self._skip_update = False  # read by the step guard: the agreed "skip this update" of the current step
        _install_step_guard(self.engine, self.scheduler.optimizer, lambda: self._skip_update)
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None
        self._rolled_back_to: str | None = None

    # ---------------------------------------------------------------- state
    def client_state(self) -> dict:
        """Loop state saved in DeepSpeed's client_state (RNG states go to one file per rank)."""
        return {"step": self.step, "consumed_micro_batches": self.consumed_micro_batches,
                "consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens,
                "data_loader": self.loader.state_dict() if self.loader is not None else None,
                "model_shape": self.cfg.model_shape(), "model_shape_hash": self.cfg.model_shape_hash(),
                "optimizer_settings": self.cfg.optimizer_settings(), "dp_size": self.dist.dp_size,
                "world_size": self.dist.world_size, "attention": self.attention_classes,
                "universal_checkpoint_info": checkpoint.universal_checkpoint_info(),
                # the tokenizer fine-tuning and export check theirs against (pretrain/state_dict.py)
                "tokenizer_sha256": self.manifest.get("tokenizer", {}).get("sha256")}

    def checkpoint_meta(self) -> dict:
        """What the COMPLETE marker records: read before loading, to refuse a bad resume cheaply."""
        return {"model_shape": self.cfg.model_shape(), "model_shape_hash": self.cfg.model_shape_hash(),
                "optimizer_settings": self.cfg.optimizer_settings(), "dp_size": self.dist.dp_size,
                "tp_size": self.dist.tp_size, "zero_stage": self.cfg.train.zero_stage,
                "consumed_samples": self.consumed_samples, "consumed_micro_batches": self.consumed_micro_batches,
                "param_norm": _param_norm(self.engine, self.cfg)}

    def save_checkpoint(self) -> str | None:
        tag = checkpoint.save(self.engine, self.ckpt_dir, self.step, self.client_state(), self.cfg.train.keep_last,
                              self.dist.is_main, meta=self.checkpoint_meta(), rank=self.dist.rank,
                              world_size=self.dist.world_size)
        if tag is not None:
            self.last_checkpoint = tag
        return tag

    def check_resume(self, tag: str, marker: dict) -> None:
        """:func:`check_checkpoint_compat` for this run; logs changed optimizer or schedule settings."""
        changed = check_checkpoint_compat(self.cfg, self.dist.dp_size, self.dist.tp_size, marker,
                                          os.path.join(self.ckpt_dir, tag))
        if changed and self.dist.is_main:
            logger.warning("resuming with changed optimizer/schedule settings: %s",
                           ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self._changed_settings = changed

    def _apply_optimizer_settings(self) -> None:
        """Loading restores the checkpoint's lr, betas, eps and weight decay into the optimizer and the
        schedule's base lr; put this run's values back (only when they changed)."""
        changed = getattr(self, "_changed_settings", {})
        if not changed:
            return
        t = self.cfg.train
        inner = self.scheduler.optimizer
        for i, group in enumerate(inner.param_groups):
            group["betas"] = (t.adam_beta1, t.adam_beta2)
            group["eps"] = t.adam_eps
            if i == 0:  # param_groups(): decayed weights first, then biases and norms (no decay)
                group["weight_decay"] = t.weight_decay
        self.scheduler.base_lrs = [t.lr for _ in inner.param_groups]
        f = lr_lambda(self.cfg)
        for group in inner.param_groups:
            group["lr"] = t.lr * f(self.scheduler.last_epoch)
        self.scheduler._last_lr = [g["lr"] for g in inner.param_groups]

    def maybe_resume(self) -> None:
        """Load the newest complete checkpoint (model, optimizer, schedule, loop counters, data position,
        RNG states); refuse one from another model shape or data-parallel size (see check_resume)."""
        if not self.cfg.train.resume:
            return
        tag, marker = checkpoint.choose(self.ckpt_dir)
        if tag is None:
            return
        self.check_resume(tag, marker)
        universal = self.cfg.train.load_universal
        state = checkpoint.load(self.engine, self.ckpt_dir, tag, universal=universal)
        self.step = int(state.get("step", marker["step"]))
        self.consumed_micro_batches = int(state["consumed_micro_batches"])
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.consumed_tokens = int(state.get("consumed_tokens", 0))
        self._apply_optimizer_settings()
        saved_dp = int(marker.get("dp_size", self.dist.dp_size))
        same_world = (marker.get("world_size", self.dist.world_size) == self.dist.world_size
                      and saved_dp == self.dist.dp_size)
        loader_state = state.get("data_loader") or {}
        if saved_dp != self.dist.dp_size:
            self.consumed_micro_batches = self.consumed_samples // (self.dist.dp_size * self.cfg.train.micro_batch_size)
            how = data_resume_on_new_dp(self.cfg, loader_state, saved_dp, self.dist.dp_size, tag)
            self._loader_state = loader_state if how == "exact" else None
            if self.dist.is_main and how == "exact":
                logger.info("data-parallel size %d -> %d: the global data order continues exactly at "
                            "sample %d", saved_dp, self.dist.dp_size, self.consumed_samples)
            elif self.dist.is_main:
                logger.warning("data-parallel size %d -> %d: the data order continues approximately (same "
                               "epoch position, %d samples consumed, not the same remaining samples; "
                               "data.resume=approximate)", saved_dp, self.dist.dp_size, self.consumed_samples)
        else:
            self._loader_state = loader_state or None
        rng = checkpoint.load_rng(self.ckpt_dir, tag, self.dist.rank) if same_world else None
        if rng is not None:
            checkpoint.set_rng_state(rng)
        else:
            seed_everything(self.cfg.train.seed + 1000 * self.dist.dp_rank + self.step)
            if same_world:
                logger.warning("no RNG state for rank %d in %s: reseeded", self.dist.rank, tag)
        saved_norm, norm = marker.get("param_norm"), _param_norm(self.engine, self.cfg)
        if saved_norm is not None and norm is not None:
            if abs(norm - saved_norm) > 1e-5 * max(abs(saved_norm), 1e-12):
                raise ValueError(f"the weights loaded from {os.path.join(self.ckpt_dir, tag)} do not match the "
                                 f"checkpoint (parameter norm {norm:.8g}, saved {saved_norm:.8g}); the load is broken")
            if self.dist.is_main:
                logger.info("loaded weights match the checkpoint (parameter norm %.8g)", norm)
        self.resumed_from = self.last_checkpoint = tag
        logger.info("resuming at step %d (lr %.3g)%s", self.step, self.scheduler.get_last_lr()[0],
                    " through the universal checkpoint" if universal else "")

    def rollback(self) -> None:
        """nan_policy=rollback: reload the last complete checkpoint, keep the data position (the
        offending batches are skipped, not replayed).

        Raises:
            FloatingPointError: no checkpoint to go back to, or the same one a second time.
        """
        tag, marker = checkpoint.choose(self.ckpt_dir)
        if tag is None or tag == self._rolled_back_to:
            why = "no checkpoint to roll back to" if tag is None else f"already rolled back to {tag} once"
            raise FloatingPointError(f"{self.cfg.train.max_nan_skips} consecutive steps up to step {self.step} had "
                                     f"a non-finite loss or gradient norm and {why}; lower train.lr or check the data")
        checkpoint.load(self.engine, self.ckpt_dir, tag, universal=self.cfg.train.load_universal)
        self._apply_optimizer_settings()
        if self.dist.is_main:
            logger.warning("rolled back from step %d to checkpoint %s (step %d); the data goes on after the "
                           "offending batches", self.step, tag, marker["step"])
        self.step = int(marker["step"])
        self._rolled_back_to = tag

    # ---------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        from data_pipeline.loader import build_val_loader

        self.engine.eval()
        loader = build_val_loader(self.cfg, self.dist.dp_rank, self.dist.dp_size,
                                  self.cfg.train.micro_batch_size, self.cfg.train.eval_batches)
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, predicted tokens, correct
        counts = torch.zeros(self.vocab_size, dtype=torch.float64)  # histogram of masked labels
        for batch in loader:
            batch = _to_device(batch, self.dist.device)
            loss_sum, n, correct = _forward(self.engine, batch)
            sums += torch.tensor([loss_sum.item(), n.item(), correct.item()], dtype=torch.float64)
            labels = batch["labels"][batch["labels"] >= 0].cpu()
            counts += torch.bincount(labels, minlength=self.vocab_size)[: self.vocab_size].double()
        self.engine.train()
        sums = all_reduce_sum(sums, data_parallel_group())
        counts = all_reduce_sum(counts, data_parallel_group())
        n = max(sums[1].item(), 1.0)
        p = counts[counts > 0] / counts.sum().clamp(min=1)
        loss = sums[0].item() / n
        return {"val/loss": loss, "val/mlm_accuracy": sums[2].item() / n,
                "val/perplexity": math.exp(min(loss, 50.0)),
                "val/unigram_entropy": float(-(p * p.log()).sum()), "val/tokens": sums[1].item()}

    # ---------------------------------------------------------------- train
    def train(self) -> dict:
        """Train to ``train.steps`` (resuming first); stop early, saved and with exit status 0, on a stop
        request. Writes ``<run_dir>/status.json``: finished, preempted or failed."""
        t = self.cfg.train
        self.stop = stopping.StopRequest(self.run_dir, t.exit_after_minutes, check_file=self.dist.is_main)
        self.stop.install()
        try:
            self.monitor.start()  # MFU peak, hparams session, custom-scalars layout
            return self._train()
        except BaseException as e:
            if self.dist.is_main:
                checkpoint.write_status(self.run_dir, {
                    "state": "failed", "step": self.step, "error": _one_line(e),
                    "checkpoint": checkpoint.latest_complete(self.ckpt_dir, report=False)})
            raise
        finally:
            self.stop.uninstall()
            self.monitor.close()
            self.metrics.close()

    def _agree(self, bad: bool) -> tuple[int, bool]:
        """All ranks vote once per step (all_reduce MAX of a tiny tensor): returns (stop reason code, skip
        this update). The number of a signal any rank received travels along, for status.json."""
        import torch.distributed as dist

        flags = torch.tensor([float(self.stop.local_code()), float(self.stop.signal_number or 0),
                              1.0 if bad else 0.0], device=checkpoint.comm_device())
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self._stop_signal = int(flags[1].item())
        return int(flags[0].item()), bool(flags[2].item())

    def _restore_loader(self, loader, state: dict) -> None:
        """Continue the loader where the checkpoint left it; with data.resume=approximate a streamed
        order whose layout changed (workers, micro batch, order) continues at the same position instead."""
        from data_pipeline.errors import DataError

        approximate = self.cfg.data.resume == "approximate"
        if self.cfg.data.order == "global":
            loader.load_state_dict(state, approximate=approximate)  # exact whatever DP size or workers
            return
        try:
            loader.load_state_dict(state)  # refuses another layout (workers, micro batch, shards)
        except DataError as e:
            if not approximate:
                raise DataError(f"{e}; or set data.resume=approximate to continue at the same epoch position "
                                "(other samples)") from None
            if self.dist.is_main:
                logger.warning("data loader: %s; continuing approximately at micro batch %d "
                               "(data.resume=approximate)", e, self.consumed_micro_batches)

    def _train(self) -> dict:
        from data_pipeline.loader import build_train_loader
        from model.attention.base import set_seed, set_step

        cfg, t = self.cfg, self.cfg.train
        self.maybe_resume()
        set_seed(t.seed)
        loader = build_train_loader(cfg, self.dist.dp_rank, self.dist.dp_size, t.micro_batch_size,
                                    self.consumed_micro_batches)
        if self._loader_state:
            self._restore_loader(loader, self._loader_state)
        self.loader = loader
        it = iter(loader)
        thr = Throughput(self.step, t.steps)
        window = torch.zeros(3, dtype=torch.float64)
        final_eval: dict = {}
        nan_run: list[int] = []  # consecutive skipped steps
        logger.info("training steps %d..%d; %d micro batch(es) of %d per rank per step; %d data-parallel rank(s); "
                    "attention per layer %s", self.step, t.steps, t.gradient_accumulation_steps, t.micro_batch_size,
                    self.dist.dp_size, self.attention_classes)
        if self.dist.is_main:
            self.metrics.text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", self.step)
        stop_code = stopping.NONE
        while self.step < t.steps:
            grad_norm = None
            set_step(self.step)  # hashed attentions draw (seed, layer, head, step)-keyed randomness
            step_window = torch.zeros(3, dtype=torch.float64)
            nonfinite = False
            skipped_before = self.engine.skipped_steps
            for micro in range(t.gradient_accumulation_steps):
                t0 = time.perf_counter()
                with _RngUntouched():
                    batch = _to_device(next(it), self.dist.device)
                wait = time.perf_counter() - t0
                loss_sum, n, correct = _forward(self.engine, batch)
                loss_sum = faults.poison_loss(loss_sum, self.step + 1)
                values = torch.tensor([loss_sum.item(), n.item(), correct.item()], dtype=torch.float64)
                nonfinite |= not math.isfinite(values[0].item())
                self.engine.backward(loss_sum / n.clamp(min=1.0))
                if micro == t.gradient_accumulation_steps - 1:
                    if t.zero_stage == 0:
                        grad_norm = _grad_norm(self.engine.module)  # DeepSpeed keeps no norm without ZeRO
                        nonfinite |= not math.isfinite(grad_norm)
                    # one collective per step, before the update: stop requests and "skip this update"
                    stop_code, self._skip_update = self._agree(nonfinite)
                self.engine.step()
                step_window += values
                ntok = int(batch["attention_mask"].sum())
                thr.add(ntok, batch["input_ids"].shape[0], wait)
                self.consumed_micro_batches += 1
                self.consumed_samples += batch["input_ids"].shape[0] * self.dist.dp_size
            self._skip_update = False
            self.step += 1
            if self.engine.skipped_steps > skipped_before:  # ours (loss) or DeepSpeed's (gradient norm)
                nan_run.append(self.step)
                self.metrics.scalars(self.step, {"train/skipped_steps": self.engine.skipped_steps})
                if self.dist.is_main:
                    logger.warning("step %d skipped (no weight update): non-finite loss or gradient norm; %d in a "
                                   "row, %d in total", self.step, len(nan_run), self.engine.skipped_steps)
                if len(nan_run) >= t.max_nan_skips:
                    if t.nan_policy == "rollback":
                        self.rollback()
                        nan_run.clear()
                        window.zero_()
                        continue
                    raise FloatingPointError(
                        f"{len(nan_run)} consecutive steps ({nan_run[0]}..{nan_run[-1]}) had a non-finite loss or "
                        f"gradient norm and were skipped (train.max_nan_skips={t.max_nan_skips}); the last good "
                        f"checkpoint is {self.last_checkpoint or 'none'}: lower train.lr, check the data, or set "
                        "train.nan_policy=rollback")
            else:
                nan_run.clear()
                window += step_window
            if (self.step % t.log_every == 0 or self.step == t.steps) and window[1] > 0:
                self._log_train(window, thr, grad_norm)
                window.zero_()
            stopping_now = stop_code != stopping.NONE
            if not stopping_now and (self.step % t.eval_every == 0 or self.step == t.steps):
                with _RngUntouched():
                    final_eval = self.evaluate()
                self.metrics.scalars(self.step, {k: v for k, v in final_eval.items() if k != "val/tokens"})
                if self.dist.is_main:
                    logger.info("eval step %d: val loss %.4f (unigram entropy %.4f), mlm acc %.3f, ppl %.1f",
                                self.step, final_eval["val/loss"], final_eval["val/unigram_entropy"],
                                final_eval["val/mlm_accuracy"], final_eval["val/perplexity"])
            saved = None
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps or stopping_now:
                saved = self.save_checkpoint()
                if saved is None and self.step == t.steps and not stopping_now:
                    raise OSError(f"the final checkpoint at step {self.step} could not be saved (see the error "
                                  f"above); the last good one is {self.last_checkpoint or 'none'}")
            if stopping_now:
                return self._preempted(stop_code, saved)
        result = {"state": "finished", "step": self.step, "attention": self.attention_classes,
                  "consumed_samples": self.consumed_samples, "checkpoint": self.last_checkpoint, **final_eval}
        if self.dist.is_main:
            checkpoint.write_status(self.run_dir, result)
        barrier()
        return result

    def _preempted(self, stop_code: int, saved: str | None) -> dict:
        reason = stopping.REASONS[stop_code]
        if stop_code == stopping.SIGNAL and getattr(self, "_stop_signal", 0):
            reason = signal.Signals(self._stop_signal).name
        result = {"state": "preempted", "step": self.step, "reason": reason, "checkpoint": self.last_checkpoint,
                  "consumed_samples": self.consumed_samples}
        if saved is None:
            result["save_error"] = "the stop checkpoint could not be written; resume uses the one named here"
        if self.dist.is_main:
            if stop_code == stopping.STOP_FILE_CODE:
                self.stop.consume_stop_file()
            checkpoint.write_status(self.run_dir, result)
            logger.warning("stopped at step %d on a stop request (%s); checkpoint %s; status.json state preempted",
                           self.step, reason, self.last_checkpoint or "none")
        if self.stop.signal_time is not None:  # the rank that caught the signal
            logger.warning("rank %d: %s handled, checkpoint %s written %.1fs after the signal arrived", self.dist.rank,
                           self.stop.signal_name, self.last_checkpoint or "none", time.time() - self.stop.signal_time)
        barrier()
        return result

    def _log_train(self, window: torch.Tensor, thr: Throughput, grad_norm: float | None) -> None:
        t = self.cfg.train
        # [loss sum, predicted, correct, tokens, samples, analytic FLOPs (pretrain.compute.FLOP_FIELDS)]
        # summed over data-parallel ranks
        # ... and last, this rank's corrupt samples skipped by the loader (summed: the run's total)
        skipped = float(getattr(self.loader, "corrupt_samples_skipped", 0))
        red = all_reduce_sum([*window.tolist(), float(thr.tokens), float(thr.samples), *self.monitor.local_flops(),
                              skipped], data_parallel_group())
        n = max(red[1].item(), 1.0)
        start_step = thr.start_step
        perf = thr.report(self.step, red[3].item(), red[4].item())
        self.consumed_tokens += int(red[3].item())
        lr = self.scheduler.get_last_lr()[0]
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        loss = red[0].item() / n
        values = {"train/loss": loss, "train/mlm_accuracy": red[2].item() / n, "train/lr": lr,
                  "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "train/skipped_steps": getattr(self.engine, "skipped_steps", 0),
                  **{k: v for k, v in perf.items() if k.startswith("perf/")},
                  "data/tokens": self.consumed_tokens,
                  "data/epoch": self.loader.epoch if self.loader is not None else None,
                  "data/corrupt_samples_skipped": red[-1].item()}
        # compute/*, perf/tflops_per_device, perf/mfu, memory/peak_gb; data wait as the max over ranks
        values.update(self.monitor.window_values(self.step, red[5:-1].tolist(), perf, start_step))
        self.metrics.scalars(self.step, values)
        if self.dist.is_main:
            mfu = values.get("perf/mfu")
            logger.info("step %d/%d | loss %.4f | acc %.3f | lr %.3g | grad norm %s | %.0f tok/s | MFU %s | ETA %s",
                        self.step, t.steps, loss, values["train/mlm_accuracy"], lr,
                        f"{float(grad_norm):.3f}" if grad_norm is not None else "n/a",
                        perf["perf/tokens_per_sec"], f"{100 * mfu:.1f}%" if mfu is not None else "n/a",
                        format_eta(perf["eta_s"]))
