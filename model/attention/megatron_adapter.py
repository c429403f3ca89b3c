"""Plug a registered ``CoreAttention`` into megatron-core's SelfAttention as its core attention.

Megatron hands the core attention sequence-first ``[s, b, h, d]`` tensors and a boolean mask that is
True where attention is NOT allowed (``[b, 1, 1, s]``); it expects ``[s, b, h * d]`` back. This is
the one place those conventions are converted to ours (batch-first, True = real token).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from model.attention.base import AttentionConfig
from model.attention.registry import build, config_from_dict


class MegatronCoreAttention(MegatronModule):
    """megatron-core ``core_attention`` built from our registry (``attention_cfg`` picks the variant)."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None, *, attention_cfg: AttentionConfig | dict,
                 max_seq_len: int) -> None:
        super().__init__(config=config)
        tp = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
        heads = config.num_attention_heads // tp
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.core = build(attention_cfg, num_heads=heads, head_dim=head_dim, max_seq_len=max_seq_len,
                          dropout=dropout, layer_number=layer_number)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: Any = None, packed_seq_params: Any = None) -> torch.Tensor:
        assert attention_bias is None and packed_seq_params is None, "bias / packed sequences unsupported"
        s, b, h, d = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, h, d] -> [b, h, s, d]
        key_padding_mask = None
        if attention_mask is not None:
            if attention_mask.dim() == 4 and attention_mask.shape[2] == 1:
                key_padding_mask = ~attention_mask[:, 0, 0, :]  # [b, 1, 1, s] -> [b, s], True = real
            else:  # [b, 1, s, s]: a key is real if some query may attend to it
                key_padding_mask = (~attention_mask[:, 0]).any(dim=1)  # [b, s]
        out = self.core(q, k, v, key_padding_mask)  # [b, h, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)  # [b, h, s, d] -> [s, b, h*d]


def layer_spec(attention_cfg: AttentionConfig | dict, max_seq_len: int) -> ModuleSpec:
    """A copy of megatron-core's local BERT layer spec with this variant plugged in.

    Variants that replace the core attention go in ``core_attention``; variants whose
    ``replaces == "linear_qkv"`` supply the fused QKV projection instead and keep megatron's path.
    """
    attention_cfg = config_from_dict(attention_cfg)
    spec = copy.deepcopy(bert_layer_local_spec)
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        MegatronCoreAttention, attention_cfg=attention_cfg, max_seq_len=max_seq_len)
    return spec
