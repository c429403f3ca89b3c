"""Shared helpers of the kernel tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (Linux only)")
F64 = torch.float64


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (absolute when want is all zero)."""
    got, want = got.detach(), want.detach()
    scale = float(want.abs().max())
    return float((got.double() - want.double()).abs().max()) / (scale if scale > 0 else 1.0)


def padding_mask(b: int, n: int, real: tuple[int, ...]) -> torch.Tensor:
    """bool [b, n], True at the first real[i] tokens of sequence i (0 = a fully padded sequence)."""
    m = torch.zeros(b, n, dtype=torch.bool)
    for i, r in enumerate(real):
        m[i, :r] = True
    return m


def randn(*shape, seed: int = 0, dtype=F64, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


def interpreter_ready() -> bool:
    """TRITON_INTERPRET=1 now, and triton's own library functions (tl.zeros, tl.sum, tl.rand, ...) were
    decorated for the interpreter, i.e. triton was (or will be) imported under the variable."""
    import os
    import sys

    if os.environ.get("TRITON_INTERPRET") != "1" or not HAS_TRITON:
        return False
    if "triton" not in sys.modules:
        return True
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)
