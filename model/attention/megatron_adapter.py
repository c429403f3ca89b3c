"""Plug a registered attention variant into megatron-core's SelfAttention.

Core variants (softmax, bert_lsh, yoso, linformer) become its ``core_attention``: megatron hands it
sequence-first ``[s, b, h, d]`` tensors and a boolean mask that is True where attention is NOT
allowed (``[b, 1, 1, s]``) and expects ``[s, b, h * d]`` back. This is the one place those
conventions are converted to ours (batch-first, True = real token).

Projection variants (``replaces == "linear_qkv"``: shared_qkv) supply megatron's ``linear_qkv``
instead (``SharedQKVLinear``) and keep softmax as the core attention (``ProjectionVariantCore``,
deliberately not a ``MegatronCoreAttention``, so ``model.bert.attention_modules`` reports the
projection module for those layers).

Per layer the adapter also sets, on the variant module: ``head_offset = tp_rank * heads`` (global
head index for stochastic variants), ``replicated_param_hook`` (TP > 1: gradients of parameters that
every rank holds whole, such as Linformer's head-shared E, are summed over the TP group), and ties
parameters that a variant shares across layers (Linformer ``sharing: layerwise``) within one model.
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from model.attention.base import AttentionConfig
from model.attention.registry import build, config_from_dict, get
from model.attention.shared_qkv import SharedQKVConfig, fused_head_interleaved

# Parameters tied across the layers of one model: id(TransformerConfig) -> {share_key: first module}.
_SHARED: dict[int, dict] = {}


def _tp_group_rank_size(pg_collection: Any) -> tuple[Any, int, int]:
    group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
    if group is None and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    if group is None:
        return None, 0, 1
    return group, torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


class _SequenceFirstCore(MegatronModule):
    """Builds the registered variant for this layer and converts megatron's layout and mask."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None, *, attention_cfg: AttentionConfig | dict,
                 max_seq_len: int) -> None:
        super().__init__(config=config)
        group, tp_rank, tp = _tp_group_rank_size(pg_collection)
        heads = config.num_attention_heads // tp
        head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.core = build(attention_cfg, num_heads=heads, head_dim=head_dim, max_seq_len=max_seq_len,
                          dropout=dropout, layer_number=layer_number, head_offset=tp_rank * heads)
        if tp > 1:
            self.core.replicated_param_hook = functools.partial(copy_to_tensor_model_parallel_region, group=group)
        key = self.core.share_key()
        if key is not None:
            store = _SHARED.get(id(config))
            if store is None:
                store = _SHARED[id(config)] = {}
                weakref.finalize(config, _SHARED.pop, id(config), None)
            if key in store:
                self.core.tie_to(store[key])
            else:
                store[key] = self.core

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
            if key_padding_mask.device.type == "cpu" and bool(key_padding_mask.all()):
                key_padding_mask = None  # no padding: skip the masking work (checked on CPU, where it costs no sync)
        out = self.core(q, k, v, key_padding_mask)  # [b, h, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)  # [b, h, s, d] -> [s, b, h*d]


class MegatronCoreAttention(_SequenceFirstCore):
    """megatron-core ``core_attention`` built from our registry (``attention_cfg`` picks the variant)."""


class ProjectionVariantCore(_SequenceFirstCore):
    """The core attention kept by layers whose variant replaces ``linear_qkv`` (softmax for shared_qkv)."""


class SharedQKVLinear(ColumnParallelLinear):
    """megatron ``linear_qkv`` for shared-weight attention: S = X W_s^T + b_s (ColumnParallelLinear
    D -> D, this rank's heads' columns) and per-partition scales d_q, d_k, d_v, returning megatron's
    fused layout [s, b, np * (3 * hn)] ordered per head as [q_j | k_j | v_j]."""

    def __init__(self, input_size: int, output_size: int, *, config: TransformerConfig, init_method: Any,
                 attention_cfg: AttentionConfig | dict, bias: bool = True, gather_output: bool = False,
                 skip_bias_add: bool = False, is_expert: bool = False, tp_comm_buffer_name: str | None = None,
                 tp_group: Any = None, **_: Any) -> None:
        cfg = config_from_dict(attention_cfg)
        assert isinstance(cfg, SharedQKVConfig)
        heads, hn = config.num_attention_heads, config.kv_channels
        if (config.num_query_groups or heads) != heads or output_size != 3 * heads * hn or config.attention_output_gate:
            raise ValueError("shared_qkv needs plain multi-head attention (num_query_groups = heads, no output "
                             f"gate); got linear_qkv output size {output_size} for {heads} heads of {hn}")
        if gather_output:
            raise ValueError("shared_qkv: linear_qkv with gather_output=True is not supported")
        # The bias must be scaled by the diagonals, so it is always added inside (skip_bias_add=False).
        super().__init__(input_size, heads * hn, config=config, init_method=init_method, bias=bias,
                         gather_output=False, skip_bias_add=False, is_expert=is_expert,
                         tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        self.head_dim = hn
        n = self.output_size_per_partition
        for name in ("d_q", "d_k", "d_v"):
            p = torch.nn.Parameter(torch.full((n,), cfg.diag_init, dtype=config.params_dtype))
            set_tensor_model_parallel_attributes(p, True, 0, 1)
            p.allreduce = True
            self.register_parameter(name, p)

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None,
                runtime_gather_output: bool | None = None) -> tuple[torch.Tensor, None]:
        s, _ = super().forward(input_, weight=weight)  # [s, b, np*hn]
        return fused_head_interleaved(s, self.d_q, self.d_k, self.d_v, self.head_dim), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state_dict = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"weight": 0, "bias": 0, "d_q": 0, "d_k": 0, "d_v": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))


# Megatron linear_qkv modules of the variants that replace it.
LINEAR_QKV_MODULES: dict[str, type] = {"shared_qkv": SharedQKVLinear}


def layer_spec(attention_cfg: AttentionConfig | dict, max_seq_len: int) -> ModuleSpec:
    """A copy of megatron-core's local BERT layer spec with this variant plugged in.

    Variants that replace the core attention go in ``core_attention``; variants whose
    ``replaces == "linear_qkv"`` supply the fused QKV projection instead and keep softmax attention.
    """
    attention_cfg = config_from_dict(attention_cfg)
    spec = copy.deepcopy(bert_layer_local_spec)
    sub = spec.submodules.self_attention.submodules
    if get(attention_cfg.name).replaces == "linear_qkv":
        if attention_cfg.name not in LINEAR_QKV_MODULES:
            raise ValueError(f"attention {attention_cfg.name!r} replaces linear_qkv but has no megatron module "
                             "in model.attention.megatron_adapter.LINEAR_QKV_MODULES")
        sub.linear_qkv = functools.partial(LINEAR_QKV_MODULES[attention_cfg.name], attention_cfg=attention_cfg)
        sub.core_attention = functools.partial(ProjectionVariantCore, attention_cfg=attention_cfg,
                                               max_seq_len=max_seq_len)
    else:
        sub.core_attention = functools.partial(MegatronCoreAttention, attention_cfg=attention_cfg,
                                               max_seq_len=max_seq_len)
    return spec
