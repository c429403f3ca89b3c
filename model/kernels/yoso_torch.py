"""YOSO (sampling) PyTorch fast path: the numbers of model/attention/yoso.py, faster and memory-bounded.

Forward, Y^_i = (1/m) sum_h table_h[H_h(q_i)] with table_h[c] = sum_{j: H_h(k_j) = c} m_j v_j:
    tables [c, b*h*2^tau, d] for a chunk of c hashes (chunked under ``max_bytes``), built with one
    ``index_add_`` per hash straight from V (no [m, n, d] copy of V), and read with one
    ``embedding_bag(mode="sum")`` that gathers and sums a query's c bucket rows in a single pass.

Backward:
    dV = the same cumulation with the roles swapped (a table of m_i dY_i keyed by query codes, read with
        key codes): exact for the sampled estimator, linear in n.
    dQ^, dK^ (``backward: surrogate``): dQ^_i = tau/(2m) sum_h sum_{j: H_h(q_i) = H_h(k_j)} (dY_i . v_j) k^_j
        (and symmetrically dK^), computed per hash over bucket-sorted tiles: queries and keys are sorted
        by their code, a tile of T consecutive sorted queries can only collide with one contiguous
        range of sorted keys, covered by windows of R keys; each (tile, window) is a small dense
        [T, R] problem (two bmm's + collision mask). The work grows with the colliding pairs
        (~ m n^2 / 2^tau for spread-out codes), not with n^2; ``sorted_cost`` estimates it and
        ``surrogate_grads`` falls back to the dense query-blocked form when that is cheaper (peaked
        attention: many queries and keys in few buckets).
    ``backward: exact`` needs each colliding pair once (not once per hash), so it uses the dense form.

The table-of-outer-products form (tables of v_j k^_j^T, d x d per bucket) is also linear in n but
costs m n d^2 per direction; it only beats the sorted tiles when buckets hold more than ~d keys
(n > d 2^tau, e.g. n > 32768 at d = 64, tau = 9), beyond the lengths this project trains at.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

TILE_Q = 32  # sorted queries per tile
TILE_K = 64  # sorted keys per window
_SLICE_BYTES = 8 << 20  # workspace of one slice of work items (cache-sized)


def cumulation(codes_q: torch.Tensor, codes_k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               tau: int, max_bytes: int) -> torch.Tensor:
    """Y^_i = (1/m) sum_h sum_j [H_h(q_i) = H_h(k_j)] m_i m_j v_j (``yoso.yoso_cumulation``'s contract).

    Args:
        codes_q, codes_k: int [b, h, n, m] bucket codes in [0, 2^tau).
        v: [b, h, n, d].  mask: float [b, n] (1 = real token).
        max_bytes: cap on the hash tables held at once (at least one hash's tables must fit).
    """
    b, h, n, d = v.shape
    m = codes_k.shape[-1]
    bh, buckets = b * h, 1 << tau
    per_hash = bh * buckets * d * v.element_size()
    chunk = int(max(1, min(m, max_bytes // max(1, per_hash))))
    vm = (v * mask[:, None, :, None]).reshape(bh * n, d)
    cq, ck = codes_q.reshape(bh, n, m), codes_k.reshape(bh, n, m)
    base = torch.arange(bh, device=v.device)[:, None] * buckets  # [bh, 1]: this slice's table rows
    out = torch.zeros(bh * n, d, device=v.device, dtype=v.dtype)
    for s in range(0, m, chunk):
        c = min(chunk, m - s)
        table = v.new_zeros(c, bh * buckets, d)
        for t in range(c):
            table[t].index_add_(0, (ck[:, :, s + t] + base).reshape(-1), vm)
        offs = torch.arange(c, device=v.device) * (bh * buckets)
        idx = (cq[:, :, s:s + c] + base[:, :, None] + offs).reshape(bh * n, c)
        out += F.embedding_bag(idx, table.view(c * bh * buckets, d), mode="sum")
    return out.view(b, h, n, d) * (mask[:, None, :, None] / m)


def hash_codes(x: torch.Tensor, params: torch.Tensor, num_hashes: int, tau: int) -> torch.Tensor:
    """``yoso.hash_codes`` (same projections, same bits, same int64 codes) with the bits summed by one
    matrix-vector product instead of an int64 multiply-and-sum (~4x faster on CPU for Gaussian hyperplanes)."""
    from model.attention import yoso

    if params.dim() != 3:  # Hadamard hash: the reference code
        return yoso.hash_codes(x, params, num_hashes, tau)
    b, h, n, _ = x.shape
    bits = (torch.einsum("bhnd,hdk->bhnk", x, params) > 0).reshape(b * h * n * num_hashes, tau)
    ft = torch.float32 if tau <= 24 else torch.float64  # sums of distinct powers of two: exact
    weights = torch.tensor([float(1 << t) for t in range(tau)], device=x.device, dtype=ft)
    # mv, not a GEMM: the analytic FLOP model (model/flops.py) counts this sum as hashing's non-matmul work
    return bits.to(ft).mv(weights).to(torch.int64).view(b, h, n, num_hashes)


def _sentinel_codes(codes: torch.Tensor, mask: torch.Tensor, value: int) -> torch.Tensor:
    """[b, h, n, m] codes with masked tokens moved to bucket ``value`` (outside [0, 2^tau))."""
    real = mask[:, None, :, None] > 0
    return torch.where(real, codes, torch.full_like(codes, value))


def _sorted_groups(cq: torch.Tensor, ck: torch.Tensor, tile_q: int, tile_k: int, pad_code: int):
    """Sort each group's (one (b*h, hash) pair per row) query and key codes; plan the work items.

    cq, ck: [G, n]. Returns the sorted codes and permutations (queries padded to whole tiles with
    ``pad_code`` / position -1), and per work item its group, tile, first key position and key end.
    """
    g, n = cq.shape
    sq, pq = cq.contiguous().sort(dim=-1)
    sk, pk = ck.contiguous().sort(dim=-1)
    nt = -(-n // tile_q)
    pad = nt * tile_q - n
    if pad:
        sq = torch.cat([sq, sq.new_full((g, pad), pad_code)], dim=1)
        pq = torch.cat([pq, pq.new_full((g, pad), -1)], dim=1)
    lo = torch.searchsorted(sk, sq[:, 0::tile_q].contiguous())
    hi = torch.searchsorted(sk, sq[:, tile_q - 1::tile_q].contiguous(), right=True)
    nwin = ((hi - lo).clamp_min(0) + tile_k - 1) // tile_k  # [G, nt] windows per tile
    flat = nwin.reshape(-1)
    tile_of = torch.repeat_interleave(torch.arange(g * nt, device=cq.device), flat)
    first = torch.cumsum(flat, 0) - flat
    start = lo.reshape(-1)[tile_of] + (torch.arange(tile_of.numel(), device=cq.device) - first[tile_of]) * tile_k
    return sq, pq, sk, pk, tile_of // nt, tile_of % nt, start, hi.reshape(-1)[tile_of]


def _hash_chunk(m: int, bh: int, n: int, max_bytes: int) -> int:
    """Hashes sorted and planned at once: ~12 int64 [b*h, n] arrays per hash, under max_bytes / 4."""
    return int(max(1, min(m, max_bytes // 4 // max(1, 12 * 8 * bh * n))))


def _grouped(codes_q: torch.Tensor, codes_k: torch.Tensor, mask: torch.Tensor, tau: int):
    """[b*h, n, m] codes with masked queries in bucket 2^tau and masked keys in 2^tau + 1."""
    b, h, n, m = codes_q.shape
    cq = _sentinel_codes(codes_q, mask, 1 << tau).reshape(b * h, n, m)
    ck = _sentinel_codes(codes_k, mask, (1 << tau) + 1).reshape(b * h, n, m)
    return cq, ck


def _plan(cq: torch.Tensor, ck: torch.Tensor, s: int, c: int, tau: int, tile_q: int, tile_k: int):
    bh, n, _ = cq.shape
    cqg = cq[:, :, s:s + c].permute(0, 2, 1).reshape(bh * c, n)
    ckg = ck[:, :, s:s + c].permute(0, 2, 1).reshape(bh * c, n)
    return _sorted_groups(cqg, ckg, tile_q, tile_k, 1 << tau)


def plan_sorted(codes_q: torch.Tensor, codes_k: torch.Tensor, mask: torch.Tensor, tau: int, max_bytes: int,
                tile_q: int = TILE_Q, tile_k: int = TILE_K) -> tuple[int, list | None]:
    """(number of [tile_q, tile_k] work items of the sorted backward, the plans of its hash chunks when
    they fit in one chunk (reused by ``surrogate_grads_sorted``), else None)."""
    b, h, n, m = codes_q.shape
    cq, ck = _grouped(codes_q, codes_k, mask, tau)
    chunk = _hash_chunk(m, b * h, n, max_bytes)
    items, plans = 0, []
    for s in range(0, m, chunk):
        plan = _plan(cq, ck, s, min(chunk, m - s), tau, tile_q, tile_k)
        items += plan[4].numel()
        if chunk >= m:  # one chunk: keep its plan (otherwise the plans would exceed the budget)
            plans.append(plan)
    return items, (plans if chunk >= m else None)


def sorted_cost(codes_q: torch.Tensor, codes_k: torch.Tensor, mask: torch.Tensor, tau: int,
                tile_q: int = TILE_Q, tile_k: int = TILE_K, max_bytes: int = 1 << 30) -> int:
    """Number of [tile_q, tile_k] work items of the sorted surrogate backward (its cost)."""
    return plan_sorted(codes_q, codes_k, mask, tau, max_bytes, tile_q, tile_k)[0]


def surrogate_grads_sorted(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, dy: torch.Tensor,
                           codes_q: torch.Tensor, codes_k: torch.Tensor, mask: torch.Tensor, tau: int,
                           max_bytes: int, tile_q: int = TILE_Q, tile_k: int = TILE_K,
                           plans: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Surrogate dQ^, dK^ over bucket-sorted tiles (see the module docstring).

    Args:
        qn, kn, v, dy: [b, h, n, d]; codes_q, codes_k: int [b, h, n, m]; mask: float [b, n].
        plans: ``plan_sorted``'s plans for these codes and tiles (saves sorting again).
    """
    b, h, n, d = v.shape
    m = codes_q.shape[-1]
    bh = b * h
    dt = v.dtype
    zero = torch.zeros(1, d, device=v.device, dtype=dt)
    dym = dy * mask[:, None, :, None]

    def flat(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # [bh * n + 1, 2d], last row zero (padding)
        return torch.cat([torch.cat([a.reshape(bh * n, d), c.reshape(bh * n, d)], dim=1), zero.repeat(1, 2)])

    qdy, kv = flat(qn, dym), flat(kn, v)  # a query's (q^, dY) and a key's (k^, v) gathered together
    dq = torch.zeros(bh * n + 1, d, device=v.device, dtype=dt)
    dk = torch.zeros(bh * n + 1, d, device=v.device, dtype=dt)
    cq, ck = _grouped(codes_q, codes_k, mask, tau)
    hchunk = _hash_chunk(m, bh, n, max_bytes)
    # Work items per slice: gathered rows, [T, R] products and outputs, about cache-sized (3x faster
    # than streaming large slices through memory).
    per_item = (3 * (tile_q + tile_k) * d + 4 * tile_q * tile_k) * v.element_size() + 8 * (tile_q + tile_k) * 4
    wchunk = int(max(1, min(max_bytes // 2, _SLICE_BYTES) // per_item))
    ar_q = torch.arange(tile_q, device=v.device)
    ar_k = torch.arange(tile_k, device=v.device)
    for i, s in enumerate(range(0, m, hchunk)):
        c = min(hchunk, m - s)
        plan = plans[i] if plans is not None else _plan(cq, ck, s, c, tau, tile_q, tile_k)
        sq, pq, sk, pk, grp, til, start, hi = plan
        row0 = torch.div(torch.arange(bh * c, device=v.device), c, rounding_mode="floor") * n
        for w0 in range(0, grp.numel(), wchunk):
            g = grp[w0:w0 + wchunk, None]
            w = g.shape[0]
            base = row0[g]  # [w, 1]
            qpos = til[w0:w0 + wchunk, None] * tile_q + ar_q  # [w, T]
            qloc = pq[g, qpos]
            qrow = torch.where(qloc >= 0, base + qloc, bh * n).view(-1)
            qcode = sq[g, qpos]
            kpos = start[w0:w0 + wchunk, None] + ar_k  # [w, R]
            kvalid = kpos < hi[w0:w0 + wchunk, None]
            kpos = kpos.clamp_max(n - 1)
            krow = torch.where(kvalid, base + pk[g, kpos], bh * n).view(-1)
            kcode = torch.where(kvalid, sk[g, kpos], -1)
            miss = qcode[:, :, None] != kcode[:, None, :]  # [w, T, R]
            qt = qdy.index_select(0, qrow).view(w, tile_q, 2 * d)
            kt = kv.index_select(0, krow).view(w, tile_k, 2 * d)
            a = torch.bmm(qt[..., d:], kt[..., d:].transpose(1, 2)).masked_fill_(miss, 0.0)  # (dY_i . v_j)
            dq.index_add_(0, qrow, torch.bmm(a, kt[..., :d]).view(-1, d))
            dk.index_add_(0, krow, torch.bmm(a.transpose(1, 2), qt[..., :d]).view(-1, d))
    scale = tau / (2 * m)
    return (dq[:-1] * scale).view(b, h, n, d), (dk[:-1] * scale).view(b, h, n, d)


# --------------------------------------------------------------------------------------------
# Bucket form of the surrogate dQ^/dK^ (the default backward on CPU)
# --------------------------------------------------------------------------------------------

_S_BYTES = 16 << 20  # cap on one batch of [A, B] bucket products (when one bucket is not bigger)
BUCKET_VS_DENSE = 0.3
"""The bucket form is used while its padded colliding pairs are fewer than this fraction of the dense
form's n^2 pairs per head (its tiny batched matmuls run ~3x slower per pair than the dense blocks)."""


def _class_sizes(n: int) -> list[int]:
    """Padded bucket sizes 1, 2, .., 6, 8, 10, 13, 17, ... (at most ~1/3 padding), up to >= n."""
    sizes, s = [], 1
    while True:
        sizes.append(s)
        if s >= n:
            return sizes
        s += max(1, s // 3)


class _Workspace:
    """Reused flat buffers (fresh large CPU allocations cost page faults on every touch)."""

    def __init__(self, like: torch.Tensor, bufs: dict | None = None) -> None:
        self.like, self.bufs = like, ({} if bufs is None else bufs)

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.like.new_empty(max(numel, int(1.25 * buf.numel()) if buf is not None else numel))
            self.bufs[name] = buf
        return buf[:numel].view(*shape)


SMALL_BMM_MACS = 1 << 20
"""Batched products of fewer multiply-adds than this run on one thread. Waking the OpenMP team costs
~45 us per call under ``OMP_WAIT_POLICY=PASSIVE`` (the CPU benchmarks' and a shared node's setting):
a bucket class of 8 blocks of 8x8 took 78 ms for 500 calls on 2 threads, 13 ms on one; the
crossover measured at 2^20-2^21 MACs for blocks 8x8 to 22x17 (d = 64)."""


class _Threads:
    """Switches torch's intra-op thread count between one and the caller's (restored by ``set(None)``)."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = device.type == "cpu"  # CUDA products do not use the intra-op pool
        self.full = torch.get_num_threads()
        self.now = self.full

    def set(self, n: int | None) -> None:
        n = self.full if n is None or not self.cpu else n
        if n != self.now:
            torch.set_num_threads(n)
            self.now = n


_SHARED = threading.local()


def _workspace(like: torch.Tensor) -> _Workspace:
    """The bucket backward's workspace: on CPU, buffers kept between calls (per thread, dtype).

    Its six [slots, d] buffers are most of the backward's memory (~0.5 GB at n = 8192, d = 64, under
    the default 1 GiB budget), and fresh CPU pages are zeroed by the kernel on first touch: reusing
    them across layers and steps took the n=8192 backward from 1.8-2.0 s to 1.4-1.5 s. The peak is
    unchanged (the first call allocates them anyway); ``release_workspaces`` returns the memory.
    On CUDA the caching allocator already reuses memory, so each call gets its own.
    """
    if like.device.type != "cpu":
        return _Workspace(like)
    cache = getattr(_SHARED, "bufs", None)
    if cache is None:
        cache = _SHARED.bufs = {}
    return _Workspace(like, cache.setdefault(like.dtype, {}))


def release_workspaces() -> None:
    """Free this thread's kept CPU workspaces (see ``_workspace``)."""
    _SHARED.bufs = {}


def _masked_codes(codes: torch.Tensor, mask: torch.Tensor, tau: int) -> torch.Tensor:
    """[b*h, n, m] codes with padding tokens in the extra bucket 2^tau (never paired)."""
    b, h, n, m = codes.shape
    return _sentinel_codes(codes, mask, 1 << tau).reshape(b * h, n, m)


def bucket_pairs(codes_q: torch.Tensor, codes_k: torch.Tensor, mask: torch.Tensor, tau: int) -> int:
    """Colliding (query, key) pairs summed over the hashes: sum over (head, hash, bucket) of |I| |J|
    (real tokens only), the work of the bucket form."""
    b, h, n, m = codes_q.shape
    nb = (1 << tau) + 1
    base = (torch.arange(b * h * m, device=codes_q.device) * nb).view(b * h, 1, m)
    cq = torch.bincount((_masked_codes(codes_q, mask, tau) + base).view(-1), minlength=b * h * m * nb)
    ck = torch.bincount((_masked_codes(codes_k, mask, tau) + base).view(-1), minlength=b * h * m * nb)
    cq.view(-1, nb)[:, -1] = 0
    return int((cq * ck).sum())


def use_bucket(codes_q: torch.Tensor, codes_k: torch.Tensor, mask: torch.Tensor, tau: int) -> bool:
    """True when the bucket form is expected to be cheaper than the dense query-blocked backward."""
    b, h, n, _ = codes_q.shape
    return bucket_pairs(codes_q, codes_k, mask, tau) < BUCKET_VS_DENSE * b * h * n * n


def _bucket_groups(n: int, d: int, itemsize: int, bh: int, m: int, max_bytes: int) -> tuple[int, int]:
    """(hashes, heads) of one chunk: ~1.4 padded slots per token and side, 6 [slots, d] buffers and
    ~12 int64 planning arrays per (head, hash) group, under max_bytes / 2."""
    per_group = n * (int(1.4 * 6 * d * itemsize) + 12 * 8)
    groups = int(max(1, min(bh * m, max_bytes // 2 // max(1, per_group))))
    hashes = min(m, groups)
    return hashes, max(1, min(bh, groups // hashes))


def surrogate_grads_bucket(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, dy: torch.Tensor,
                           codes_q: torch.Tensor, codes_k: torch.Tensor, mask: torch.Tensor, tau: int,
                           max_bytes: int, chunk: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Surrogate dQ^, dK^ in bucket form: per (head, hash, bucket c) the colliding pairs are the complete
    block I_c x J_c, so with S_c = dY_{I_c} V_{J_c}^T: dQ^_{I_c} += S_c K^_{J_c}, dK^_{J_c} += S_c^T Q^_{I_c}.

    For a chunk of (hash, head) groups: one sort of the (group, code) keys per side, buckets grouped into
    classes of padded sizes (A, B) (``_class_sizes``), the rows gathered once into class-major slots
    (padding slots read a zero row), three batched matmuls per class, and each token's results summed
    over the chunk's hashes with one ``embedding_bag``. Padding tokens (mask 0) are in no bucket.

    Args:
        qn, kn, v, dy: [b, h, n, d]; codes_q, codes_k: int [b, h, n, m]; mask: float [b, n].
        chunk: (hashes, heads) per chunk (default: from ``max_bytes``).
    """
    b, h, n, d = v.shape
    m = codes_q.shape[-1]
    bh, dev, dt = b * h, v.device, v.dtype
    nb = (1 << tau) + 1
    cq, ck = _masked_codes(codes_q, mask, tau), _masked_codes(codes_k, mask, tau)
    mk = mask[:, None, :, None].to(dt)
    pad_row = bh * n

    def flat(x: torch.Tensor) -> torch.Tensor:  # [bh * n + 1, d], last row zero (padding slots)
        return torch.cat([x.reshape(bh * n, d), x.new_zeros(1, d)])

    fq, fdy, fk, fv = flat(qn), flat(dy * mk), flat(kn), flat(v * mk)
    sizes_l = _class_sizes(n)
    sizes = torch.tensor(sizes_l, device=dev)
    ns = len(sizes_l)
    dq = torch.zeros(bh * n, d, device=dev, dtype=dt)
    dk = torch.zeros(bh * n, d, device=dev, dtype=dt)
    hc, hh = chunk or _bucket_groups(n, d, v.element_size(), bh, m, max_bytes)
    ws = _workspace(v)
    cap = int(1.4 * hc * hh * n)
    for name in ("xq", "xdy", "xk", "xv", "oq", "ok"):
        ws.get(name, cap, d)
    s_cap = max(1, _S_BYTES // v.element_size())
    threads = _Threads(dev)  # tiny batched products run single-threaded (see SMALL_BMM_MACS)
    try:
        for s in range(0, m, hc):
            for h0 in range(0, bh, hh):
                c, hb = min(hc, m - s), min(hh, bh - h0)
                g, ent = hb * c, hb * c * n
                gid = (torch.arange(g, device=dev, dtype=torch.int32) * nb).view(hb, c, 1)
                keyq = (cq[h0:h0 + hb, :, s:s + c].permute(0, 2, 1).to(torch.int32) + gid).reshape(-1)
                keyk = (ck[h0:h0 + hb, :, s:s + c].permute(0, 2, 1).to(torch.int32) + gid).reshape(-1)
                cntq = torch.bincount(keyq, minlength=g * nb)
                cntk = torch.bincount(keyk, minlength=g * nb)
                live = (cntq > 0) & (cntk > 0)
                live.view(g, nb)[:, nb - 1] = False
                bk = live.nonzero().squeeze(1)
                if bk.numel() == 0:
                    continue
                sq, pq = keyq.sort()
                sk, pk = keyk.sort()
                offq, offk = cntq.cumsum(0) - cntq, cntk.cumsum(0) - cntk
                ia, ib = torch.bucketize(cntq[bk], sizes), torch.bucketize(cntk[bk], sizes)
                cls, order = (ia * ns + ib).sort(stable=True)
                bk = bk[order]
                sa, sb = sizes[ia[order]], sizes[ib[order]]
                enda, endb = sa.cumsum(0), sb.cumsum(0)
                totq, totk = int(enda[-1]), int(endb[-1])
                ucls, ccnt = torch.unique_consecutive(cls, return_counts=True)
                # slot of each sorted entry (its bucket's first slot + its rank in the bucket), or the zero row
                baseq = torch.full((g * nb,), -1, device=dev, dtype=torch.int64)
                baseq[bk] = enda - sa
                basek = torch.full((g * nb,), -1, device=dev, dtype=torch.int64)
                basek[bk] = endb - sb
                sq, sk = sq.long(), sk.long()
                pos = torch.arange(ent, device=dev)
                bq, bkk = baseq[sq], basek[sk]
                slq_sorted = torch.where(bq >= 0, bq + pos - offq[sq], totq)
                slk_sorted = torch.where(bkk >= 0, bkk + pos - offk[sk], totk)

                def row_of(e: torch.Tensor, c: int = c, h0: int = h0) -> torch.Tensor:  # entry (head, hash, token) of the chunk -> flat row
                    return torch.div(e, c * n, rounding_mode="floor") * n + (e % n + h0 * n)

                srow_q = torch.full((totq + 1,), pad_row, device=dev, dtype=torch.int64)
                srow_q[slq_sorted] = row_of(pq)
                srow_k = torch.full((totk + 1,), pad_row, device=dev, dtype=torch.int64)
                srow_k[slk_sorted] = row_of(pk)
                iq, ik = srow_q[:totq], srow_k[:totk]
                xq = torch.index_select(fq, 0, iq, out=ws.get("xq", totq, d))
                xdy = torch.index_select(fdy, 0, iq, out=ws.get("xdy", totq, d))
                xk = torch.index_select(fk, 0, ik, out=ws.get("xk", totk, d))
                xv = torch.index_select(fv, 0, ik, out=ws.get("xv", totk, d))
                oq, ok = ws.get("oq", totq + 1, d), ws.get("ok", totk + 1, d)
                oq[totq] = 0
                ok[totk] = 0
                o1 = o2 = 0
                for cl, cnt in zip(ucls.tolist(), ccnt.tolist()):
                    a_, b_ = sizes_l[cl // ns], sizes_l[cl % ns]
                    step = max(1, s_cap // (a_ * b_))
                    for l0 in range(0, cnt, step):
                        nl = min(step, cnt - l0)
                        threads.set(1 if nl * a_ * b_ * d < SMALL_BMM_MACS else None)
                        r1, r2 = slice(o1, o1 + nl * a_), slice(o2, o2 + nl * b_)
                        sc = torch.bmm(xdy[r1].view(nl, a_, d), xv[r2].view(nl, b_, d).transpose(1, 2),
                                       out=ws.get("s", nl, a_, b_))  # (dY_i . v_j) of the block
                        torch.bmm(sc, xk[r2].view(nl, b_, d), out=oq[r1].view(nl, a_, d))
                        torch.bmm(sc.transpose(1, 2), xq[r1].view(nl, a_, d), out=ok[r2].view(nl, b_, d))
                        o1 += nl * a_
                        o2 += nl * b_
                threads.set(None)
                slq = torch.empty(ent, device=dev, dtype=torch.int64)
                slq[pq] = slq_sorted
                slk = torch.empty(ent, device=dev, dtype=torch.int64)
                slk[pk] = slk_sorted
                rows = slice(h0 * n, (h0 + hb) * n)
                dq[rows] += F.embedding_bag(slq.view(hb, c, n).transpose(1, 2).reshape(hb * n, c), oq, mode="sum")
                dk[rows] += F.embedding_bag(slk.view(hb, c, n).transpose(1, 2).reshape(hb * n, c), ok, mode="sum")
    finally:
        threads.set(None)
    scale = tau / (2 * m)
    return (dq * scale).view(b, h, n, d), (dk * scale).view(b, h, n, d)


class YosoSampled(torch.autograd.Function):
    """Y^ = cumulation(codes) with the linear dV and the bucket-form (or dense) dQ^/dK^ backward."""

    @staticmethod
    def forward(ctx, qn, kn, v, mask, codes_q, codes_k, tau, exact, max_bytes):
        out = cumulation(codes_q, codes_k, v, mask, tau, max_bytes)
        ctx.save_for_backward(qn, kn, v, mask, codes_q, codes_k)
        ctx.cfg = (tau, exact, max_bytes)
        return out

    @staticmethod
    def backward(ctx, dy):
        from model.attention.yoso import dense_grads

        qn, kn, v, mask, codes_q, codes_k = ctx.saved_tensors
        tau, exact, max_bytes = ctx.cfg
        dy = dy.to(v.dtype)
        if exact or not use_bucket(codes_q, codes_k, mask, tau):
            dq, dk, dv = dense_grads(qn, kn, v, mask, codes_q, codes_k, dy, tau, False, exact, max_bytes)
            return dq, dk, dv, None, None, None, None, None, None
        dv = cumulation(codes_k, codes_q, (dy * mask[:, None, :, None]).to(v.dtype), mask, tau, max_bytes)
        dq, dk = surrogate_grads_bucket(qn, kn, v, dy, codes_q, codes_k, mask, tau, max_bytes)
        return dq, dk, dv, None, None, None, None, None, None


DENSE_VS_SORTED = 10.0
"""A dense [TILE_Q, TILE_K] block of the query-blocked backward costs about this many sorted work
items (measured on CPU at n = 2048 and 4096: ~275 us vs ~25 us of CPU time)."""


def _sorted_is_cheaper(items: int, shape) -> bool:
    b, h, n, _ = shape
    return items < DENSE_VS_SORTED * b * h * n * n / (TILE_Q * TILE_K)


def use_sorted(codes_q: torch.Tensor, codes_k: torch.Tensor, mask: torch.Tensor, tau: int) -> bool:
    """True when the sorted-tile surrogate backward is expected to be cheaper than the dense one."""
    return _sorted_is_cheaper(sorted_cost(codes_q, codes_k, mask, tau), codes_q.shape)


def yoso_sampled(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 codes_q: torch.Tensor, codes_k: torch.Tensor, tau: int, exact: bool,
                 max_bytes: int) -> torch.Tensor:
    """Y^ (before the output normalization) with the fast forward and backward; inputs as
    ``yoso._YosoFunction`` takes them (fp32/fp64 normalized q^, k^, v; float mask [b, n]; int codes)."""
    return YosoSampled.apply(qn, kn, v, mask, codes_q, codes_k, tau, exact, max_bytes)
