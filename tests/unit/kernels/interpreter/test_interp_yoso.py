"""YOSO Triton kernels in the interpreter (CPU) against the fp64 references, forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import F64, needs_triton, padding_mask, randn, rel_err

from model.attention import reference as ref
from model.attention.yoso import YosoConfig, hash_codes, sample_hash_params, yoso_attention
from model.kernels.dispatch import load

pytestmark = needs_triton
CPU = torch.device("cpu")
SMALL = {"table": 16, "m": 16, "n": 32}  # tiles smaller than n, n not a multiple of any


def _inputs(b, h, n, d, dtype=F64, seed=0):
    q, k, v, dy = (randn(b, h, n, d, seed=seed + i) for i in range(4))
    q = q + 0.5 * k  # correlated: collisions are informative
    qn, kn = (torch.nn.functional.normalize(t, dim=-1) for t in (q, k))
    # Round to the tested input dtype; the references then see the same values in fp64.
    return [t.to(dtype).to(F64) for t in (qn, kn, v, dy)]


def _layout(codes: torch.Tensor, b: int, h: int) -> torch.Tensor:
    """Kernel codes [b*h, m, n] -> the references' [b, h, n, m]."""
    return codes.view(b, h, *codes.shape[1:]).transpose(-1, -2).long()


@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("kind", ["gaussian", "hadamard"])
def test_hash_and_cumulate_matches_torch_codes_and_dict_tables(d, kind):
    b, h, n, m, tau = 2, 1, 37, 4, 3
    yt = load("yoso_triton")
    qn, kn, v, _ = _inputs(b, h, n, d)
    mask = padding_mask(b, n, (37, 0))
    params = sample_hash_params(YosoConfig(num_hashes=m, hash_bits=tau, hash=kind), h, d,
                                torch.Generator().manual_seed(5), CPU)
    planes = yt.hyperplanes(params, d, m, tau)
    out, cq, ck = yt.hash_and_cumulate(qn, kn, v, mask.to(F64), planes, m, tau, 1 << 30, SMALL)
    for x, codes in ((qn, cq), (kn, ck)):
        want = hash_codes(x, params.to(F64), m, tau)
        proj = torch.einsum("bhnd,hdk->bhnk", x, planes.to(F64)).abs().view(b, h, n, m, tau).amin(-1)
        assert ((_layout(codes, b, h) == want) | (proj < 1e-5)).all()  # equal up to sign ties
    want = ref.yoso_cumulation_reference(_layout(cq, b, h), _layout(ck, b, h), v, mask)
    assert rel_err(out, want) < 1e-5
    assert (out[1] == 0).all()  # the fully padded sequence


def test_hash_chunks_accumulate():
    """A table budget of one hash at a time gives the same result as all hashes at once."""
    b, h, n, d, m, tau = 1, 2, 23, 32, 5, 4
    yt = load("yoso_triton")
    qn, kn, v, _ = _inputs(b, h, n, d)
    mask = padding_mask(b, n, (20,))
    params = sample_hash_params(YosoConfig(num_hashes=m, hash_bits=tau), h, d, torch.Generator().manual_seed(1), CPU)
    planes = yt.hyperplanes(params, d, m, tau)
    one = yt.hash_and_cumulate(qn, kn, v, mask.to(F64), planes, m, tau, b * h * (1 << tau) * d * 4, SMALL)
    full = yt.hash_and_cumulate(qn, kn, v, mask.to(F64), planes, m, tau, 1 << 30, SMALL)
    assert torch.equal(one[1], full[1]) and torch.equal(one[2], full[2])
    assert rel_err(one[0], full[0]) < 1e-6


@pytest.mark.parametrize(("expectation", "exact"), [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_dense_backward_matches_pairwise_formula(expectation, exact, d):
    b, h, n, m, tau = 2, 1, 19, 4, 3
    yt = load("yoso_triton")
    qn, kn, v, dy = _inputs(b, h, n, d)
    mask = padding_mask(b, n, (19, 0)) if d == 64 else padding_mask(b, n, (19, 11))
    g = torch.Generator().manual_seed(3)
    cq = torch.randint(0, 1 << tau, (b * h, m, n), generator=g, dtype=torch.int32)
    ck = torch.randint(0, 1 << tau, (b * h, m, n), generator=g, dtype=torch.int32)
    got = yt.dense_backward(qn, kn, v, mask.to(F64), dy, None if expectation else cq, None if expectation else ck,
                            m, tau, expectation, exact, SMALL)
    want = ref.yoso_grad_reference(qn, kn, v, dy, mask, tau, None if expectation else _layout(cq, b, h),
                                   None if expectation else _layout(ck, b, h), exact=exact)
    for a, w in zip(got, want):
        assert rel_err(a, w) < 1e-5


@pytest.mark.parametrize("d", [32, 128])
def test_expectation_forward_matches_double_loop(d):
    b, h, n, tau = 2, 1, 21, 5
    q, k, v = (randn(b, h, n, d, seed=s) for s in range(3))
    k[0, 0, 2] = q[0, 0, 2] * 3.0  # cosine 1: the clamp matters
    k[0, 0, 4] = -q[0, 0, 1]  # cosine -1
    mask = padding_mask(b, n, (17, 0))
    qn, kn = (torch.nn.functional.normalize(t, dim=-1) for t in (q, k))
    out = load("yoso_triton").expectation_forward(qn, kn, v, mask.to(F64), tau, SMALL)
    # fp32 cosines: a cosine of 1 comes out as 1 - 6e-8, and acos has an infinite slope there
    # (acos(1 - e) ~ sqrt(2 e) = 3.5e-4), so the weight of that pair is off by ~5e-4.
    assert rel_err(out, ref.yoso_e_reference(q, k, v, mask, tau, normalize=False)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    """fp16 / bf16 inputs are loaded and accumulated in fp32 (so bf16 never reaches tl.dot)."""
    b, h, n, d, m, tau = 1, 2, 29, 64, 4, 3
    yt = load("yoso_triton")
    qn, kn, v, dy = _inputs(b, h, n, d, dtype=dtype)
    mask = padding_mask(b, n, (25,))
    params = sample_hash_params(YosoConfig(num_hashes=m, hash_bits=tau), h, d, torch.Generator().manual_seed(2), CPU)
    planes = yt.hyperplanes(params, d, m, tau)
    out, cq, ck = yt.hash_and_cumulate(*(t.to(dtype) for t in (qn, kn, v)), mask.to(dtype), planes, m, tau,
                                       1 << 30, SMALL)
    cq4, ck4 = _layout(cq, b, h), _layout(ck, b, h)
    assert rel_err(out, ref.yoso_cumulation_reference(cq4, ck4, v, mask)) < 1e-5
    got = yt.dense_backward(*(t.to(dtype) for t in (qn, kn, v)), mask.to(dtype), dy.to(dtype), cq, ck, m, tau,
                            False, False, SMALL)
    for a, w in zip(got, ref.yoso_grad_reference(qn, kn, v, dy, mask, tau, cq4, ck4)):
        assert rel_err(a, w) < 1e-5


@pytest.mark.parametrize("cfg", [{"num_hashes": 4, "hash_bits": 3}, {"expectation": True, "hash_bits": 4},
                                 {"num_hashes": 3, "hash_bits": 5, "hash": "hadamard", "backward": "exact"}])
def test_yoso_attention_triton_equals_reference(cfg):
    """End to end through yoso_attention (normalizations and autograd around the kernels)."""
    q, k, v = (randn(2, 2, 26, 32, seed=s, dtype=torch.float32) for s in range(3))
    mask = padding_mask(2, 26, (26, 9))
    res = []
    for impl in ("reference", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = yoso_attention(*leaves, mask, YosoConfig(**cfg, impl=impl), torch.Generator().manual_seed(4))
        (out * randn(*out.shape, seed=8, dtype=torch.float32) * mask[:, None, :, None]).sum().backward()
        res.append((out.detach(), *(t.grad for t in leaves)))
    for got, want in zip(res[1], res[0]):
        assert rel_err(got, want) < 1e-4
