"""The CPU paths (impl: torch) against the fp64 references: same numbers, bounded workspace."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import F64, padding_mask, randn, rel_err

from model.attention import reference as ref
from model.attention.bert_lsh import BertLshConfig, bert_lsh_attention, lsh_codes
from model.attention.yoso import YosoConfig, sample_hash_params, yoso_attention
from model.kernels import lsh_torch, yoso_torch


def _lsh_case(semantics, b=2, h=2, n=11, d=6, tables=2, bands=2, size=3, seed=3):
    q, k, v = (randn(b, h, n, d, seed=seed + i) for i in range(3))
    q[0, 1, 3] = 0  # an exact-zero projection gives bit 0
    g = torch.Generator().manual_seed(seed)
    planes = torch.randn(h, tables, bands, d, generator=g, dtype=F64)
    coeffs = torch.randint(0, size, (h, tables, bands), generator=g)
    cfg = BertLshConfig(bands=bands, table_size=size, num_hashes=tables, semantics=semantics)
    return q, k, v, planes, coeffs, cfg


@pytest.mark.parametrize("semantics", ["code", "paper"])
@pytest.mark.parametrize("max_bytes", [1 << 30, 2000])  # probabilities kept / tiles of 2-3 rows, recomputed
def test_bert_lsh_blocked_matches_loop_port_forward_and_backward(semantics, max_bytes):
    q, k, v, planes, coeffs, cfg = _lsh_case(semantics)
    mask = padding_mask(2, 11, (11, 6))
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = ref.bert_lsh_reference(*leaves, mask, planes, coeffs, 3, semantics)
    dy = randn(*want.shape, seed=9)
    grads_want = torch.autograd.grad(want, leaves, dy)
    cq, ck = lsh_codes(q, planes, coeffs, 3), lsh_codes(k, planes, coeffs, 3)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    got = lsh_torch.bert_lsh_blocked(*leaves, cq, ck, mask, semantics, max_bytes=max_bytes)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, leaves, dy), grads_want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("semantics", ["code", "paper"])
def test_bert_lsh_fully_padded_sequence_and_rows_without_collisions(semantics):
    q, k, v, planes, coeffs, cfg = _lsh_case(semantics, n=9, tables=1, bands=3, size=8)
    mask = padding_mask(2, 9, (9, 0))  # the second sequence is all padding
    want = bert_lsh_attention(q, k, v, mask, BertLshConfig(**{**cfg.__dict__, "impl": "reference"}),
                              hyperplanes=planes, coefficients=coeffs)
    cq, ck = lsh_codes(q, planes, coeffs, 8), lsh_codes(k, planes, coeffs, 8)
    got = lsh_torch.bert_lsh_blocked(q, k, v, cq, ck, mask, semantics, max_bytes=1500)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if semantics == "paper":
        assert (got[1] == 0).all()


def test_bert_lsh_blocked_dropout_gradients_are_consistent():
    """With the default generator seeded, forward and backward regenerate the same dropout masks."""
    q, k, v, planes, coeffs, _ = _lsh_case("code", b=1, n=7, d=4)
    mask = padding_mask(1, 7, (5,))
    cq, ck = lsh_codes(q, planes, coeffs, 3), lsh_codes(k, planes, coeffs, 3)

    def f(q, k, v):
        torch.manual_seed(0)
        return lsh_torch.bert_lsh_blocked(q, k, v, cq, ck, mask, "code", dropout_p=0.3, max_bytes=600)

    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(f, leaves)
    no_drop = lsh_torch.bert_lsh_blocked(q, k, v, cq, ck, mask, "code")
    assert not torch.allclose(f(q, k, v), no_drop)


def test_bert_lsh_tiling_respects_the_budget():
    for bh, n, budget in [(12, 8192, 256 << 20), (96, 512, 256 << 20), (2, 100, 4000), (1, 10, 1)]:
        heads, rows = lsh_torch.tiling(bh, n, 4, budget)
        assert 1 <= heads <= bh and 1 <= rows <= n
        assert heads * rows * n * 4 * lsh_torch._WORK_TENSORS <= max(budget, n * 4 * lsh_torch._WORK_TENSORS)


@pytest.mark.parametrize("max_bytes", [1 << 30, 4000])  # one chunk of hashes / one hash at a time
def test_yoso_cumulation_matches_dict_tables(max_bytes):
    g = torch.Generator().manual_seed(2)
    b, h, n, d, m, tau = 2, 2, 13, 5, 6, 3
    cq = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    ck = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    v = randn(b, h, n, d, seed=1)
    mask = padding_mask(b, n, (13, 0))
    out = yoso_torch.cumulation(cq, ck, v, mask.to(F64), tau, max_bytes)
    torch.testing.assert_close(out, ref.yoso_cumulation_reference(cq, ck, v, mask), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("tiles", "max_bytes"), [((32, 64), 1 << 30), ((4, 8), 1 << 30), ((2, 3), 30000)])
def test_yoso_sorted_surrogate_backward_matches_pairwise_formula(tiles, max_bytes):
    g = torch.Generator().manual_seed(4)
    b, h, n, d, m, tau = 2, 2, 21, 4, 5, 2
    qn, kn = (torch.nn.functional.normalize(randn(b, h, n, d, seed=s), dim=-1) for s in (1, 2))
    v, dy = randn(b, h, n, d, seed=3), randn(b, h, n, d, seed=4)
    cq = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    ck = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    mask = padding_mask(b, n, (21, 13))
    dq, dk = yoso_torch.surrogate_grads_sorted(qn, kn, v, dy, cq, ck, mask.to(F64), tau, max_bytes, *tiles)
    want_q, want_k, want_v = ref.yoso_grad_reference(qn, kn, v, dy, mask, tau, cq, ck)
    torch.testing.assert_close(dq, want_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, want_k, rtol=1e-10, atol=1e-12)
    leaves = [t.clone().requires_grad_(True) for t in (qn, kn, v)]
    yoso_torch.yoso_sampled(*leaves, mask.to(F64), cq, ck, tau, False, max_bytes).backward(dy)
    for got, want in zip(leaves, (want_q, want_k, want_v)):
        torch.testing.assert_close(got.grad, want, rtol=1e-10, atol=1e-12)


def test_yoso_backward_picks_sorted_tiles_for_spread_codes_and_dense_for_peaked_ones():
    g = torch.Generator().manual_seed(0)
    b, h, n, m, tau = 1, 2, 1024, 32, 9
    mask = torch.ones(b, n, dtype=F64)
    spread = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    peaked = torch.zeros(b, h, n, m, dtype=torch.int64)  # every query and key in one bucket
    assert yoso_torch.use_sorted(spread, spread, mask, tau)
    assert not yoso_torch.use_sorted(peaked, peaked, mask, tau)  # m times the dense work
    items, plans = yoso_torch.plan_sorted(spread, spread, mask, tau, 1 << 30)
    assert items == yoso_torch.sorted_cost(spread, spread, mask, tau) and len(plans) == 1
    assert yoso_torch.plan_sorted(spread, spread, mask, tau, 1 << 20)[1] is None  # chunked: not kept


@pytest.mark.parametrize("backward", ["surrogate", "exact"])
def test_yoso_torch_impl_equals_reference_impl(backward):
    """Through yoso_attention: same codes, same outputs and gradients (the sorted path at this size)."""
    q, k, v = (randn(1, 2, 300, 8, seed=s) for s in range(3))
    q = q + k  # correlated: informative collisions
    mask = padding_mask(1, 300, (280,))
    outs = []
    for impl in ("reference", "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        cfg = YosoConfig(num_hashes=6, hash_bits=4, backward=backward, impl=impl)
        out = yoso_attention(*leaves, mask, cfg, torch.Generator().manual_seed(1))
        out.backward(randn(*out.shape, seed=7) * mask[:, None, :, None])
        outs.append((out.detach(), *(t.grad for t in leaves)))
    for got, want in zip(outs[1], outs[0]):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("semantics", ["code", "paper"])
@pytest.mark.parametrize("tables,bands,size", [(1, 2, 4), (1, 3, 8), (2, 2, 3)])
@pytest.mark.parametrize("lengths", [None, (37, 20), (37, 0)])
def test_bert_lsh_bucket_form_equals_row_blocked_form(monkeypatch, semantics, tables, bands, size, lengths):
    """The bucket form (one table or paper semantics) against the row-blocked form, forward and all
    gradients, with tiles of 4 slots so buckets span many tiles and pairs (n = 37: no tile multiple),
    padding, a fully padded sequence and the code semantics' logit-0 keys."""
    from model.kernels import lsh_buckets

    monkeypatch.setattr(lsh_buckets, "TILE", 4)
    monkeypatch.setattr(lsh_buckets, "_CHUNK_BYTES", 4 * 8 * 16 * 5)  # 5 tile pairs per chunk
    b, h, n, d = 2, 3, 37, 8
    q, k, v = (randn(b, h, n, d, seed=20 + i) for i in range(3))
    g = torch.Generator().manual_seed(5)
    planes = torch.randn(h, tables, bands, d, generator=g, dtype=F64)
    coeffs = torch.randint(0, size, (h, tables, bands), generator=g)
    mask = None if lengths is None else padding_mask(b, n, lengths)
    cq, ck = lsh_codes(q, planes, coeffs, size), lsh_codes(k, planes, coeffs, size)
    dy = randn(b, h, n, d, seed=9)
    results = []
    for buckets in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        budget = 4096 if buckets and lengths else 256 << 20  # bucket form: the 1st pass's blocks recomputed / kept
        out = lsh_torch.bert_lsh_blocked(*leaves, cq, ck, mask, semantics, buckets=buckets, max_bytes=budget)
        results.append((out, *torch.autograd.grad(out, leaves, dy)))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    uses_buckets = lsh_buckets.supported(semantics, tables, 0.0)
    assert uses_buckets == (semantics == "paper" or tables == 1)


def test_bert_lsh_bucket_form_skips_unused_tile_pairs_and_keeps_fp32_close():
    """fp32 at a realistic size: the plan keeps only pairs with a used entry (about half of each
    bucket's tile grid), and the result matches the fp64 row-blocked form to fp32 rounding."""
    from model.kernels import lsh_buckets

    b, h, n, d = 1, 2, 300, 16
    q, k, v = (randn(b, h, n, d, seed=40 + i) for i in range(3))
    g = torch.Generator().manual_seed(1)
    planes = torch.randn(h, 1, 2, d, generator=g, dtype=F64)
    coeffs = torch.tensor([[[1, 2]], [[3, 5]]])
    cq, ck = lsh_codes(q, planes, coeffs, 256), lsh_codes(k, planes, coeffs, 256)
    plan = lsh_buckets._Plan(cq.reshape(b * h, n), ck.reshape(b * h, n), None, 16)
    grid = int((plan.q.tiles * plan.k.tiles).sum())
    assert 0.4 * grid < plan.pi.numel() < 0.75 * grid
    want = lsh_torch.bert_lsh_blocked(q, k, v, cq, ck, None, "code", buckets=False)
    got = lsh_torch.bert_lsh_blocked(q.float(), k.float(), v.float(), cq, ck, None, "code")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _yoso_bucket_case(n=37, m=4, tau=3, b=2, h=2, d=5, real=(37, 19), seed=5):
    g = torch.Generator().manual_seed(seed)
    qn, kn = (torch.nn.functional.normalize(randn(b, h, n, d, seed=seed + s), dim=-1) for s in (1, 2))
    v, dy = randn(b, h, n, d, seed=seed + 3), randn(b, h, n, d, seed=seed + 4)
    cq = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    ck = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    cq[0, 1, :9] = 2  # a large bucket: padded class sizes above the small ones
    ck[0, 1, 3:20] = 2
    return qn, kn, v, dy, cq, ck, padding_mask(b, n, real)


@pytest.mark.parametrize(("chunk", "s_bytes"), [(None, None), ((1, 1), None), ((3, 2), None), ((2, 3), 200)])
def test_yoso_bucket_surrogate_backward_matches_pairwise_formula(chunk, s_bytes, monkeypatch):
    """fp64, padding rows (and a fully padded tail), n prime, hash/head chunks, class batches split."""
    if s_bytes is not None:
        monkeypatch.setattr(yoso_torch, "_S_BYTES", s_bytes)
    qn, kn, v, dy, cq, ck, mask = _yoso_bucket_case()
    want_q, want_k, _ = ref.yoso_grad_reference(qn, kn, v, dy, mask, 3, cq, ck)
    dq, dk = yoso_torch.surrogate_grads_bucket(qn, kn, v, dy, cq, ck, mask.to(F64), 3, 1 << 30, chunk)
    torch.testing.assert_close(dq, want_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, want_k, rtol=1e-10, atol=1e-12)
    assert (dq[1, :, 19:] == 0).all() and (dk[1, :, 19:] == 0).all()


@pytest.mark.parametrize("small_macs", [0, 1 << 40])
def test_yoso_bucket_small_products_run_single_threaded_and_threads_are_restored(small_macs, monkeypatch):
    """Below SMALL_BMM_MACS the class products run on one thread (OpenMP wake-ups dominate them);
    the result does not depend on it and the caller's thread count comes back, also after an error."""
    monkeypatch.setattr(yoso_torch, "SMALL_BMM_MACS", small_macs)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda k: (seen.append(k), real_set(k)))
    try:
        qn, kn, v, dy, cq, ck, mask = _yoso_bucket_case()
        want_q, want_k, _ = ref.yoso_grad_reference(qn, kn, v, dy, mask, 3, cq, ck)
        dq, dk = yoso_torch.surrogate_grads_bucket(qn, kn, v, dy, cq, ck, mask.to(F64), 3, 1 << 30)
        torch.testing.assert_close(dq, want_q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dk, want_k, rtol=1e-10, atol=1e-12)
        assert torch.get_num_threads() == 2
        assert seen == ([] if small_macs == 0 else [1, 2])  # switched once per chunk at most, then back
        with pytest.raises(RuntimeError):  # a failing call (mixed dtypes)
            yoso_torch.surrogate_grads_bucket(qn, kn, v.float(), dy, cq, ck, mask.to(F64), 3, 1 << 30)
        assert torch.get_num_threads() == 2
    finally:
        real_set(before)


def test_yoso_bucket_workspace_is_kept_between_calls_and_results_do_not_alias_it():
    """On CPU the bucket backward reuses its buffers; a second call (other data) is still exact and
    the first call's results are untouched by it."""
    yoso_torch.release_workspaces()
    qn, kn, v, dy, cq, ck, mask = _yoso_bucket_case()
    want_q, want_k, _ = ref.yoso_grad_reference(qn, kn, v, dy, mask, 3, cq, ck)
    dq, dk = yoso_torch.surrogate_grads_bucket(qn, kn, v, dy, cq, ck, mask.to(F64), 3, 1 << 30)
    six = ("xq", "xdy", "xk", "xv", "oq", "ok")  # sized up front for the chunk ("s" grows with the classes)
    kept = {name: yoso_torch._SHARED.bufs[F64][name].data_ptr() for name in six}
    qn2, kn2, v2, dy2, cq2, ck2, mask2 = _yoso_bucket_case(seed=9)
    want_q2, want_k2, _ = ref.yoso_grad_reference(qn2, kn2, v2, dy2, mask2, 3, cq2, ck2)
    dq2, dk2 = yoso_torch.surrogate_grads_bucket(qn2, kn2, v2, dy2, cq2, ck2, mask2.to(F64), 3, 1 << 30)
    assert {name: yoso_torch._SHARED.bufs[F64][name].data_ptr() for name in six} == kept  # reused
    for got, want in ((dq, want_q), (dk, want_k), (dq2, want_q2), (dk2, want_k2)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    yoso_torch.release_workspaces()
    assert yoso_torch._SHARED.bufs == {}


def test_yoso_bucket_budget_chunks_and_no_collisions():
    qn, kn, v, dy, cq, ck, mask = _yoso_bucket_case(n=23, real=(23, 0))
    want_q, want_k, _ = ref.yoso_grad_reference(qn, kn, v, dy, mask, 3, cq, ck)
    assert yoso_torch._bucket_groups(23, 5, 8, 4, 4, 30000) == (1, 1)  # one (hash, head) at a time
    dq, dk = yoso_torch.surrogate_grads_bucket(qn, kn, v, dy, cq, ck, mask.to(F64), 3, 30000)
    torch.testing.assert_close(dq, want_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, want_k, rtol=1e-10, atol=1e-12)
    # queries and keys in disjoint buckets: nothing collides, zero gradients
    dq, dk = yoso_torch.surrogate_grads_bucket(qn, kn, v, dy, cq % 4, ck % 4 + 4, mask.to(F64), 3, 1 << 30)
    assert (dq == 0).all() and (dk == 0).all()


def test_yoso_sampled_backward_uses_bucket_form_for_spread_codes():
    """Through the autograd function: the bucket path (spread codes) equals the pairwise formula."""
    b, h, n, d, m, tau = 1, 3, 64, 6, 3, 6
    g = torch.Generator().manual_seed(8)
    qn, kn = (torch.nn.functional.normalize(randn(b, h, n, d, seed=s), dim=-1) for s in (1, 2))
    v, dy = randn(b, h, n, d, seed=3), randn(b, h, n, d, seed=4)
    cq = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    ck = torch.randint(0, 1 << tau, (b, h, n, m), generator=g)
    mask = padding_mask(b, n, (50,))
    assert yoso_torch.use_bucket(cq, ck, mask.to(F64), tau)
    peaked = torch.zeros_like(cq)
    assert not yoso_torch.use_bucket(peaked, peaked, mask.to(F64), tau)  # m times the dense work
    assert yoso_torch.bucket_pairs(peaked, peaked, mask.to(F64), tau) == h * m * 50 * 50
    want = ref.yoso_grad_reference(qn, kn, v, dy, mask, tau, cq, ck)
    leaves = [t.clone().requires_grad_(True) for t in (qn, kn, v)]
    yoso_torch.yoso_sampled(*leaves, mask.to(F64), cq, ck, tau, False, 1 << 30).backward(dy)
    for got, w in zip(leaves, want):
        torch.testing.assert_close(got.grad, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tau", [1, 9, 26])
def test_yoso_fast_hash_codes_equal_the_reference_codes(tau):
    from model.attention.yoso import hash_codes

    x = torch.nn.functional.normalize(randn(2, 3, 17, 8, seed=1), dim=-1)
    for kind in ("gaussian", "hadamard"):
        cfg = YosoConfig(num_hashes=3, hash_bits=tau, hash=kind)
        params = sample_hash_params(cfg, 3, 8, torch.Generator().manual_seed(2), x.device).to(F64)
        got = yoso_torch.hash_codes(x, params, 3, tau)
        assert got.dtype == torch.int64 and torch.equal(got, hash_codes(x, params, 3, tau))
