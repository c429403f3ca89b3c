"""The one place that starts torch.distributed and megatron-core's parallel_state, and seeds RNGs.

The rank variables come from the deepspeed launcher, torchrun or srun (see launch/slurm_env.py);
a plain ``python launch/train.py`` runs as a world of one. The backend follows the accelerator:
NCCL on CUDA, gloo on CPU (DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the world."""

    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (selects the GPU)."""
    tp_rank: int
    """Rank within the tensor-parallel group."""
    tp_size: int
    """Tensor-parallel degree."""
    dp_rank: int
    """Data-parallel rank: ranks of one tensor-parallel group share it and read the same data."""
    dp_size: int
    """Data-parallel degree (world_size // tp_size)."""
    device: torch.device
    """Device of this rank's model."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(tensor_model_parallel_size: int = 1, seed: int = 0) -> DistInfo:
    """Start the process group and megatron's parallel state; idempotent.

    Raises:
        ValueError: the world size is not divisible by the tensor-parallel degree.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from megatron.core import parallel_state

    from launch.slurm_env import apply_slurm_env, in_slurm_task

    if in_slurm_task():
        # Slurm hook: `srun python launch/train.py ...` (one task per rank) sets only SLURM_* variables;
        # map them to RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (see launch/slurm_env.py).
        apply_slurm_env()
    if "RANK" not in os.environ:  # a plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % tensor_model_parallel_size:
        raise ValueError(f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size="
                         f"{tensor_model_parallel_size}; launch a multiple of it or lower the TP degree")
    accel = get_accelerator()
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if accel.device_name() == "cpu":
            _skip_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), verbose=False)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size, 1)
    seed_everything(seed)
    if accel.device_name() == "cuda":
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    device = torch.device(accel.current_device_name()) if accel.device_name() == "cuda" else torch.device("cpu")
    info = DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(), dp_size=parallel_state.get_data_parallel_world_size(),
        device=device)
    logger.info("distributed: rank %d/%d, tp %d/%d, dp %d/%d, backend %s, device %s", info.rank, info.world_size,
                info.tp_rank, info.tp_size, info.dp_rank, info.dp_size, dist.get_backend(), device)
    return info


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op at init.

    On the CPU accelerator ``deepspeed.init_distributed`` compiles ``deepspeed_shm_comm`` with g++
    into ~/.cache/torch_extensions and maps a 69 MB /dev/shm file per rank that it never unlinks.
    Training does not use it (its all-reduces go through the gloo process group; only
    ``inference_all_reduce`` would), and it costs: a compile on every new machine, 69 MB of RAM
    leaked per rank per launch until reboot, and a process killed mid-build leaves torch's build
    lock behind, after which every later launch waits on that lock forever.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown_distributed() -> None:
    """Tear down megatron's parallel state and the process group at the end of a successful run.

    Call it once per process, after the last collective, on the success path only (a rank that
    failed may leave peers inside a collective, where destroying the group can hang them).
    Without it, gloo's worker threads outlive interpreter shutdown and the process can abort
    with "terminate called without an active exception" after all work is done (exit 250/134
    under the launcher, so a finished job reads as failed).
    """
    import sys

    import torch.distributed as dist

    parallel_state = sys.modules.get("megatron.core.parallel_state")  # no import: nothing to tear down if unused
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float] | torch.Tensor, group=None) -> torch.Tensor:
    """Sum a small float64 vector over ``group`` (the data-parallel group for losses)."""
    import torch.distributed as dist

    t = torch.as_tensor(values, dtype=torch.float64).clone()
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t


def data_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
