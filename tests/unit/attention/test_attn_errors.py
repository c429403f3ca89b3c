"""Bad inputs and configs fail with one-line ValueErrors that name the key."""

from __future__ import annotations

import pytest
import torch

from model.attention import build, config_from_dict, layer_configs
from model.attention.yoso import YosoConfig, yoso_attention


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_linformer_k_larger_than_max_seq_len():
    with pytest.raises(ValueError) as e:
        build({"name": "linformer", "k": 64}, num_heads=2, head_dim=4, max_seq_len=32)
    _one_line(e, "model.attention.k=64", "32")
    with pytest.raises(ValueError) as e:
        build(config_from_dict({"name": "linformer", "k": 64}, "model.layer_attention[3]"),
              num_heads=2, head_dim=4, max_seq_len=32)
    _one_line(e, "model.layer_attention[3].k=64")


def test_linformer_sequence_longer_than_max_seq_len():
    core = build({"name": "linformer", "k": 8}, num_heads=2, head_dim=4, max_seq_len=16)
    x = torch.randn(1, 2, 20, 4)
    with pytest.raises(ValueError) as e:
        core(x, x, x, None)
    _one_line(e, "20", "max_position_embeddings")


def test_yoso_hash_bits_too_large_for_memory():
    cfg = config_from_dict({"name": "yoso", "hash_bits": 24, "max_memory_mb": 64})
    x = torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError) as e:
        yoso_attention(x, x, x, None, cfg)
    _one_line(e, "model.attention.hash_bits=24", "max_memory_mb")


@pytest.mark.parametrize(("cfg", "needle"), [
    ({"name": "yoso", "hash_bits": 40}, "model.attention.hash_bits=40"),
    ({"name": "yoso", "num_hashes": 0}, "model.attention.num_hashes=0"),
    ({"name": "yoso", "conv_window": 4}, "model.attention.conv_window=4"),
    ({"name": "yoso", "hash": "simhash"}, "model.attention.hash='simhash'"),
    ({"name": "bert_lsh", "bands": 0}, "model.attention.bands=0"),
    ({"name": "bert_lsh", "semantics": "sparse"}, "valid choices: code, paper"),
    ({"name": "linformer", "sharing": "global"}, "model.attention.sharing"),
    ({"name": "linformer", "k": 0}, "model.attention.k=0"),
    ({"name": "linformer", "init": "xavier"}, "valid choices: normal, pool"),
    ({"name": "shared_qkv", "bias": True}, "unknown key 'bias'"),
    ({"name": "performer"}, "available: bert_lsh, linformer, shared_qkv, softmax, yoso"),
])
def test_bad_config_values(cfg, needle):
    with pytest.raises(ValueError) as e:
        config_from_dict(cfg)
    _one_line(e, needle)


def test_bad_layer_rules():
    with pytest.raises(ValueError) as e:
        layer_configs({"name": "softmax"}, [{"layers": [2, 5], "name": "yoso"}], 4)
    _one_line(e, "model.layer_attention[0].layers=[2, 5]")
    with pytest.raises(ValueError) as e:
        layer_configs({"name": "softmax"}, [{"layers": [0, 1], "name": "yoso", "hash_bits": 0}], 4)
    _one_line(e, "model.layer_attention[0].hash_bits=0")
    names = [c.name for c in layer_configs({"name": "yoso"}, [{"layers": [0, 0], "name": "softmax"},
                                                             {"layers": [3, 3], "name": "softmax"}], 4)]
    assert names == ["softmax", "yoso", "yoso", "softmax"]


@pytest.mark.parametrize("name", ["softmax", "yoso", "bert_lsh", "linformer"])
def test_bad_tensor_inputs(name):
    core = build({"name": name, **({"k": 4} if name == "linformer" else {})}, num_heads=2, head_dim=4, max_seq_len=8)
    q = torch.randn(1, 2, 6, 4)
    with pytest.raises(ValueError) as e:
        core(q, q, q, torch.ones(1, 6))
    _one_line(e, "key_padding_mask must be bool")
    with pytest.raises(ValueError) as e:
        core(q, q, q, torch.ones(1, 5, dtype=torch.bool))
    _one_line(e, "key_padding_mask must be [batch, seq]")
    with pytest.raises(ValueError) as e:
        core(q, q[..., :3], q, None)
    _one_line(e, "shapes do not match")


def test_yoso_config_defaults_follow_the_repo():
    cfg = YosoConfig()
    assert (cfg.num_hashes, cfg.hash_bits, cfg.expectation) == (32, 9, False)
