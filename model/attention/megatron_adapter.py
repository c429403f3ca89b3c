"""Plug a registered attention variant into megatron-core's SelfAttention.

Core variants (softmax, bert_lsh, yoso, linformer) become its ``core_attention``: megatron hands it
sequence-first ``[s, b, h, d]`` tensors and a boolean mask that is True where attention is NOT
allowed (``[b, 1, 1, s]``) and expects ``[s, b, h * d]`` back. This is the one place those
conventions are converted to ours (batch-first, True = real token).

Projection variants (``replaces == "linear_qkv"``: shared_qkv) supply megatron's ``linear_qkv``
instead (``SharedQKVLinear``) and keep softmax as the core attention (``ProjectionVariantCore``,
deliberately not a ``MegatronCoreAttention``, so ``model.bert.attention_modules`` reports the
projection module for those layers).

Linformer layers with head-shared E/F use ``LinformerSelfAttention``, which compresses the layer
input before the K/V linear layers (the same numbers, the K/V projections of k rows instead of n) and
hands the core K/V of k rows.

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
import torch.nn.functional as nnf
from megatron.core import parallel_state
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from model.attention.base import AttentionConfig
from model.attention.linformer import LinformerAttention, compress_sequence, compresses_input
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
        if key.shape[0] != s:  # K/V already compressed along the sequence (LinformerSelfAttention), mask applied
            out = self.core.attend_compressed(q, k, v)  # [b, h, s, d]
        else:
            out = self.core(q, k, v, key_padding_mask(attention_mask))  # [b, h, s, d]
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)  # [b, h, s, d] -> [s, b, h*d]


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """megatron's mask (True = NOT allowed; [b, 1, 1, s] or [b, 1, s, s]) -> ours: bool [b, s], True = real.

    None when there is no padding (checked on CPU only, where it costs no device sync)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.shape[2] == 1:
        mask = ~attention_mask[:, 0, 0, :]  # [b, 1, 1, s] -> [b, s], True = real
    else:  # [b, 1, s, s]: a key is real if some query may attend to it
        mask = (~attention_mask[:, 0]).any(dim=1)  # [b, s]
    if mask.device.type == "cpu" and bool(mask.all()):
        return None  # no padding: skip the masking work
    return mask


class LinformerSelfAttention(SelfAttention):
    """megatron SelfAttention for Linformer layers that compresses the layer input, not K and V.

    With E and F shared by the heads and k < n (``linformer.compresses_input``), K~ and V~ are

        K~ = (E X~) W_k^T + (E keep) b_k,   V~ = (F X~) W_v^T + (F keep) b_v,   X~ = X with padded rows zeroed

    which equals E (X W_k^T + b_k) with padded rows of K zeroed (the paper's form) but runs the K/V
    linear layers on k rows instead of n. Q is X W_q^T + b_q as usual. W and b are this rank's slice of
    megatron's fused ``linear_qkv`` (per head [q | k | v]); the core (``attend_compressed``) sees K/V
    of k rows. Under TP the input passes megatron's copy-to-TP-region (identity forward, all-reduce of
    its gradient) as ``linear_qkv`` does, and E/F get the core's replicated-parameter hook. Otherwise
    (``sharing: none``, k >= n, grouped queries, sequence parallelism) the layer is megatron's
    SelfAttention unchanged.
    """

    compress_input: bool = True
    """Class-wide switch: False runs the paper's form everywhere (tests and A/B benchmarks compare them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        core = self.core_attention.core
        if not isinstance(core, LinformerAttention):
            raise TypeError(f"LinformerSelfAttention needs Linformer core attention, got {type(core).__name__}")
        self._attention_mask: torch.Tensor | None = None
        self._plain = (self.num_query_groups_per_partition == self.num_attention_heads_per_partition
                       and not self.config.attention_output_gate and not self.config.sequence_parallel
                       and all(n is None or isinstance(n, IdentityOp) for n in (self.q_layernorm, self.k_layernorm)))
        group, _, tp = _tp_group_rank_size(self.pg_collection)
        self._tp_group = group if tp > 1 else None
        # ZeRO-3 gathers a module's parameters around ITS forward; these are read in this module's
        # get_query_key_value_tensors, outside linear_qkv's and the core's forward (recent DeepSpeed also
        # gathers such a parameter on first access; registering says so up front, as the trainer does for
        # the tied output embedding).
        import deepspeed

        for p in (self.linear_qkv.weight, self.linear_qkv.bias, core.E, core.F):
            if p is not None:
                deepspeed.zero.register_external_parameter(self, p)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, *args: Any, **kwargs: Any):
        self._attention_mask = attention_mask  # get_query_key_value_tensors zeroes padded rows with it
        try:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self._attention_mask = None

    def get_query_key_value_tensors(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                                    output_gate: bool = False, split_qkv: bool = True):
        core = self.core_attention.core
        n, b, _ = hidden_states.shape
        if not (self.compress_input and self._plain and split_qkv and not output_gate and key_value_states is None
                and compresses_input(core.cfg, n)):
            return super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate=output_gate,
                                                       split_qkv=split_qkv)
        x = hidden_states  # [n, b, D]
        if self._tp_group is not None:
            x = copy_to_tensor_model_parallel_region(x, group=self._tp_group)
        heads, hn = self.num_attention_heads_per_partition, self.hidden_size_per_attention_head
        w = self.linear_qkv.weight.view(heads, 3, hn, -1)  # [np*3*hn, D] -> [np, (q, k, v), hn, D]
        bias = self.linear_qkv.bias
        bias = bias.view(heads, 3, hn) if bias is not None else None  # [np*3*hn] -> [np, (q, k, v), hn]

        def linear(t: torch.Tensor, which: int, row_weight: torch.Tensor | None = None) -> torch.Tensor:
            out = nnf.linear(t, w[:, which].reshape(heads * hn, -1))  # [., b, D] -> [., b, np*hn]
            if bias is not None:
                bw = bias[:, which].reshape(heads * hn)
                out = out + (bw if row_weight is None else row_weight[..., None] * bw)
            return out

        query = linear(x, 0).view(n, b, heads, hn)  # [n, b, np*hn] -> [n, b, np, hn]
        mask = key_padding_mask(self._attention_mask)  # [b, n] or None
        keep = mask.t().to(x.dtype) if mask is not None else None  # [n, b]
        E, F_ = core.projections()
        ex, e_keep = compress_sequence(E, x, keep)  # [k, b, D], [k, b | 1]
        fx, f_keep = (ex, e_keep) if F_ is E else compress_sequence(F_, x, keep)
        key = linear(ex, 1, e_keep).view(-1, b, heads, hn)  # [k, b, np*hn] -> [k, b, np, hn]
        value = linear(fx, 2, f_keep).view(-1, b, heads, hn)
        return query, key, value


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
        if attention_cfg.name == "linformer":
            spec.submodules.self_attention.module = LinformerSelfAttention
    return spec
