"""Config: good files, inheritance, overrides, and one-line errors for bad input."""

import dataclasses
import glob
import os
import typing

import pytest

from launch.config import ConfigError, ExperimentConfig, field_docs, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)


def test_demo_values_and_override_precedence():
    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"), ["model.num_layers=3", "train.lr=1e-3",
                                                                "model.attention.name=softmax"])
    assert cfg.model.num_layers == 3
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)  # "1e-3" is a YAML string
    assert cfg.model.hidden_size == 256  # from the file, not the default


def test_inherit_merges_sections(tmp_path):
    write(tmp_path, "base.yaml", "model: {num_layers: 6, hidden_size: 128}\ntrain: {steps: 7}\n")
    child = write(tmp_path, "child.yaml", "inherit: base.yaml\nmodel: {num_layers: 2}\n")
    cfg = load_config(child)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.train.steps) == (2, 128, 7)


def one_line_error(path=None, overrides=(), world_size=None):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides), world_size)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_key_lists_valid_keys(tmp_path):
    msg = one_line_error(write(tmp_path, "c.yaml", "model: {num_layer: 4}\n"))
    assert "model.num_layer" in msg and "num_layers" in msg and "hidden_size" in msg


def test_unknown_section_and_override_key():
    assert "valid keys" in one_line_error(overrides=["modle.num_layers=2"])
    assert "train.stepz" in one_line_error(overrides=["train.stepz=2"])


def test_bad_values_name_the_key_and_choices():
    msg = one_line_error(overrides=["train.lr_decay=exp"])
    assert "train.lr_decay" in msg and "cosine" in msg and "linear" in msg
    assert "train.zero_stage" in one_line_error(overrides=["train.zero_stage=5"])
    assert "model.num_layers" in one_line_error(overrides=["model.num_layers=four"])
    assert "train.bf16" in one_line_error(overrides=["train.bf16=maybe"])
    assert "num_attention_heads" in one_line_error(overrides=["model.hidden_size=100", "model.num_attention_heads=3"])
    assert "data.mask_prob" in one_line_error(overrides=["data.mask_prob=1.5"])


def test_world_size_not_divisible_by_tp():
    msg = one_line_error(overrides=["parallel.tensor_model_parallel_size=2"], world_size=3)
    assert "world size 3" in msg and "tensor_model_parallel_size=2" in msg


def test_missing_file_and_malformed_override(tmp_path):
    assert "not found" in one_line_error(str(tmp_path / "nope.yaml"))
    assert "key=value" in one_line_error(overrides=["model.num_layers"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs/demo.yaml"), ["train.steps=5"])
    out = str(tmp_path / "run" / "config.yaml")
    cfg.dump(out)
    again = load_config(out)
    assert again == cfg


def test_every_field_has_a_docstring():
    for section in dataclasses.fields(ExperimentConfig):
        cls = typing.get_type_hints(ExperimentConfig)[section.name]
        if dataclasses.is_dataclass(cls):
            docs = field_docs(cls)
            missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
            assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_lr_decay_steps_keeps_the_schedule_of_an_extended_run():
    """Raising train.steps on resume with lr_decay_steps pinned to the original length leaves the
    learning rate of every step up to it unchanged; without the pin the decay stretches."""
    from pretrain.trainer import lr_lambda

    demo = os.path.join(ROOT, "configs/demo.yaml")
    short = lr_lambda(load_config(demo, ["train.steps=10", "train.warmup_steps=4"]))
    pinned = lr_lambda(load_config(demo, ["train.steps=20", "train.warmup_steps=4", "train.lr_decay_steps=10"]))
    stretched = lr_lambda(load_config(demo, ["train.steps=20", "train.warmup_steps=4"]))
    assert [pinned(s) for s in range(10)] == [short(s) for s in range(10)]
    assert pinned(10) == pinned(15) == short(10) == 0.0  # at min_lr (0) from the decay's end on
    assert stretched(7) > short(7) and stretched(3) == short(3)  # warm-up equal, decay not
    with pytest.raises(ConfigError, match="lr_decay_steps"):
        load_config(demo, ["train.lr_decay_steps=-1"])
