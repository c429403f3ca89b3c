"""BERT-LSH attention, row-blocked PyTorch path: the same numbers as the dense code in
model/attention/bert_lsh.py without its [b, h, n, n] scores, collision matrix and probabilities.

Per block of r query rows [i0, i1) (all batches and heads at once):

``code`` semantics (S[i, j] = c(q_i, k_j) q_i . k_j for j >= i, S[i, j] = c(q_j, k_i) q_j . k_i for j < i,
c = any table agrees; non-colliding logits 0, so S is symmetric):
    right = Q_blk K[i0:]^T (columns j >= i0; on the diagonal tile U = its collided upper triangle and
    S = U + U^T), left = K_blk Q[:i0]^T (columns j < i0), so each pair's product is computed once
    overall (n^2 d, as one dense QK^T); then P = softmax(S / sqrt(d), padded keys -inf), dropout,
    O_blk = P V.
``paper`` semantics: S = Q_blk K^T / sqrt(d) where every table agrees and the key is real, else -inf;
    a row without any such key outputs 0.

The backward recomputes each block's logits from the saved codes and log-sum-exp (flash-attention
style, softmax recomputed; dropout masks are regenerated from a per-call seed drawn from the default generator), so the
saved state is q, k, v, the output and the codes. Peak workspace is about
``8 * b * h * r * n`` floats; ``r`` is chosen from ``max_bytes``.
"""

from __future__ import annotations

import math

import torch

from model.kernels import lsh_buckets

_WORK_TENSORS = 6  # live [g, r, n] temporaries per tile (logits, probs, masks, dS, ...)
_TILE_BYTES = 16 << 20  # keep a tile's temporaries about cache-sized (much faster than streaming)
_MIN_ROWS = 128  # GEMMs get slow below this many rows


def tiling(bh: int, n: int, elem: int, max_bytes: int) -> tuple[int, int]:
    """(heads per tile, rows per tile): about ``_TILE_BYTES`` of temporaries, never above ``max_bytes``."""
    budget = min(max_bytes, _TILE_BYTES)
    per_row = _WORK_TENSORS * n * elem
    rows = int(max(1, min(n, max(_MIN_ROWS, budget // per_row), max_bytes // per_row)))
    heads = int(max(1, min(bh, budget // (per_row * rows))))
    return heads, rows


def _none_equal(ca: torch.Tensor, cb: torch.Tensor, every: bool) -> torch.Tensor:
    """[g, L, r] vs [g, L, c] -> bool [g, r, c]: True where NO table agrees (``every``: where SOME
    table disagrees), i.e. where the pair does not collide under ``code`` (``paper``)."""
    out = ca[:, 0, :, None] != cb[:, 0, None, :]
    for t in range(1, ca.shape[1]):
        ne = ca[:, t, :, None] != cb[:, t, None, :]
        out = (out | ne) if every else (out & ne)
    return out


def _dropout_keep(shape, p: float, seed: int, g0: int, i0: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + g0 * 131_071 + i0) & ((1 << 63) - 1))
    return torch.rand(shape, generator=g, device=device) >= p


def _tile_logits(qs, k, cq, ck, key_bad, i0, i1, semantics):
    """Logits of rows [i0, i1) of a head group from the pre-scaled queries ``qs`` [g, n, d] ->
    (logits [g, r, n], no-collision mask of the right part, of the left part, rows-with-a-key or None).
    ``code``: right = columns j >= i0 (S = q_i . k_j for j >= i), left = columns j < i1 (S = q_j . k_i
    for j < i); the masks say where S is 0 (needed again by the backward)."""
    n = qs.shape[1]
    qb = qs[:, i0:i1]
    if semantics == "paper":
        bad = _none_equal(cq[..., i0:i1], ck, every=True)
        if key_bad is not None:
            bad |= key_bad
        logits = torch.bmm(qb, k.transpose(1, 2)).masked_fill_(bad, float("-inf"))
        if not bool(bad.all(-1).any()):
            return logits, None, None, None
        row_ok = ~bad.all(-1, keepdim=True)
        return logits.masked_fill_(~row_ok, 0.0), None, None, row_ok
    r = i1 - i0
    nr, nl = _code_masks(cq, ck, i0, i1)
    right = torch.bmm(qb, k[:, i0:].transpose(1, 2)).masked_fill_(nr, 0.0)  # U on the diagonal tile
    logits = qs.new_empty(qs.shape[0], r, n)
    logits[..., i0:] = right
    diag = logits[..., i0:i1]
    diag += right[..., :r].transpose(1, 2)  # S = U + U^T on the diagonal tile ...
    diag.diagonal(dim1=1, dim2=2).mul_(0.5)  # ... with the diagonal once (exact: (x + x) / 2 = x)
    if nl is not None:
        logits[..., :i0] = torch.bmm(k[:, i0:i1], qs[:, :i0].transpose(1, 2)).masked_fill_(nl, 0.0)
    if key_bad is not None:
        logits.masked_fill_(key_bad, float("-inf"))
    return logits, nr, nl, None


def _code_masks(cq, ck, i0, i1):
    """``code`` semantics, rows [i0, i1): where S is 0 in columns j >= i0 (no collision of (q_i, k_j),
    or j < i inside the diagonal tile) and in columns j < i0 (no collision of (q_j, k_i)); None if i0 = 0."""
    r = i1 - i0
    nr = _none_equal(cq[..., i0:i1], ck[..., i0:], every=False)  # [g, r, n - i0]
    nr[..., :r] |= torch.ones(r, r, dtype=torch.bool, device=cq.device).tril_(-1)
    nl = _none_equal(ck[..., i0:i1], cq[..., :i0], every=False) if i0 > 0 else None  # [g, r, i0]
    return nr, nl


def _probs(logits, row_ok):
    p = torch.softmax(logits, dim=-1)
    return p if row_ok is None else p.mul_(row_ok)


def _tiles(bh: int, n: int, elem: int, max_bytes: int):
    heads, rows = tiling(bh, n, elem, max_bytes)
    for g0 in range(0, bh, heads):
        for i0 in range(0, n, rows):
            yield slice(g0, min(bh, g0 + heads)), i0, min(n, i0 + rows)


class _LshBlocked(torch.autograd.Function):
    """q, k, v [bh, n, d]; codes [bh, L, n]; key_bad bool [bh, 1, n] (True = masked key) or None.
    The probabilities are kept for the backward when they take at most half of ``max_bytes``
    (short sequences: no recomputation), else recomputed tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, cq, ck, key_bad, semantics, dropout_p, seed, max_bytes):
        bh, n, d = q.shape
        qs = q * (1.0 / math.sqrt(d))
        out = torch.empty_like(v)
        keep_p = bh * n * n * q.element_size() <= max_bytes // 2
        probs = q.new_empty(bh, n, n) if keep_p else q.new_empty(0)
        for hs, i0, i1 in _tiles(bh, n, q.element_size(), max_bytes):
            kb = None if key_bad is None else key_bad[hs]
            logits, _, _, row_ok = _tile_logits(qs[hs], k[hs], cq[hs], ck[hs], kb, i0, i1, semantics)
            p = _probs(logits, row_ok)
            if keep_p:
                probs[hs, i0:i1] = p
            if dropout_p > 0:
                p = p * _dropout_keep(p.shape, dropout_p, seed, hs.start, i0, q.device) / (1 - dropout_p)
            out[hs, i0:i1] = torch.bmm(p, v[hs])
        ctx.save_for_backward(q, k, v, cq, ck, key_bad, out, probs)
        ctx.cfg = (semantics, dropout_p, seed, max_bytes)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cq, ck, key_bad, out, probs = ctx.saved_tensors
        semantics, dropout_p, seed, max_bytes = ctx.cfg
        bh, n, d = q.shape
        scale = 1.0 / math.sqrt(d)
        qs = q * scale
        dout = dout.to(q.dtype)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        delta = (dout * out).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        for hs, i0, i1 in _tiles(bh, n, q.element_size(), max_bytes):
            kb = None if key_bad is None else key_bad[hs]
            qh, kh, vh = q[hs], k[hs], v[hs]
            if probs.numel():
                p = probs[hs, i0:i1]
                nr, nl = _code_masks(cq[hs], ck[hs], i0, i1) if semantics == "code" else (None, None)
            else:
                logits, nr, nl, row_ok = _tile_logits(qs[hs], kh, cq[hs], ck[hs], kb, i0, i1, semantics)
                p = _probs(logits, row_ok)
                del logits
            dob = dout[hs, i0:i1]
            dp = torch.bmm(dob, vh.transpose(1, 2))
            if dropout_p > 0:
                keep = _dropout_keep(p.shape, dropout_p, seed, hs.start, i0, q.device).to(p.dtype)
                keep /= 1 - dropout_p
                dv[hs] += torch.bmm((p * keep).transpose(1, 2), dob)
                dp.mul_(keep)
                del keep
            else:
                dv[hs] += torch.bmm(p.transpose(1, 2), dob)
            ds = dp.sub_(delta[hs, i0:i1]).mul_(p).mul_(scale)  # gradient of the unscaled S
            del p
            if semantics == "paper":
                dq[hs, i0:i1] += torch.bmm(ds, kh)
                dk[hs] += torch.bmm(ds.transpose(1, 2), qh[:, i0:i1])
                continue
            if nl is not None:  # columns j < i0: S[i, j] = q_j . k_i
                dl = ds[..., :i0].masked_fill(nl, 0.0)
                dk[hs, i0:i1] += torch.bmm(dl, qh[:, :i0])
                dq[hs, :i0] += torch.bmm(dl.transpose(1, 2), kh[:, i0:i1])
                del dl
            dd = ds[..., i0:i1]  # S = U + U^T on the diagonal tile: dU = dS + dS^T (diagonal once)
            dd += dd.transpose(1, 2).clone()
            dd.diagonal(dim1=1, dim2=2).mul_(0.5)
            du = ds[..., i0:].masked_fill_(nr, 0.0)  # columns j >= i0: S[i, j] = q_i . k_j
            dq[hs, i0:i1] += torch.bmm(du, kh[:, i0:])
            dk[hs, i0:] += torch.bmm(du.transpose(1, 2), qh[:, i0:i1])
        return dq, dk, dv, None, None, None, None, None, None, None


def bert_lsh_blocked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, codes_q: torch.Tensor,
                     codes_k: torch.Tensor, key_padding_mask: torch.Tensor | None, semantics: str,
                     dropout_p: float = 0.0, max_bytes: int = 256 << 20, buckets: bool = True) -> torch.Tensor:
    """BERT-LSH attention from precomputed codes, O(block * n) workspace.

    Without dropout, with one table (``code``) or under ``paper``, the bucket form of
    model/kernels/lsh_buckets.py computes it (only colliding pairs multiplied; same numbers);
    ``buckets=False`` forces the row-blocked form below.

    Args:
        q, k, v: [b, h, n, d] (computed in fp32, or fp64 when given fp64; returned in v's dtype).
        codes_q, codes_k: int [b, h, L, n] bucket codes (``model.attention.bert_lsh.lsh_codes``).
        key_padding_mask: bool [b, n], True = real token (None = all real).
        semantics: ``code`` or ``paper`` (see model/attention/bert_lsh.py).
        dropout_p: dropout on the attention probabilities (mask seeded from the default generator).
        max_bytes: workspace budget that sets the row block.
        buckets: use the bucket form where it applies.
    """
    b, h, n, d = q.shape
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_dtype = v.dtype
    key_bad = None
    if key_padding_mask is not None and not bool(key_padding_mask.all()):
        ok = key_padding_mask
        if semantics == "code":  # a fully padded sequence sees every key (its outputs are never used)
            ok = ok | ~key_padding_mask.any(-1, keepdim=True)
        key_bad = (~ok)[:, None, None, :].expand(b, h, 1, n).reshape(b * h, 1, n)
    flat = [t.to(ct).reshape(b * h, n, d) for t in (q, k, v)]
    codes = [c.reshape(b * h, c.shape[2], n) for c in (codes_q, codes_k)]
    if buckets and lsh_buckets.supported(semantics, codes_q.shape[2], dropout_p):
        key_ok = None if key_bad is None else ~key_bad[:, 0]
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = lsh_buckets.bert_lsh_buckets(*flat, *codes, key_ok, semantics, int(max_bytes))
        return out.view(b, h, n, d).to(out_dtype)
    seed = int(torch.randint(0, 1 << 62, (1,)).item()) if dropout_p > 0 else 0
    with torch.autocast(device_type=q.device.type, enabled=False):
        out = _LshBlocked.apply(*flat, *codes, key_bad, semantics, float(dropout_p), seed, int(max_bytes))
    return out.view(b, h, n, d).to(out_dtype)
