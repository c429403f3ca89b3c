"""Export to Hugging Face: MegatronBertForMaskedLM gives bertforge's logits; tokenizer gives its ids."""

from __future__ import annotations

import os

import pytest
import torch

TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=48",
        "model.max_position_embeddings=24", "data.seq_len=16", "model.hidden_dropout=0.1",
        "model.attention_dropout=0.1", "model.layernorm_epsilon=1e-6"]


@pytest.fixture(scope="module")
def world():
    from pretrain.state_dict import init_single_process

    return init_single_process(0)


def _cfg(*extra: str):
    from launch.config import load_config

    return load_config(None, TINY + list(extra))


def _random_model(cfg, vocab: int = 100):
    """A BertMLM whose every parameter (LayerNorms and biases included) is random, so any mix-up shows."""
    from model.bert import build_model

    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(("d_q", "d_k", "d_v")):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _state_dict(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


CASES = {
    "softmax": [],
    "shared_qkv": ["model.attention={name: shared_qkv}"],
    "softmax+shared_qkv": ["model.layer_attention=[null, {name: shared_qkv}]"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_logits_match(world, case, tmp_path):
    from transformers import MegatronBertForMaskedLM

    from pretrain.export_hf import _sample_batch, build_hf_model, compare_logits

    cfg = _cfg(*CASES[case])
    model = _random_model(cfg)
    hf = build_hf_model(_state_dict(model), cfg)
    batch = _sample_batch(100, 20)
    assert compare_logits(model, hf, batch) <= 1e-4
    # and after a save / from_pretrained round trip (safetensors, tied decoder restored)
    hf.save_pretrained(str(tmp_path))
    again = MegatronBertForMaskedLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert again.cls.predictions.decoder.weight.data_ptr() == again.bert.embeddings.word_embeddings.weight.data_ptr()
    diff = compare_logits(model, again, batch)
    assert diff <= 1e-4, diff
    assert again.config.vocab_size == 128  # the padded embedding rows


def test_padding_and_token_types_matter(world):
    """The check is not vacuous: token types and padding change the logits, equally in both models."""
    from pretrain.export_hf import _sample_batch, build_hf_model

    cfg = _cfg()
    model = _random_model(cfg)
    hf = build_hf_model(_state_dict(model), cfg)
    batch = _sample_batch(100, 20)
    flipped = dict(batch, token_type_ids=1 - batch["token_type_ids"])
    with torch.no_grad():
        a = hf(**batch).logits
        b = hf(**flipped).logits
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("extra,named", [
    (["model.attention={name: yoso, num_hashes: 4, hash_bits: 4}"], "yoso"),
    (["model.layer_attention=[null, {name: linformer, k: 8}]"], "linformer"),
])
def test_other_variants_get_one_clear_line(extra, named):
    from pretrain.export_hf import ExportError, check_exportable

    with pytest.raises(ExportError) as e:
        check_exportable(_cfg(*extra))
    msg = str(e.value)
    assert "\n" not in msg and named in msg and "MegatronBertForMaskedLM" in msg and "layer" in msg


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A small unigram sentencepiece model trained on stdlib docstrings (as the pipeline trains them)."""
    import json as json_mod

    from data_pipeline.tokenizer import train_tokenizer

    docs = [m.__doc__ for m in (os, json_mod, torch.nn, pytest) if m.__doc__] * 2
    docs += [open(os.__file__).read()[:20000]]
    prefix = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    tok = train_tokenizer(docs, prefix, vocab_size=300, num_threads=1)
    return tok


def test_hf_tokenizer_reproduces_sentencepiece_ids(sp_model, tmp_path):
    from transformers import AutoTokenizer

    from pretrain.export_hf import hf_tokenizer

    hf_tokenizer(sp_model.path, 64).save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    lines = [ln for ln in open(os.__file__).read().splitlines() if ln.strip()][:400]
    lines += ["Return the sum of a and b.", "  extra   spaces\tand tabs  ", "digits 12345 and x2y", "Ünïcödé ﬁ text"]
    same = sum(tok(ln, add_special_tokens=False)["input_ids"] == sp_model.encode(ln) for ln in lines)
    assert same >= 0.99 * len(lines), f"{same}/{len(lines)} lines tokenized alike"
    enc = tok("a b", "c d")
    a, b = sp_model.encode("a b"), sp_model.encode("c d")
    assert enc["input_ids"] == [sp_model.cls_id, *a, sp_model.sep_id, *b, sp_model.sep_id]
    assert enc["token_type_ids"] == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert tok.mask_token_id == sp_model.mask_id and tok.pad_token_id == sp_model.pad_id
    assert len(tok) == sp_model.vocab_size


def test_checkpoint_lookup_errors_are_one_line(tmp_path):
    from launch.config import load_config
    from pretrain.state_dict import CheckpointError, find_checkpoint

    def err(*args) -> str:
        with pytest.raises(CheckpointError) as e:
            find_checkpoint(*args)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in err(str(tmp_path / "nope"))
    assert "not a bertforge run directory" in err(str(tmp_path))
    load_config(None, []).dump(str(tmp_path / "config.yaml"))
    assert "no complete checkpoint" in err(str(tmp_path))
    (tmp_path / "checkpoints" / "global_step5").mkdir(parents=True)
    assert "incomplete" in err(str(tmp_path / "checkpoints" / "global_step5"))
    assert "does not exist" in err(str(tmp_path), "global_step7")
