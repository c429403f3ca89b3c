"""BERT-LSH attention by buckets (CPU fast path): only the colliding pairs are multiplied.

With one hash table (``code`` semantics) or under ``paper`` semantics (every table must agree, so the
tuple of codes is one code), "collides" is an equivalence: queries and keys fall into buckets and a
pair collides iff the query's and the key's buckets are the same. Sorting the queries and the keys of
a head by (code, position) makes every bucket c a pair of contiguous ranges, Q_c and K_c, and all of
that bucket's products are M_c = Q_c K_c^T / sqrt(d) (about n^2 / 2^bands entries per head instead of
n^2). Each bucket is padded to whole tiles of ``TILE`` slots, and every (query tile, key tile) pair of
a bucket that holds a used entry becomes one batch row, so all groups (batch x heads) and buckets run
as a few batched GEMMs and elementwise passes over [pairs, T, T] (chunked to ``_CHUNK_BYTES``),
whatever the number of buckets.

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

_CHUNK_BYTES = 16 << 20  # temporaries of one chunk of tile pairs (about cache-sized: much faster than streaming)
TILE = 64  # slots per tile (rows and columns): smaller skips more of the unused lower staircase, at more ops


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


class _Side:
    """The tiled sorted layout of one side (queries or keys): tokens sorted by (bucket, position),
    each bucket padded to whole tiles of T slots. ``slot_tok`` [S] flat token per slot (0 for a
    padding slot), ``slot_pos`` [S] its position (``pad_pos`` for padding), ``tok_slot`` [g * n] the
    slot of each token (S, a null slot, when its bucket has no partner on the other side)."""

    def __init__(self, bucket, counts, live, n, tile, pad_pos):
        device = bucket.device
        tiles = torch.where(live, (counts + tile - 1) // tile, 0)  # [B]
        self.num_tiles = int(tiles.sum().item())
        size = self.num_tiles * tile
        tile_start = torch.cumsum(tiles, 0) - tiles
        first = torch.cumsum(counts, 0) - counts
        pos = torch.arange(bucket.numel(), device=device) % n
        order = torch.sort(bucket * n + pos).indices  # flat tokens by (bucket, position)
        b_sorted = bucket[order]
        rank = torch.arange(order.numel(), device=device) - first[b_sorted]
        slot = tile_start[b_sorted] * tile + rank
        keep = live[b_sorted]
        self.slot_tok = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_tok[slot[keep]] = order[keep]
        self.slot_pos = torch.full((size,), pad_pos, dtype=torch.long, device=device)
        self.slot_pos[slot[keep]] = pos[order[keep]]
        self.tok_slot = torch.full((bucket.numel(),), size, dtype=torch.long, device=device)
        self.tok_slot[order[keep]] = slot[keep]
        self.tiles, self.tile_start, self.size = tiles, tile_start, size


class _Plan:
    """Block-sparse plan of one call: both sides' tiled layouts and the (query tile, key tile) pairs
    of a bucket that hold a used entry (some i_a <= j_b), vectorised over all groups and buckets."""

    def __init__(self, cq, ck, key_ok, tile):
        g, n = cq.shape
        device = cq.device
        span = int(max(cq.max().item(), ck.max().item())) + 1
        base = torch.arange(g, device=device)[:, None] * span
        keys, bucket = torch.unique(torch.cat([(cq + base).reshape(-1), (ck + base).reshape(-1)]),
                                    return_inverse=True)
        bq, bk = bucket[:g * n], bucket[g * n:]
        nb = keys.numel()
        nq, nk = torch.bincount(bq, minlength=nb), torch.bincount(bk, minlength=nb)
        live = (nq > 0) & (nk > 0)
        self.tile, self.n, self.g = tile, n, g
        self.q = _Side(bq, nq, live, n, tile, pad_pos=n + 1)  # padding slots: never <= a key position
        self.k = _Side(bk, nk, live, n, tile, pad_pos=-1)
        # candidate pairs per bucket: tiles_q x tiles_k, kept if min position of the query tile
        # <= max position of the key tile (else every entry has j_b < i_a and is unused)
        tq, tk = self.q.tiles, self.k.tiles
        cand = tq * tk
        total = int(cand.sum().item())
        cb = torch.repeat_interleave(torch.arange(nb, device=device), cand)
        local = torch.arange(total, device=device) - (torch.cumsum(cand, 0) - cand)[cb]
        pi = self.q.tile_start[cb] + local // tk[cb]
        pj = self.k.tile_start[cb] + local % tk[cb]
        qmin = self.q.slot_pos.view(-1, tile).amin(1)
        kmax = self.k.slot_pos.view(-1, tile).amax(1)
        used = qmin.index_select(0, pi) <= kmax.index_select(0, pj)
        self.pi, self.pj = pi[used], pj[used]
        self.pos_q = self.q.slot_pos.view(-1, tile)
        self.pos_k = self.k.slot_pos.view(-1, tile)
        self.ok_q = self.ok_k = None
        if key_ok is not None:
            flat_ok = key_ok.reshape(-1)
            self.ok_q = flat_ok[self.q.slot_tok].view(-1, tile)  # the query slot's token is a real key
            self.ok_k = flat_ok[self.k.slot_tok].view(-1, tile)

    def tiles_q(self, x):
        """Token tensor [g, n, d] -> [tiles_q, T, d] in the query layout (padding slots: token 0)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.q.slot_tok).view(-1, self.tile, x.shape[-1])

    def tiles_k(self, x):
        return x.reshape(-1, x.shape[-1]).index_select(0, self.k.slot_tok).view(-1, self.tile, x.shape[-1])

    def chunks(self, budget_entries):
        per = max(1, budget_entries // (self.tile * self.tile))
        for c0 in range(0, self.pi.numel(), per):
            yield self.pi[c0:c0 + per], self.pj[c0:c0 + per]

    def logits(self, qt, kt, pi, pj):
        """(M_r, M_l, R, Lm) [P, T, T] of pairs: M = (scale q) k^T with -inf outside the right mask
        R (i_a <= j_b, j_b a real key) / the left mask Lm (i_a < j_b, i_a a real key)."""
        pq, pk = self.pos_q.index_select(0, pi)[:, :, None], self.pos_k.index_select(0, pj)[:, None, :]
        right, left = pq <= pk, pq < pk
        if self.ok_q is not None:
            right &= self.ok_k.index_select(0, pj)[:, None, :]
            left &= self.ok_q.index_select(0, pi)[:, :, None]
        m = torch.bmm(qt.index_select(0, pi), kt.index_select(0, pj).transpose(1, 2))
        ninf = m.new_full((), float("-inf"))
        return torch.where(right, m, ninf), torch.where(left, m, ninf), right, left


def _slots(x: torch.Tensor, tile: int) -> torch.Tensor:
    """[tiles, T, ...] -> [tiles * T + 1, ...] with a zero null slot appended."""
    flat = x.reshape(-1, *x.shape[2:])
    return torch.cat([flat, flat.new_zeros(1, *x.shape[2:])])


def _row_index(p: torch.Tensor, tile: int) -> torch.Tensor:
    """pair tiles [P] -> the flat slots [P * T] of their rows."""
    return (p[:, None] * tile + torch.arange(tile, device=p.device)).reshape(-1)


class _LshBucketsCode(torch.autograd.Function):
    """``code`` semantics, one table, no dropout. q, k, v [g, n, d]; codes [g, n]; key_ok bool [g, n] or None."""

    @staticmethod
    def forward(ctx, q, k, v, cq, ck, key_ok, max_bytes, tile):
        g_count, n, d = q.shape
        scale = 1.0 / math.sqrt(d)
        plan = _Plan(cq, ck, key_ok, tile)
        qt, kt = plan.tiles_q(q * scale), plan.tiles_k(k)  # [tiles, T, d]
        vq, vk = plan.tiles_q(v), plan.tiles_k(v)
        sq, sk = plan.q.size, plan.k.size
        ninf = float("-inf")
        max_r, max_l = q.new_full((sq,), ninf), q.new_full((sk,), ninf)  # per slot
        cnt_r, cnt_l = q.new_zeros(sq), q.new_zeros(sk)
        z_r, z_l = q.new_zeros(sq), q.new_zeros(sk)
        acc_q, acc_k = q.new_zeros(plan.q.num_tiles, tile, d), q.new_zeros(plan.k.num_tiles, tile, d)
        chunk = _CHUNK_BYTES // (4 * q.element_size())
        cache, budget = [], max_bytes // 2
        for pi, pj in plan.chunks(chunk):  # pass 1: maxima and counts per slot
            m_r, m_l, right, left = plan.logits(qt, kt, pi, pj)
            rq, rk = _row_index(pi, tile), _row_index(pj, tile)
            max_r.scatter_reduce_(0, rq, m_r.amax(2).reshape(-1), "amax")
            max_l.scatter_reduce_(0, rk, m_l.amax(1).reshape(-1), "amax")
            cnt_r.index_add_(0, rq, right.sum(2).reshape(-1).to(q.dtype))
            cnt_l.index_add_(0, rk, left.sum(1).reshape(-1).to(q.dtype))
            size = m_r.numel() * (2 * m_r.element_size() + 2)
            cache.append((m_r, m_l, right, left) if size <= budget else None)
            budget -= size if size <= budget else 0
        # per token: m = max(right max, left max, and 0 if some real key did not collide)
        tq, tk = plan.q.tok_slot, plan.k.tok_slot  # [g * n], null slot = size
        pad = q.new_full((1,), ninf)
        n_real = q.new_full((g_count, n), float(n)) if key_ok is None else key_ok.sum(1, keepdim=True).to(q.dtype).expand(g_count, n)
        other = n_real.reshape(-1) - torch.cat([cnt_r, pad.new_zeros(1)])[tq] - torch.cat([cnt_l, pad.new_zeros(1)])[tk]
        has_zero = other > 0.5
        mx = torch.maximum(torch.cat([max_r, pad])[tq], torch.cat([max_l, pad])[tk])
        mx = torch.where(has_zero, mx.clamp(min=0.0), mx)  # [g * n]
        e0 = torch.where(has_zero, torch.exp(-mx), 0.0)  # e^{-m}: the weight of a logit-0 key
        mx_q, mx_k = mx[plan.q.slot_tok].view(-1, tile), mx[plan.k.slot_tok].view(-1, tile)
        e0_q, e0_k = e0[plan.q.slot_tok].view(-1, tile), e0[plan.k.slot_tok].view(-1, tile)
        for (pi, pj), got in zip(plan.chunks(chunk), cache):  # pass 2: sums and outputs
            m_r, m_l, right, left = got if got is not None else plan.logits(qt, kt, pi, pj)
            rq, rk = _row_index(pi, tile), _row_index(pj, tile)
            e_r = m_r.sub_(mx_q.index_select(0, pi)[:, :, None]).exp_()  # [P, T, T], 0 outside R
            e_l = m_l.sub_(mx_k.index_select(0, pj)[:, None, :]).exp_()
            z_r.index_add_(0, rq, e_r.sum(2).reshape(-1))
            z_l.index_add_(0, rk, e_l.sum(1).reshape(-1))
            e_r = torch.where(right, e_r.sub_(e0_q.index_select(0, pi)[:, :, None]), 0.0)  # minus the logit-0 weight
            e_l = torch.where(left, e_l.sub_(e0_k.index_select(0, pj)[:, None, :]), 0.0)
            acc_q.index_add_(0, pi, torch.bmm(e_r, vk.index_select(0, pj)))
            acc_k.index_add_(0, pj, torch.bmm(e_l.transpose(1, 2), vq.index_select(0, pi)))
        del cache
        z = torch.cat([z_r, pad.new_zeros(1)])[tq] + torch.cat([z_l, pad.new_zeros(1)])[tk] + other.clamp_(min=0) * e0
        vsum = (v if key_ok is None else v * key_ok[..., None]).sum(1)  # [g, d]
        acc = _slots(acc_q, tile)[tq] + _slots(acc_k, tile)[tk]  # [g * n, d]
        out = acc.view(g_count, n, d).addcmul_(e0.view(g_count, n, 1), vsum[:, None]).div_(z.view(g_count, n, 1))
        lse = mx + torch.log(z)
        w = e0 / z
        ctx.save_for_backward(q, k, v, cq, ck, key_ok, out, lse.view(g_count, n), w.view(g_count, n))
        ctx.tile = tile
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cq, ck, key_ok, out, lse, w = ctx.saved_tensors
        tile = ctx.tile
        g_count, n, d = q.shape
        scale = 1.0 / math.sqrt(d)
        dout = dout.to(q.dtype).contiguous()
        plan = _Plan(cq, ck, key_ok, tile)
        qt, kt = plan.tiles_q(q * scale), plan.tiles_k(k)
        vq, vk = plan.tiles_q(v), plan.tiles_k(v)
        doq, dok = plan.tiles_q(dout), plan.tiles_k(dout)
        delta = (dout * out).sum(-1)  # [g, n] rowsum(dO * O) = rowsum(P * dP)
        stats = torch.stack([lse, w, delta], -1)  # [g, n, 3]
        lse_q, w_q, dl_q = plan.tiles_q(stats).unbind(-1)  # [tiles, T] each
        lse_k, w_k, dl_k = plan.tiles_k(stats).unbind(-1)
        dqt, dkt = torch.zeros_like(qt), torch.zeros_like(kt)
        dvk, dvq = torch.zeros_like(vk), torch.zeros_like(vq)
        for pi, pj in plan.chunks(_CHUNK_BYTES // (4 * q.element_size())):
            m_r, m_l, right, left = plan.logits(qt, kt, pi, pj)
            p_r = m_r.sub_(lse_q.index_select(0, pi)[:, :, None]).exp_()  # [P, T, T] probabilities of the right entries
            p_l = m_l.sub_(lse_k.index_select(0, pj)[:, None, :]).exp_()
            dp_r = torch.bmm(doq.index_select(0, pi), vk.index_select(0, pj).transpose(1, 2))  # dO_i . v_j (row i_a, column j_b)
            dp_l = torch.bmm(vq.index_select(0, pi), dok.index_select(0, pj).transpose(1, 2))  # dO_j . v_i (row j_b, column i_a)
            ds = dp_r.sub_(dl_q.index_select(0, pi)[:, :, None]).mul_(p_r)
            ds += dp_l.sub_(dl_k.index_select(0, pj)[:, None, :]).mul_(p_l)  # dS of the logits S = scale * q_i . k_j
            dqt.index_add_(0, pi, torch.bmm(ds, kt.index_select(0, pj)))  # (times scale below)
            dkt.index_add_(0, pj, torch.bmm(ds.transpose(1, 2), qt.index_select(0, pi)))  # qt holds scale * q
            p_r = torch.where(right, p_r.sub_(w_q.index_select(0, pi)[:, :, None]), 0.0)  # minus the logit-0 weight
            p_l = torch.where(left, p_l.sub_(w_k.index_select(0, pj)[:, None, :]), 0.0)
            dvk.index_add_(0, pj, torch.bmm(p_r.transpose(1, 2), doq.index_select(0, pi)))
            dvq.index_add_(0, pi, torch.bmm(p_l, dok.index_select(0, pj)))
        tq, tk = plan.q.tok_slot, plan.k.tok_slot
        dense = (w[..., None] * dout).sum(1, keepdim=True)  # [g, 1, d]: every real key's logit-0 share
        if key_ok is not None:
            dense = dense * key_ok[..., None]
        dv = (_slots(dvk, tile)[tk] + _slots(dvq, tile)[tq]).view(g_count, n, d).add_(dense)
        dq = _slots(dqt, tile)[tq].view(g_count, n, d).mul_(scale)
        dk = _slots(dkt, tile)[tk].view(g_count, n, d)
        return dq, dk, dv, None, None, None, None, None


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
    return _LshBucketsCode.apply(q, k, v, cq, ck, key_ok, int(max_bytes), TILE)
