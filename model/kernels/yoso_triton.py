"""YOSO Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1). Import via ``dispatch.load``.

Sampling forward, Y^_i = (1/m) sum_h table_h[H_h(q^_i)], two fused kernels per chunk of hashes:
    ``_build_kernel``   per block of keys: SimHash codes of k^ (one [BLOCK, d] x [d, tau] dot per hash;
                        stored for the backward), then ``atomic_add`` of the masked v rows into
                        table[b*h, hash, code, :] (fp32).
    ``_gather_kernel``  per block of queries: codes of q^ (stored), sum of the m bucket rows read from
                        the tables, times m_i / m.
Tables take b*h*m*2^tau*d*4 bytes; hashes are chunked so they stay under ``max_bytes``.

Backward (and the YOSO-E forward) as dense tiles, flash-attention style, with the weights computed on
the fly and never stored:
    W_ij = m_i m_j (1/m) sum_h [H_h(q_i) = H_h(k_j)] (codes compared tile by tile)  or  B(q^_i . k^_j) (YOSO-E)
    ``_dkdv_kernel`` per key block: dV_j = sum_i W_ij dY_i, dK^_j = sum_i w'_ij (dY_i . v_j) q^_i
    ``_dq_kernel``   per query block: dQ^_i = sum_j w'_ij (dY_i . v_j) k^_j
    ``_dense_fwd_kernel`` (YOSO-E) per query block: Y_i = sum_j W_ij v_j
with w' = tau/2 W (surrogate) or B'(0.99 x) (exact; on pairs with W > 0 when sampling). Every product
is a ``tl.dot`` (tensor cores: tf32x3 for fp32 operands, so results stay close to fp32).

Any n (masked tails), head dims up to 128 (padded to a power of two >= 16; larger ones would
not fit shared memory with fp32 tiles: ``impl: auto`` then uses the torch path), fp32/fp16/bf16 inputs
(loaded and accumulated in fp32; hash tables are fp32), masks honoured (masked keys never enter a
table, masked queries output 0). Atomic adds make the forward's summation order, hence its last
bits, nondeterministic on GPUs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from model.kernels.dispatch import TRITON_MAX_HEAD_DIM, interpreter_enabled
from model.kernels.triton_common import collision_prob, collision_prob_grad, hash_code

INTERPRETED = interpreter_enabled()


@triton.jit
def _build_kernel(x_ptr, r_ptr, v_ptr, mask_ptr, codes_ptr, table_ptr, n, H, h0, hn, m,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TAU: tl.constexpr,
                  TAU_P: tl.constexpr, HASH: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < n
    real = tl.load(mask_ptr + (bh // H) * n + offs_n, mask=row_ok, other=0.0) > 0
    tile = bh.to(tl.int64) * n * D + offs_n[:, None] * D + offs_d[None, :]
    in_tile = row_ok[:, None] & (offs_d[None, :] < D)
    vals = tl.load(v_ptr + tile, mask=in_tile, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + tile, mask=in_tile, other=0.0).to(tl.float32)
    r_head = r_ptr + (bh % H).to(tl.int64) * D * m * TAU
    for hh in range(h0, h0 + hn):
        code_ptrs = codes_ptr + (bh.to(tl.int64) * m + hh) * n + offs_n
        if HASH:
            code = hash_code(x, r_head + hh * TAU, m * TAU, 1, offs_d, D, TAU, TAU_P, PREC)
            tl.store(code_ptrs, code, mask=row_ok)
        else:
            code = tl.load(code_ptrs, mask=row_ok, other=0)
        row = (bh.to(tl.int64) * hn + hh - h0) * (1 << TAU) + code
        tl.atomic_add(table_ptr + row[:, None] * D + offs_d[None, :], vals,
                      mask=in_tile & real[:, None], sem="relaxed")


@triton.jit
def _gather_kernel(x_ptr, r_ptr, table_ptr, mask_ptr, codes_ptr, out_ptr, n, H, h0, hn, m, scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TAU: tl.constexpr,
                   TAU_P: tl.constexpr, HASH: tl.constexpr, ACCUM: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_n < n
    real = tl.load(mask_ptr + (bh // H) * n + offs_n, mask=row_ok, other=0.0)
    tile = bh.to(tl.int64) * n * D + offs_n[:, None] * D + offs_d[None, :]
    in_tile = row_ok[:, None] & (offs_d[None, :] < D)
    if HASH:
        x = tl.load(x_ptr + tile, mask=in_tile, other=0.0).to(tl.float32)
    r_head = r_ptr + (bh % H).to(tl.int64) * D * m * TAU
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for hh in range(h0, h0 + hn):
        code_ptrs = codes_ptr + (bh.to(tl.int64) * m + hh) * n + offs_n
        if HASH:
            code = hash_code(x, r_head + hh * TAU, m * TAU, 1, offs_d, D, TAU, TAU_P, PREC)
            tl.store(code_ptrs, code, mask=row_ok)
        else:
            code = tl.load(code_ptrs, mask=row_ok, other=0)
        row = (bh.to(tl.int64) * hn + hh - h0) * (1 << TAU) + code
        acc += tl.load(table_ptr + row[:, None] * D + offs_d[None, :], mask=in_tile, other=0.0)
    acc = acc * (real * scale)[:, None]
    if ACCUM:
        acc += tl.load(out_ptr + tile, mask=in_tile, other=0.0)
    tl.store(out_ptr + tile, acc, mask=in_tile)


@triton.jit
def _weights(q, k, cq_ptr, ck_ptr, offs_m, offs_n, n, m, qreal, kreal, TAU: tl.constexpr,
             EXPECTATION: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr):
    """(W, w') of a [BLOCK_M, BLOCK_N] tile: W = collision frequency or B(x), w' = its backward weight."""
    valid = qreal[:, None] * kreal[None, :]
    if EXPECTATION or EXACT:
        x = tl.dot(q, tl.trans(k), input_precision=PREC)
    if EXPECTATION:
        w = collision_prob(x, TAU) * valid
    else:
        cnt = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
        for hh in range(0, m):
            cq = tl.load(cq_ptr + hh * n + offs_m, mask=offs_m < n, other=-1)
            ck = tl.load(ck_ptr + hh * n + offs_n, mask=offs_n < n, other=-2)
            cnt += tl.where(cq[:, None] == ck[None, :], 1.0, 0.0)
        w = cnt * valid / m
    if EXACT:
        wd = collision_prob_grad(x, TAU) * valid
        if not EXPECTATION:
            wd = tl.where(w > 0, wd, 0.0)
    else:
        wd = (TAU / 2) * w
    return w, wd


@triton.jit
def _dense_fwd_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, n, H, TAU: tl.constexpr, D: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      PREC: tl.constexpr):
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * n * D
    dmask = offs_d[None, :] < D
    q = tl.load(q_ptr + base + offs_m[:, None] * D + offs_d[None, :], mask=(offs_m[:, None] < n) & dmask,
                other=0.0).to(tl.float32)
    qreal = tl.load(mask_ptr + (bh // H) * n + offs_m, mask=offs_m < n, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n) & dmask
        k = tl.load(k_ptr + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        kreal = tl.load(mask_ptr + (bh // H) * n + offs_n, mask=offs_n < n, other=0.0)
        x = tl.dot(q, tl.trans(k), input_precision=PREC)
        w = collision_prob(x, TAU) * kreal[None, :]
        acc += tl.dot(w, v, input_precision=PREC)
    acc = acc * qreal[:, None]
    tl.store(out_ptr + base + offs_m[:, None] * D + offs_d[None, :], acc, mask=(offs_m[:, None] < n) & dmask)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, dy_ptr, mask_ptr, cq_ptr, ck_ptr, dk_ptr, dv_ptr, n, H, m,
                 TAU: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, EXPECTATION: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * n * D
    dmask = offs_d[None, :] < D
    kv_mask = (offs_n[:, None] < n) & dmask
    k = tl.load(k_ptr + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
    kreal = tl.load(mask_ptr + (bh // H) * n + offs_n, mask=offs_n < n, other=0.0)
    cq_base = cq_ptr + bh.to(tl.int64) * m * n
    ck_base = ck_ptr + bh.to(tl.int64) * m * n
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_mask = (offs_m[:, None] < n) & dmask
        q = tl.load(q_ptr + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        qreal = tl.load(mask_ptr + (bh // H) * n + offs_m, mask=offs_m < n, other=0.0)
        dy = tl.load(dy_ptr + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
        w, wd = _weights(q, k, cq_base, ck_base, offs_m, offs_n, n, m, qreal, kreal, TAU, EXPECTATION, EXACT, PREC)
        dv += tl.dot(tl.trans(w), dy, input_precision=PREC)
        a = wd * tl.dot(dy, tl.trans(v), input_precision=PREC)
        dk += tl.dot(tl.trans(a), q, input_precision=PREC)
    tl.store(dk_ptr + base + offs_n[:, None] * D + offs_d[None, :], dk, mask=kv_mask)
    tl.store(dv_ptr + base + offs_n[:, None] * D + offs_d[None, :], dv, mask=kv_mask)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, dy_ptr, mask_ptr, cq_ptr, ck_ptr, dq_ptr, n, H, m,
               TAU: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, EXPECTATION: tl.constexpr, EXACT: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * n * D
    dmask = offs_d[None, :] < D
    q_mask = (offs_m[:, None] < n) & dmask
    q = tl.load(q_ptr + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + base + offs_m[:, None] * D + offs_d[None, :], mask=q_mask, other=0.0).to(tl.float32)
    qreal = tl.load(mask_ptr + (bh // H) * n + offs_m, mask=offs_m < n, other=0.0)
    cq_base = cq_ptr + bh.to(tl.int64) * m * n
    ck_base = ck_ptr + bh.to(tl.int64) * m * n
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n[:, None] < n) & dmask
        k = tl.load(k_ptr + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        kreal = tl.load(mask_ptr + (bh // H) * n + offs_n, mask=offs_n < n, other=0.0)
        w, wd = _weights(q, k, cq_base, ck_base, offs_m, offs_n, n, m, qreal, kreal, TAU, EXPECTATION, EXACT, PREC)
        a = wd * tl.dot(dy, tl.trans(v), input_precision=PREC)
        dq += tl.dot(a, k, input_precision=PREC)
    tl.store(dq_ptr + base + offs_m[:, None] * D + offs_d[None, :], dq, mask=q_mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

MAX_HEAD_DIM = TRITON_MAX_HEAD_DIM["yoso"]
INTERPRETER_BLOCKS = {"table": 32, "m": 32, "n": 32}


def gpu_config(d: int) -> dict:
    """Tiles, warps and pipeline stages per head dim, chosen so that every kernel's shared memory
    fits an A100 (163 KiB) and an H100 (227 KiB); checked by the AOT test."""
    if d <= 64:
        return {"table": 64, "m": 64, "n": 64, "num_warps": 4, "num_stages": 3}
    return {"table": 64, "m": 32, "n": 32, "num_warps": 4, "num_stages": 2}


def _config(d: int, blocks: dict | None) -> dict:
    base = dict(INTERPRETER_BLOCKS, num_warps=4, num_stages=1) if INTERPRETED else gpu_config(d)
    return dict(base, **(blocks or {}))


def _prec() -> str:
    return "ieee" if INTERPRETED else "tf32x3"


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def hadamard_matrix(signs: torch.Tensor, head_dim: int, num_hashes: int, tau: int) -> torch.Tensor:
    """The fast Hadamard hash ``sign(H D3 H D2 H D1 x)`` (``yoso.hash_codes``) as hyperplanes: the
    linear map applied to the basis vectors, [h, d, m*tau], in the Gaussian layout."""
    from model.attention.yoso import fwht

    h, _, parts, dp = signs.shape
    y = torch.eye(head_dim, dp, device=signs.device, dtype=signs.dtype)[None, :, None, :]  # [1, d, 1, dp]
    for r in range(3):
        y = fwht(y * signs[:, None, r])  # [h, d, parts, dp]
    per_part = dp // tau
    return y[..., : per_part * tau].reshape(h, head_dim, parts * per_part * tau)[..., : num_hashes * tau]


def hyperplanes(params: torch.Tensor, head_dim: int, num_hashes: int, tau: int) -> torch.Tensor:
    """fp32 contiguous [h, d, m*tau] hyperplanes from ``yoso.sample_hash_params``' output."""
    if params.dim() == 4:
        params = hadamard_matrix(params.float(), head_dim, num_hashes, tau)
    return params.float().contiguous()


def hash_and_cumulate(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                      planes: torch.Tensor, num_hashes: int, tau: int, max_bytes: int,
                      blocks: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampling forward: (Y^ [b, h, n, d] fp32, codes_q, codes_k int32 [b*h, m, n]).

    qn, kn, v: [b, h, n, d] (any float dtype); mask: [b, n] (1 = real); planes: [h, d, m*tau].
    """
    b, h, n, d = v.shape
    bh, m, buckets = b * h, num_hashes, 1 << tau
    blk = _config(d, blocks)
    qn, kn, v = qn.contiguous(), kn.contiguous(), v.contiguous()
    maskf = mask.float().contiguous()
    codes_q = torch.empty(bh, m, n, device=v.device, dtype=torch.int32)
    codes_k = torch.empty_like(codes_q)
    out = torch.empty(b, h, n, d, device=v.device, dtype=torch.float32)
    per_hash = bh * buckets * d * 4
    chunk = int(max(1, min(m, max_bytes // max(1, per_hash))))
    meta = dict(D=d, BLOCK_D=_block_d(d), BLOCK_N=blk["table"], TAU=tau,
                TAU_P=max(16, triton.next_power_of_2(tau)), PREC=_prec(), num_warps=blk["num_warps"],
                num_stages=blk["num_stages"])
    grid = (bh, triton.cdiv(n, blk["table"]))
    for h0 in range(0, m, chunk):
        hn = min(chunk, m - h0)
        table = torch.zeros(bh, hn, buckets, d, device=v.device, dtype=torch.float32)
        _build_kernel[grid](kn, planes, v, maskf, codes_k, table, n, h, h0, hn, m, HASH=True, **meta)
        _gather_kernel[grid](qn, planes, table, maskf, codes_q, out, n, h, h0, hn, m, 1.0 / m,
                             HASH=True, ACCUM=h0 > 0, **meta)
    return out, codes_q, codes_k


def expectation_forward(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, tau: int,
                        blocks: dict | None = None) -> torch.Tensor:
    """YOSO-E forward Y (before the output normalization), fp32 [b, h, n, d]."""
    b, h, n, d = v.shape
    blk = _config(d, blocks)
    out = torch.empty(b, h, n, d, device=v.device, dtype=torch.float32)
    _dense_fwd_kernel[(b * h, triton.cdiv(n, blk["m"]))](
        qn.contiguous(), kn.contiguous(), v.contiguous(), mask.float().contiguous(), out, n, h, TAU=tau, D=d,
        BLOCK_D=_block_d(d), BLOCK_M=blk["m"], BLOCK_N=blk["n"], PREC=_prec(), num_warps=blk["num_warps"],
        num_stages=blk["num_stages"])
    return out


def dense_backward(qn, kn, v, mask, dy, codes_q, codes_k, num_hashes: int, tau: int, expectation: bool,
                   exact: bool, blocks: dict | None = None):
    """(dQ^, dK^, dV) fp32 of Y = W V by the tiled kernels (codes unused for YOSO-E)."""
    b, h, n, d = v.shape
    blk = _config(d, blocks)
    qn, kn, v, dy = (t.contiguous() for t in (qn, kn, v, dy))
    maskf = mask.float().contiguous()
    if codes_q is None:
        codes_q = codes_k = torch.zeros(1, device=v.device, dtype=torch.int32)
    dq = torch.empty(b, h, n, d, device=v.device, dtype=torch.float32)
    dk, dv = torch.empty_like(dq), torch.empty_like(dq)
    meta = dict(TAU=tau, D=d, BLOCK_D=_block_d(d), BLOCK_M=blk["m"], BLOCK_N=blk["n"], EXPECTATION=expectation,
                EXACT=exact, PREC=_prec(), num_warps=blk["num_warps"], num_stages=blk["num_stages"])
    _dkdv_kernel[(b * h, triton.cdiv(n, blk["n"]))](qn, kn, v, dy, maskf, codes_q, codes_k, dk, dv, n, h,
                                                    num_hashes, **meta)
    _dq_kernel[(b * h, triton.cdiv(n, blk["m"]))](qn, kn, v, dy, maskf, codes_q, codes_k, dq, n, h,
                                                  num_hashes, **meta)
    return dq, dk, dv


class _YosoTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qn, kn, v, mask, planes, num_hashes, tau, expectation, exact, max_bytes, blocks):
        if expectation:
            out = expectation_forward(qn, kn, v, mask, tau, blocks)
            codes_q = codes_k = None
        else:
            out, codes_q, codes_k = hash_and_cumulate(qn, kn, v, mask, planes, num_hashes, tau, max_bytes, blocks)
        ctx.save_for_backward(qn, kn, v, mask, codes_q, codes_k)
        ctx.cfg = (num_hashes, tau, expectation, exact, blocks)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, dy):
        qn, kn, v, mask, codes_q, codes_k = ctx.saved_tensors
        num_hashes, tau, expectation, exact, blocks = ctx.cfg
        dq, dk, dv = dense_backward(qn, kn, v, mask, dy, codes_q, codes_k, num_hashes, tau, expectation, exact,
                                    blocks)
        return (dq.to(qn.dtype), dk.to(kn.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None)


def yoso_triton(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                params: torch.Tensor | None, num_hashes: int, tau: int, expectation: bool, exact: bool,
                max_bytes: int, blocks: dict | None = None) -> torch.Tensor:
    """Y^ (sampling) or Y (YOSO-E) before the output normalization, differentiable in qn, kn, v.

    Args:
        qn, kn: l2-normalized [b, h, n, d]; v: [b, h, n, d]; any float dtype (fp32 inside).
        mask: [b, n], 1 = real token.
        params: ``yoso.sample_hash_params`` output (Gaussian [h, d, m*tau] or Hadamard signs), None for YOSO-E.
        max_bytes: cap on the hash tables held at once (hashes are chunked under it).
        blocks: tile sizes {"table", "m", "n"} (tests use small ones).
    """
    check_sizes(num_hashes, tau, v.shape[-1])
    planes = None if expectation else hyperplanes(params, v.shape[-1], num_hashes, tau)
    return _YosoTriton.apply(qn, kn, v, mask, planes, num_hashes, tau, expectation, exact, max_bytes, blocks)


def check_sizes(num_hashes: int, tau: int, head_dim: int) -> None:
    """Host-side checks of what the kernels support (one-line ValueErrors)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"yoso triton kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    if tau > 30 or num_hashes < 1:
        raise ValueError(f"yoso triton kernels need 1 <= tau <= 30 and m >= 1, got tau={tau}, m={num_hashes}")

