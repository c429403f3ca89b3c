"""The pretraining loop: DeepSpeed engine around model.build_model(cfg); step, eval, save, log.

Written for one device; DeepSpeed (ZeRO, data parallelism, clipping, accumulation) wraps it in
``build_engine`` and megatron-core's layers carry tensor parallelism.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import torch

from launch.config import ExperimentConfig
from launch.distributed import DistInfo, all_reduce_sum, barrier, data_parallel_group
from pretrain import checkpoint
from pretrain.ds_config import to_deepspeed_config
from pretrain.metrics import Metrics, Throughput, format_eta

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
        span = max(t.steps - t.warmup_steps, 1)
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


def build_engine(cfg: ExperimentConfig, model: torch.nn.Module, dist_info: DistInfo):
    """Wrap ``model`` in a DeepSpeed engine with our AdamW and LR schedule (the one place DeepSpeed enters)."""
    import deepspeed

    t = cfg.train
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    mpu = None
    if cfg.parallel.tensor_model_parallel_size > 1:
        from launch.mpu import MegatronMPU

        mpu = MegatronMPU()
    if t.zero_stage == 3 and getattr(model, "share_embeddings_and_output_weights", False):
        # The tied output projection reads the embedding's weight outside the embedding module.
        deepspeed.zero.register_external_parameter(model.output_layer, model.shared_embedding_or_output_weight())
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=mpu,
        config=to_deepspeed_config(cfg, dist_info.dp_size))
    return engine, optimizer, scheduler


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
        self.attention_classes = [type(m).__name__ for m in attention_modules(self.model)]
        # Dropout masks differ across data-parallel ranks, agree within a tensor-parallel group.
        torch.manual_seed(cfg.train.seed + 1000 * dist_info.dp_rank)
        self.engine, self.optimizer, self.scheduler = build_engine(cfg, self.model, dist_info)
        self.metrics = Metrics(self.run_dir, dist_info.is_main)
        self.step = 0
        self.consumed_micro_batches = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0

    # ---------------------------------------------------------------- state
    def client_state(self) -> dict:
        return {"step": self.step, "consumed_micro_batches": self.consumed_micro_batches,
                "consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens,
                "model_shape_hash": self.cfg.model_shape_hash(), "dp_size": self.dist.dp_size}

    def maybe_resume(self) -> None:
        if not self.cfg.train.resume:
            return
        state = checkpoint.load(self.engine, self.ckpt_dir)
        if state is None:
            return
        if state.get("model_shape_hash") not in (None, self.cfg.model_shape_hash()):
            raise ValueError(f"checkpoint in {self.ckpt_dir} was trained with a different model shape; "
                             "use a new train.run_dir or restore the model settings")
        if state.get("dp_size", self.dist.dp_size) != self.dist.dp_size:
            raise ValueError(f"checkpoint was written with {state['dp_size']} data-parallel ranks, this run has "
                             f"{self.dist.dp_size}; launch the same number of ranks")
        self.step = int(state["step"])
        self.consumed_micro_batches = int(state["consumed_micro_batches"])
        self.consumed_samples = int(state.get("consumed_samples", 0))
        self.consumed_tokens = int(state.get("consumed_tokens", 0))
        logger.info("resuming at step %d (lr %.3g)", self.step, self.scheduler.get_last_lr()[0])

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
        from data_pipeline.loader import build_train_loader
        from model.attention.base import set_seed, set_step

        cfg, t = self.cfg, self.cfg.train
        self.maybe_resume()
        set_seed(t.seed)
        loader = build_train_loader(cfg, self.dist.dp_rank, self.dist.dp_size, t.micro_batch_size,
                                    self.consumed_micro_batches)
        it = iter(loader)
        thr = Throughput(self.step, t.steps)
        window = torch.zeros(3, dtype=torch.float64)
        final_eval: dict = {}
        logger.info("training steps %d..%d; %d micro batch(es) of %d per rank per step; %d data-parallel rank(s); "
                    "attention per layer %s", self.step, t.steps, t.gradient_accumulation_steps, t.micro_batch_size,
                    self.dist.dp_size, self.attention_classes)
        if self.dist.is_main:
            self.metrics.text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", self.step)
        while self.step < t.steps:
            grad_norm = None
            set_step(self.step)  # hashed attentions draw (seed, layer, head, step)-keyed randomness
            for _ in range(t.gradient_accumulation_steps):
                t0 = time.perf_counter()
                batch = _to_device(next(it), self.dist.device)
                wait = time.perf_counter() - t0
                loss_sum, n, correct = _forward(self.engine, batch)
                self.engine.backward(loss_sum / n.clamp(min=1.0))
                if t.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                    grad_norm = _grad_norm(self.engine.module)  # DeepSpeed keeps no norm without ZeRO
                self.engine.step()
                window += torch.tensor([loss_sum.item(), n.item(), correct.item()], dtype=torch.float64)
                ntok = int(batch["attention_mask"].sum())
                thr.add(ntok, batch["input_ids"].shape[0], wait)
                self.consumed_micro_batches += 1
                self.consumed_samples += batch["input_ids"].shape[0] * self.dist.dp_size
            self.step += 1
            if not math.isfinite(window[0].item()):
                raise FloatingPointError(f"non-finite loss at step {self.step}; lower train.lr or check the data")
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log_train(window, thr, grad_norm)
                window.zero_()
            if self.step % t.eval_every == 0 or self.step == t.steps:
                final_eval = self.evaluate()
                self.metrics.scalars(self.step, {k: v for k, v in final_eval.items() if k != "val/tokens"})
                if self.dist.is_main:
                    logger.info("eval step %d: val loss %.4f (unigram entropy %.4f), mlm acc %.3f, ppl %.1f",
                                self.step, final_eval["val/loss"], final_eval["val/unigram_entropy"],
                                final_eval["val/mlm_accuracy"], final_eval["val/perplexity"])
            if (t.save_every and self.step % t.save_every == 0) or self.step == t.steps:
                checkpoint.save(self.engine, self.ckpt_dir, self.step, self.client_state(), t.keep_last,
                                self.dist.is_main)
        result = {"state": "finished", "step": self.step, "attention": self.attention_classes, **final_eval}
        if self.dist.is_main:
            checkpoint._atomic_write(os.path.join(self.run_dir, "status.json"), json.dumps(result) + "\n")
        self.metrics.close()
        barrier()
        return result

    def _log_train(self, window: torch.Tensor, thr: Throughput, grad_norm: float | None) -> None:
        t = self.cfg.train
        # [loss sum, predicted, correct, tokens, samples] summed over data-parallel ranks
        red = all_reduce_sum([*window.tolist(), float(thr.tokens), float(thr.samples)], data_parallel_group())
        n = max(red[1].item(), 1.0)
        perf = thr.report(self.step, red[3].item(), red[4].item())
        self.consumed_tokens += int(red[3].item())
        lr = self.scheduler.get_last_lr()[0]
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        loss = red[0].item() / n
        values = {"train/loss": loss, "train/mlm_accuracy": red[2].item() / n, "train/lr": lr,
                  "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "train/skipped_steps": getattr(self.engine, "skipped_steps", 0),
                  **{k: v for k, v in perf.items() if k.startswith("perf/")}}
        self.metrics.scalars(self.step, values)
        if self.dist.is_main:
            logger.info("step %d/%d | loss %.4f | acc %.3f | lr %.3g | grad norm %s | %.0f tok/s | ETA %s",
                        self.step, t.steps, loss, values["train/mlm_accuracy"], lr,
                        f"{float(grad_norm):.3f}" if grad_norm is not None else "n/a",
                        perf["perf/tokens_per_sec"], format_eta(perf["eta_s"]))
