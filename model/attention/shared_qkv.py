"""Shared-weight self-attention (Kowsher et al. 2024): one D -> D projection for Q, K and V.

    S = X W_s^T + b_s,   Q = S diag(d_q),   K = S diag(d_k),   V = S diag(d_v)

then exact softmax attention. W_s uses nn.Linear's [out, in] layout; the diagonals have no bias.
Parameters per layer: D^2 + D + 3D instead of 3(D^2 + D) (66.54% fewer at D = 768). The per-head
logits sum_c S_ic d_q,c d_k,c S_jc are symmetric; only d_q * d_k matters for them (both still learn).

This variant replaces megatron's ``linear_qkv`` (``replaces = "linear_qkv"``): the megatron adapter
puts ``SharedQKVLinear`` (megatron_adapter.py) there, a ColumnParallelLinear D -> D/tp plus
per-partition scales producing megatron's fused head-interleaved layout, and keeps softmax core
attention. ``SharedQKVProjection`` is the same projection as a plain module for code without megatron.
Init choice (the paper does not give one): d_* = ``diag_init`` (1: Q = K = V = S at init), W_s as
every other megatron weight (normal, std ``model.init_method_std``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.attention.base import AttentionConfig, CoreAttention
from model.attention.registry import register
from model.attention.softmax import softmax_attention


@dataclass
class SharedQKVConfig(AttentionConfig):
    """Shared-weight attention fields (``model.attention: {name: shared_qkv}``)."""

    name: str = "shared_qkv"
    diag_init: float = 1.0
    """Initial value of every entry of d_q, d_k, d_v."""


def shared_qkv_projection(x: torch.Tensor, w_s: torch.Tensor, b_s: torch.Tensor | None,
                          d_q: torch.Tensor, d_k: torch.Tensor, d_v: torch.Tensor,
                          num_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q, K, V from one shared projection.

    Args:
        x: [b, s, D_in].  w_s: [D, D_in] (nn.Linear layout).  b_s: [D] or None.  d_q, d_k, d_v: [D].
        num_heads: split D into heads -> [b, h, s, D/h] each; None keeps [b, s, D].
    """
    s = F.linear(x, w_s, b_s)
    q, k, v = s * d_q, s * d_k, s * d_v
    if num_heads is None:
        return q, k, v
    b, n, dim = s.shape
    return tuple(t.view(b, n, num_heads, dim // num_heads).transpose(1, 2) for t in (q, k, v))


def fused_head_interleaved(s: torch.Tensor, d_q: torch.Tensor, d_k: torch.Tensor, d_v: torch.Tensor,
                           head_dim: int) -> torch.Tensor:
    """megatron's fused QKV layout from the shared projection: S [..., np*hn] -> [..., np*(3*hn)]
    ordered per head as [q_j | k_j | v_j] (what SelfAttention.get_query_key_value_tensors splits)."""
    lead = s.shape[:-1]
    heads = s.shape[-1] // head_dim
    s = s.view(*lead, heads, 1, head_dim)
    scales = torch.stack((d_q, d_k, d_v)).view(3, heads, head_dim).transpose(0, 1)  # [np, 3, hn]
    return (s * scales).reshape(*lead, heads * 3 * head_dim)


class SharedQKVProjection(nn.Module):
    """The shared projection as a plain module: x [b, s, D] -> q, k, v [b, h, s, D/h]."""

    def __init__(self, hidden_size: int, num_heads: int, cfg: SharedQKVConfig | None = None,
                 init_std: float = 0.02, bias: bool = True) -> None:
        super().__init__()
        cfg = cfg or SharedQKVConfig()
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.empty(hidden_size, hidden_size).normal_(0.0, init_std))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.d_q = nn.Parameter(torch.full((hidden_size,), cfg.diag_init))
        self.d_k = nn.Parameter(torch.full((hidden_size,), cfg.diag_init))
        self.d_v = nn.Parameter(torch.full((hidden_size,), cfg.diag_init))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return shared_qkv_projection(x, self.weight, self.bias, self.d_q, self.d_k, self.d_v, self.num_heads)


@register("shared_qkv", SharedQKVConfig)
class SharedQKVAttention(CoreAttention):
    """The core attention kept by shared-weight layers: exact softmax (the projection is the variant)."""

    replaces = "linear_qkv"
    projection_cls = SharedQKVProjection

    def forward(self, q, k, v, key_padding_mask):
        return softmax_attention(q, k, v, key_padding_mask, self.dropout if self.training else 0.0)

