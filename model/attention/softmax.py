"""Exact softmax attention: the baseline every variant is compared with.

Fast path: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
on CUDA, the fused CPU kernel here). Reference path: ``model.attention.reference.softmax_reference``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.attention.base import AttentionConfig, CoreAttention, check_qkv
from model.attention.registry import register


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with padded keys excluded.

    Args:
        q, k, v: [b, h, s, d].
        key_padding_mask: bool [b, s], True = real token (None = all real).
        dropout_p: dropout on the attention probabilities (training only).

    Returns:
        [b, h, s, d].
    """
    check_qkv("softmax", q, k, v, key_padding_mask)
    attn_mask = None
    if key_padding_mask is not None:
        # A row with no real key at all would softmax over nothing (NaN); let it see every key:
        # its queries are padding too, and their outputs are never used.
        empty = ~key_padding_mask.any(dim=-1, keepdim=True)  # [b, 1]
        attn_mask = (key_padding_mask | empty)[:, None, None, :]  # [b, 1, 1, s] broadcast over h, q
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                          scale=1.0 / math.sqrt(q.shape[-1]))


@register("softmax", AttentionConfig)
class SoftmaxAttention(CoreAttention):
    """Exact scaled dot-product attention (SDPA)."""

    def forward(self, q, k, v, key_padding_mask):
        return softmax_attention(q, k, v, key_padding_mask, self.dropout if self.training else 0.0)
