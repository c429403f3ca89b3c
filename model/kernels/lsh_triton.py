"""BERT-LSH flash-style Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1). Import via
``dispatch.load``.

The logits are built tile by tile from the hash codes, never stored; the softmax is online
(running max and sum), so memory is O(n) per head (the output and one log-sum-exp per row):

``code`` semantics (released code): S[i, j] = q_i . k_j if (q_i, k_j) collide in any table, for j >= i;
    S[i, j] = q_j . k_i if (q_j, k_i) collide, for j < i; else 0 (not -inf). A tile above the diagonal
    needs Q_I K_J^T, one below needs K_I Q_J^T, a diagonal tile both. P = softmax(S / sqrt(d), padded
    keys -inf); dropout; O = P V.
``paper`` semantics: S = Q_I K_J^T / sqrt(d) where every table agrees and the key is real, else -inf;
    rows without any such key output 0.

Backward (two kernels, like FlashAttention-2, both recomputing P from the saved log-sum-exp):
    ``_bwd_rows_kernel`` per query block: dQ_I (and, for ``code``, the dK_I of the lower-triangle terms);
    ``_bwd_cols_kernel`` per key block: dV_J, dK_J (and, for ``code``, the dQ_J of the lower terms).
    dS = P (dP - rowsum(dO O)) with dP = dO V^T (dropout-masked and rescaled).
Dropout masks come from ``tl.rand(seed + b*h index, i * n + j)`` (Philox), the same in the forward and
both backward kernels (n up to 46340).

q, k, v may be fp32, fp16 or bf16: dot products run on the input dtype with fp32 accumulation
(tf32x3 for fp32 inputs; bf16 is upcast to fp32 in the interpreter, whose bf16 ``tl.dot`` is broken,
triton-lang/triton#11584). Any n (masked tails), head dims up to 256 (padded to a power of two).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from model.kernels.dispatch import TRITON_MAX_HEAD_DIM, interpreter_enabled

INTERPRETED = interpreter_enabled()


@triton.jit
def _collide(ca_ptr, cb_ptr, offs_a, offs_b, n, L, EVERY: tl.constexpr):
    """bool [A, B]: the codes at ca_ptr (rows offs_a) and cb_ptr (offs_b) agree in any table
    (EVERY: in every table). Codes are [L, n] per head."""
    ca = tl.load(ca_ptr + offs_a, mask=offs_a < n, other=-1)
    cb = tl.load(cb_ptr + offs_b, mask=offs_b < n, other=-2)
    hit = ca[:, None] == cb[None, :]
    for t in range(1, L):
        ca = tl.load(ca_ptr + t * n + offs_a, mask=offs_a < n, other=-1)
        cb = tl.load(cb_ptr + t * n + offs_b, mask=offs_b < n, other=-2)
        if EVERY:
            hit = hit & (ca[:, None] == cb[None, :])
        else:
            hit = hit | (ca[:, None] == cb[None, :])
    return hit


@triton.jit
def _scores(q_i, k_i, q_j, k_j, cq_ptr, ck_ptr, offs_m, offs_n, row0, col0, n, L, kok, scale,
            CODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Scaled logits of the tile (rows offs_m, columns offs_n) -> (S, mask of the q_i . k_j terms,
    mask of the q_j . k_i terms (``code`` only)); -inf at masked keys (``paper``: at non-collisions)."""
    if CODE:
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        upper = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int1)
        lower = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int1)
        if col0 + BLOCK_N - 1 >= row0:  # some j >= i in this tile
            upper = _collide(cq_ptr, ck_ptr, offs_m, offs_n, n, L, False) & (offs_n[None, :] >= offs_m[:, None])
            a = tl.dot(q_i, tl.trans(k_j), input_precision=PREC)
            s += tl.where(upper, a, 0.0)
        if col0 < row0 + BLOCK_M - 1:  # some j < i
            lower = _collide(ck_ptr, cq_ptr, offs_m, offs_n, n, L, False) & (offs_n[None, :] < offs_m[:, None])
            b = tl.dot(k_i, tl.trans(q_j), input_precision=PREC)
            s += tl.where(lower, b, 0.0)
        s = tl.where(kok[None, :], s * scale, float("-inf"))
    else:
        upper = _collide(cq_ptr, ck_ptr, offs_m, offs_n, n, L, True) & kok[None, :]
        lower = upper
        a = tl.dot(q_i, tl.trans(k_j), input_precision=PREC)
        s = tl.where(upper, a * scale, float("-inf"))
    return s, upper, lower


@triton.jit
def _load_rows(ptr, base, offs, n, offs_d, D: tl.constexpr, DOT_F32: tl.constexpr):
    x = tl.load(ptr + base + offs[:, None] * D + offs_d[None, :], mask=(offs[:, None] < n) & (offs_d[None, :] < D),
                other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _keep(seed, bh, offs_m, offs_n, n, p_drop):
    return tl.rand(seed + bh, offs_m[:, None] * n + offs_n[None, :]) >= p_drop


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, cq_ptr, ck_ptr, kok_ptr, out_ptr, lse_ptr, n, H, L, scale, seed, p_drop,
                CODE: tl.constexpr, DROPOUT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * n * D
    cq_ptr += bh.to(tl.int64) * L * n
    ck_ptr += bh.to(tl.int64) * L * n
    q_i = _load_rows(q_ptr, base, offs_m, n, offs_d, D, DOT_F32)
    k_i = q_i
    if CODE:
        k_i = _load_rows(k_ptr, base, offs_m, n, offs_d, D, DOT_F32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col0 in range(0, n, BLOCK_N):
        offs_n = col0 + tl.arange(0, BLOCK_N)
        k_j = _load_rows(k_ptr, base, offs_n, n, offs_d, D, DOT_F32)
        v_j = _load_rows(v_ptr, base, offs_n, n, offs_d, D, DOT_F32)
        q_j = k_j
        if CODE:
            q_j = _load_rows(q_ptr, base, offs_n, n, offs_d, D, DOT_F32)
        kok = tl.load(kok_ptr + (bh // H) * n + offs_n, mask=offs_n < n, other=0.0) > 0
        s, _u, _l = _scores(q_i, k_i, q_j, k_j, cq_ptr, ck_ptr, offs_m, offs_n, row0, col0, n, L, kok, scale,
                            CODE, BLOCK_M, BLOCK_N, PREC)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m, offs_n, n, p_drop), p / (1.0 - p_drop), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_j.dtype), v_j, input_precision=PREC)
        m_i = m_new
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(out_ptr + base + offs_m[:, None] * D + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < n) & (offs_d[None, :] < D))
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * n + offs_m, lse, mask=offs_m < n)


@triton.jit
def _bwd_rows_kernel(q_ptr, k_ptr, v_ptr, do_ptr, cq_ptr, ck_ptr, kok_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr,
                     n, H, L, scale, seed, p_drop, CODE: tl.constexpr, DROPOUT: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_F32: tl.constexpr, PREC: tl.constexpr):
    row0 = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * n * D
    cq_ptr += bh.to(tl.int64) * L * n
    ck_ptr += bh.to(tl.int64) * L * n
    q_i = _load_rows(q_ptr, base, offs_m, n, offs_d, D, DOT_F32)
    k_i = q_i
    if CODE:
        k_i = _load_rows(k_ptr, base, offs_m, n, offs_d, D, DOT_F32)
    do_i = _load_rows(do_ptr, base, offs_m, n, offs_d, D, DOT_F32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * n + offs_m, mask=offs_m < n, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * n + offs_m, mask=offs_m < n, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dk = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for col0 in range(0, n, BLOCK_N):
        offs_n = col0 + tl.arange(0, BLOCK_N)
        k_j = _load_rows(k_ptr, base, offs_n, n, offs_d, D, DOT_F32)
        v_j = _load_rows(v_ptr, base, offs_n, n, offs_d, D, DOT_F32)
        q_j = k_j
        if CODE:
            q_j = _load_rows(q_ptr, base, offs_n, n, offs_d, D, DOT_F32)
        kok = tl.load(kok_ptr + (bh // H) * n + offs_n, mask=offs_n < n, other=0.0) > 0
        s, upper, lower = _scores(q_i, k_i, q_j, k_j, cq_ptr, ck_ptr, offs_m, offs_n, row0, col0, n, L, kok,
                                  scale, CODE, BLOCK_M, BLOCK_N, PREC)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do_i, tl.trans(v_j), input_precision=PREC)
        if DROPOUT:
            dp = tl.where(_keep(seed, bh, offs_m, offs_n, n, p_drop), dp / (1.0 - p_drop), 0.0)
        ds = p * (dp - delta[:, None]) * scale
        if CODE:
            dq += tl.dot(tl.where(upper, ds, 0.0).to(k_j.dtype), k_j, input_precision=PREC)
            dk += tl.dot(tl.where(lower, ds, 0.0).to(q_j.dtype), q_j, input_precision=PREC)
        else:
            dq += tl.dot(ds.to(k_j.dtype), k_j, input_precision=PREC)
    io_mask = (offs_m[:, None] < n) & (offs_d[None, :] < D)
    tl.store(dq_ptr + base + offs_m[:, None] * D + offs_d[None, :], dq, mask=io_mask)
    if CODE:
        tl.store(dk_ptr + base + offs_m[:, None] * D + offs_d[None, :], dk, mask=io_mask)


@triton.jit
def _bwd_cols_kernel(q_ptr, k_ptr, v_ptr, do_ptr, cq_ptr, ck_ptr, kok_ptr, lse_ptr, delta_ptr, dq_ptr, dk_ptr,
                     dv_ptr, n, H, L, scale, seed, p_drop, CODE: tl.constexpr, DROPOUT: tl.constexpr,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     DOT_F32: tl.constexpr, PREC: tl.constexpr):
    col0 = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    offs_n = col0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    base = bh.to(tl.int64) * n * D
    cq_ptr += bh.to(tl.int64) * L * n
    ck_ptr += bh.to(tl.int64) * L * n
    k_j = _load_rows(k_ptr, base, offs_n, n, offs_d, D, DOT_F32)
    v_j = _load_rows(v_ptr, base, offs_n, n, offs_d, D, DOT_F32)
    q_j = k_j
    if CODE:
        q_j = _load_rows(q_ptr, base, offs_n, n, offs_d, D, DOT_F32)
    kok = tl.load(kok_ptr + (bh // H) * n + offs_n, mask=offs_n < n, other=0.0) > 0
    dq = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for row0 in range(0, n, BLOCK_M):
        offs_m = row0 + tl.arange(0, BLOCK_M)
        q_i = _load_rows(q_ptr, base, offs_m, n, offs_d, D, DOT_F32)
        k_i = q_i
        if CODE:
            k_i = _load_rows(k_ptr, base, offs_m, n, offs_d, D, DOT_F32)
        do_i = _load_rows(do_ptr, base, offs_m, n, offs_d, D, DOT_F32)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * n + offs_m, mask=offs_m < n, other=float("inf"))
        delta = tl.load(delta_ptr + bh.to(tl.int64) * n + offs_m, mask=offs_m < n, other=0.0)
        s, upper, lower = _scores(q_i, k_i, q_j, k_j, cq_ptr, ck_ptr, offs_m, offs_n, row0, col0, n, L, kok,
                                  scale, CODE, BLOCK_M, BLOCK_N, PREC)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do_i, tl.trans(v_j), input_precision=PREC)
        if DROPOUT:
            keep = _keep(seed, bh, offs_m, offs_n, n, p_drop)
            dv += tl.dot(tl.trans(tl.where(keep, p / (1.0 - p_drop), 0.0).to(do_i.dtype)), do_i,
                         input_precision=PREC)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        else:
            dv += tl.dot(tl.trans(p.to(do_i.dtype)), do_i, input_precision=PREC)
        ds = p * (dp - delta[:, None]) * scale
        if CODE:
            dk += tl.dot(tl.trans(tl.where(upper, ds, 0.0).to(q_i.dtype)), q_i, input_precision=PREC)
            dq += tl.dot(tl.trans(tl.where(lower, ds, 0.0).to(k_i.dtype)), k_i, input_precision=PREC)
        else:
            dk += tl.dot(tl.trans(ds.to(q_i.dtype)), q_i, input_precision=PREC)
    io_mask = (offs_n[:, None] < n) & (offs_d[None, :] < D)
    tl.store(dk_ptr + base + offs_n[:, None] * D + offs_d[None, :], dk, mask=io_mask)
    tl.store(dv_ptr + base + offs_n[:, None] * D + offs_d[None, :], dv, mask=io_mask)
    if CODE:
        tl.store(dq_ptr + base + offs_n[:, None] * D + offs_d[None, :], dq, mask=io_mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

MAX_HEAD_DIM = TRITON_MAX_HEAD_DIM["bert_lsh"]
INTERPRETER_BLOCKS = {"m": 32, "n": 32}


def gpu_config(d: int) -> dict:
    """Tiles, warps and pipeline stages per head dim (shared memory within an A100's 163 KiB and an
    H100's 227 KiB; checked by the AOT test)."""
    if d <= 64:
        return {"m": 64, "n": 64, "num_warps": 4, "num_stages": 3}
    if d <= 128:
        return {"m": 64, "n": 32, "num_warps": 8, "num_stages": 2}
    return {"m": 32, "n": 32, "num_warps": 8, "num_stages": 2}


def _meta(q: torch.Tensor, d: int, blocks: dict | None, code: bool, dropout: bool) -> dict:
    base = dict(INTERPRETER_BLOCKS, num_warps=4, num_stages=1) if INTERPRETED else gpu_config(d)
    blk = dict(base, **(blocks or {}))
    dot_f32 = q.dtype == torch.float32 or (INTERPRETED and q.dtype == torch.bfloat16)
    return dict(CODE=code, DROPOUT=dropout, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=blk["m"],
                BLOCK_N=blk["n"], DOT_F32=dot_f32, PREC="ieee" if INTERPRETED else "tf32x3",
                num_warps=blk["num_warps"], num_stages=blk["num_stages"])


class _LshTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cq, ck, key_ok, code, dropout_p, seed, blocks):
        b, h, n, d = q.shape
        out = torch.empty_like(v)
        lse = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
        meta = _meta(q, d, blocks, code, dropout_p > 0)
        grid = (triton.cdiv(n, meta["BLOCK_M"]), b * h)
        _fwd_kernel[grid](q, k, v, cq, ck, key_ok, out, lse, n, h, cq.shape[1], 1.0 / math.sqrt(d), seed,
                          dropout_p, **meta)
        ctx.save_for_backward(q, k, v, cq, ck, key_ok, out, lse)
        ctx.cfg = (code, dropout_p, seed, blocks)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cq, ck, key_ok, out, lse = ctx.saved_tensors
        code, dropout_p, seed, blocks = ctx.cfg
        b, h, n, d = q.shape
        dout = dout.to(q.dtype).contiguous()
        delta = (dout.float() * out.float()).sum(-1).reshape(b * h, n).contiguous()
        meta = _meta(q, d, blocks, code, dropout_p > 0)
        dq_r = torch.empty(b, h, n, d, device=q.device, dtype=torch.float32)
        dk_r = torch.empty_like(dq_r) if code else dq_r
        dq_c = torch.empty_like(dq_r) if code else dq_r
        dk_c, dv = torch.empty_like(dq_r), torch.empty_like(dq_r)
        args = (n, h, cq.shape[1], 1.0 / math.sqrt(d), seed, dropout_p)
        _bwd_rows_kernel[(triton.cdiv(n, meta["BLOCK_M"]), b * h)](
            q, k, v, dout, cq, ck, key_ok, lse, delta, dq_r, dk_r, *args, **meta)
        _bwd_cols_kernel[(triton.cdiv(n, meta["BLOCK_N"]), b * h)](
            q, k, v, dout, cq, ck, key_ok, lse, delta, dq_c, dk_c, dv, *args, **meta)
        dq = dq_r + dq_c if code else dq_r
        dk = dk_r + dk_c if code else dk_c
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None)


def bert_lsh_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, codes_q: torch.Tensor,
                    codes_k: torch.Tensor, key_padding_mask: torch.Tensor | None, semantics: str,
                    dropout_p: float = 0.0, blocks: dict | None = None) -> torch.Tensor:
    """BERT-LSH attention from precomputed codes with the flash-style kernels.

    Args:
        q, k, v: [b, h, n, d] fp32 / fp16 / bf16 (one dtype; the output has it).
        codes_q, codes_k: int [b, h, L, n] (``model.attention.bert_lsh.lsh_codes``).
        key_padding_mask: bool [b, n], True = real token (None = all real).
        semantics: ``code`` or ``paper``.  dropout_p: dropout on the probabilities (Philox in-kernel).
        blocks: tile sizes {"m", "n"} (tests use small ones).
    """
    b, h, n, d = q.shape
    if d > MAX_HEAD_DIM:
        raise ValueError(f"bert_lsh triton kernels support head dims up to {MAX_HEAD_DIM}, got {d}")
    out_dtype = v.dtype
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    k, v = k.to(q.dtype), v.to(q.dtype)
    if key_padding_mask is None:
        key_ok = torch.ones(b, n, device=q.device, dtype=torch.float32)
    else:
        ok = key_padding_mask
        if semantics == "code":  # a fully padded sequence sees every key (its outputs are never used)
            ok = ok | ~key_padding_mask.any(-1, keepdim=True)
        key_ok = ok.float().contiguous()
    seed = int(torch.randint(0, 1 << 30, (1,)).item()) if dropout_p > 0 else 0
    cq = codes_q.reshape(b * h, codes_q.shape[2], n).to(torch.int32).contiguous()
    ck = codes_k.reshape(b * h, codes_k.shape[2], n).to(torch.int32).contiguous()
    out = _LshTriton.apply(q.contiguous(), k.contiguous(), v.contiguous(), cq, ck, key_ok, semantics == "code",
                           float(dropout_p), seed, blocks)
    return out.to(out_dtype)
