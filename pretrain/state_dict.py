"""Pretraining checkpoints of any ZeRO stage -> one fp32 state dict -> a single-process BertMLM.

    ck = find_checkpoint("runs/demo")            # run dir, its checkpoints/ or checkpoints/global_stepN
    sd = fp32_state_dict(ck)                     # {name: fp32 tensor}, ZeRO partitions gathered
    model = load_model(ck)                       # BertMLM (megatron parallel_state must be up:
                                                 # init_single_process() makes a world of one)

ZeRO 1-3 checkpoints hold the fp32 master weights partitioned over the data-parallel ranks; they are
gathered with DeepSpeed's ``zero_to_fp32`` (the trainer writes ``latest`` and keeps DeepSpeed's layout
for exactly this). A stage-0 checkpoint has no partitions: its module weights are used (upcast).
Tensor-parallel checkpoints (several ``mp_rank_XX``) are refused with a message.

The tokenizer a checkpoint was pretrained with is identified by its sha256: the trainer stores it in
``client_state["tokenizer_sha256"]``; older checkpoints fall back to the manifest of the run's data dir.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field

import torch

from launch.config import ConfigError, ExperimentConfig, load_config
from pretrain.checkpoint import describe_incomplete, latest_complete, list_tags

logger = logging.getLogger(__name__)

_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message is one line that says what to do."""


@dataclass
class Checkpoint:
    """One complete pretraining checkpoint and what is known about it."""

    run_dir: str
    """The run directory (holds config.yaml and checkpoints/)."""
    ckpt_dir: str
    """``<run_dir>/checkpoints``."""
    tag: str
    """``global_stepN``."""
    cfg: ExperimentConfig
    """The run's resolved config (``<run_dir>/config.yaml``)."""
    client_state: dict = field(default_factory=dict)
    """What the trainer saved beside the weights (step, tokenizer hash, ...)."""
    zero_stage: int = 0
    """ZeRO stage the checkpoint was written with."""

    @property
    def path(self) -> str:
        return os.path.join(self.ckpt_dir, self.tag)

    @property
    def step(self) -> int:
        return int(self.client_state.get("step", _TAG.match(self.tag).group(1)))

    @property
    def tokenizer_sha256(self) -> str | None:
        """sha256 of the tokenizer model the checkpoint was pretrained with (None if unknown)."""
        sha = self.client_state.get("tokenizer_sha256")
        if sha:
            return sha
        manifest = os.path.join(self.cfg.data.data_dir, "manifest.json")
        try:
            with open(manifest) as f:
                return json.load(f)["tokenizer"]["sha256"]
        except (OSError, KeyError, ValueError):
            return None

    def describe(self) -> str:
        return f"{self.path} (step {self.step}, ZeRO-{self.zero_stage})"


def locate_run(path: str) -> tuple[str, str, str | None]:
    """``(run_dir, ckpt_dir, tag or None)`` of a run dir, its ``checkpoints/`` or ``checkpoints/global_stepN``.

    Raises:
        CheckpointError: the path does not exist or holds no config.yaml.
    """
    path = os.path.abspath(path.rstrip("/"))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist; pass a pretraining run directory (train.run_dir)")
    tag = None
    if _TAG.match(os.path.basename(path)):
        tag, path = os.path.basename(path), os.path.dirname(path)
    if os.path.basename(path) == "checkpoints":
        run_dir, ckpt_dir = os.path.dirname(path), path
    else:
        run_dir, ckpt_dir = path, os.path.join(path, "checkpoints")
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise CheckpointError(f"{run_dir} is not a bertforge run directory (no config.yaml); pass the train.run_dir "
                              "of a pretraining run")
    return run_dir, ckpt_dir, tag


def run_config(run_dir: str) -> ExperimentConfig:
    """The resolved config a run was trained with (``<run_dir>/config.yaml``)."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    try:
        return load_config(cfg_path)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def find_checkpoint(path: str, tag: str | None = None) -> Checkpoint:
    """Resolve ``path`` (a run dir, its ``checkpoints/``, or ``checkpoints/global_stepN``) to a complete
    checkpoint: ``tag`` if given, else the newest one with a completion marker.

    Raises:
        CheckpointError: no such run, no config.yaml, no complete checkpoint, tensor-parallel shards.
    """
    run_dir, ckpt_dir, path_tag = locate_run(path)
    tag = tag or path_tag
    cfg = run_config(run_dir)
    if tag:
        if not os.path.isdir(os.path.join(ckpt_dir, tag)):
            raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} does not exist; leave the tag out to "
                                  "take the newest complete one")
        if tag not in [name for _, name in list_tags(ckpt_dir)[0]]:
            raise CheckpointError(f"checkpoint {os.path.join(ckpt_dir, tag)} is incomplete "
                                  f"({describe_incomplete(ckpt_dir, tag)}); leave the tag out to take the newest "
                                  "complete one")
    else:
        tag = latest_complete(ckpt_dir)
        if tag is None:
            raise CheckpointError(f"no complete checkpoint in {ckpt_dir}; train the run until it saves one "
                                  "(train.save_every or the final step)")
    ck = Checkpoint(run_dir=run_dir, ckpt_dir=ckpt_dir, tag=tag, cfg=cfg)
    files = sorted(os.listdir(ck.path))
    if any(re.search(r"mp_rank_(?!00)\d+", f) for f in files) or cfg.parallel.tensor_model_parallel_size > 1:
        raise CheckpointError(f"{ck.path} was written with tensor parallelism "
                              f"(parallel.tensor_model_parallel_size={cfg.parallel.tensor_model_parallel_size}); "
                              "merging tensor-parallel shards is not supported, pretrain with TP=1 or convert "
                              "it with DeepSpeed's ds_to_universal first")
    states = "mp_rank_00_model_states.pt"
    if states not in files:
        states = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if states not in files:
        raise CheckpointError(f"{ck.path} holds no DeepSpeed model states file (*mp_rank_00_model_states.pt)")
    meta = torch.load(os.path.join(ck.path, states), map_location="cpu", weights_only=False, mmap=True)
    ck.client_state = {k: v for k, v in meta.items()
                       if k in ("step", "consumed_samples", "consumed_tokens", "model_shape_hash", "dp_size",
                                "tokenizer_sha256", "global_steps")}
    ck.zero_stage = int(((meta.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", cfg.train.zero_stage))
    del meta
    return ck


def fp32_state_dict(ck: Checkpoint) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict, ZeRO partitions gathered (keys as in ``BertMLM.state_dict()``,
    without ``_extra_state`` entries; the tied output weight is the embedding's and is not listed)."""
    has_partitions = bool(glob.glob(os.path.join(ck.path, "*_optim_states.pt")))
    sd: dict[str, torch.Tensor] | None = None
    if has_partitions and ck.zero_stage >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):  # it prints, and tqdm bars
            sd = get_fp32_state_dict_from_zero_checkpoint(ck.ckpt_dir, tag=ck.tag)
        for line in out.getvalue().splitlines():
            logger.debug("zero_to_fp32: %s", line)
    if sd is None:
        if ck.zero_stage == 3:
            raise CheckpointError(f"{ck.path} is a ZeRO-3 checkpoint without its *_optim_states.pt partitions; "
                                  "copy the whole global_step folder")
        meta = torch.load(os.path.join(ck.path, "mp_rank_00_model_states.pt"), map_location="cpu",
                          weights_only=False)
        module = meta["module"]
        if any(v.dtype != torch.float32 for v in module.values() if torch.is_tensor(v) and v.is_floating_point()):
            logger.warning("%s holds no fp32 master weights (stage-0 %s); using its module weights upcast to fp32",
                           ck.path, "bf16" if ck.cfg.train.bf16 else "checkpoint")
        sd = module
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v
            for k, v in sd.items() if torch.is_tensor(v) and not k.endswith("._extra_state")}


def vocab_rows(sd: dict[str, torch.Tensor]) -> int:
    """Rows of the (padded) word embedding of a BertMLM state dict."""
    return int(sd["embedding.word_embeddings.weight"].shape[0])


def init_single_process(seed: int = 0):
    """This process's place in the world, starting one if needed, with megatron's parallel_state up.

    Under a launcher (RANK/WORLD_SIZE set) this is ``launch.distributed.init_distributed``. Otherwise a
    gloo world of one is started with torch.distributed alone: evaluation and export need no DeepSpeed
    communication (whose start may JIT-build its CPU shared-memory op, tens of seconds).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from launch.distributed import DistInfo, _free_port, init_distributed, seed_everything

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" in os.environ or (dist.is_initialized() and dist.get_world_size() > 1):
        return init_distributed(1, seed)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    seed_everything(seed)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return DistInfo(rank=0, world_size=1, local_rank=0, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1, device=device)


def build_from_state_dict(cfg: ExperimentConfig, sd: dict[str, torch.Tensor] | None, vocab_size: int):
    """A BertMLM of ``cfg`` with the weights of ``sd`` (None: keep the random initialisation).

    Raises:
        CheckpointError: the state dict does not fit the model of ``cfg`` (names or shapes).
    """
    from model.bert import build_model

    model = build_model(cfg, vocab_size)
    if sd is None:
        return model
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("._extra_state")}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"shape of {k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}")
        raise CheckpointError("checkpoint weights do not fit the model of its config.yaml (" + "; ".join(parts) +
                              "); was config.yaml edited after training?")
    model.load_state_dict(sd, strict=False)
    return model


def load_model(ck: Checkpoint, device: torch.device | str = "cpu", sd: dict[str, torch.Tensor] | None = None):
    """The checkpoint's BertMLM in this process, fp32, eval mode (megatron parallel_state must be up)."""
    sd = fp32_state_dict(ck) if sd is None else sd
    model = build_from_state_dict(ck.cfg, sd, vocab_rows(sd))
    return model.to(device).eval()


def check_tokenizer(ck: Checkpoint, sha256: str | None, what: str) -> None:
    """Refuse a tokenizer (``what``: where it came from) other than the one ``ck`` was pretrained with.

    Raises:
        CheckpointError: one line naming both hashes.
    """
    expected = ck.tokenizer_sha256
    if expected is None:
        logger.warning("cannot tell which tokenizer %s was pretrained with (no tokenizer hash); trusting %s",
                       ck.path, what)
        return
    if sha256 != expected:
        raise CheckpointError(f"{what} (sha256 {str(sha256)[:12]}) is not the tokenizer checkpoint {ck.path} was "
                              f"pretrained with (sha256 {expected[:12]}); use the run's tokenizer "
                              f"({os.path.join(ck.cfg.data.data_dir, 'tokenizer.model')}) or a checkpoint "
                              "pretrained with this one")
