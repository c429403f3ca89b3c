"""Fixtures of the attention tests: a one-process megatron world, and the small block harness."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_attention_rng():
    """Every test starts from the same attention seed and step, and restores them."""
    from model.attention import base

    seed, step = base.get_seed(), base.get_step()
    base.set_seed(0)
    base.set_step(0)
    torch.manual_seed(0)
    yield
    base.set_seed(seed)
    base.set_step(step)
