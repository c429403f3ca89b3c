"""Export a pretraining checkpoint to a Hugging Face folder loadable as ``MegatronBertForMaskedLM``.

    python -m pretrain.export_hf --run runs/demo --out exports/demo_hf
    # then: transformers.MegatronBertForMaskedLM.from_pretrained("exports/demo_hf")
    #       transformers.AutoTokenizer.from_pretrained("exports/demo_hf")

The folder: config.json, model.safetensors (fp32, ZeRO partitions gathered first), the tokenizer
(tokenizer.json + tokenizer_config.json, converted from the sentencepiece model, plus that model as
``bertforge_tokenizer.model``) and bertforge_export.json (where it came from). After writing, the
export is loaded back with ``from_pretrained`` and its logits are compared with bertforge's model on a
fixed batch (``--no-verify`` skips that); a difference above ``--atol`` is an error.

Why MegatronBert and not Bert: megatron-core's BERT is pre-LayerNorm (LN before attention and MLP,
one final LN, no LN on the embeddings), which ``MegatronBertForMaskedLM`` implements and the post-LN
``BertForMaskedLM`` cannot express. Weight mapping (L layers, H hidden, n heads of d = H / n):

    embedding.{word,position,tokentype}_embeddings -> bert.embeddings.{word,position,token_type}_embeddings
    layers.i.input_layernorm                        -> bert.encoder.layer.i.attention.ln
    layers.i.self_attention.linear_qkv [3H, H]      -> attention.self.{query,key,value} [H, H] each:
        megatron's fused rows are head-interleaved, viewed as [n, 3, d, H] ([q_j | k_j | v_j] per head j)
    layers.i.self_attention.linear_proj             -> attention.output.dense
    layers.i.pre_mlp_layernorm                      -> bert.encoder.layer.i.ln
    layers.i.mlp.linear_fc1 / linear_fc2            -> intermediate.dense / output.dense
    encoder.final_layernorm                         -> bert.encoder.ln
    lm_head.dense, lm_head.layer_norm               -> cls.predictions.transform.dense / .LayerNorm (gelu between)
    output_layer.bias                               -> cls.predictions.bias (decoder weight tied to the embedding)

shared_qkv layers (Q = S diag(d_q), K = S diag(d_k), V = S diag(d_v), S = X W_s^T + b_s) export exactly as
ordinary projections W_q = diag(d_q) W_s, b_q = d_q * b_s (the parameter saving is not kept). Layers of
other variants (bert_lsh, yoso, linformer) have no MegatronBert equivalent: the export stops with a
message (no custom modeling code is generated). The vocabulary keeps the padded embedding rows (a
multiple of 128); ids beyond the tokenizer's are never produced by it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

import torch  # noqa: E402

logger = logging.getLogger(__name__)

EXPORTABLE = ("softmax", "shared_qkv")
"""Attention variants that map onto MegatronBert's self-attention exactly."""


class ExportError(ValueError):
    """A checkpoint that cannot be exported as asked (one line)."""


def check_exportable(cfg) -> list[str]:
    """The attention name of every layer; raises ExportError naming layers MegatronBert cannot express."""
    from model.bert import layer_attention_configs

    names = [c.name for c in layer_attention_configs(cfg)]
    bad = sorted({n for n in names if n not in EXPORTABLE})
    if bad:
        layers = [i for i, n in enumerate(names) if n not in EXPORTABLE]
        raise ExportError(f"attention {', '.join(bad)} (layer{'s' if len(layers) > 1 else ''} "
                          f"{', '.join(map(str, layers))}) has no MegatronBertForMaskedLM equivalent; only "
                          f"{' and '.join(EXPORTABLE)} layers export to Hugging Face (custom modeling code for "
                          "the other variants is not implemented)")
    return names


def hf_config(cfg, vocab_size: int, tokenizer_vocab: int | None = None):
    """The ``MegatronBertConfig`` of the run's model (fp32, dropouts as pretrained)."""
    from transformers import MegatronBertConfig

    m = cfg.model
    return MegatronBertConfig(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, intermediate_size=m.ffn_hidden_size or 4 * m.hidden_size,
        hidden_act="gelu", hidden_dropout_prob=m.hidden_dropout, attention_probs_dropout_prob=m.attention_dropout,
        max_position_embeddings=m.max_position_embeddings, type_vocab_size=2, initializer_range=m.init_method_std,
        layer_norm_eps=m.layernorm_epsilon, pad_token_id=0, tie_word_embeddings=True,
        architectures=["MegatronBertForMaskedLM"], dtype="float32",
    )


def _split_qkv(sd: dict, prefix: str, attention: str, heads: int) -> tuple[torch.Tensor, ...]:
    """(W_q, b_q, W_k, b_k, W_v, b_v), each [H, H] / [H], of one layer's megatron linear_qkv."""
    w, b = sd[prefix + "linear_qkv.weight"], sd[prefix + "linear_qkv.bias"]
    if attention == "shared_qkv":
        out = []
        for d in ("d_q", "d_k", "d_v"):
            scale = sd[prefix + "linear_qkv." + d]  # [H]
            out += [scale[:, None] * w, scale * b]
        return tuple(out)
    hidden = w.shape[1]
    d = w.shape[0] // (3 * heads)
    w4 = w.view(heads, 3, d, hidden)  # rows head-interleaved: [q_j | k_j | v_j] per head j
    b3 = b.view(heads, 3, d)
    return tuple(t for i in range(3) for t in (w4[:, i].reshape(heads * d, hidden), b3[:, i].reshape(heads * d)))


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """bertforge (megatron-core) BertMLM state dict -> MegatronBertForMaskedLM state dict.

    Raises:
        ExportError: a layer's variant cannot be expressed (see :func:`check_exportable`).
    """
    names = check_exportable(cfg)
    heads = cfg.model.num_attention_heads
    out = {
        "bert.embeddings.word_embeddings.weight": sd["embedding.word_embeddings.weight"],
        "bert.embeddings.position_embeddings.weight": sd["embedding.position_embeddings.weight"],
        "bert.embeddings.token_type_embeddings.weight": sd["embedding.tokentype_embeddings.weight"],
    }
    for i, name in enumerate(names):
        src, dst = f"encoder.layers.{i}.", f"bert.encoder.layer.{i}."
        wq, bq, wk, bk, wv, bv = _split_qkv(sd, src + "self_attention.", name, heads)
        pairs = {
            "attention.ln": "input_layernorm", "attention.output.dense": "self_attention.linear_proj",
            "ln": "pre_mlp_layernorm", "intermediate.dense": "mlp.linear_fc1", "output.dense": "mlp.linear_fc2",
        }
        for hf, mc in pairs.items():
            out[f"{dst}{hf}.weight"] = sd[f"{src}{mc}.weight"]
            out[f"{dst}{hf}.bias"] = sd[f"{src}{mc}.bias"]
        for part, (w, b) in {"query": (wq, bq), "key": (wk, bk), "value": (wv, bv)}.items():
            out[f"{dst}attention.self.{part}.weight"] = w
            out[f"{dst}attention.self.{part}.bias"] = b
    for hf, mc in {"bert.encoder.ln": "encoder.final_layernorm",
                   "cls.predictions.transform.dense": "lm_head.dense",
                   "cls.predictions.transform.LayerNorm": "lm_head.layer_norm"}.items():
        out[f"{hf}.weight"] = sd[f"{mc}.weight"]
        out[f"{hf}.bias"] = sd[f"{mc}.bias"]
    out["cls.predictions.bias"] = sd["output_layer.bias"]
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]  # tied
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]  # tied
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def build_hf_model(sd: dict[str, torch.Tensor], cfg):
    """A MegatronBertForMaskedLM holding the weights of the bertforge state dict ``sd``."""
    from transformers import MegatronBertForMaskedLM

    from pretrain.state_dict import vocab_rows

    model = MegatronBertForMaskedLM(hf_config(cfg, vocab_rows(sd)))
    hf_sd = to_hf_state_dict(sd, cfg)
    expected = set(model.state_dict())
    if set(hf_sd) != expected:
        raise ExportError(f"weight mapping is out of date with transformers' MegatronBert: missing "
                          f"{sorted(expected - set(hf_sd))[:3]}, unexpected {sorted(set(hf_sd) - expected)[:3]}")
    model.load_state_dict(hf_sd, strict=True)
    model.tie_weights()
    return model.eval()


def hf_tokenizer(tokenizer_path: str, model_max_length: int):
    """A ``transformers`` fast tokenizer equivalent to bertforge's sentencepiece model: same pieces and
    ids (a unigram model with the sentencepiece scores, its NFKC charsmap, whitespace and digit rules),
    ``[CLS] A [SEP]`` / ``[CLS] A [SEP] B [SEP]`` templates with token types 0 / 1. Lines whose best
    segmentation ties between two pieceings may split differently (rare: runs of one repeated character)."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.tokenizer import CLS, MASK, PAD, SEP, UNK
    from data_pipeline.tokenizer import Tokenizer as SpTokenizer

    sp = SpTokenizer.load(tokenizer_path)  # checks the special ids
    proto = sentencepiece_model_pb2.ModelProto()
    with open(sp.path, "rb") as f:
        proto.ParseFromString(f.read())
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    if ts.model_type != 1:  # 1 = UNIGRAM
        raise ExportError(f"tokenizer {sp.path} is a {'BPE' if ts.model_type == 2 else ts.model_type} sentencepiece "
                          "model; only unigram models (data.tokenizer_type=unigram) are converted")
    tok = Tokenizer(Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=sp.unk_id, byte_fallback=False))
    norms = [normalizers.Precompiled(ns.precompiled_charsmap)] if ns.precompiled_charsmap else []
    if ns.remove_extra_whitespaces:
        norms += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norms:
        tok.normalizer = normalizers.Sequence(norms)
    scheme = "always" if ns.add_dummy_prefix else "never"
    pre = [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=ts.split_by_whitespace)]
    if ts.split_digits:
        pre.append(pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=scheme)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0", pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, sp.cls_id), (SEP, sp.sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, pad_token=PAD, cls_token=CLS,
                                   sep_token=SEP, mask_token=MASK, model_max_length=model_max_length,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _sample_batch(vocab: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch with padding and both token types: what export verification runs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, seq), generator=g)
    ids[:, 0] = 1  # [CLS]
    am = torch.ones(3, seq, dtype=torch.long)
    am[1, seq * 2 // 3:] = 0
    am[2, seq // 2:] = 0
    ids[am == 0] = 0
    tt = torch.zeros_like(ids)
    tt[0, seq // 2:] = 1
    return {"input_ids": ids, "attention_mask": am, "token_type_ids": tt}


def compare_logits(bf_model, hf_model, batch: dict[str, torch.Tensor]) -> float:
    """Max |bertforge - HF| over the logits of the real (non-padding) tokens of ``batch``."""
    with torch.no_grad():
        a = bf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     tokentype_ids=batch["token_type_ids"]).float()
        b = hf_model(**batch).logits.float()
    real = batch["attention_mask"].bool()
    return float((a - b).abs()[real].max())


def export(run: str, out_dir: str, tag: str | None = None, tokenizer: str | None = None, verify: bool = True,
           atol: float = 1e-4) -> dict:
    """Write the HF folder of ``run``'s checkpoint to ``out_dir``; returns what bertforge_export.json holds.

    Raises:
        CheckpointError, ExportError: one line each (unsupported variant, tokenizer mismatch, failed check).
    """
    from data_pipeline.tokenizer import sha256_file
    from pretrain.state_dict import check_tokenizer, find_checkpoint, fp32_state_dict

    ck = find_checkpoint(run, tag)
    names = check_exportable(ck.cfg)  # before gathering any weights
    tok_path = tokenizer or os.path.join(ck.cfg.data.data_dir, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise ExportError(f"tokenizer {tok_path} not found; pass --tokenizer with the run's tokenizer.model")
    check_tokenizer(ck, sha256_file(tok_path), f"tokenizer {tok_path}")
    sd = fp32_state_dict(ck)
    hf_model = build_hf_model(sd, ck.cfg)
    os.makedirs(out_dir, exist_ok=True)
    hf_model.save_pretrained(out_dir, safe_serialization=True)
    hf_tok = hf_tokenizer(tok_path, ck.cfg.model.max_position_embeddings)
    hf_tok.save_pretrained(out_dir)
    shutil.copyfile(tok_path, os.path.join(out_dir, "bertforge_tokenizer.model"))
    info = {"run": ck.run_dir, "checkpoint": ck.path, "step": ck.step, "zero_stage": ck.zero_stage,
            "attention": names, "tokenizer_sha256": sha256_file(tok_path), "vocab_size": hf_model.config.vocab_size,
            "tokenizer_vocab_size": len(hf_tok), "architecture": "MegatronBertForMaskedLM"}
    if verify:
        info["max_abs_logit_diff"] = verify_export(ck, sd, out_dir, atol)
    with open(os.path.join(out_dir, "bertforge_export.json"), "w") as f:
        json.dump(info, f, indent=1)
    return info


def verify_export(ck, sd: dict[str, torch.Tensor], out_dir: str, atol: float) -> float:
    """Reload ``out_dir`` with ``from_pretrained`` and compare its logits with bertforge's model."""
    from transformers import MegatronBertForMaskedLM

    from model.attention.base import set_seed, set_step
    from pretrain.state_dict import init_single_process, load_model, vocab_rows

    init_single_process(ck.cfg.train.seed)
    set_seed(ck.cfg.train.seed)
    set_step(0)
    bf_model = load_model(ck, "cpu", sd)
    hf_model = MegatronBertForMaskedLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    batch = _sample_batch(min(vocab_rows(sd), 1000), min(ck.cfg.model.max_position_embeddings, 64))
    diff = compare_logits(bf_model, hf_model, batch)
    if not diff <= atol:
        raise ExportError(f"exported model's logits differ from bertforge's by {diff:.3g} (> {atol:g}); "
                          f"the export in {out_dir} is wrong, please report it")
    logger.info("verified: MegatronBertForMaskedLM.from_pretrained(%s) matches bertforge's logits (max abs diff %.2e)",
                out_dir, diff)
    return diff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="pretraining run dir (or its checkpoints/global_stepN)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: newest complete)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the run's data dir's)")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing logits")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference accepted by the check")
    args = parser.parse_args(argv)
    from launch.cli import error_exit, setup_logging

    setup_logging(0)
    from data_pipeline.errors import DataError
    from pretrain.state_dict import CheckpointError

    try:
        info = export(args.run, args.out, args.tag, args.tokenizer, not args.no_verify, args.atol)
    except (CheckpointError, ExportError, DataError) as e:
        return error_exit(e)
    from launch.distributed import shutdown_distributed

    shutdown_distributed()
    logger.info("exported %s (step %d) to %s", info["checkpoint"], info["step"], args.out)
    sys.stdout.write(json.dumps({"out": os.path.abspath(args.out), **info}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
