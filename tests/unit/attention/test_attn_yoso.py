"""YOSO: the sampled estimator converges to YOSO-E, precision handling, hashing details."""

from __future__ import annotations

import pytest
import torch

from model.attention.base import head_generators
from model.attention.yoso import YosoConfig, fwht, hash_codes, sample_hash_params, yoso_attention


def _qkv(b=1, h=2, n=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g) for _ in range(3))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_sampling_mean_tends_to_expectation_and_error_falls_with_m():
    q, k, v = _qkv()
    q = q + k  # correlated queries and keys: informative collision probabilities
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, 13:] = False
    tau = 3
    exact = yoso_attention(q, k, v, mask, YosoConfig(expectation=True, hash_bits=tau), normalize=False)
    errors = {}
    for m in (4, 16, 64, 256):
        cfg = YosoConfig(num_hashes=m, hash_bits=tau)
        errs = [_rel(yoso_attention(q, k, v, mask, cfg, torch.Generator().manual_seed(s), normalize=False), exact)
                for s in range(4)]
        errors[m] = sum(errs) / len(errs)
    assert errors[4] > errors[16] > errors[64] > errors[256]
    assert errors[256] < 0.35 * errors[4]  # ~1/sqrt(m): 1/8 expected
    cfg = YosoConfig(num_hashes=8, hash_bits=tau)
    mean = torch.stack([yoso_attention(q, k, v, mask, cfg, torch.Generator().manual_seed(100 + s), normalize=False)
                        for s in range(64)]).mean(0)
    assert _rel(mean, exact) < 0.35 * errors[4]


def test_hadamard_hash_is_close_to_expectation():
    q, k, v = _qkv(d=16)
    q = q + k
    tau = 3
    exact = yoso_attention(q, k, v, None, YosoConfig(expectation=True, hash_bits=tau), normalize=False)
    cfg = YosoConfig(num_hashes=64, hash_bits=tau, hash="hadamard")
    mean = torch.stack([yoso_attention(q, k, v, None, cfg, torch.Generator().manual_seed(s), normalize=False)
                        for s in range(8)]).mean(0)
    assert _rel(mean, exact) < 0.15


def test_fwht_matches_hadamard_matrix():
    h = torch.tensor([[1.0]])
    for _ in range(4):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fwht(x), x @ h.T)


@pytest.mark.parametrize("kind", ["gaussian", "hadamard"])
def test_codes_range_and_odd_head_dim(kind):
    cfg = YosoConfig(num_hashes=5, hash_bits=4, hash=kind)
    x = torch.nn.functional.normalize(torch.randn(2, 3, 7, 5), dim=-1)  # head dim 5: padded to 8 for Hadamard
    params = sample_hash_params(cfg, 3, 5, head_generators("cpu", 1, range(3)), torch.device("cpu"))
    codes = hash_codes(x, params, 5, 4)
    assert codes.shape == (2, 3, 7, 5) and codes.min() >= 0 and codes.max() < 16
    out = yoso_attention(torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 5), torch.randn(2, 3, 7, 5), None, cfg)
    assert out.shape == (2, 3, 7, 5) and torch.isfinite(out).all()


def test_runs_in_fp32_under_autocast():
    q, k, v = _qkv(n=12)
    cfg = YosoConfig(num_hashes=8, hash_bits=4)
    qb, kb, vb = (t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = yoso_attention(qb, kb, vb, None, cfg, torch.Generator().manual_seed(0))
    assert out.dtype == torch.bfloat16
    want = yoso_attention(qb.float(), kb.float(), vb.float(), None, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad.float()).all() for t in (qb, kb, vb))


@pytest.mark.parametrize("backward", ["surrogate", "exact"])
def test_duplicate_queries_and_keys_give_finite_gradients(backward):
    q, _, v = _qkv(n=6)
    q = q.requires_grad_(True)
    for expectation in (True, False):
        out = yoso_attention(q, q, v, None, YosoConfig(expectation=expectation, hash_bits=6, backward=backward),
                             torch.Generator().manual_seed(0))
        (g,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(g).all()


def test_padded_and_collision_free_queries_output_zero():
    q, k, v = _qkv(n=8)
    k[:, :, :3] = q[:, :, :3]  # identical query/key pairs always collide
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, 6:] = False
    out = yoso_attention(q, k, v, mask, YosoConfig(num_hashes=1, hash_bits=12), torch.Generator().manual_seed(0))
    assert (out[0, :, 6:] == 0).all()
    norms = out[0, :, :6].norm(dim=-1)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))  # unit rows, or zero without collisions
    assert (norms == 0).any() and (norms > 0).any()
