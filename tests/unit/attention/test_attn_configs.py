"""The attention configs load, validate and resolve per layer; compare.py runs."""

from __future__ import annotations

import glob
import os

import pytest

from launch.config import load_config
from model.attention import available, layer_configs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
VARIANTS = ["softmax", "shared_qkv", "bert_lsh", "yoso", "linformer"]


def _names(cfg):
    return [c.name for c in layer_configs(cfg.model.attention, cfg.model.layer_attention, cfg.model.num_layers)]


def test_bert_base_shape():
    m = load_config(os.path.join(ROOT, "configs/bert_base.yaml")).model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.max_position_embeddings) == (12, 768, 12, 512)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_configs(variant):
    assert variant in available()
    base = load_config(os.path.join(ROOT, f"configs/bert_base_{variant}.yaml"))
    assert base.data.seq_len == 512 and _names(base) == [variant] * 12
    long = load_config(os.path.join(ROOT, f"configs/long_4096_{variant}.yaml"))
    assert long.data.seq_len == 4096 and long.model.max_position_embeddings == 4096
    assert _names(long) == [variant] * 12 and long.model.hidden_size == 768


def test_hybrid():
    cfg = load_config(os.path.join(ROOT, "configs/hybrid.yaml"))
    names = _names(cfg)
    assert names[0] == names[-1] == "softmax" and set(names[1:-1]) == {"yoso"} and len(names) >= 3


def test_every_variant_has_configs():
    files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    for name in available():
        assert f"bert_base_{name}.yaml" in files and f"long_4096_{name}.yaml" in files, name


def test_compare_table():
    from model.attention.compare import compare, format_table

    rows = compare([16, 32], heads=2, head_dim=8)
    assert {r["variant"] for r in rows} == {n for n in available() if n != "softmax"} | {"yoso-E"}
    assert all(r["rel_err"] < 1e-6 for r in rows if r["variant"] == "shared_qkv")
    assert "n=32" in format_table(rows)
