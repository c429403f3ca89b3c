"""Analytic forward + backward FLOPs and parameter counts of every attention variant and of the BERT.

What is counted (one multiply-add = 2 FLOPs; everything per optimizer micro batch of ``batch``
sequences of ``seq_len`` tokens; ``seq_len`` is the PADDED length the kernels run on, so padding
costs as much as real tokens in every PyTorch path here):

* ``*_matmul``: GEMM work only (what ``torch.utils.flop_counter.FlopCounterMode`` counts; the tests
  check these against it on the references). Backward of a GEMM whose two operands both need
  gradients is 2x its forward (weights, activations, Linformer's E/F all do).
* ``fwd`` / ``bwd``: GEMMs plus estimates of the elementwise work that grows with the same sizes
  (softmax ~5 FLOPs per score forward and ~4 backward, hashing bit packing, table scatter/gather
  adds, normalizations, acos/pow ~10 per YOSO-E weight). Comparisons, index arithmetic and memory
  traffic are not FLOPs and are ignored, although they dominate YOSO and BERT-LSH on real hardware.
* The attention block = Q/K/V projection + core attention + output projection, one layer.
  ``model_flops`` adds embeddings (free), LayerNorms, the FFN and the MLM head (evaluated only at the
  ``num_masked`` predicted tokens, as model/bert.py does).
* Costs are those of THIS repository's implementations, not idealized kernels:
    - softmax: QK^T and AV, 4 n^2 D forward.
    - linformer: E K, F V, Q K~^T, A V~: 8 n k D forward (E, F get gradients). Inside megatron layers
      with head-shared E/F and k < n the input is compressed instead (``LinformerSelfAttention``): E X
      and F X (one product when E = F), the K/V linear layers on k rows, Q on n rows.
    - bert_lsh: dense QK^T and AV (as the released code, 4 n^2 D) + hashing 2 (2n) d L b per head;
      non-colliding logits are 0, not skipped, so nothing is saved in the core.
    - yoso (sampling): hashing (Gaussian: 2 (2n) d m tau per head; Hadamard: 3 FWHT of d_p log2 d_p
      adds per part per vector) and 2 n m d table adds; the backward is the dense, query-blocked
      surrogate (8 n^2 D GEMMs + the collision count): O(n^2), like the reference code's
      ``n2_backward``. yoso-E: 4 n^2 D forward, 10 n^2 D backward. YOSO-C adds a depthwise conv.
    - shared_qkv: one D x D projection (2 n D^2) + 3 n D scaling instead of 6 n D^2.
* Parameters: the attention block's Q/K/V projection (``qkv``), the variant's own parameters
  (``core``: Linformer E/F, YOSO-C conv; ``core_shared``: Linformer layerwise, counted once per
  model) and the output projection. ``qkv_saved_pct`` compares the Q/K/V projection only (the
  paper's 66.53% for shared_qkv at D = 768: (2D - 1) / (3D + 3) = 66.54%).
"""

from __future__ import annotations

import math
from typing import Any

from model.attention.linformer import compresses_input
from model.attention.registry import config_from_dict, layer_configs

SOFTMAX_ELEMENTWISE_FWD = 5
SOFTMAX_ELEMENTWISE_BWD = 4
TRANSCENDENTAL = 10


def _cfg(attention: Any):
    return config_from_dict(attention if not isinstance(attention, str) else {"name": attention})


def _core_flops(cfg, n: int, num_heads: int, head_dim: int, max_seq_len: int, hidden_size: int | None = None,
                input_form: bool = False) -> dict[str, float]:
    """Core attention of one sequence, all heads: {fwd_matmul, bwd_matmul, fwd_other, bwd_other}."""
    H, d = num_heads, head_dim
    D = H * d
    scores = n * n * H
    name = cfg.name
    if name in ("softmax", "shared_qkv"):
        fm = 4.0 * n * n * D
        return dict(fwd_matmul=fm, bwd_matmul=2 * fm,
                    fwd_other=SOFTMAX_ELEMENTWISE_FWD * scores, bwd_other=SOFTMAX_ELEMENTWISE_BWD * scores)
    if name == "linformer":
        k = min(cfg.k, max_seq_len)
        if input_form:  # E X (and F X unless E = F) over the hidden size, then Q K~^T and A V~
            fm = (2.0 if cfg.sharing in ("key-value", "layerwise") else 4.0) * n * k * (hidden_size or D) + 4.0 * n * k * D
        else:  # E K, F V, Q K~^T, A V~
            fm = 8.0 * n * k * D
        return dict(fwd_matmul=fm, bwd_matmul=2 * fm,
                    fwd_other=SOFTMAX_ELEMENTWISE_FWD * n * k * H + 2 * n * D,
                    bwd_other=SOFTMAX_ELEMENTWISE_BWD * n * k * H + 2 * n * D)
    if name == "bert_lsh":
        L, b = cfg.num_hashes, cfg.bands
        hashing = 2.0 * (2 * n) * d * L * b * H
        fm = 4.0 * n * n * D
        # collision OR over tables, triu + symmetric copy, scale, mask, softmax
        other = (L + 3 + SOFTMAX_ELEMENTWISE_FWD) * scores + 2 * n * L * b * H
        return dict(fwd_matmul=fm + hashing, bwd_matmul=2 * fm,
                    fwd_other=other, bwd_other=(3 + SOFTMAX_ELEMENTWISE_BWD) * scores)
    if name == "yoso":
        m, tau = cfg.num_hashes, cfg.hash_bits
        norm = 3.0 * 3 * n * D  # normalize q, k and the output rows
        conv = 2.0 * n * cfg.conv_window * D if cfg.conv_window else 0.0
        if cfg.expectation:
            fm = 4.0 * n * n * D
            bm = 10.0 * n * n * D
            return dict(fwd_matmul=fm + conv, bwd_matmul=bm + 2 * conv,
                        fwd_other=(TRANSCENDENTAL + 1) * scores + norm,
                        bwd_other=(2 * TRANSCENDENTAL + 3) * scores + 2 * norm)
        if cfg.hash == "gaussian":
            hash_mm, hash_other = 2.0 * (2 * n) * d * m * tau * H, 2.0 * (2 * n) * m * tau * H
        else:
            dp = 1 << max(d - 1, tau - 1, 0).bit_length()
            parts = math.ceil(m / (dp // tau))
            hash_mm, hash_other = 0.0, (2 * n) * H * parts * 3 * (dp * math.log2(dp) + dp)
        table = 2.0 * n * m * d * H
        bm = 8.0 * n * n * D
        if cfg.backward == "exact":
            bm += 2.0 * n * n * D
        return dict(fwd_matmul=hash_mm + conv, bwd_matmul=bm + 2 * conv,
                    fwd_other=hash_other + table + norm,
                    bwd_other=(m + 3) * scores + (TRANSCENDENTAL * scores if cfg.backward == "exact" else 0)
                    + 2 * norm)
    raise ValueError(f"model/flops.py has no FLOP formula for attention {name!r}; add one")


def _proj_flops(cfg, n: int, hidden_size: int, num_heads: int, head_dim: int,
                input_form: bool = False) -> dict[str, float]:
    """Q/K/V projection + output projection of one sequence."""
    D, inner = hidden_size, num_heads * head_dim
    out_mm = 2.0 * n * inner * D
    if cfg.name == "shared_qkv":
        qkv_mm, qkv_other = 2.0 * n * D * inner, n * inner + 3 * n * inner
    elif input_form:  # Linformer compressing the layer input: Q over n rows, K and V over k rows
        k = cfg.k
        qkv_mm, qkv_other = 2.0 * n * D * inner + 4.0 * k * D * inner, n * inner + 4 * k * inner
    else:
        qkv_mm, qkv_other = 6.0 * n * D * inner, 3 * n * inner
    return dict(fwd_matmul=qkv_mm + out_mm, bwd_matmul=2 * (qkv_mm + out_mm),
                fwd_other=qkv_other + n * D, bwd_other=qkv_other + n * D)


def attention_flops(cfg_dict: Any, batch: int, seq_len: int, num_heads: int, head_dim: int,
                    hidden_size: int, max_seq_len: int, linformer_input_form: bool = True) -> dict[str, float]:
    """FLOPs of one attention block (one layer) over a batch, with the softmax equivalent.

    Args:
        cfg_dict: ``{name: ..., <fields>}`` (or an AttentionConfig, or a bare name).
        batch, seq_len: sequences and their padded length.
        num_heads, head_dim, hidden_size: the layer's shape (all heads, not per TP rank).
        max_seq_len: model.max_position_embeddings (caps Linformer's k).
        linformer_input_form: count Linformer as megatron layers run it: compressing the layer input
            before the K/V linear layers where ``linformer.compresses_input`` says so (head-shared E/F,
            k < n); False counts the paper's form (E K, F V; the standalone core attention).

    Returns:
        fwd, bwd, total; core_* and proj_* parts with their *_matmul GEMM shares; softmax_fwd,
        softmax_bwd, softmax_total of the same block with softmax attention; saved_pct (of total).
    """
    cfg = _cfg(cfg_dict)
    out: dict[str, float] = {}
    for prefix, c in (("", cfg), ("softmax_", _cfg("softmax"))):
        input_form = linformer_input_form and c.name == "linformer" and compresses_input(c, seq_len)
        core = _core_flops(c, seq_len, num_heads, head_dim, max_seq_len, hidden_size, input_form)
        proj = _proj_flops(c, seq_len, hidden_size, num_heads, head_dim, input_form)
        parts = {}
        for part_name, part in (("core", core), ("proj", proj)):
            for phase in ("fwd", "bwd"):
                mm = batch * part[f"{phase}_matmul"]
                parts[f"{part_name}_{phase}_matmul"] = mm
                parts[f"{part_name}_{phase}"] = mm + batch * part[f"{phase}_other"]
        fwd = parts["core_fwd"] + parts["proj_fwd"]
        bwd = parts["core_bwd"] + parts["proj_bwd"]
        if prefix:
            out.update(softmax_fwd=fwd, softmax_bwd=bwd, softmax_total=fwd + bwd)
        else:
            out.update(parts, fwd=fwd, bwd=bwd, total=fwd + bwd)
    out["saved_pct"] = 100.0 * (1 - out["total"] / out["softmax_total"])
    return out


def attention_params(cfg_dict: Any, hidden_size: int, num_heads: int, max_seq_len: int,
                     head_dim: int | None = None) -> dict[str, float]:
    """Parameters of one attention block (Q/K/V, variant, output projection) vs softmax attention."""
    cfg = _cfg(cfg_dict)
    D = hidden_size
    d = head_dim or D // num_heads
    inner = num_heads * d
    standard_qkv = 3 * (D * inner + inner)
    qkv = D * inner + inner + 3 * inner if cfg.name == "shared_qkv" else standard_qkv
    core = core_shared = 0
    if cfg.name == "linformer":
        k = cfg.k
        if cfg.sharing == "none":
            core = 2 * num_heads * k * max_seq_len
        elif cfg.sharing == "headwise":
            core = 2 * k * max_seq_len
        elif cfg.sharing == "key-value":
            core = k * max_seq_len
        else:
            core_shared = k * max_seq_len
    elif cfg.name == "yoso" and cfg.conv_window:
        core = num_heads * cfg.conv_window
    out_proj = inner * D + D
    total = qkv + core + out_proj
    softmax_total = standard_qkv + out_proj
    return dict(qkv=qkv, core=core, core_shared=core_shared, out=out_proj, total=total,
                softmax_qkv=standard_qkv, softmax_total=softmax_total,
                qkv_saved_pct=100.0 * (1 - qkv / standard_qkv),
                saved_pct=100.0 * (1 - total / softmax_total))


def _get(obj: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        obj = obj.get(part, default) if isinstance(obj, dict) else getattr(obj, part, default)
    return obj


def model_flops(experiment_cfg: Any, batch: int, seq_len: int, num_masked: int, vocab: int,
                linformer_input_form: bool = True) -> dict[str, float]:
    """FLOPs of one forward + backward of the whole BERT over a batch, and of its softmax twin.

    Args:
        experiment_cfg: an ``ExperimentConfig`` (or its dict); model.* fields are read.
        batch, seq_len: sequences and their padded length.
        num_masked: predicted (MLM) tokens in the whole batch; the head runs only there.
        vocab: rows of the output embedding (the padded vocabulary).
        linformer_input_form: as in :func:`attention_flops`.

    Returns:
        fwd, bwd, total; attention_total / softmax_attention_total (all layers' attention blocks);
        softmax_total (same model, softmax everywhere); saved_pct and attention_saved_pct.
    """
    m = _get(experiment_cfg, "model")
    L, D, H = _get(m, "num_layers"), _get(m, "hidden_size"), _get(m, "num_attention_heads")
    ffn = _get(m, "ffn_hidden_size") or 4 * D
    max_len = _get(m, "max_position_embeddings")
    per_layer = layer_configs(_get(m, "attention"), _get(m, "layer_attention") or [], L)
    n, d = seq_len, D // H
    tokens = batch * n
    attn_fwd = attn_bwd = sm_fwd = sm_bwd = 0.0
    for c in per_layer:
        a = attention_flops(c, batch, n, H, d, D, max_len, linformer_input_form)
        attn_fwd, attn_bwd = attn_fwd + a["fwd"], attn_bwd + a["bwd"]
        sm_fwd, sm_bwd = sm_fwd + a["softmax_fwd"], sm_bwd + a["softmax_bwd"]
    ln = 8.0 * D  # LayerNorm per token, forward (~2x backward)
    ffn_mm = 4.0 * tokens * D * ffn
    ffn_other = 8.0 * tokens * ffn + 2 * tokens * D  # GELU, bias, residual adds
    rest_fwd = L * (ffn_mm + ffn_other + 2 * tokens * ln) + tokens * ln  # + the final LayerNorm
    rest_bwd = L * (2 * ffn_mm + ffn_other + 4 * tokens * ln) + 2 * tokens * ln
    head_mm = 2.0 * num_masked * D * D + 2.0 * num_masked * D * vocab
    head_other = num_masked * (ln + 8 * D + 5 * vocab)  # LN, GELU, cross entropy
    rest_fwd += head_mm + head_other
    rest_bwd += 2 * head_mm + head_other
    fwd, bwd = attn_fwd + rest_fwd, attn_bwd + rest_bwd
    softmax_total = sm_fwd + sm_bwd + rest_fwd + rest_bwd
    return dict(fwd=fwd, bwd=bwd, total=fwd + bwd, attention_fwd=attn_fwd, attention_bwd=attn_bwd,
                attention_total=attn_fwd + attn_bwd, softmax_attention_total=sm_fwd + sm_bwd,
                softmax_total=softmax_total, saved_pct=100.0 * (1 - (fwd + bwd) / softmax_total),
                attention_saved_pct=100.0 * (1 - (attn_fwd + attn_bwd) / (sm_fwd + sm_bwd)))


def model_params(experiment_cfg: Any, vocab: int) -> dict[str, float]:
    """Parameters of the BERT (encoder, embeddings, MLM head) and of its softmax twin."""
    m = _get(experiment_cfg, "model")
    L, D, H = _get(m, "num_layers"), _get(m, "hidden_size"), _get(m, "num_attention_heads")
    ffn = _get(m, "ffn_hidden_size") or 4 * D
    max_len = _get(m, "max_position_embeddings")
    per_layer = layer_configs(_get(m, "attention"), _get(m, "layer_attention") or [], L)
    attn = softmax_attn = 0
    shared: dict[tuple, int] = {}
    for c in per_layer:
        p = attention_params(c, D, H, max_len)
        attn += p["total"]
        softmax_attn += p["softmax_total"]
        if p["core_shared"]:
            shared[(c.name, getattr(c, "k", 0))] = p["core_shared"]
    attn += sum(shared.values())
    layer_rest = 2 * D * ffn + ffn + D + 4 * D  # FFN + two LayerNorms
    embed = vocab * D + max_len * D + 2 * D  # words (tied with the output), positions, 2 token types
    head = D * D + D + 2 * D + vocab  # dense, LN, output bias
    rest = L * layer_rest + embed + head + 2 * D  # + final LayerNorm
    return dict(total=attn + rest, softmax_total=softmax_attn + rest, attention=attn,
                softmax_attention=softmax_attn, saved_pct=100.0 * (1 - (attn + rest) / (softmax_attn + rest)))
