"""model/flops.py: GEMM counts against FlopCounterMode, parameter counts against real modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.attention import reference as ref
from model.attention.bert_lsh import BertLshConfig, bert_lsh_attention
from model.attention.yoso import YosoConfig, yoso_attention
from model.flops import attention_flops, attention_params, model_flops

B, H, N, HD, MAXLEN = 2, 2, 24, 8, 32
D = H * HD


def _count(fn):
    """FlopCounterMode totals of fn()'s forward and of its backward."""
    with FlopCounterMode(display=False) as fc:
        out = fn()
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        out.backward(torch.ones_like(out))
    return fwd, fc.get_total_flops()


def _leaf(*shape):
    return torch.randn(*shape, requires_grad=True)


def _close(measured, analytic, tol=0.05):
    assert analytic > 0 and abs(measured - analytic) <= tol * analytic, (measured, analytic)


def _core(cfg):
    return attention_flops(cfg, B, N, H, HD, D, MAXLEN)


def test_softmax_reference():
    q, k, v = _leaf(B, H, N, HD), _leaf(B, H, N, HD), _leaf(B, H, N, HD)
    fwd, bwd = _count(lambda: ref.softmax_reference(q, k, v, None))
    a = _core({"name": "softmax"})
    _close(fwd, a["core_fwd_matmul"])
    _close(bwd, a["core_bwd_matmul"])


@pytest.mark.parametrize("sharing", ["none", "headwise"])
def test_linformer_reference(sharing):
    k_len = 8
    q, k, v = _leaf(B, H, N, HD), _leaf(B, H, N, HD), _leaf(B, H, N, HD)
    shape = (H, k_len, MAXLEN) if sharing == "none" else (k_len, MAXLEN)
    E, F = _leaf(*shape), _leaf(*shape)
    fwd, bwd = _count(lambda: ref.linformer_reference(q, k, v, None, E, F))
    a = _core({"name": "linformer", "k": k_len, "sharing": sharing})
    _close(fwd, a["core_fwd_matmul"])
    _close(bwd, a["core_bwd_matmul"])


def test_shared_qkv_projection_and_reference():
    """The shared path costs one D x D GEMM; the folded-weight reference is standard attention."""
    from model.attention.shared_qkv import shared_qkv_projection

    x = _leaf(B, N, D)
    w, b = _leaf(D, D), _leaf(D)
    dq, dk, dv = _leaf(D), _leaf(D), _leaf(D)
    out_proj = 2.0 * B * N * D * D  # both stop before the output projection
    a, s = _core({"name": "shared_qkv"}), _core({"name": "softmax"})
    fwd, bwd = _count(lambda: ref.softmax_reference(*shared_qkv_projection(x, w, b, dq, dk, dv, H), None))
    _close(fwd, a["core_fwd_matmul"] + a["proj_fwd_matmul"] - out_proj)
    _close(bwd, a["core_bwd_matmul"] + a["proj_bwd_matmul"] - 2 * out_proj)
    fwd, bwd = _count(lambda: ref.shared_qkv_reference(x, w, b, dq, dk, dv, H, None))
    _close(fwd, s["core_fwd_matmul"] + s["proj_fwd_matmul"] - out_proj)
    _close(bwd, s["core_bwd_matmul"] + s["proj_bwd_matmul"] - 2 * out_proj)


@pytest.mark.parametrize("cfg", [{"expectation": True}, {"num_hashes": 8, "hash_bits": 4},
                                 {"num_hashes": 8, "hash_bits": 4, "backward": "exact"},
                                 {"expectation": True, "conv_window": 3}])
def test_yoso_gemms(cfg):
    q, k, v = _leaf(B, H, N, HD), _leaf(B, H, N, HD), _leaf(B, H, N, HD)
    conv = _leaf(H, 1, cfg["conv_window"], 1) if cfg.get("conv_window") else None
    ycfg = YosoConfig(**cfg)
    fwd, bwd = _count(lambda: yoso_attention(q, k, v, None, ycfg, torch.Generator().manual_seed(0), conv))
    a = _core({"name": "yoso", **cfg})
    _close(fwd, a["core_fwd_matmul"])
    _close(bwd, a["core_bwd_matmul"])


def test_bert_lsh_gemms():
    q, k, v = _leaf(B, H, N, HD), _leaf(B, H, N, HD), _leaf(B, H, N, HD)
    cfg = BertLshConfig(bands=2, num_hashes=3)
    fwd, bwd = _count(lambda: bert_lsh_attention(q, k, v, None, cfg, torch.Generator().manual_seed(0)))
    a = _core({"name": "bert_lsh", "bands": 2, "num_hashes": 3})
    _close(fwd, a["core_fwd_matmul"])
    _close(bwd, a["core_bwd_matmul"])


def test_shared_qkv_parameter_reduction():
    p = attention_params({"name": "shared_qkv"}, 768, 12, 512)
    assert p["qkv"] == 768 * 768 + 4 * 768
    assert p["softmax_qkv"] == 1_771_776
    assert round(p["qkv_saved_pct"], 2) == 66.54
    assert p["softmax_qkv"] - p["qkv"] == 1_178_880  # saved per layer


def test_spec_ratios_bert_base():
    """ATTENTION_SPEC section 3.3/5.4: shared_qkv block GEMMs 62.5% of standard at n=512; Linformer
    k=128 core 50% at n=512 and 200% at n=128."""
    a = attention_flops({"name": "shared_qkv"}, 1, 512, 12, 64, 768, 512)
    shared = a["core_fwd_matmul"] + a["proj_fwd_matmul"]
    standard = 8 * 512 * 768 ** 2 + 4 * 512 ** 2 * 768
    assert abs(shared / standard - 0.625) < 0.01
    s512 = attention_flops("softmax", 1, 512, 12, 64, 768, 512)["core_fwd_matmul"]
    lin512 = attention_flops({"name": "linformer", "k": 128}, 1, 512, 12, 64, 768, 512)["core_fwd_matmul"]
    assert lin512 / s512 == pytest.approx(0.5)
    s128 = attention_flops("softmax", 1, 128, 12, 64, 768, 512)["core_fwd_matmul"]
    lin128 = attention_flops({"name": "linformer", "k": 128}, 1, 128, 12, 64, 768, 512)["core_fwd_matmul"]
    assert lin128 / s128 == pytest.approx(2.0)


def test_model_flops_hybrid_and_softmax_twin():
    cfg = {"model": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "ffn_hidden_size": 0,
                     "max_position_embeddings": 128, "attention": {"name": "yoso"},
                     "layer_attention": [{"layers": [0, 0], "name": "softmax"},
                                         {"layers": [3, 3], "name": "softmax"}]}}
    f = model_flops(cfg, 8, 128, 150, 1024)
    assert f["total"] == pytest.approx(f["fwd"] + f["bwd"])
    soft = dict(cfg["model"], attention={"name": "softmax"}, layer_attention=[])
    g = model_flops({"model": soft}, 8, 128, 150, 1024)
    assert g["saved_pct"] == pytest.approx(0.0) and g["softmax_total"] == pytest.approx(f["softmax_total"])
    assert f["attention_total"] != g["attention_total"]


@pytest.mark.parametrize("sharing", ["headwise", "key-value", "none"])
def test_linformer_megatron_layer_gemms(megatron_world, sharing):
    """The whole megatron attention block of a Linformer layer (Q/K/V, core, output projection), as
    LinformerSelfAttention runs it: the input form for head-shared E/F at k < n, the paper's for none."""
    from launch.config import load_config
    from model.bert import build_model

    cfg = load_config(None, ["model.num_layers=1", f"model.hidden_size={D}", f"model.num_attention_heads={H}",
                             f"model.max_position_embeddings={MAXLEN}", f"data.seq_len={N}", "model.vocab_size=128",
                             "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
                             f"model.attention={{name: linformer, k: 8, sharing: {sharing}}}"])
    torch.manual_seed(0)
    attn = build_model(cfg, 100).encoder.layers[0].self_attention
    x = _leaf(N, B, D)
    # SDPA's math backend: FlopCounterMode has no formula for the CPU flash kernel
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        fwd, bwd = _count(lambda: attn(x, torch.zeros(B, 1, 1, N, dtype=torch.bool))[0])
    a = _core(cfg.model.attention)
    _close(fwd, a["core_fwd_matmul"] + a["proj_fwd_matmul"])
    _close(bwd, a["core_bwd_matmul"] + a["proj_bwd_matmul"])
    paper = attention_flops(cfg.model.attention, B, N, H, HD, D, MAXLEN, linformer_input_form=False)
    if sharing == "none":
        assert paper["total"] == a["total"]
    else:  # the K/V projections of N - k rows are gone
        assert a["proj_fwd_matmul"] == paper["proj_fwd_matmul"] - B * 4.0 * (N - 8) * D * D
