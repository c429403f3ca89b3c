"""BERT-LSH flash-style Triton kernels in the interpreter (CPU) against the fp64 dense path."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import F64, needs_triton, padding_mask, randn, rel_err

from model.attention.bert_lsh import BertLshConfig, bert_lsh_attention, lsh_codes
from model.kernels.dispatch import load

pytestmark = needs_triton
SMALL = {"m": 16, "n": 32}  # tiles smaller than n, n not a multiple of either
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def _case(b, h, n, d, tables=2, bands=2, size=3, seed=0):
    q, k, v, do = (randn(b, h, n, d, seed=seed + i, dtype=torch.float32) for i in range(4))
    q = q * 0.5
    g = torch.Generator().manual_seed(seed)
    planes = torch.randn(h, tables, bands, d, generator=g)
    coeffs = torch.randint(0, size, (h, tables, bands), generator=g)
    return q, k, v, do, planes, coeffs


def _check(semantics, dtype, d, mask, tables=2, bands=2, size=3, n=45, dropout_p=0.0):
    b = mask.shape[0]
    q, k, v, do, planes, coeffs = _case(b, 2, n, d, tables, bands, size)
    # The reference sees the same (rounded) values in fp64 and the same codes.
    ref_leaves = [t.to(dtype).to(F64).requires_grad_(True) for t in (q, k, v)]
    cfg = BertLshConfig(bands=bands, table_size=size, num_hashes=tables, semantics=semantics, impl="reference")
    want = bert_lsh_attention(*ref_leaves, mask, cfg, hyperplanes=planes.to(F64), coefficients=coeffs)
    want_grads = torch.autograd.grad(want, ref_leaves, do.to(F64))
    cq = lsh_codes(ref_leaves[0].detach(), planes.to(F64), coeffs, size)
    ck = lsh_codes(ref_leaves[1].detach(), planes.to(F64), coeffs, size)
    leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    got = load("lsh_triton").bert_lsh_triton(*leaves, cq, ck, mask, semantics, dropout_p, SMALL)
    assert got.dtype == dtype
    grads = torch.autograd.grad(got, leaves, do.to(dtype))
    assert rel_err(got, want) < TOL[dtype]
    for g, w in zip(grads, want_grads):
        assert rel_err(g, w) < TOL[dtype]
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("semantics", ["code", "paper"])
def test_forward_backward_match_dense_path(semantics, dtype):
    _check(semantics, dtype, 32, padding_mask(2, 45, (45, 30)))


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("semantics", ["code", "paper"])
def test_head_dims(semantics, d):
    _check(semantics, torch.float16, d, padding_mask(1, 45, (40,)), tables=1, bands=2, size=4)


@pytest.mark.parametrize("semantics", ["code", "paper"])
def test_fully_padded_sequence(semantics):
    """Code semantics: a sequence without real tokens sees every key (as the dense path);
    paper semantics: its rows have no allowed key and output 0 (gradients stay finite)."""
    out = _check(semantics, torch.float32, 32, padding_mask(2, 37, (37, 0)), n=37)
    if semantics == "paper":
        assert (out[1] == 0).all()


def test_dropout_masks_agree_between_forward_and_backward():
    """Same seed -> same output; the analytic gradient matches a central difference of the forward."""
    q, k, v, do, planes, coeffs = _case(1, 2, 37, 32)
    mask = padding_mask(1, 37, (33,))
    cq, ck = lsh_codes(q, planes, coeffs, 3), lsh_codes(k, planes, coeffs, 3)
    lt = load("lsh_triton")

    def f(q, k, v):
        torch.manual_seed(11)
        return lt.bert_lsh_triton(q, k, v, cq, ck, mask, "code", 0.25, SMALL)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = f(*leaves)
    assert torch.equal(out, f(q, k, v))
    assert not torch.allclose(out, lt.bert_lsh_triton(q, k, v, cq, ck, mask, "code", 0.0, SMALL))
    grads = torch.autograd.grad(out, leaves, do)
    dirs = [randn(*q.shape, seed=20 + i, dtype=torch.float32) for i in range(3)]
    eps = 1e-2  # small enough that no code changes (codes are fixed here anyway)
    plus = f(*(t + eps * u for t, u in zip((q, k, v), dirs)))
    minus = f(*(t - eps * u for t, u in zip((q, k, v), dirs)))
    numeric = float(((plus - minus) * do).sum()) / (2 * eps)
    analytic = float(sum((g * u).sum() for g, u in zip(grads, dirs)))
    assert abs(numeric - analytic) < 2e-3 * max(1.0, abs(analytic))


def test_bert_lsh_attention_triton_equals_torch_and_reference():
    """End to end through bert_lsh_attention with the module's seeded hashing."""
    q, k, v = (randn(2, 2, 40, 32, seed=s, dtype=torch.float32) for s in range(3))
    mask = padding_mask(2, 40, (40, 22))
    res = {}
    for impl in ("reference", "torch", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        cfg = BertLshConfig(bands=2, table_size=8, num_hashes=2, impl=impl)
        out = bert_lsh_attention(*leaves, mask, cfg, torch.Generator().manual_seed(3))
        (out * mask[:, None, :, None]).sum().backward()
        res[impl] = (out.detach(), *(t.grad for t in leaves))
    for impl in ("torch", "triton"):
        for got, want in zip(res[impl], res["reference"]):
            assert rel_err(got, want) < 1e-5
