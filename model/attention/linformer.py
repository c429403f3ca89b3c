"""Linformer (Wang et al. 2020): softmax attention over ``k`` sequence-axis projections of K and V.

    head_i = softmax(Q_i (E_i K_i)^T / sqrt(d)) (F_i V_i),   E_i, F_i: [k, max_seq_len]

Padded rows of K and V are zeroed before projecting, and a sequence shorter than max_seq_len uses
the first ``n`` columns of E and F (for right padding both give the same result). The n x k scores
are an ordinary SDPA call with no mask left (no padded columns remain); with 16-bit tensors on CPU
and small n x k scores they run as matmul-softmax-matmul instead (``_attention_explicit``), which is
faster there than SDPA's CPU flash kernel.

Sharing (``sharing``):
    none        one E and one F per head (parameters [heads, k, max_seq_len] each)
    headwise    one E and one F per layer, shared by all heads (default)
    key-value   one matrix per layer, E = F
    layerwise   one matrix for every layer, head, K and V. Tied across the layers of a megatron
                model by the adapter (``share_key``/``tie_to``); a standalone module owns its own.

Inside a megatron layer with head-shared E and F and k < n, ``LinformerSelfAttention`` (megatron
adapter) compresses the layer input instead: K~ = (E X) W_k^T + (E 1) b_k, the same numbers as
E (X W_k^T + b_k), with the K/V linear layers run on k rows instead of n (fairseq's form, see
``compresses_input``); the core then only attends (``attend_compressed``).

Under tensor parallelism head-shared matrices are replicated on every rank; their gradient is summed
over the tensor-parallel group through ``replicated_param_hook`` (set by the adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as nnf
from torch import nn

from model.attention.base import AttentionConfig, CoreAttention, check_qkv
from model.attention.registry import register


@dataclass
class LinformerConfig(AttentionConfig):
    """Linformer attention fields (``model.attention: {name: linformer, k: 128, ...}``)."""

    name: str = "linformer"
    k: int = 128
    """Projected length: rows of E and F (must be <= max_seq_len = model.max_position_embeddings)."""
    sharing: Literal["none", "headwise", "key-value", "layerwise"] = "headwise"
    """Which projections are shared: per head (none), per layer, E = F per layer, one for all layers."""
    init: Literal["normal", "pool"] = "normal"
    """Init of E and F: ``normal`` (random projection, the paper's learned E) or ``pool`` (row r averages
    positions [r*w, (r+1)*w), w = max_seq_len / k: the paper's mean-pooling projection as a start, still
    learned). Pooling keeps local order from step 0; a random E mixes all positions into every row."""
    init_std: float = 0.0
    """Std of the normal init of E and F; 0 means 1/sqrt(max_seq_len) (keeps K~ rows at K's scale).
    With ``init: pool``, the std of noise added to the pooling weights (0 = none)."""

    def validate(self, where: str = "model.attention") -> None:
        if self.k < 1:
            raise ValueError(f"{where}.k={self.k} must be a positive integer")
        if self.init_std < 0:
            raise ValueError(f"{where}.init_std={self.init_std} must be >= 0")


def linformer_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None, E: torch.Tensor, F: torch.Tensor,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """Linformer attention.

    Args:
        q, k, v: [b, h, n, d].
        key_padding_mask: bool [b, n], True = real token (None = all real).
        E, F: [k, N] (shared by heads) or [h, k, N] (per head) with N >= n; columns [:n] are used.
        dropout_p: dropout on the n x k attention probabilities.

    Returns:
        [b, h, n, d].
    """
    check_qkv("linformer", q, k, v, key_padding_mask)
    n = k.shape[2]
    if E.shape[-1] < n or F.shape[-1] < n:
        raise ValueError(f"linformer: sequence length {n} exceeds max_seq_len {min(E.shape[-1], F.shape[-1])} "
                         "(columns of E/F); raise model.max_position_embeddings")
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None].to(k.dtype)  # [b, 1, n, 1]
        k, v = k * keep, v * keep
    E, F = E[..., :n].to(k.dtype), F[..., :n].to(v.dtype)
    return attend_compressed(q, _project(E, k), _project(F, v), dropout_p)


def attend_compressed(q: torch.Tensor, k_proj: torch.Tensor, v_proj: torch.Tensor,
                      dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k_proj^T / sqrt(d)) v_proj: q [b, h, n, d], k_proj, v_proj [b, h, k, d] -> [b, h, n, d].

    The second half of Linformer, once K and V are compressed along the sequence (no mask is left:
    padded rows were zeroed before compressing)."""
    if k_proj.shape != v_proj.shape or q.shape[:2] != k_proj.shape[:2] or q.shape[-1] != k_proj.shape[-1]:
        raise ValueError(f"linformer: compressed k, v must be [batch, heads, k, head_dim] matching q "
                         f"{tuple(q.shape)}; got {tuple(k_proj.shape)}, {tuple(v_proj.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    if _explicit_scores(q, k_proj):
        return _attention_explicit(q, k_proj, v_proj, dropout_p, scale)
    return nnf.scaled_dot_product_attention(q, k_proj, v_proj, dropout_p=dropout_p, scale=scale)


def compresses_input(cfg: LinformerConfig, n: int) -> bool:
    """Whether a megatron layer compresses its input X instead of K and V (``LinformerSelfAttention``).

    With E and F shared by the heads, E (X W_k^T + b_k) = (E X) W_k^T + (E 1) b_k exactly (padded rows
    zeroed on both sides), and the right side runs the K/V linear layers on k rows instead of n. That
    saves work only when k < n; per-head E_i would need one E_i X per head, so ``sharing: none`` keeps
    the paper's form."""
    return cfg.sharing != "none" and cfg.k < n


def compress_sequence(P: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a sequence-first ``x`` [n, b, D] along the sequence with P [k, N] (N >= n; columns [:n]).

    Args:
        keep: [n, b] in x's dtype, 1 at real tokens (None = all real); padded rows count as zero.

    Returns:
        (P x [k, b, D], P keep [k, b] or [k, 1]: the weight each compressed row gives a bias added to x's rows).
    """
    n, b, D = x.shape
    if P.shape[-1] < n:
        raise ValueError(f"linformer: sequence length {n} exceeds max_seq_len {P.shape[-1]} (columns of E/F); "
                         "raise model.max_position_embeddings")
    P = P[:, :n].to(x.dtype)
    if keep is None:
        return (P @ x.reshape(n, b * D)).view(-1, b, D), P.sum(dim=1, keepdim=True)  # [k, b*D] -> [k, b, D]
    xs = (x * keep[..., None]).view(n, b * D)  # [n, b, D] -> [n, b*D]
    return (P @ xs).view(-1, b, D), P @ keep  # [k, b, D], [k, b]


# Largest score tensor (b * h * n * k elements) that the explicit path takes: with bf16 on CPU the explicit
# matmul-softmax-matmul fwd+bwd measured 1.2-2x faster than SDPA's CPU flash kernel up to here (b=1, h=4,
# n=2048, k=128: 3.6 vs 7.5 ms; h=12, n=4096, k=256: 56 vs 66 ms) and slower beyond (h=12, n=8192, k=256:
# 154 vs 133 ms). In fp32 the flash kernel is as fast or faster, and on GPUs flash/efficient SDPA wins.
EXPLICIT_MAX_SCORES = 1 << 24


def _explicit_scores(q: torch.Tensor, k_proj: torch.Tensor) -> bool:
    """Whether the n x k scores go through :func:`_attention_explicit` (CPU, 16-bit, small scores)."""
    b, h, n, _ = q.shape
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and b * h * n * k_proj.shape[2] <= EXPLICIT_MAX_SCORES)


def _attention_explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                        scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with the n x k probabilities stored for backward, as HF's eager path.

    q: [b, h, n, d]; k, v: [b, h, k, d] -> [b, h, n, d]. The softmax runs in q's dtype (the CPU kernel
    accumulates in fp32 and rounds the probabilities once)."""
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)  # [b, h, n, k]
    if dropout_p:
        p = nnf.dropout(p, dropout_p)
    return torch.matmul(p, v)


def _project(P: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """P [k, n] (shared by heads) or [h, k, n] (per head) times x [b, h, n, d] -> [b, h, k, d].

    A shared P is applied as one GEMM in the sequence-first layout: megatron hands the core its
    [s, b, h, d] tensors as permuted views, so ``[n, b*h*d]`` is a free view and there is no copy
    (``torch.matmul(P, x)`` folds x into a transposed copy for a contiguous [b, h, n, d] input and
    its gradient); a per-head P is a batched matmul.
    """
    if P.dim() == 3:
        return torch.matmul(P, x)  # [h, k, n] @ [b, h, n, d] -> [b, h, k, d]
    b, h, n, d = x.shape
    xs = x.permute(2, 0, 1, 3).reshape(n, b * h * d)  # [b, h, n, d] -> [n, b*h*d]
    return (P @ xs).view(P.shape[0], b, h, d).permute(1, 2, 0, 3)  # [k, b, h, d] -> [b, h, k, d]


@register("linformer", LinformerConfig)
class LinformerAttention(CoreAttention):
    """Linformer core attention owning its sequence projections E (and F)."""

    cfg: LinformerConfig

    def __init__(self, cfg: LinformerConfig, **dims) -> None:
        super().__init__(cfg, **dims)
        if cfg.k > self.max_seq_len:
            raise ValueError(f"linformer: {cfg.where()}.k={cfg.k} exceeds max_seq_len={self.max_seq_len} "
                             f"(model.max_position_embeddings); use k <= {self.max_seq_len}")
        shape = (self.num_heads, cfg.k, self.max_seq_len) if cfg.sharing == "none" else (cfg.k, self.max_seq_len)
        self.E = nn.Parameter(self._initial(shape))
        self.F = nn.Parameter(self._initial(shape)) if cfg.sharing in ("none", "headwise") else None

    def _initial(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A fresh E or F of ``shape`` ([k, N] or [heads, k, N]) as ``cfg.init`` says."""
        if self.cfg.init == "normal":
            return torch.empty(shape).normal_(0.0, self.cfg.init_std or 1.0 / math.sqrt(self.max_seq_len))
        k, N = shape[-2], shape[-1]
        row = (torch.arange(N) * k) // N  # position c -> the row that pools it: k contiguous windows
        pool = (row[None, :] == torch.arange(k)[:, None]).float()  # [k, N] one-hot windows
        pool = (pool / pool.sum(dim=1, keepdim=True)).expand(shape).clone()  # window means (k <= N: none empty)
        if self.cfg.init_std:  # independent noise per head (sharing: none)
            pool += torch.randn(shape) * self.cfg.init_std
        return pool

    def share_key(self) -> object | None:
        if self.cfg.sharing != "layerwise":
            return None
        return ("linformer", self.cfg.k, self.max_seq_len)

    def tie_to(self, other: CoreAttention) -> None:
        assert isinstance(other, LinformerAttention) and other.E.shape == self.E.shape
        self.E = other.E

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, F) as this forward uses them: F is E for ``key-value`` / ``layerwise``; head-shared
        matrices go through ``replicated_param_hook`` (replicated on every TP rank: grads summed over TP)."""
        E, F_ = self.E, self.F
        if self.cfg.sharing != "none":
            E = self.replicated_param_hook(E)
            F_ = self.replicated_param_hook(F_) if F_ is not None else None
        return E, (E if F_ is None else F_)

    def attend_compressed(self, q: torch.Tensor, k_proj: torch.Tensor, v_proj: torch.Tensor) -> torch.Tensor:
        """Attention over K, V already compressed to k rows (q [b, h, n, d]; k_proj, v_proj [b, h, k, d])."""
        return attend_compressed(q, k_proj, v_proj, self.dropout if self.training else 0.0)

    def forward(self, q, k, v, key_padding_mask):
        if k.shape[2] > self.max_seq_len:
            raise ValueError(f"linformer: sequence length {k.shape[2]} exceeds max_seq_len={self.max_seq_len}; "
                             "raise model.max_position_embeddings")
        E, F_ = self.projections()
        return linformer_attention(q, k, v, key_padding_mask, E, F_, self.dropout if self.training else 0.0)
