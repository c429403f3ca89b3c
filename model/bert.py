"""megatron-core BERT for masked-language-model pretraining, with per-layer attention from config.

Notation: b = batch, s = sequence, h = hidden, v = vocabulary (of this tensor-parallel rank),
n = number of predicted (masked) tokens in the batch.

The model is megatron-core's ``BertModel`` (pre-LayerNorm, learned absolute positions, MLM head;
no NSP/SOP binary head, as RoBERTa and MosaicBERT). Its layer specs are copies of
``bert_layer_local_spec`` whose core attention is ``MegatronCoreAttention`` around the variant
the config names, layer by layer. Logits are computed only at the masked positions (the rest are
never scored), which saves the vocabulary projection of ~85% of the tokens.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
from megatron.core.models.bert.bert_model import BertModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from launch.config import ConfigError, ExperimentConfig
from model.attention import config_from_dict
from model.attention.base import AttentionConfig
from model.attention.megatron_adapter import MegatronCoreAttention, layer_spec

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def pad_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Round the vocabulary up so every tensor-parallel shard is a multiple of ``multiple``."""
    step = multiple * tp
    return ((vocab_size + step - 1) // step) * step


def layer_attention_configs(cfg: ExperimentConfig) -> list[AttentionConfig]:
    """One resolved attention config per layer: the default, then ``model.layer_attention`` rules."""
    m = cfg.model
    try:
        default = config_from_dict(m.attention, "model.attention")
        per_layer: list[AttentionConfig] = [default] * m.num_layers
        rules = m.layer_attention or []
        if rules and all(r is None or "layers" not in r for r in rules):
            if len(rules) != m.num_layers:
                raise ValueError(f"model.layer_attention has {len(rules)} entries for {m.num_layers} layers; "
                                 "give one per layer (null keeps the default) or use {layers: [a, b], name: ...} rules")
            for i, r in enumerate(rules):
                if r is not None:
                    per_layer[i] = config_from_dict(r, f"model.layer_attention[{i}]")
        else:
            for i, r in enumerate(rules):
                r = dict(r)
                span = r.pop("layers", None)
                if not (isinstance(span, list) and len(span) == 2 and 0 <= span[0] <= span[1] < m.num_layers):
                    raise ValueError(f"model.layer_attention[{i}].layers={span!r} must be [first, last] with "
                                     f"0 <= first <= last < {m.num_layers}")
                lc = config_from_dict(r, f"model.layer_attention[{i}]")
                for j in range(span[0], span[1] + 1):
                    per_layer[j] = lc
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return per_layer


def transformer_config(cfg: ExperimentConfig) -> TransformerConfig:
    """megatron-core TransformerConfig from ours (CPU-safe: no fusions, CPU initialisation)."""
    m = cfg.model
    bf16 = cfg.train.bf16
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size or 4 * m.hidden_size,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        layernorm_epsilon=m.layernorm_epsilon,
        tensor_model_parallel_size=cfg.parallel.tensor_model_parallel_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        bf16=bf16,
        params_dtype=torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        sequence_parallel=False,
    )


class BertMLM(BertModel):
    """megatron-core BertModel whose forward returns the MLM loss sum, count and correct predictions."""

    def _sanity_check_attention_and_get_attn_mask_dimension(self) -> str:
        # Our core attentions take the key-padding mask [b, 1, 1, s]; megatron's check would compare
        # Transformer Engine versions (absent on CPU) and fail.
        return "b11s"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                tokentype_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **_: object):
        """Encode and score the masked positions.

        Args:
            input_ids, attention_mask (1 = real), tokentype_ids, labels (-100 = not predicted): [b, s].

        Returns:
            With labels: (loss_sum, num_predicted, num_correct) as 0-d tensors (sum, not mean, so
            data-parallel and accumulation averages weight every token alike). Without: logits [b, s, v].
        """
        ext_mask = self.bert_extended_attention_mask(attention_mask)  # [b, 1, 1, s], True = masked out
        position_ids = self.bert_position_ids(input_ids)
        hidden = self.embedding(input_ids=input_ids, position_ids=position_ids,
                                tokentype_ids=tokentype_ids)  # [s, b, h]
        hidden = self.encoder(hidden_states=hidden, attention_mask=ext_mask)  # [s, b, h]
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if labels is None:
            logits, _ = self.output_layer(self.lm_head(hidden_states=hidden), weight=weight)  # [s, b, v]
            return logits.transpose(0, 1).contiguous()  # [b, s, v]
        picked = labels.transpose(0, 1) != IGNORE_INDEX  # [s, b]
        target = labels.transpose(0, 1)[picked]  # [n]
        hidden = hidden[picked].unsqueeze(1)  # [s, b, h] -> [n, 1, h]
        logits, _ = self.output_layer(self.lm_head(hidden_states=hidden), weight=weight)  # [n, 1, v]
        logits = logits.float()
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            loss = tensor_parallel.vocab_parallel_cross_entropy(logits, target.unsqueeze(1)).squeeze(1)
            pred = _vocab_parallel_argmax(logits.squeeze(1).detach())
        else:
            loss = F.cross_entropy(logits.squeeze(1), target, reduction="none")
            pred = logits.squeeze(1).argmax(-1)
        n = torch.tensor(float(target.numel()), device=loss.device)
        return loss.sum(), n, (pred == target).sum().float()


def _vocab_parallel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over a vocabulary split across the tensor-parallel group: [n, v/tp] -> [n] global ids.

    Gathers only each rank's (max, index) pair with torch.distributed (megatron's gather helpers
    allocate on CUDA, which CPU runs do not have).
    """
    import torch.distributed as dist

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    local_max, local_idx = logits.max(dim=-1)  # [n], [n]
    offset = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    pair = torch.stack([local_max, (local_idx + offset).to(local_max.dtype)])  # [2, n]
    gathered = [torch.empty_like(pair) for _ in range(tp)]
    dist.all_gather(gathered, pair.contiguous(), group=group)
    both = torch.stack(gathered)  # [tp, 2, n]
    best = both[:, 0].argmax(dim=0)  # [n] which rank holds the max
    return both[:, 1].gather(0, best[None]).squeeze(0).long()


def build_model(cfg: ExperimentConfig, vocab_size: int) -> BertMLM:
    """Build the BERT of ``cfg`` for a tokenizer of ``vocab_size`` (megatron parallel_state must be set up)."""
    per_layer = layer_attention_configs(cfg)
    tp = cfg.parallel.tensor_model_parallel_size
    padded_vocab = cfg.model.vocab_size or pad_vocab_size(vocab_size, tp)
    if padded_vocab < vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab_size}; "
                          "set it to 0 to follow the tokenizer")
    specs = [layer_spec(c, cfg.model.max_position_embeddings) for c in per_layer]
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=bert_layer_local_spec.submodules.input_layernorm)
    model = BertMLM(
        config=transformer_config(cfg),
        num_tokentypes=2,
        transformer_layer_spec=block,
        vocab_size=padded_vocab,
        max_sequence_length=cfg.model.max_position_embeddings,
        share_embeddings_and_output_weights=True,
        add_binary_head=False,
        parallel_output=True,
    )
    logger.info("built BERT: %d layers, attention per layer %s, %.2fM parameters on this rank",
                cfg.model.num_layers, [c.name for c in per_layer],
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention module of every layer, in layer order (tests and logs inspect them):
    the CoreAttention a layer runs, or its linear_qkv replacement for projection variants."""
    found = []
    for layer in model.encoder.layers:
        core = layer.self_attention.core_attention
        found.append(core.core if isinstance(core, MegatronCoreAttention) else layer.self_attention.linear_qkv)
    return found
