"""YOSO: "You Only Sample (Almost) Once" attention (Zeng et al., ICML 2021), PyTorch path.

Per head, on l2-normalized q^, k^ (no 1/sqrt(d), no softmax):

    YOSO-E (``expectation: true``):  Y_i = sum_j m_i m_j (1 - arccos(q^_i . k^_j) / pi)^tau v_j   (O(n^2))
    YOSO (sampling, m hashes of tau bits):
        Y^_i = (1/m) sum_h table_h[H_h(q^_i)],   table_h[c] = sum_{j: H_h(k^_j) = c} m_j v_j
    output O_i = Y_i / max(||Y_i||, 1e-12)  (+ depthwise conv over the sequence of V*m: YOSO-C)

Hashes: tau Gaussian hyperplanes per hash (``hash: gaussian``, collision probability exactly
(1 - theta/pi)^tau), or the fast Hadamard hash ``sign(H D3 H D2 H D1 x)`` (``hash: hadamard``; head
dim zero-padded to a power of two; orthogonal rather than i.i.d. hyperplanes inside a part).
Cumulation is vectorized: scatter (``index_add_``) into [b*h*m_chunk, 2^tau, d] tables and gather,
chunked over hashes so the workspace stays under ``max_memory_mb``.

Backward (custom autograd.Function, computed densely in query blocks, like the reference code's
``n2_backward``; O(n^2) time, O(block * n) memory):
    dV = W^T dY with W the sampled collision frequencies (exact for the estimator) or B(x) for YOSO-E;
    ``backward: surrogate`` (default): dQ^ = (tau/2 W * G) K^, dK^ = (tau/2 W * G)^T Q^, G = dY V^T,
        the bounded surrogate of the reference code (B'(x) replaced by tau/2 B(x));
    ``backward: exact``: the exact derivative B'(x) = tau (1 - acos x/pi)^(tau-1) / (pi sqrt(1 - x^2)) at
        0.99 x (keeps it finite, as YOSO v2), on every pair for YOSO-E and on the pairs that collide in
        at least one hash for sampling (as YOSO v2).
Autograd carries dQ^, dK^ through the normalizations. Everything runs in fp32 (autocast disabled).

Randomness: hyperplanes per head from generators keyed by (seed, layer, global head, step), shared
by every sequence of the batch (the reference code draws per (batch, head) and call).

Implementations (``impl``, see model/kernels/): ``torch`` (sampling) cumulates with per-hash scatter +
``embedding_bag`` and runs the surrogate dQ/dK backward over bucket-sorted tiles, cost ~ colliding pairs
(model/kernels/yoso_torch.py); ``triton`` fuses hashing with the table build / gather and runs the
backward (and YOSO-E) as dense tiles with on-the-fly weights (model/kernels/yoso_triton.py);
``reference`` is the code below; ``auto`` picks triton on CUDA, torch elsewhere. YOSO-E and the exact
backward use the dense blocked code below on CPU. All hash the same way, so they agree up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.attention.base import AttentionConfig, CoreAttention, check_qkv, sample_per_head
from model.attention.registry import register
from model.kernels.dispatch import Impl, load, resolve_impl

_MIB = 1 << 20
_EXACT_SCALE = 0.99  # x -> 0.99 x inside the exact derivative keeps 1/sqrt(1 - x^2) <= 7.1


@dataclass
class YosoConfig(AttentionConfig):
    """YOSO fields (``model.attention: {name: yoso, num_hashes: 32, hash_bits: 9, ...}``)."""

    name: str = "yoso"
    num_hashes: int = 32
    """m: independent hash functions averaged (sampling mode)."""
    hash_bits: int = 9
    """tau: bits per hash; 2^tau buckets per table. Grow it with the sequence length (9 at 512)."""
    expectation: bool = False
    """YOSO-E: the exact expectation, O(n^2), deterministic."""
    hash: Literal["gaussian", "hadamard"] = "gaussian"
    """Gaussian hyperplanes, or the fast Hadamard hash (sign of H D3 H D2 H D1 x)."""
    conv_window: int = 0
    """YOSO-C: odd window of a depthwise convolution over the sequence of V added to the output (0 = off)."""
    backward: Literal["surrogate", "exact"] = "surrogate"
    """dQ/dK: the bounded surrogate tau/2 B(x), or the exact derivative B'(0.99 x)."""
    max_memory_mb: float = 1024.0
    """Cap on the transient workspace (hash tables, n x block backward weights), in MiB."""
    impl: Impl = "auto"
    """``auto`` (Triton on CUDA, else torch), ``triton`` (fused kernels; CUDA, or CPU under
    TRITON_INTERPRET=1), ``torch`` (fast vectorized PyTorch), ``reference`` (the plain PyTorch code, debugging)."""

    def validate(self, where: str = "model.attention") -> None:
        if self.num_hashes < 1:
            raise ValueError(f"{where}.num_hashes={self.num_hashes} must be a positive integer")
        if not 1 <= self.hash_bits <= 30:
            raise ValueError(f"{where}.hash_bits={self.hash_bits} must be in [1, 30]")
        if self.conv_window < 0 or (self.conv_window and self.conv_window % 2 == 0):
            raise ValueError(f"{where}.conv_window={self.conv_window} must be 0 (off) or an odd positive integer")
        if self.max_memory_mb <= 0:
            raise ValueError(f"{where}.max_memory_mb={self.max_memory_mb} must be > 0")


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def _hadamard_dim(head_dim: int, tau: int) -> int:
    return 1 << max(head_dim - 1, tau - 1, 0).bit_length()


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform over the last dim (a power of two)."""
    shape = x.shape
    d = shape[-1]
    h = 1
    while h < d:
        x = x.reshape(*shape[:-1], d // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(shape)


def sample_hash_params(cfg: YosoConfig, num_heads: int, head_dim: int,
                       generator: torch.Generator | Sequence[torch.Generator] | None,
                       device: torch.device) -> torch.Tensor:
    """Random hash parameters per head: Gaussian hyperplanes [h, d, m*tau], or for the Hadamard
    hash the random sign diagonals [h, 3, parts, d_p] (values +-1)."""
    m, tau = cfg.num_hashes, cfg.hash_bits
    if cfg.hash == "gaussian":
        return sample_per_head("normal", num_heads, (head_dim, m * tau), generator, device)
    dp = _hadamard_dim(head_dim, tau)
    parts = math.ceil(m / (dp // tau))
    bits = sample_per_head("randint", num_heads, (3, parts, dp), generator, device)
    return bits.float() * 2 - 1


def hash_codes(x: torch.Tensor, params: torch.Tensor, num_hashes: int, tau: int) -> torch.Tensor:
    """Codes sum_t 2^t [r_t . x > 0] of x [b, h, n, d] -> int64 [b, h, n, m]."""
    b, h, n, d = x.shape
    if params.dim() == 3:  # Gaussian hyperplanes [h, d, m*tau]
        proj = torch.einsum("bhnd,hdk->bhnk", x, params)
        bits = (proj > 0).view(b, h, n, num_hashes, tau)
    else:  # Hadamard: signs [h, 3, parts, dp]
        parts, dp = params.shape[2], params.shape[3]
        y = F.pad(x, (0, dp - d))[:, :, :, None, :]  # [b, h, n, 1, dp]
        for r in range(3):
            y = fwht(y * params[None, :, None, r])  # [b, h, n, parts, dp]
        per_part = dp // tau
        y = y[..., : per_part * tau].reshape(b, h, n, parts * per_part, tau)[:, :, :, :num_hashes]
        bits = y > 0
    weights = torch.tensor([1 << t for t in range(tau)], device=x.device, dtype=torch.int64)
    return (bits.to(torch.int64) * weights).sum(-1)


# --------------------------------------------------------------------------------------------
# Cumulation and dense weights
# --------------------------------------------------------------------------------------------


def _too_big(tau: int, b: int, h: int, d: int, budget: int, where: str) -> ValueError:
    need = b * h * (1 << tau) * d * 4 / _MIB
    return ValueError(f"yoso: {where}.hash_bits={tau} needs {need:.0f} MiB of hash tables per hash "
                      f"({b}x{h}x2^{tau}x{d} fp32) > {where}.max_memory_mb={budget / _MIB:.0f}; "
                      "lower hash_bits or raise max_memory_mb")


def yoso_cumulation(codes_q: torch.Tensor, codes_k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor, tau: int, max_bytes: int = 1 << 30,
                    where: str = "model.attention") -> torch.Tensor:
    """Y^_i = (1/m) sum_h sum_j [H_h(q_i) = H_h(k_j)] m_i m_j v_j via hash tables.

    Args:
        codes_q, codes_k: int64 [b, h, n, m] bucket codes in [0, 2^tau).
        v: [b, h, n, d].  mask: float [b, n] (1 = real token).
    """
    b, h, n, d = v.shape
    m = codes_k.shape[-1]
    buckets = 1 << tau
    per_hash = b * h * (buckets + 2 * n) * d * v.element_size()
    if b * h * buckets * d * v.element_size() > max_bytes:
        raise _too_big(tau, b, h, d, max_bytes, where)
    chunk = max(1, min(m, max_bytes // per_hash))
    vm = v * mask[:, None, :, None]
    out = torch.zeros_like(v)
    for s in range(0, m, chunk):
        cq, ck = codes_q[..., s:s + chunk], codes_k[..., s:s + chunk]
        c = ck.shape[-1]
        base = (torch.arange(b * h * c, device=v.device).view(b, h, c, 1)) * buckets  # table of (b, h, hash)
        idx_k = (ck.transpose(2, 3) + base).reshape(-1)  # [b, h, c, n]
        idx_q = (cq.transpose(2, 3) + base).reshape(-1)
        table = v.new_zeros(b * h * c * buckets, d)
        table.index_add_(0, idx_k, vm[:, :, None].expand(b, h, c, n, d).reshape(-1, d))
        out += table.index_select(0, idx_q).view(b, h, c, n, d).sum(2)
    return out * (mask[:, None, :, None] / m)


def collision_probability(x: torch.Tensor, tau: int) -> torch.Tensor:
    """B(x) = (1 - arccos(x)/pi)^tau for cosines x (clamped to [-1, 1])."""
    return (1 - torch.arccos(x.clamp(-1.0, 1.0)) / math.pi) ** tau


def collision_probability_grad(x: torch.Tensor, tau: int) -> torch.Tensor:
    """dB/dx at 0.99 x: tau (1 - acos x~/pi)^(tau-1) / (pi sqrt(1 - x~^2)), x~ = 0.99 clamp(x)."""
    xs = _EXACT_SCALE * x.clamp(-1.0, 1.0)
    return tau * (1 - torch.arccos(xs) / math.pi) ** (tau - 1) / (math.pi * torch.sqrt(1 - xs * xs))


def _sampled_weights(cq: torch.Tensor, ck: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Collision frequency (1/m) sum_h [cq_h == ck_h]: [b, h, r, m] x [b, h, n, m] -> [b, h, r, n]."""
    m = cq.shape[-1]
    w = torch.zeros(*cq.shape[:3], ck.shape[2], device=cq.device, dtype=dtype)
    for t in range(m):
        w += cq[..., t, None] == ck[..., None, :, t]
    return w / m


def _row_block(b: int, h: int, n: int, max_bytes: int, tensors: int = 4) -> int:
    return max(1, min(n, max_bytes // max(1, b * h * n * 4 * tensors)))


class _YosoFunction(torch.autograd.Function):
    """Y = W V with W the collision frequencies (sampling, via tables) or B(q^.k^) (expectation)."""

    @staticmethod
    def forward(ctx, qn, kn, v, mask, codes_q, codes_k, tau, expectation, exact, max_bytes, where):
        b, h, n, d = v.shape
        if expectation:
            out = torch.empty_like(v)
            blk = _row_block(b, h, n, max_bytes, tensors=2)
            mk = mask[:, None, None, :]
            for i in range(0, n, blk):
                w = collision_probability(qn[:, :, i:i + blk] @ kn.transpose(-1, -2), tau) * mk
                out[:, :, i:i + blk] = w @ v
            out *= mask[:, None, :, None]
        else:
            out = yoso_cumulation(codes_q, codes_k, v, mask, tau, max_bytes, where)
        ctx.save_for_backward(qn, kn, v, mask, codes_q, codes_k)
        ctx.cfg = (tau, expectation, exact, max_bytes)
        return out

    @staticmethod
    def backward(ctx, dy):
        qn, kn, v, mask, codes_q, codes_k = ctx.saved_tensors
        tau, expectation, exact, max_bytes = ctx.cfg
        dq, dk, dv = dense_grads(qn, kn, v, mask, codes_q, codes_k, dy.to(v.dtype), tau, expectation, exact,
                                 max_bytes)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def dense_grads(qn: torch.Tensor, kn: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                codes_q: torch.Tensor, codes_k: torch.Tensor, dy: torch.Tensor, tau: int, expectation: bool,
                exact: bool, max_bytes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ^, dK^, dV of Y = W V, computed densely in query blocks (O(n^2) time, O(block * n) memory)."""
    b, h, n, d = v.shape
    dq, dk, dv = torch.zeros_like(qn), torch.zeros_like(kn), torch.zeros_like(v)
    mk = mask[:, None, None, :]
    blk = _row_block(b, h, n, max_bytes)
    for i in range(0, n, blk):
        sl = slice(i, i + blk)
        qb, dyb = qn[:, :, sl], dy[:, :, sl] * mask[:, None, sl, None]
        x = qb @ kn.transpose(-1, -2) if (expectation or exact) else None  # [b, h, r, n]
        w = collision_probability(x, tau) if expectation else _sampled_weights(codes_q[:, :, sl], codes_k, v.dtype)
        w = w * mk
        dv += w.transpose(-1, -2) @ dyb
        if exact:
            wd = collision_probability_grad(x, tau) * mk
            if not expectation:
                wd = wd * (w > 0)
        else:
            wd = (tau / 2) * w
        a = wd * (dyb @ v.transpose(-1, -2))  # [b, h, r, n]
        dq[:, :, sl] = a @ kn
        dk += a.transpose(-1, -2) @ qb
    return dq, dk, dv


def yoso_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   key_padding_mask: torch.Tensor | None, cfg: YosoConfig,
                   generator: torch.Generator | Sequence[torch.Generator] | None = None,
                   conv_weight: torch.Tensor | None = None, hash_params: torch.Tensor | None = None,
                   normalize: bool = True) -> torch.Tensor:
    """YOSO attention (sampling, or YOSO-E when ``cfg.expectation``).

    Args:
        q, k, v: [b, h, n, d] (any float dtype; computed in fp32, returned in v's dtype).
        key_padding_mask: bool [b, n], True = real token (None = all real).
        cfg: the YOSO fields.
        generator: one generator for all heads, one per head, or None (default RNG); unused for YOSO-E.
        conv_weight: [h, 1, w, 1] depthwise conv over the sequence (YOSO-C), or None.
        hash_params: injected output of ``sample_hash_params`` (tests); overrides ``generator``.
        normalize: l2-normalize output rows (the algorithm); False returns Y^ (tests).

    Returns:
        [b, h, n, d]. Padded queries and queries without any collision get the zero vector (+ conv).
    """
    check_qkv("yoso", q, k, v, key_padding_mask)
    b, h, n, d = q.shape
    out_dtype = v.dtype
    where = cfg.where()
    max_bytes = int(cfg.max_memory_mb * _MIB)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32  # fp32 (fp64 kept for tests)
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        mask = (torch.ones(b, n, device=q.device, dtype=ct) if key_padding_mask is None
                else key_padding_mask.to(ct))
        qn, kn = F.normalize(q, p=2.0, dim=-1), F.normalize(k, p=2.0, dim=-1)
        impl = resolve_impl(cfg.impl, q.device, where, "yoso", d)
        exact = cfg.backward == "exact"
        params = None
        if cfg.expectation:
            codes_q = codes_k = torch.empty(0, dtype=torch.int64, device=q.device)
        else:
            if b * h * (1 << cfg.hash_bits) * d * 4 > max_bytes:
                raise _too_big(cfg.hash_bits, b, h, d, max_bytes, where)
            params = hash_params if hash_params is not None else sample_hash_params(cfg, h, d, generator, q.device)
            params = params.to(ct)
            if impl != "triton":
                hasher = hash_codes
                if impl == "torch":
                    from model.kernels.yoso_torch import hash_codes as hasher
                with torch.no_grad():
                    codes_q = hasher(qn, params, cfg.num_hashes, cfg.hash_bits)
                    codes_k = hasher(kn, params, cfg.num_hashes, cfg.hash_bits)
        if impl == "triton":
            y = load("yoso_triton").yoso_triton(qn, kn, v, mask, params, cfg.num_hashes, cfg.hash_bits,
                                                cfg.expectation, exact, max_bytes)
        elif impl == "torch" and not cfg.expectation:
            from model.kernels.yoso_torch import yoso_sampled

            y = yoso_sampled(qn, kn, v, mask, codes_q, codes_k, cfg.hash_bits, exact, max_bytes)
        else:  # reference, and YOSO-E on CPU (already blocked: O(block * n) memory)
            y = _YosoFunction.apply(qn, kn, v, mask, codes_q, codes_k, cfg.hash_bits, cfg.expectation,
                                    exact, max_bytes, where)
        out = F.normalize(y, p=2.0, dim=-1, eps=1e-12) if normalize else y
        if conv_weight is not None:
            w = conv_weight.shape[2]
            out = out + F.conv2d(v * mask[:, None, :, None], conv_weight.to(ct), padding=(w // 2, 0), groups=h)
    return out.to(out_dtype)


@register("yoso", YosoConfig)
class YosoAttention(CoreAttention):
    """YOSO / YOSO-E / YOSO-C core attention (PyTorch path)."""

    is_stochastic = True
    cfg: YosoConfig

    def __init__(self, cfg: YosoConfig, **dims) -> None:
        super().__init__(cfg, **dims)
        if cfg.conv_window:
            weight = torch.empty(self.num_heads, 1, cfg.conv_window, 1)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default init
            self.conv_weight = nn.Parameter(weight)
        else:
            self.conv_weight = None

    def forward(self, q, k, v, key_padding_mask):
        gens = None if self.cfg.expectation else self.generators(q.device)
        return yoso_attention(q, k, v, key_padding_mask, self.cfg, gens, self.conv_weight)
