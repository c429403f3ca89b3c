"""The attention contract every variant follows.

Notation: b = batch, h = heads (of this tensor-parallel rank), s = sequence, d = head dim.

A variant is a ``CoreAttention`` subclass registered by name (see ``registry.py``) with a config
dataclass subclassing ``AttentionConfig``. It sees batch-first ``q, k, v: [b, h, s, d]`` and a
boolean ``key_padding_mask: [b, s]`` that is True at REAL tokens, and returns ``[b, h, s, d]``.
Megatron's sequence-first layout and its inverted mask are converted once, in
``megatron_adapter.py``, never inside a variant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn


@dataclass
class AttentionConfig:
    """Fields shared by every variant; each variant subclasses it with its own fields."""

    name: str = "softmax"
    """Registered variant name (``model.attention.registry.available()`` lists them)."""


class CoreAttention(nn.Module):
    """Per-head attention math. Owns no Q/K/V or output projections (megatron's layers do)."""

    config_cls: ClassVar[type[AttentionConfig]] = AttentionConfig
    """The variant's config dataclass (set by ``@register``)."""
    name: ClassVar[str] = ""
    """The registered name (set by ``@register``)."""
    replaces: ClassVar[Literal["core_attention", "linear_qkv"]] = "core_attention"
    """Which submodule of megatron's SelfAttention spec this variant supplies."""
    is_stochastic: ClassVar[bool] = False
    """True when the output depends on sampled randomness (hashes); keyed by explicit generators."""

    def __init__(self, cfg: AttentionConfig, *, num_heads: int, head_dim: int, max_seq_len: int,
                 dropout: float = 0.0, layer_number: int = 1) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.dropout = dropout
        self.layer_number = layer_number

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """q, k, v: [b, h, s, d]; key_padding_mask: bool [b, s], True = real token -> [b, h, s, d]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.cfg, f.name)!r}" for f in dataclasses.fields(self.cfg))
        return f"{fields}, heads={self.num_heads}, head_dim={self.head_dim}"
