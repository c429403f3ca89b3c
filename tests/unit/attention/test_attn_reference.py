"""Fast paths against the naive fp64 references of model/attention/reference.py (ATTENTION_SPEC tests)."""

from __future__ import annotations

import math

import pytest
import torch

from model.attention import reference as ref
from model.attention.bert_lsh import BertLshConfig, bert_lsh_attention, collisions, lsh_codes
from model.attention.linformer import linformer_attention
from model.attention.shared_qkv import SharedQKVProjection, shared_qkv_projection
from model.attention.softmax import softmax_attention
from model.attention.yoso import YosoConfig, _YosoFunction, yoso_attention, yoso_cumulation

F64 = torch.float64


def _qkv(b=2, h=2, n=9, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g, dtype=F64) for _ in range(3))


def _mask(b=2, n=9, real=(9, 6)):
    m = torch.zeros(b, n, dtype=torch.bool)
    for i, r in enumerate(real):
        m[i, :r] = True
    return m


def test_softmax_matches_reference():
    q, k, v = _qkv()
    mask = _mask()
    torch.testing.assert_close(softmax_attention(q, k, v, mask), ref.softmax_reference(q, k, v, mask))


@pytest.mark.parametrize("per_head", [False, True])
def test_linformer_matches_formula(per_head):
    q, k, v = _qkv()
    mask = _mask()
    shape = (2, 4, 12) if per_head else (4, 12)
    g = torch.Generator().manual_seed(5)
    E, F = torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)
    torch.testing.assert_close(linformer_attention(q, k, v, mask, E, F), ref.linformer_reference(q, k, v, mask, E, F))


@pytest.mark.parametrize(("k", "N", "sharing"), [(4, 8, "headwise"), (4, 10, "none"), (3, 3, "key-value")])
def test_linformer_pool_init_is_window_means(k, N, sharing):
    """``init: pool``: E (and F) start as the mean over k contiguous windows covering all N positions,
    so the compressed keys and values are window means of K and V (checked against that formula)."""
    from model.attention import build

    core = build({"name": "linformer", "k": k, "init": "pool", "sharing": sharing}, num_heads=2, head_dim=4,
                 max_seq_len=N).double()
    E = core.E.detach()
    assert E.shape == ((2, k, N) if sharing == "none" else (k, N))
    E2 = E.reshape(-1, k, N)
    for P in E2:
        rows = [(P[r] > 0).nonzero().flatten().tolist() for r in range(k)]
        assert sum(rows, []) == list(range(N))  # contiguous windows in order, each position once
        for r, cols in enumerate(rows):
            torch.testing.assert_close(P[r, cols], torch.full((len(cols),), 1.0 / len(cols), dtype=F64))
    q, kk, v = _qkv(b=1, n=N)
    win = [(E2[0][r] > 0).nonzero().flatten() for r in range(k)]
    k_bar = torch.stack([kk[:, :, w].mean(2) for w in win], dim=2)  # [b, h, k, d]
    v_bar = torch.stack([v[:, :, w].mean(2) for w in win], dim=2)
    want = torch.softmax(q @ k_bar.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v_bar
    torch.testing.assert_close(core.eval()(q, kk, v, None), want)
    noisy = build({"name": "linformer", "k": k, "init": "pool", "init_std": 0.01}, num_heads=2, head_dim=4,
                  max_seq_len=N)
    assert 0 < (noisy.E.detach().double() - E.reshape(-1, k, N)[0]).abs().max() < 0.1
    per_head = build({"name": "linformer", "k": k, "init": "pool", "init_std": 0.01, "sharing": "none"},
                     num_heads=2, head_dim=4, max_seq_len=N).E.detach()
    assert not torch.equal(per_head[0], per_head[1])  # each head draws its own noise


def test_linformer_zeroing_pads_equals_slicing():
    """Right padding: zeroing the padded rows == running on the real prefix (E sliced to it)."""
    q, k, v = _qkv()
    mask = _mask(real=(9, 6))
    E, F = torch.randn(4, 12, dtype=F64), torch.randn(4, 12, dtype=F64)
    full = linformer_attention(q, k, v, mask, E, F)
    short = linformer_attention(q[1:, :, :6], k[1:, :, :6], v[1:, :, :6], None, E, F)
    torch.testing.assert_close(full[1:, :, :6], short)


def test_yoso_e_matches_double_loop():
    q, k, v = _qkv(b=1, n=7)
    k[0, 0, 2] = q[0, 0, 2] * 3.0  # cosine exactly 1 (up to rounding): the clamp matters
    k[0, 1, 4] = -q[0, 1, 1]  # cosine -1
    mask = _mask(b=1, n=7, real=(5,))
    cfg = YosoConfig(expectation=True, hash_bits=5)
    out = yoso_attention(q, k, v, mask, cfg)
    torch.testing.assert_close(out, ref.yoso_e_reference(q, k, v, mask, tau=5))
    raw = yoso_attention(q, k, v, mask, cfg, normalize=False)
    torch.testing.assert_close(raw, ref.yoso_e_reference(q, k, v, mask, tau=5, normalize=False))


@pytest.mark.parametrize("max_bytes", [1 << 30, 6000])  # the second forces chunks of hashes
def test_yoso_cumulation_matches_dict_tables(max_bytes):
    g = torch.Generator().manual_seed(2)
    b, h, n, d, m, tau = 2, 2, 11, 5, 6, 3
    cq = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    ck = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    v = torch.randn(b, h, n, d, generator=g)
    mask = _mask(b=b, n=n, real=(11, 8))
    out = yoso_cumulation(cq, ck, v, mask.float(), tau, max_bytes=max_bytes)
    assert (ref.yoso_cumulation_reference(cq, ck, v, mask) - out).abs().max() < 1e-5


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("expectation", [False, True])
def test_yoso_backward_matches_pairwise_formula(expectation, exact):
    b, h, n, d, m, tau = 1, 2, 6, 4, 5, 2
    g = torch.Generator().manual_seed(4)
    qn, kn = (torch.nn.functional.normalize(torch.randn(b, h, n, d, generator=g, dtype=F64), dim=-1)
              for _ in range(2))
    v = torch.randn(b, h, n, d, generator=g, dtype=F64)
    dy = torch.randn(b, h, n, d, generator=g, dtype=F64)
    mask = _mask(b=1, n=n, real=(5,))
    if expectation:
        cq = ck = torch.empty(0, dtype=torch.int64)
    else:
        cq = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
        ck = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    leaves = [t.clone().requires_grad_(True) for t in (qn, kn, v)]
    y = _YosoFunction.apply(*leaves, mask.to(F64), cq, ck, tau, expectation, exact, 1 << 20, "model.attention")
    y.backward(dy)
    expect = ref.yoso_grad_reference(qn, kn, v, dy, mask, tau, None if expectation else cq,
                                     None if expectation else ck, exact=exact)
    for got, want in zip(leaves, expect):
        torch.testing.assert_close(got.grad, want)


@pytest.mark.parametrize("semantics", ["code", "paper"])
@pytest.mark.parametrize("per_batch", [False, True])
def test_bert_lsh_matches_loop_port(semantics, per_batch):
    q, k, v = _qkv(n=8, d=6, seed=3)
    q[0, 1, 3] = 0  # an exact-zero projection gives bit 0
    mask = _mask(n=8, real=(8, 5))
    cfg = BertLshConfig(bands=3, table_size=5, num_hashes=2, semantics=semantics)
    g = torch.Generator().manual_seed(9)
    lead = (2, 2) if per_batch else (2,)
    planes = torch.randn(*lead, 2, 3, 6, generator=g, dtype=F64)
    coeffs = torch.randint(0, 5, (*lead, 2, 3), generator=g)
    out = bert_lsh_attention(q, k, v, mask, cfg, hyperplanes=planes, coefficients=coeffs)
    want = ref.bert_lsh_reference(q, k, v, mask, planes, coeffs, 5, semantics)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # the collision pattern itself, exactly
    coll = collisions(lsh_codes(q, planes, coeffs, 5), lsh_codes(k, planes, coeffs, 5), semantics)
    for bi in range(2):
        for hi in range(2):
            p = planes[bi, hi] if per_batch else planes[hi]
            c = coeffs[bi, hi] if per_batch else coeffs[hi]
            for i in range(8):
                for j in range(8):
                    hits = [ref._lsh_code(q[bi, hi, i], p[t], c[t], 5) == ref._lsh_code(k[bi, hi, j], p[t], c[t], 5)
                            for t in range(2)]
                    assert bool(coll[bi, hi, i, j]) == (any(hits) if semantics == "code" else all(hits))


def test_bert_lsh_code_semantics_properties():
    """Non-colliding logits are 0 (not -inf), and the lower triangle copies q_i . k_j."""
    q, k, v = _qkv(b=1, h=1, n=5, d=4)
    cfg = BertLshConfig(bands=1, table_size=1, num_hashes=1)  # table size 1: every pair collides
    planes, coeffs = torch.randn(1, 1, 1, 4, dtype=F64), torch.zeros(1, 1, 1, dtype=torch.int64)
    out = bert_lsh_attention(q, k, v, None, cfg, hyperplanes=planes, coefficients=coeffs)
    s = torch.triu(q[0, 0] @ k[0, 0].T)
    s = s + s.T - torch.diag(torch.diag(s))
    torch.testing.assert_close(out[0, 0], torch.softmax(s / 2.0, dim=-1) @ v[0, 0])
    planes = torch.randn(1, 1, 8, 4, dtype=F64)
    coeffs = torch.tensor([[[1, 2, 4, 8, 16, 32, 64, 128]]])
    cfg = BertLshConfig(bands=8, table_size=256, num_hashes=1)
    coll = collisions(lsh_codes(q, planes, coeffs, 256), lsh_codes(k, planes, coeffs, 256), "code")[0, 0]
    out = bert_lsh_attention(q, k, v, None, cfg, hyperplanes=planes, coefficients=coeffs)
    u = torch.triu(torch.where(coll, q[0, 0] @ k[0, 0].T, 0.0))
    s = u + u.T - torch.diag(torch.diag(u))
    torch.testing.assert_close(out[0, 0], torch.softmax(s / 2.0, dim=-1) @ v[0, 0])


def test_shared_qkv_equals_standard_attention_with_folded_weights():
    torch.manual_seed(0)
    dim, heads = 12, 3
    proj = SharedQKVProjection(dim, heads, init_std=0.3).double()
    with torch.no_grad():
        for p in (proj.bias, proj.d_q, proj.d_k, proj.d_v):
            p.copy_(torch.randn_like(p))
    x = torch.randn(2, 7, dim, dtype=F64, requires_grad=True)
    mask = _mask(n=7, real=(7, 4))
    out = softmax_attention(*proj(x), mask)
    params = [proj.weight, proj.bias, proj.d_q, proj.d_k, proj.d_v]
    want = ref.shared_qkv_reference(x, *params, heads, mask)
    torch.testing.assert_close(out, want)
    dy = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, [x, *params], dy)
    want_grads = torch.autograd.grad(want, [x, *params], dy)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    assert sum(p.numel() for p in proj.parameters()) == dim * dim + 4 * dim


def test_shared_qkv_logits_are_symmetric():
    dim, heads = 12, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 6, dim, generator=g, dtype=F64)
    w, b = torch.randn(dim, dim, generator=g, dtype=F64), torch.randn(dim, generator=g, dtype=F64)
    dq, dk, dv = (torch.randn(dim, generator=g, dtype=F64) for _ in range(3))
    q, k, _ = shared_qkv_projection(x, w, b, dq, dk, dv, heads)
    s = q @ k.transpose(-1, -2) / math.sqrt(dim // heads)
    torch.testing.assert_close(s, s.transpose(-1, -2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linformer_explicit_16bit_path_matches_sdpa(dtype, monkeypatch):
    """16-bit CPU Linformer runs its n x k scores as matmul-softmax-matmul (faster than the CPU flash
    kernel at these sizes); outputs and all gradients agree with SDPA's path to 16-bit precision."""
    from model.attention import linformer as lin

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=g) for _ in range(3))
    E, F = (torch.randn(8, 48, generator=g) / 7 for _ in range(2))
    mask = _mask(b=2, n=40, real=(40, 29))
    assert lin._explicit_scores(q.to(dtype), q[:, :, :8].to(dtype)) and not lin._explicit_scores(q, q[:, :, :8])

    def run(path: str):
        monkeypatch.setattr(lin, "EXPLICIT_MAX_SCORES", 1 << 30 if path == "explicit" else 0)
        dt = torch.float64 if path == "fp64" else dtype
        ins = [t.to(dt).requires_grad_() for t in (q, k, v, E, F)]
        out = linformer_attention(ins[0], ins[1], ins[2], mask, ins[3], ins[4])
        out.double().square().sum().backward()
        return [out.double(), *(t.grad.double() for t in ins)]

    ref_, explicit, sdpa = run("fp64"), run("explicit"), run("sdpa")
    for name, r, a, b in zip(("out", "dq", "dk", "dv", "dE", "dF"), ref_, explicit, sdpa):
        err_a, err_b, scale = (a - r).abs().max(), (b - r).abs().max(), r.abs().max()
        assert err_a <= 2 * err_b + 1e-2 * scale, (name, float(err_a), float(err_b), float(scale))


def test_linformer_explicit_path_dropout_and_size_limit(monkeypatch):
    """Dropout on the explicit path drops probabilities (output changes, stays finite); past
    EXPLICIT_MAX_SCORES score elements the call goes back to SDPA."""
    from model.attention import linformer as lin

    q = torch.randn(1, 2, 32, 8, dtype=torch.bfloat16)
    kp = torch.randn(1, 2, 8, 8, dtype=torch.bfloat16)
    torch.manual_seed(0)
    dropped = lin._attention_explicit(q, kp, kp, 0.5, 0.35)
    assert torch.isfinite(dropped).all() and not torch.equal(dropped, lin._attention_explicit(q, kp, kp, 0.0, 0.35))
    monkeypatch.setattr(lin, "EXPLICIT_MAX_SCORES", 1 * 2 * 32 * 8)
    assert lin._explicit_scores(q, kp)
    monkeypatch.setattr(lin, "EXPLICIT_MAX_SCORES", 1 * 2 * 32 * 8 - 1)
    assert not lin._explicit_scores(q, kp)
