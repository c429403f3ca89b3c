"""The ``impl`` switch: resolution per device, config validation, interpreter-aware module loading."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import needs_triton

from model.attention import config_from_dict
from model.kernels.dispatch import load, resolve_impl

CPU = torch.device("cpu")


def test_auto_is_torch_on_cpu_and_explicit_choices_pass_through(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("auto", CPU) == "torch"
    assert resolve_impl("torch", CPU) == "torch"
    assert resolve_impl("reference", CPU) == "reference"
    assert resolve_impl("triton", CPU) == "triton"  # CPU tensors are fine in the interpreter


def test_triton_on_cpu_without_interpreter_is_a_one_line_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"model.attention.impl=triton needs CUDA tensors.*TRITON_INTERPRET=1"):
        resolve_impl("triton", CPU)
    with pytest.raises(ValueError, match="valid choices: auto, triton, torch, reference"):
        resolve_impl("fast", CPU)


def test_head_dims_beyond_the_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_impl("triton", CPU, variant="yoso", head_dim=128) == "triton"
    assert resolve_impl("auto", CPU, variant="yoso", head_dim=256) == "torch"
    with pytest.raises(ValueError, match="supports yoso head dims up to 128, got 256"):
        resolve_impl("triton", CPU, variant="yoso", head_dim=256)
    assert resolve_impl("triton", CPU, variant="bert_lsh", head_dim=256) == "triton"


@pytest.mark.parametrize("name", ["yoso", "bert_lsh"])
def test_config_field_validates(name):
    assert config_from_dict({"name": name}).impl == "auto"
    assert config_from_dict({"name": name, "impl": "reference"}).impl == "reference"
    with pytest.raises(ValueError, match="valid choices: auto, triton, torch, reference"):
        config_from_dict({"name": name, "impl": "cuda"})


def test_bert_lsh_memory_cap_validates():
    with pytest.raises(ValueError, match=r"model.attention.max_memory_mb=0.0 must be > 0"):
        config_from_dict({"name": "bert_lsh", "max_memory_mb": 0}).validate()


@needs_triton
def test_kernel_modules_follow_the_interpreter_switch(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = load("yoso_triton")
    assert mod.INTERPRETED and isinstance(mod._build_kernel, InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    mod = load("lsh_triton")
    assert not mod.INTERPRETED and isinstance(mod._fwd_kernel, JITFunction)
    assert not load("triton_common").INTERPRETED
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert load("lsh_triton").INTERPRETED and load("triton_common").INTERPRETED
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not load("yoso_triton").INTERPRETED  # as the rest of this process expects
    with pytest.raises(ValueError, match="unknown kernel module"):
        load("dispatch")
