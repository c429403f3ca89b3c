"""Fixtures shared by every test folder."""

from __future__ import annotations

import os
import socket

import pytest


def pytest_configure(config):
    """Keep bertforge's per-user cache (shard hash stamps, downloaded shards) of a test session in a
    temporary directory, shared with the processes the tests launch, never in the user's ~/.cache."""
    if "BERTFORGE_CACHE_DIR" not in os.environ:
        import tempfile

        os.environ["BERTFORGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="bertforge-test-cache-")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def megatron_world():
    """gloo world of 1 with megatron parallel_state (TP = PP = 1), set up once per session."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    started = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
        started = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if started:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
