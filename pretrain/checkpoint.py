"""DeepSpeed checkpoints that a crash, a kill or a full disk cannot corrupt.

Layout: ``<run_dir>/checkpoints/global_step<N>/`` as DeepSpeed writes it, plus one
``rng_state_rank<R>.pt`` per rank and ``COMPLETE``. ``COMPLETE`` is written by rank 0 only after
every rank reported its files written (an all_reduce of a failure flag, so a rank whose write failed
says so instead of hanging the others); it is JSON holding the step, the file list with sizes (checked
again on resume) and the run's metadata (model shape, optimizer settings, data-parallel size). DeepSpeed's
``latest`` file is written by us, atomically, only after the marker (``save_checkpoint(...,
save_latest=False)``), so ``zero_to_fp32`` and ``ds_to_universal`` keep working.

Resume takes the newest complete tag; incomplete or damaged ones are reported and ignored. A save
that fails (disk full, permission) is reported on every rank, its partial directory is removed and
``latest`` keeps pointing at the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from launch.distributed import barrier
from pretrain import faults

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
UNIVERSAL_SUFFIX = "_universal"
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be loaded or converted; the message is one line."""


def tag_of(step: int) -> str:
    return f"global_step{step}"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_status(run_dir: str, status: dict) -> None:
    """``<run_dir>/status.json`` (atomically): what a batch script reads to decide on a requeue."""
    os.makedirs(run_dir, exist_ok=True)
    _atomic_write(os.path.join(run_dir, "status.json"), json.dumps(status, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# Finding checkpoints
# --------------------------------------------------------------------------------------------


def read_marker(ckpt_dir: str, tag: str) -> dict | None:
    """The JSON in ``<tag>/COMPLETE``, or None when there is no (readable) marker."""
    try:
        with open(os.path.join(ckpt_dir, tag, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _damage(ckpt_dir: str, tag: str, marker: dict) -> str | None:
    """Why a marked checkpoint is unusable (a listed file missing or resized), or None."""
    for name, size in (marker.get("files") or {}).items():
        path = os.path.join(ckpt_dir, tag, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, {size} were written"
    return None


def list_tags(ckpt_dir: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(complete tags sorted by step, incomplete tag names) in ``ckpt_dir``.

    Complete means: a readable ``COMPLETE`` marker and every file it lists present with its size.
    """
    complete, incomplete = [], []
    if not os.path.isdir(ckpt_dir):
        return complete, incomplete
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        if not m or not os.path.isdir(os.path.join(ckpt_dir, name)):
            continue
        marker = read_marker(ckpt_dir, name)
        if marker is not None and _damage(ckpt_dir, name, marker) is None:
            complete.append((int(m.group(1)), name))
        else:
            incomplete.append(name)
    return sorted(complete), sorted(incomplete, key=lambda n: int(_TAG.match(n).group(1)))


def describe_incomplete(ckpt_dir: str, tag: str) -> str:
    marker = read_marker(ckpt_dir, tag)
    if marker is None:
        return f"no {MARKER} marker: the save was interrupted or failed"
    return f"damaged after it was saved: {_damage(ckpt_dir, tag, marker)}"


def latest_complete(ckpt_dir: str, report: bool = True) -> str | None:
    """Newest complete tag; incomplete ones (a save that was killed or failed) are reported and ignored."""
    complete, incomplete = list_tags(ckpt_dir)
    if report:
        for name in incomplete:
            logger.warning("ignoring incomplete checkpoint %s (%s)", os.path.join(ckpt_dir, name),
                           describe_incomplete(ckpt_dir, name))
    return complete[-1][1] if complete else None


def choose(ckpt_dir: str) -> tuple[str | None, dict | None]:
    """(tag, marker) of the checkpoint to resume from, decided by rank 0 and shared with every rank."""
    import torch.distributed as dist

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    chosen: list = [None, None]
    if rank0:
        tag = latest_complete(ckpt_dir)
        chosen = [tag, read_marker(ckpt_dir, tag) if tag else None]
    if dist.is_initialized():
        dist.broadcast_object_list(chosen, src=0)
    return chosen[0], chosen[1]


# --------------------------------------------------------------------------------------------
# Model state dict: what ds_to_universal can read
# --------------------------------------------------------------------------------------------


def universal_checkpoint_info() -> dict:
    """The ``universal_checkpoint_info`` client_state entry ds_to_universal requires (no tensor-parallel
    merge patterns: the universal path is used without tensor parallelism, see Trainer.check_resume)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}


def _drop_empty_extra_state(module, state_dict, prefix, local_metadata) -> None:
    key = prefix + "_extra_state"
    if key in state_dict and state_dict[key] is None:
        del state_dict[key]


def _supply_empty_extra_state(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
    state_dict.setdefault(prefix + "_extra_state", None)


def prepare_module(model: torch.nn.Module) -> None:
    """Leave megatron-core's empty ``<layer>._extra_state = None`` entries (placeholders for Transformer
    Engine state) out of saved state dicts, and put them back when loading (strict loads expect them).

    ds_to_universal converts every module-state entry with ``tensor.float()`` and dies on them
    (``'NoneType' object has no attribute 'float'``); a real (non-None) extra state is kept as is.
    """
    for module in model.modules():
        if type(module).get_extra_state is not torch.nn.Module.get_extra_state:
            module.register_state_dict_post_hook(_drop_empty_extra_state)
            module.register_load_state_dict_pre_hook(_supply_empty_extra_state)


# --------------------------------------------------------------------------------------------
# RNG states (per rank: dropout masks differ across data-parallel ranks)
# --------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Python, numpy and torch RNG states (plus CUDA and megatron's CUDA tracker on CUDA)."""
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
        from megatron.core import tensor_parallel

        state["megatron_cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
        from megatron.core import tensor_parallel

        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_cuda_tracker"])


def rng_file(ckpt_dir: str, tag: str, rank: int) -> str:
    return os.path.join(ckpt_dir, tag, f"rng_state_rank{rank:05d}.pt")


def load_rng(ckpt_dir: str, tag: str, rank: int) -> dict | None:
    path = rng_file(ckpt_dir, tag, rank)
    if not os.path.isfile(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


class _WriteGuard:
    """Wraps the engine's checkpoint writes so an I/O error is recorded instead of raised.

    A rank whose write raises would skip DeepSpeed's later barrier and hang the others; recorded, the
    error travels through :func:`_any_rank` and every rank learns the save failed.
    """

    def __init__(self, engine) -> None:
        self.errors: list[str] = []
        self.step = 0
        ce = engine.checkpoint_engine
        self._save, self._makedirs = ce.save, ce.makedirs
        ce.save, ce.makedirs = self.save, self.makedirs
        copy = getattr(engine, "_copy_recovery_script", None)
        if copy is not None:
            engine._copy_recovery_script = lambda path: self.guard(copy, path, what=f"copy recovery scripts to {path}")

    def guard(self, fn, *args, what: str, **kwargs):
        if self.errors:  # the first failure decides; later writes of this save are pointless
            return None
        try:
            return fn(*args, **kwargs)
        except OSError as e:
            self.errors.append(f"{what}: {e}")
            return None

    def save(self, state_dict, path: str):
        def write():
            data = None
            if faults.active("kill_in_save", self.step):
                buf = io.BytesIO()
                torch.save(state_dict, buf)
                data = buf.getvalue()
            faults.before_checkpoint_write(path, self.step, data)
            return self._save(state_dict, path)

        return self.guard(write, what=f"write {path}")

    def makedirs(self, path, exist_ok=False):
        return self.guard(self._makedirs, path, exist_ok=exist_ok, what=f"create {path}")

    def write_tensor_file(self, obj, path: str) -> None:
        def write():
            faults.before_checkpoint_write(path, self.step)
            torch.save(obj, path)

        self.guard(write, what=f"write {path}")


def _guard(engine) -> _WriteGuard:
    guard = getattr(engine, "_bertforge_write_guard", None)
    if guard is None:
        guard = _WriteGuard(engine)
        engine._bertforge_write_guard = guard
    return guard


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (all_reduce MAX)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _discard(ckpt_dir: str, tag: str) -> None:
    """Remove a tag directory: marker first, so a crash half-way leaves an incomplete checkpoint."""
    path = os.path.join(ckpt_dir, tag)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, MARKER))
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path + UNIVERSAL_SUFFIX, ignore_errors=True)


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int, is_main: bool,
         meta: dict | None = None, rank: int = 0, world_size: int = 1) -> str | None:
    """Save on every rank (all must call it); mark complete, point ``latest`` at it, prune to ``keep_last``.

    Returns the tag, or None when the save failed on some rank: then the error is logged on every
    rank, the partial directory is removed and ``latest`` still names the previous checkpoint.
    """
    tag = tag_of(step)
    tag_dir = os.path.join(ckpt_dir, tag)
    t0 = time.perf_counter()
    guard = _guard(engine)
    guard.errors.clear()
    guard.step = step
    if is_main:
        guard.makedirs(ckpt_dir, exist_ok=True)
        if os.path.isdir(tag_dir):  # a leftover of a killed save (or a re-save): never mix old and new files
            logger.warning("removing the earlier checkpoint directory %s before saving into it", tag_dir)
            _discard(ckpt_dir, tag)
    barrier()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    guard.makedirs(tag_dir, exist_ok=True)
    guard.write_tensor_file(rng_state(), rng_file(ckpt_dir, tag, rank))
    failed = _any_rank(bool(guard.errors))  # every rank's files are on disk (or known lost) past this point
    if failed:
        if guard.errors:
            logger.error("checkpoint save at step %d failed on rank %d: %s", step, rank, guard.errors[0])
        if is_main:
            previous = latest_complete(ckpt_dir, report=False)
            _discard(ckpt_dir, tag)
            logger.error("checkpoint %s was NOT saved (a rank could not write its files: disk full or no "
                         "permission?); the previous checkpoint %s stays valid and `latest` still names it",
                         tag_dir, previous or "(none)")
        barrier()
        return None
    if is_main:
        files = {}
        for name in sorted(os.listdir(tag_dir)):
            if os.path.isfile(os.path.join(tag_dir, name)) and name != MARKER:
                files[name] = os.path.getsize(os.path.join(tag_dir, name))
        marker = {"step": step, "tag": tag, "time": time.time(), "world_size": world_size, "files": files,
                  **(meta or {})}
        try:
            _atomic_write(os.path.join(tag_dir, MARKER), json.dumps(marker, default=str) + "\n")
            _atomic_write(os.path.join(ckpt_dir, LATEST), tag)
        except OSError as e:
            guard.errors.append(f"write {MARKER}/{LATEST}: {e}")
    if _any_rank(bool(guard.errors)):
        if is_main:
            _discard(ckpt_dir, tag)
            previous = latest_complete(ckpt_dir, report=False)
            if previous:  # `latest` may be the half-replaced one: point it back
                try:
                    _atomic_write(os.path.join(ckpt_dir, LATEST), previous)
                except OSError as e:
                    logger.error("could not restore %s to %s: %s", LATEST, previous, e)
            logger.error("checkpoint %s was NOT saved (%s); the previous checkpoint %s stays valid",
                         tag_dir, guard.errors[0], previous or "(none)")
        barrier()
        return None
    if is_main:
        complete, incomplete = list_tags(ckpt_dir)
        for _, old in complete[:-keep_last] if keep_last > 0 else []:
            _discard(ckpt_dir, old)
        for old in incomplete:  # leftovers of killed saves, already reported on resume
            if int(_TAG.match(old).group(1)) < step:
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        logger.info("saved checkpoint %s in %.1fs", tag_dir, time.perf_counter() - t0)
    barrier()
    return tag


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def universal_dir(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, tag + UNIVERSAL_SUFFIX)


def convert_to_universal(ckpt_dir: str, tag: str) -> str:
    """``python -m deepspeed.checkpoint.ds_to_universal`` on ``<tag>`` -> ``<tag>_universal`` (once).

    Raises:
        CheckpointError: the conversion failed (its last output line is in the message).
    """
    out = universal_dir(ckpt_dir, tag)
    if os.path.isfile(os.path.join(out, MARKER)):
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           os.path.join(ckpt_dir, tag), "--output_folder", tmp, "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    t0 = time.perf_counter()
    logger.info("converting %s to a universal checkpoint: %s", os.path.join(ckpt_dir, tag), " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"ds_to_universal failed on {os.path.join(ckpt_dir, tag)}: "
                           f"{lines[-1] if lines else 'exit ' + str(proc.returncode)}")
    _atomic_write(os.path.join(tmp, MARKER), json.dumps({"source": tag, "time": time.time()}) + "\n")
    os.replace(tmp, out)
    # the converter points latest_universal at the folder it wrote (our temporary name): name the final one
    _atomic_write(os.path.join(ckpt_dir, "latest_universal"), os.path.basename(out))
    logger.info("universal checkpoint %s written in %.1fs", out, time.perf_counter() - t0)
    return out


def load(engine, ckpt_dir: str, tag: str, universal: bool = False) -> dict:
    """Load ``tag`` (or its universal form) into ``engine``; returns its client_state.

    Raises:
        CheckpointError: DeepSpeed could not load it (or the universal conversion failed).
    """
    import torch.distributed as dist

    load_tag = tag
    if universal:
        error = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            try:
                convert_to_universal(ckpt_dir, tag)
            except CheckpointError as e:
                error = [str(e)]
        if dist.is_initialized():
            dist.broadcast_object_list(error, src=0)
        if error[0]:
            raise CheckpointError(error[0])
        load_tag = tag + UNIVERSAL_SUFFIX
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=load_tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, load_tag)}")
    logger.info("loaded %s", path)
    return client_state or {}
