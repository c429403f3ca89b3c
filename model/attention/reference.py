"""Naive, readable references (fp64-capable) the tests compare every fast path with."""

from __future__ import annotations

import math

import torch


def softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Dense softmax attention in the inputs' dtype. q, k, v: [b, h, s, d]; mask True = real."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [b, h, s, s]
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # [b, h, s, d]
