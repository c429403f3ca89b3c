"""The compiled kernels on a real GPU against the torch paths (``pytest -m gpu``; skipped by make test)."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import needs_triton, padding_mask, rel_err

from model.attention.bert_lsh import BertLshConfig, bert_lsh_attention
from model.attention.yoso import YosoConfig, yoso_attention

pytestmark = [pytest.mark.gpu, needs_triton,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _qkv(b, h, n, d, dtype, seed=0):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, device=CUDA, dtype=dtype) for _ in range(3)]


def _run(fn, impl, q, k, v, mask):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(impl, *leaves)
    (out.float() * mask[:, None, :, None]).sum().backward()
    return (out.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("semantics", ["code", "paper"])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_bert_lsh_triton_matches_torch_path(semantics, dtype, d):
    q, k, v = _qkv(2, 4, 1000, d, dtype)
    mask = padding_mask(2, 1000, (1000, 613)).to(CUDA)

    def fn(impl, q, k, v):
        cfg = BertLshConfig(semantics=semantics, bands=2, table_size=16, num_hashes=2, impl=impl)
        return bert_lsh_attention(q, k, v, mask, cfg, torch.Generator(device=CUDA).manual_seed(1))

    got, want = _run(fn, "triton", q, k, v, mask), _run(fn, "torch", q, k, v, mask)
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for a, w in zip(got, want):
        assert rel_err(a, w) < tol


@pytest.mark.parametrize("cfg", [{}, {"expectation": True}, {"backward": "exact"}, {"hash": "hadamard"}])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_yoso_triton_matches_torch_path(cfg, d):
    q, k, v = _qkv(2, 4, 777, d, torch.float32)
    q = q + k
    mask = padding_mask(2, 777, (777, 500)).to(CUDA)

    def fn(impl, q, k, v):
        return yoso_attention(q, k, v, mask, YosoConfig(**cfg, impl=impl), torch.Generator(device=CUDA).manual_seed(1))

    got, want = _run(fn, "triton", q, k, v, mask), _run(fn, "torch", q, k, v, mask)
    for a, w in zip(got, want):
        assert rel_err(a, w) < 1e-3  # tf32x3 products; a sign tie can flip a rare hash bit
