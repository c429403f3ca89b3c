"""@triton.jit helpers shared by the YOSO and BERT-LSH kernels (import through ``dispatch.load``)."""

from __future__ import annotations

import triton
import triton.language as tl

from model.kernels.dispatch import interpreter_enabled

INTERPRETED = interpreter_enabled()
"""Whether this module's functions were decorated for the interpreter (``dispatch.load`` checks it)."""

PI = 3.141592653589793


@triton.jit
def acos(x):
    """arccos on [-1, 1] (Abramowitz & Stegun 4.4.46, absolute error <= 2e-8): libdevice's acos is
    not available in the interpreter, so one formula serves both."""
    ax = tl.abs(x)
    p = -0.0012624911
    p = p * ax + 0.0066700901
    p = p * ax - 0.0170881256
    p = p * ax + 0.0308918810
    p = p * ax - 0.0501743046
    p = p * ax + 0.0889789874
    p = p * ax - 0.2145988016
    p = p * ax + 1.5707963050
    r = tl.sqrt(tl.maximum(1.0 - ax, 0.0)) * p
    return tl.where(x < 0, 3.141592653589793 - r, r)


@triton.jit
def int_pow(base, EXP: tl.constexpr):
    """base ** EXP for a small non-negative integer EXP (unrolled; 0 ** 0 = 1)."""
    out = tl.full(base.shape, 1.0, tl.float32)
    for _ in tl.static_range(EXP):
        out = out * base
    return out


@triton.jit
def collision_prob(x, TAU: tl.constexpr):
    """B(x) = (1 - acos(x)/pi)^tau for cosines x (clamped to [-1, 1])."""
    xc = tl.minimum(tl.maximum(x, -1.0), 1.0)
    return int_pow(1.0 - acos(xc) / 3.141592653589793, TAU)


@triton.jit
def collision_prob_grad(x, TAU: tl.constexpr):
    """dB/dx at 0.99 x: tau (1 - acos(x~)/pi)^(tau-1) / (pi sqrt(1 - x~^2)), x~ = 0.99 clamp(x)."""
    xs = 0.99 * tl.minimum(tl.maximum(x, -1.0), 1.0)
    base = 1.0 - acos(xs) / 3.141592653589793
    return TAU * int_pow(base, TAU - 1) / (3.141592653589793 * tl.sqrt(1.0 - xs * xs))


@triton.jit
def hash_code(x, r_ptr, stride_rd, stride_rt, offs_d, D: tl.constexpr, TAU: tl.constexpr,
              TAU_P: tl.constexpr, PREC: tl.constexpr):
    """SimHash code sum_t 2^t [r_t . x > 0] of the rows of x [BLOCK, BLOCK_D] (fp32) with the tau
    hyperplanes at r_ptr (element (dim, t) at r_ptr + dim * stride_rd + t * stride_rt) -> int32 [BLOCK]."""
    offs_t = tl.arange(0, TAU_P)
    r = tl.load(r_ptr + offs_d[:, None] * stride_rd + offs_t[None, :] * stride_rt,
                mask=(offs_d[:, None] < D) & (offs_t[None, :] < TAU), other=0.0).to(tl.float32)
    proj = tl.dot(x, r, input_precision=PREC)  # [BLOCK, TAU_P]; padded bits project to 0 -> bit 0
    bits = tl.where(proj > 0, 1, 0) << offs_t[None, :]
    return tl.sum(bits, axis=1)
