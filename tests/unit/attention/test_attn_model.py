"""Every variant inside megatron-core's BERT (model.bert.build_model), single-process gloo world."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.attention import available

TINY = ["model.num_layers=3", "model.hidden_size=32", "model.num_attention_heads=4", "model.ffn_hidden_size=64",
        "model.max_position_embeddings=32", "data.seq_len=16", "model.hidden_dropout=0.0",
        "model.attention_dropout=0.0"]
VARIANT_FIELDS = {"linformer": {"k": 8}, "yoso": {"num_hashes": 8, "hash_bits": 5}}
HYBRID = "hybrid"


def _cfg(name: str, extra: dict | None = None):
    from launch.config import load_config

    if name == HYBRID:
        attn = "model.attention={name: yoso, num_hashes: 8, hash_bits: 5}"
        rules = "model.layer_attention=[{layers: [0, 0], name: softmax}, {layers: [2, 2], name: softmax}]"
        return load_config(None, TINY + [attn, rules])
    fields = {"name": name, **VARIANT_FIELDS.get(name, {}), **(extra or {})}
    body = ", ".join(f"{k}: {v}" for k, v in fields.items())
    return load_config(None, TINY + [f"model.attention={{{body}}}"])


def _build(cfg):
    from model.bert import build_model

    torch.manual_seed(0)
    return build_model(cfg, 100)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 16), generator=g)
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, 11:] = 0
    labels = torch.full((2, 16), -100)
    labels[:, 3] = ids[:, 3]
    labels[0, 7] = ids[0, 7]
    return ids, am, torch.zeros_like(ids), labels


def _expected_classes(name: str, layers: int = 3) -> list[str]:
    from model.attention import get

    def cls(n):
        return "SharedQKVLinear" if get(n).replaces == "linear_qkv" else get(n).__name__

    if name == HYBRID:
        return [cls("softmax"), cls("yoso"), cls("softmax")]
    return [cls(name)] * layers


@pytest.fixture(scope="module")
def logits_per_variant(megatron_world):
    from model.bert import attention_modules

    ids, am, tt, labels = _batch()
    out = {}
    for name in [*available(), HYBRID]:
        model = _build(_cfg(name))
        assert [type(m).__name__ for m in attention_modules(model)] == _expected_classes(name), name
        model.train()
        loss, n, _ = model(ids, am, tt, labels)
        (loss / n).backward()
        assert torch.isfinite(loss), name
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"
        model.eval()
        with torch.no_grad():
            out[name] = model(ids, am, tt)
        assert out[name].shape == (2, 16, 128) and torch.isfinite(out[name]).all()
    return out


def test_each_layer_runs_its_variant_and_logits_differ(logits_per_variant):
    names = list(logits_per_variant)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(logits_per_variant[a], logits_per_variant[b], atol=1e-4), (a, b)


def test_shared_qkv_linear_produces_megatron_fused_layout(megatron_world):
    from model.bert import attention_modules

    model = _build(_cfg("shared_qkv"))
    lin = attention_modules(model)[0]
    with torch.no_grad():
        for p in (lin.d_q, lin.d_k, lin.d_v, lin.bias):
            p.copy_(torch.randn_like(p))
    x = torch.randn(5, 2, 32)
    mixed, bias = lin(x)
    assert bias is None and mixed.shape == (5, 2, 96)
    q, k, v = mixed.view(5, 2, 4, 24).split([8, 8, 8], dim=3)  # SelfAttention.get_query_key_value_tensors
    s = F.linear(x, lin.weight, lin.bias)
    for got, scale in ((q, lin.d_q), (k, lin.d_k), (v, lin.d_v)):
        torch.testing.assert_close(got, (s * scale).view(5, 2, 4, 8))
    assert sum(p.numel() for p in lin.parameters()) == 32 * 32 + 4 * 32
    # and the layer's own split agrees
    q2, k2, v2 = model.encoder.layers[0].self_attention.get_query_key_value_tensors(x)
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(v2, v)


def test_linformer_layerwise_ties_one_matrix_across_layers(megatron_world):
    from model.bert import attention_modules

    model = _build(_cfg("linformer", {"sharing": "layerwise"}))
    cores = attention_modules(model)
    assert all(c.E is cores[0].E for c in cores) and all(c.F is None for c in cores)
    assert sum(p is cores[0].E for p in model.parameters()) == 1
    ids, am, tt, labels = _batch()
    loss, n, _ = model(ids, am, tt, labels)
    loss.backward()
    assert cores[0].E.grad is not None and cores[0].E.grad.abs().sum() > 0
    other = _build(_cfg("linformer", {"sharing": "layerwise"}))
    assert attention_modules(other)[0].E is not cores[0].E  # tying stays within one model


@pytest.mark.parametrize("sharing", ["headwise", "key-value", "layerwise", "none"])
def test_linformer_layer_compresses_its_input_with_the_papers_numbers(megatron_world, monkeypatch, sharing):
    """LinformerSelfAttention's (E X) W_k^T + (E keep) b_k form gives the paper form's loss and every
    gradient (padding in the batch, biases trained away from 0, n < max_seq_len), and the K/V linear
    layers really run on k rows (sharing: none keeps the paper form: n rows)."""
    from model.attention.megatron_adapter import LinformerSelfAttention

    model = _build(_cfg("linformer", {"sharing": sharing}))
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.self_attention.linear_qkv.bias.normal_(0.0, 0.5)
    assert all(type(layer.self_attention) is LinformerSelfAttention for layer in model.encoder.layers)

    def run(compress: bool):
        monkeypatch.setattr(LinformerSelfAttention, "compress_input", compress)
        model.zero_grad()
        ids, am, tt, labels = _batch()
        loss, _, _ = model(ids, am, tt, labels)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    paper_loss, paper_grads = run(False)
    loss, grads = run(True)
    torch.testing.assert_close(loss, paper_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == paper_grads.keys() and any(".E" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], paper_grads[n], rtol=1e-4, atol=1e-6, msg=n)

    attn = model.encoder.layers[0].self_attention
    x = torch.randn(16, 2, 32)
    mask = torch.zeros(2, 1, 1, 16, dtype=torch.bool)
    mask[1, ..., 11:] = True
    attn._attention_mask = mask
    q, k, v = attn.get_query_key_value_tensors(x)
    attn._attention_mask = None
    assert q.shape == (16, 2, 4, 8)
    assert k.shape == v.shape == ((16, 2, 4, 8) if sharing == "none" else (8, 2, 4, 8))
