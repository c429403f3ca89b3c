"""Table of bad configs: each one stops with ONE line that names the key and what would be allowed."""

from __future__ import annotations

import pytest

from data_pipeline.errors import DataError
from launch.config import ConfigError, load_config

# (id, overrides, world size, fragments the one-line message must contain)
BAD = [
    ("unknown key", ["model.num_layer=2"], None, ["model.num_layer", "valid keys", "num_layers"]),
    ("unknown section", ["modle.num_layers=2"], None, ["modle", "valid keys", "model"]),
    ("int as text", ["model.num_layers=four"], None, ["model.num_layers", "integer"]),
    ("bool as text", ["train.bf16=maybe"], None, ["train.bf16", "true/false"]),
    ("float as text", ["train.lr=fast"], None, ["train.lr", "number"]),
    ("list as number", ["data.corpus=5"], None, ["data.corpus", "list"]),
    ("mapping as text", ["model.attention=softmax"], None, ["model.attention", "mapping"]),
    ("negative hidden size", ["model.hidden_size=-64"], None, ["model.hidden_size=-64", "positive"]),
    ("zero steps", ["train.steps=0"], None, ["train.steps=0", "positive"]),
    ("zero micro batch", ["train.micro_batch_size=0"], None, ["train.micro_batch_size=0", "positive"]),
    ("zero accumulation", ["train.gradient_accumulation_steps=0"], None, ["train.gradient_accumulation_steps"]),
    ("negative warm-up", ["train.warmup_steps=-1"], None, ["train.warmup_steps", ">= 0"]),
    ("heads do not divide hidden", ["model.hidden_size=100", "model.num_attention_heads=3"], None,
     ["model.hidden_size=100", "model.num_attention_heads=3"]),
    ("world not divisible by TP", ["parallel.tensor_model_parallel_size=2"], 3,
     ["world size 3", "parallel.tensor_model_parallel_size=2"]),
    ("heads not divisible by TP", ["parallel.tensor_model_parallel_size=3"], 3,
     ["model.num_attention_heads=4", "parallel.tensor_model_parallel_size=3"]),
    ("global batch mismatch", ["train.global_batch_size=64", "train.micro_batch_size=16"], 2,
     ["train.global_batch_size=64", "train.micro_batch_size=16", "train.gradient_accumulation_steps=2"]),
    ("ZeRO stage out of range", ["train.zero_stage=4"], None, ["train.zero_stage=4", "0, 1, 2, 3"]),
    ("decay shape", ["train.lr_decay=exp"], None, ["train.lr_decay", "linear", "cosine", "constant"]),
    ("min lr above lr", ["train.lr=1e-4", "train.min_lr=1e-3"], None, ["train.min_lr", "min_lr <= lr"]),
    ("positions shorter than sequences", ["model.max_position_embeddings=64", "data.seq_len=128"], None,
     ["model.max_position_embeddings=64", "data.seq_len=128"]),
    ("sequence too short", ["data.seq_len=4", "model.max_position_embeddings=64"], None, ["data.seq_len=4"]),
    ("vocabulary too small", ["data.vocab_size=8"], None, ["data.vocab_size=8"]),
    ("mask probability", ["data.mask_prob=1.5"], None, ["data.mask_prob=1.5", "[0, 1)"]),
    ("mask split", ["data.mask_token_prob=0.8", "data.random_token_prob=0.3"], None,
     ["data.mask_token_prob", "data.random_token_prob", "<= 1"]),
    ("dropout", ["model.hidden_dropout=1.0"], None, ["model.hidden_dropout=1.0", "[0, 1)"]),
    ("tokenizer type", ["data.tokenizer_type=wordpiece"], None, ["data.tokenizer_type", "unigram", "bpe"]),
    ("layer rule type", ["model.layer_attention=[3]"], None, ["model.layer_attention[0]", "mapping or null"]),
    ("time budget", ["train.exit_after_minutes=-5"], None, ["train.exit_after_minutes=-5", ">= 0"]),
    ("NaN skips", ["train.max_nan_skips=0"], None, ["train.max_nan_skips=0", "positive"]),
    ("NaN policy", ["train.nan_policy=ignore"], None, ["train.nan_policy", "stop", "rollback"]),
    ("override without value", ["train.steps"], None, ["train.steps", "key=value"]),
]


@pytest.mark.parametrize("overrides,world_size,fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_naming_the_key(overrides, world_size, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides, world_size)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    missing = [f for f in fragments if f not in msg]
    assert not missing, f"{msg!r} lacks {missing}"


def test_table_is_large():
    assert len(BAD) >= 20


def test_missing_config_file_and_data_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml.*--config configs/demo.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    from data_pipeline.loader import read_manifest

    with pytest.raises(DataError) as e:  # data.data_dir without prepared shards: the launch stops (exit 2)
        read_manifest(str(tmp_path / "no_data"))
    assert "\n" not in str(e.value) and "no manifest.json" in str(e.value) and "data_pipeline.prepare" in str(e.value)
