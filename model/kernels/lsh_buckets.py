"""BERT-LSH attention by buckets (CPU fast path): only the colliding pairs are multiplied.

With one hash table (``code`` semantics) or under ``paper`` semantics (every table must agree, so the
tuple of codes is one code), "collides" is an equivalence: queries and keys fall into buckets and a
pair collides iff the query's and the key's buckets are the same. Sorting the queries and the keys of
a head by (code, position) makes every bucket c a pair of contiguous ranges, Q_c and K_c, and all of
that bucket's products are one small GEMM M_c = Q_c K_c^T / sqrt(d) (about n^2 / 2^bands entries per
head instead of n^2).

``code`` semantics (model/attention/bert_lsh.py): S[i, j] = q_i . k_j if j >= i and (q_i, k_j) collide,
S[i, j] = q_j . k_i if j < i and (q_j, k_i) collide, else 0 (not -inf). An entry (a, b) of M_c, query
token i_a and key token j_b, is therefore used twice when i_a <= j_b: by row i_a at column j_b ("right"
mask R, j_b a real key) and, if i_a < j_b, by row j_b at column i_a ("left" mask Lm, i_a a real key);
entries with i_a > j_b are unused. Every other real key of a row has logit 0, so with the row max m
and sum Z::

    O_i = ( sum_{colliding j} (e^{S_ij - m_i} - e^{-m_i}) v_j  +  e^{-m_i} sum_{real j} v_j ) / Z_i
    Z_i = sum_{colliding j} e^{S_ij - m_i}  +  (#non-colliding real keys) e^{-m_i}

(the e^{-m} terms vanish for a row whose every real key collides). Two passes per head: the first
collects each token's max over its right entries (its query's bucket) and its left entries (its
key's bucket), the second the sums and outputs. The backward recomputes the blocks from the saved
log-sum-exp (flash-attention style): dS = P (dP - rowsum(dO * O)) on the colliding entries, and dV
adds the dense part sum_i w_i dO_i (w_i = e^{-m_i} / Z_i, the weight of a non-colliding key) to every
real key, minus the colliding entries' share.

``paper`` semantics: per bucket, ordinary softmax attention of Q_c over the real keys of K_c (SDPA,
autograd); a query whose bucket holds no real key outputs 0.

Dropout and ``code`` with several tables (OR of tables: not an equivalence) are not handled here;
model/kernels/lsh_torch.py (row-blocked, every pair) takes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 16 << 20  # temporaries of one row chunk of a bucket block (cache-sized)
_CHUNK_TEMPS = 18  # bytes per block entry live in a chunk (M_r, M_l, exp, R, Lm, ...)
_CHUNK_ROWS = 256  # rows per chunk: smaller skips more of the unused lower staircase, at more ops


def supported(semantics: str, num_tables: int, dropout_p: float) -> bool:
    """Whether the bucket form computes this case (else the row-blocked path does)."""
    return dropout_p == 0.0 and (semantics == "paper" or num_tables == 1)


def bucket_codes(codes_q: torch.Tensor, codes_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int [g, L, n] each -> [g, n] each: one code per token whose equality is "every table agrees"."""
    if codes_q.shape[1] == 1:
        return codes_q[:, 0], codes_k[:, 0]
    size = int(max(codes_q.max().item(), codes_k.max().item())) + 1
    if codes_q.shape[1] * math.log2(max(size, 2)) > 62:
        raise ValueError("too many tables to combine their codes into one int64")
    out = []
    for codes in (codes_q, codes_k):
        c = codes[:, 0]
        for t in range(1, codes.shape[1]):
            c = c * size + codes[:, t]
        out.append(c)
    return out[0], out[1]


def _sorted(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[g, n] codes -> (sorted codes, token positions in that order), stable (positions ascending per code)."""
    return torch.sort(codes, dim=-1, stable=True)


def _blocks(sq: torch.Tensor, sk: torch.Tensor, skip_code: int | None = None) -> list[list[tuple[int, int, int, int]]]:
    """Per group, the buckets present on both sides as (q_start, q_count, k_start, k_count) in the sorted orders."""
    out = []
    for g in range(sq.shape[0]):
        cq, nq = torch.unique_consecutive(sq[g], return_counts=True)
        ck, nk = torch.unique_consecutive(sk[g], return_counts=True)
        kpos, start = {}, 0
        for c, cnt in zip(ck.tolist(), nk.tolist()):
            kpos[c] = (start, cnt)
            start += cnt
        blocks, start = [], 0
        for c, cnt in zip(cq.tolist(), nq.tolist()):
            if c in kpos and c != skip_code:
                blocks.append((start, cnt, *kpos[c]))
            start += cnt
        out.append(blocks)
    return out


def _flat_index(order: torch.Tensor) -> torch.Tensor:
    """[g, n] positions per group -> [g * n] rows of the flattened [g * n, ...] tensor."""
    g, n = order.shape
    return (order + torch.arange(g, device=order.device)[:, None] * n).reshape(-1)


def _gather(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """x [g, n, ...] in the token order -> the same in the order whose ``_flat_index`` is ``flat``."""
    return x.reshape(flat.numel(), -1).index_select(0, flat).view(x.shape)


def _chunks(iq: torch.Tensor, ik: torch.Tensor, qs: int, qn: int, ks: int, kn: int) -> list[tuple[int, int, int]]:
    """Row chunks (a0, a1, b0) of a block: entries with j_b < i_a are never used, and both orders
    ascend within a bucket, so columns before b0 = #{b: j_b < i_(a0)} are skipped for rows a >= a0."""
    rows = max(1, min(qn, _CHUNK_ROWS, _CHUNK_BYTES // max(1, kn * _CHUNK_TEMPS)))
    starts = list(range(0, qn, rows))
    firsts = iq[qs:qs + qn][starts]
    b0s = torch.searchsorted(ik[ks:ks + kn], firsts).tolist()
    return [(a0, min(qn, a0 + rows), b0) for a0, b0 in zip(starts, b0s) if b0 < kn]


class _Sorted:
    """One call's bucket plan: the sort orders, the blocks, sorted copies of q (pre-scaled), k, v and
    the key masks. Orders are [g, n] token positions; ``inv_*`` map back (sorted index of each token)."""

    def __init__(self, qs, k, v, cq, ck, key_ok):
        g, n = cq.shape
        codes_q, self.iq = _sorted(cq)
        codes_k, self.ik = _sorted(ck)
        self.blocks = _blocks(codes_q, codes_k)
        ar = torch.arange(n, device=cq.device).expand(g, n)
        self.inv_q = torch.empty_like(self.iq).scatter_(1, self.iq, ar)
        self.inv_k = torch.empty_like(self.ik).scatter_(1, self.ik, ar)
        self.fq, self.fk = _flat_index(self.iq), _flat_index(self.ik)
        self.finv_q, self.finv_k = _flat_index(self.inv_q), _flat_index(self.inv_k)
        self.q, self.vq = _gather(qs, self.fq), _gather(v, self.fq)
        self.k, self.vk = _gather(k, self.fk), _gather(v, self.fk)
        self.ok_q = None if key_ok is None else key_ok.gather(1, self.iq)  # token i_a is a real key
        self.ok_k = None if key_ok is None else key_ok.gather(1, self.ik)
        self.chunks = [[_chunks(self.iq[i], self.ik[i], *blk) for blk in self.blocks[i]] for i in range(g)]

    def by_query(self, x):  # token order -> query order
        return _gather(x, self.fq)

    def by_key(self, x):
        return _gather(x, self.fk)

    def from_query(self, x):  # query order -> token order
        return _gather(x, self.finv_q)

    def from_key(self, x):
        return _gather(x, self.finv_k)

    def logits(self, g, qs, ks, kn, a0, a1, b0):
        """(M_r, M_l, R, Lm) of rows [a0, a1), columns [b0, kn) of a block: M = (scale q) k^T with
        -inf outside the right mask R (i_a <= j_b, j_b real) / the left mask Lm (i_a < j_b, i_a real)."""
        rows, cols = slice(qs + a0, qs + a1), slice(ks + b0, ks + kn)
        iq, ik = self.iq[g, rows, None], self.ik[g, None, cols]
        right, left = iq <= ik, iq < ik
        if self.ok_q is not None:
            right &= self.ok_k[g, None, cols]
            left &= self.ok_q[g, rows, None]
        m = self.q[g, rows] @ self.k[g, cols].transpose(0, 1)  # [r, c]
        ninf = m.new_full((), float("-inf"))
        return torch.where(right, m, ninf), torch.where(left, m, ninf), right, left


class _LshBucketsCode(torch.autograd.Function):
    """``code`` semantics, one table, no dropout. q, k, v [g, n, d]; codes [g, n]; key_ok bool [g, n] or None."""

    @staticmethod
    def forward(ctx, q, k, v, cq, ck, key_ok, max_bytes):
        g_count, n, d = q.shape
        scale = 1.0 / math.sqrt(d)
        plan = _Sorted(q * scale, k, v, cq, ck, key_ok)
        ninf = float("-inf")
        # per token: right stats in query order (its query's bucket), left stats in key order
        max_r, max_l = q.new_full((g_count, n), ninf), q.new_full((g_count, n), ninf)
        cnt_r, cnt_l = q.new_zeros(g_count, n), q.new_zeros(g_count, n)
        z_r, z_l = q.new_zeros(g_count, n), q.new_zeros(g_count, n)
        acc_q, acc_k = torch.zeros_like(q), torch.zeros_like(q)  # unnormalised outputs, query / key order
        vsum = (v if key_ok is None else v * key_ok[..., None]).sum(1)  # [g, d]
        n_real = q.new_full((g_count,), float(n)) if key_ok is None else key_ok.sum(1).to(q.dtype)
        mx_t, e0_t, other = q.new_empty(g_count, n), q.new_empty(g_count, n), q.new_empty(g_count, n)
        for g in range(g_count):
            cache, budget = {}, max_bytes // 2
            for (qs, qn, ks, kn), chunks in zip(plan.blocks[g], plan.chunks[g]):  # pass 1: maxima, counts
                for a0, a1, b0 in chunks:
                    m_r, m_l, right, left = plan.logits(g, qs, ks, kn, a0, a1, b0)
                    rows, cols = slice(qs + a0, qs + a1), slice(ks + b0, ks + kn)
                    max_r[g, rows] = m_r.amax(1)
                    cnt_r[g, rows] = right.sum(1)
                    torch.maximum(max_l[g, cols], m_l.amax(0), out=max_l[g, cols])
                    cnt_l[g, cols] += left.sum(0)
                    size = m_r.numel() * (2 * m_r.element_size() + 2)
                    if size <= budget:
                        cache[(qs, a0)] = (m_r, m_l, right, left)
                        budget -= size
            # per token (token order): m = max(right max, left max, and 0 if some real key did not collide)
            tq, tk = plan.inv_q[g], plan.inv_k[g]
            other[g] = n_real[g] - cnt_r[g, tq] - cnt_l[g, tk]
            has_zero = other[g] > 0.5
            mx = torch.maximum(max_r[g, tq], max_l[g, tk])
            mx_t[g] = torch.where(has_zero, mx.clamp(min=0.0), mx)
            e0_t[g] = torch.where(has_zero, torch.exp(-mx_t[g]), 0.0)  # e^{-m}: weight of a logit-0 key
            mx_q, mx_k = mx_t[g, plan.iq[g]], mx_t[g, plan.ik[g]]
            e0_q, e0_k = e0_t[g, plan.iq[g]], e0_t[g, plan.ik[g]]
            for (qs, qn, ks, kn), chunks in zip(plan.blocks[g], plan.chunks[g]):  # pass 2: sums, outputs
                for a0, a1, b0 in chunks:
                    got = cache.pop((qs, a0), None)
                    m_r, m_l, right, left = got if got is not None else plan.logits(g, qs, ks, kn, a0, a1, b0)
                    rows, cols = slice(qs + a0, qs + a1), slice(ks + b0, ks + kn)
                    e_r = m_r.sub_(mx_q[rows, None]).exp_()  # [r, c], 0 outside R
                    e_l = m_l.sub_(mx_k[None, cols]).exp_()
                    z_r[g, rows] = e_r.sum(1)
                    z_l[g, cols] += e_l.sum(0)
                    e_r = torch.where(right, e_r.sub_(e0_q[rows, None]), 0.0)  # minus the logit-0 weight
                    e_l = torch.where(left, e_l.sub_(e0_k[None, cols]), 0.0)
                    acc_q[g, rows] = e_r @ plan.vk[g, cols]
                    acc_k[g, cols] += e_l.transpose(0, 1) @ plan.vq[g, rows]
        z_t = plan.from_query(z_r[..., None])[..., 0] + plan.from_key(z_l[..., None])[..., 0] + other.clamp_(min=0) * e0_t
        out = (plan.from_query(acc_q) + plan.from_key(acc_k)).addcmul_(e0_t[..., None], vsum[:, None]).div_(z_t[..., None])
        lse = mx_t + torch.log(z_t)
        w = e0_t / z_t
        ctx.save_for_backward(q, k, v, cq, ck, key_ok, out, lse, w)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cq, ck, key_ok, out, lse, w = ctx.saved_tensors
        g_count, n, d = q.shape
        scale = 1.0 / math.sqrt(d)
        dout = dout.to(q.dtype).contiguous()
        plan = _Sorted(q * scale, k, v, cq, ck, key_ok)
        delta = (dout * out).sum(-1)  # [g, n] rowsum(dO * O) = rowsum(P * dP)
        do_q, do_k = plan.by_query(dout), plan.by_key(dout)
        stats = torch.stack([lse, w, delta], -1)  # [g, n, 3]
        lse_q, w_q, dl_q = plan.by_query(stats).unbind(-1)
        lse_k, w_k, dl_k = plan.by_key(stats).unbind(-1)
        dq_s, dk_s = torch.zeros_like(q), torch.zeros_like(k)  # query order / key order
        dvk_s, dvq_s = torch.zeros_like(v), torch.zeros_like(v)
        for g in range(g_count):
            for (qs, qn, ks, kn), chunks in zip(plan.blocks[g], plan.chunks[g]):
                for a0, a1, b0 in chunks:
                    rows, cols = slice(qs + a0, qs + a1), slice(ks + b0, ks + kn)
                    kb, vkb, dokb = plan.k[g, cols], plan.vk[g, cols], do_k[g, cols]
                    m_r, m_l, right, left = plan.logits(g, qs, ks, kn, a0, a1, b0)
                    p_r = m_r.sub_(lse_q[g, rows, None]).exp_()  # [r, c] probabilities of the right entries
                    p_l = m_l.sub_(lse_k[g, None, cols]).exp_()
                    dp_r = do_q[g, rows] @ vkb.transpose(0, 1)  # dO_i . v_j (row i_a, column j_b)
                    dp_l = plan.vq[g, rows] @ dokb.transpose(0, 1)  # dO_j . v_i (row j_b, column i_a)
                    ds = dp_r.sub_(dl_q[g, rows, None]).mul_(p_r)
                    ds += dp_l.sub_(dl_k[g, None, cols]).mul_(p_l)  # dS of the logits S = scale * q_i . k_j
                    dq_s[g, rows] += ds @ kb  # (times scale below)
                    dk_s[g, cols] += ds.transpose(0, 1) @ plan.q[g, rows]  # plan.q holds scale * q
                    p_r = torch.where(right, p_r.sub_(w_q[g, rows, None]), 0.0)  # minus the logit-0 weight
                    p_l = torch.where(left, p_l.sub_(w_k[g, None, cols]), 0.0)
                    dvk_s[g, cols] += p_r.transpose(0, 1) @ do_q[g, rows]
                    dvq_s[g, rows] += p_l @ dokb
        dense = (w[..., None] * dout).sum(1, keepdim=True)  # [g, 1, d]: every real key's logit-0 share
        if key_ok is not None:
            dense = dense * key_ok[..., None]
        dv = (plan.from_key(dvk_s) + plan.from_query(dvq_s)).add_(dense)
        return plan.from_query(dq_s).mul_(scale), plan.from_key(dk_s), dv, None, None, None, None


def _paper(q, k, v, cq, ck, key_ok):
    """``paper`` semantics by buckets with autograd: SDPA per bucket, 0 where a query's bucket has no real key."""
    g_count, n, d = q.shape
    if key_ok is not None:
        ck = torch.where(key_ok, ck, torch.full_like(ck, -1))  # padded keys join no query's bucket
    sq, iq = _sorted(cq)
    sk, ik = _sorted(ck)
    blocks = _blocks(sq, sk, skip_code=-1)
    fk = _flat_index(ik)
    qs, ks, vs = _gather(q, _flat_index(iq)), _gather(k, fk), _gather(v, fk)
    rows = []
    for g in range(g_count):
        parts, last = [], 0
        for q0, qn, k0, kn in blocks[g]:
            if q0 > last:
                parts.append(q.new_zeros(q0 - last, d))
            parts.append(F.scaled_dot_product_attention(qs[g, None, q0:q0 + qn], ks[g, None, k0:k0 + kn],
                                                        vs[g, None, k0:k0 + kn])[0])
            last = q0 + qn
        if last < n:
            parts.append(q.new_zeros(n - last, d))
        rows.append(torch.cat(parts))
    out_sorted = torch.stack(rows)  # [g, n, d] by query order
    return torch.zeros_like(out_sorted).scatter(1, iq[..., None].expand(-1, -1, d), out_sorted)


def bert_lsh_buckets(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, codes_q: torch.Tensor,
                     codes_k: torch.Tensor, key_ok: torch.Tensor | None, semantics: str,
                     max_bytes: int = 256 << 20) -> torch.Tensor:
    """BERT-LSH attention by buckets (see the module docstring).

    Args:
        q, k, v: [g, n, d] (g = batch * heads), already in the compute dtype.
        codes_q, codes_k: int [g, L, n] (L = 1 for ``code``).
        key_ok: bool [g, n], True = a real key (for ``code``, the fully-padded-sequence convention
            already applied), or None.
        semantics: ``code`` or ``paper``.
        max_bytes: how much of the first pass's blocks may be kept for the second (else recomputed).
    """
    cq, ck = bucket_codes(codes_q, codes_k)
    if semantics == "paper":
        return _paper(q, k, v, cq, ck, key_ok)
    if codes_q.shape[1] != 1:
        raise ValueError("the bucket form of the code semantics needs one hash table")
    return _LshBucketsCode.apply(q, k, v, cq, ck, key_ok, int(max_bytes))
