"""Checkpoint bookkeeping without DeepSpeed: completion markers, incomplete/damaged tags, failed saves,
keep-last-k, RNG state round trips, the resume compatibility check, stop requests and fault specs."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import time

import numpy as np
import pytest
import torch

from launch.config import load_config
from pretrain import checkpoint, faults, stopping
from pretrain.trainer import _install_step_guard, check_checkpoint_compat


class FakeCheckpointEngine:
    """What DeepSpeed's TorchCheckpointEngine offers to our write guard."""

    def save(self, state_dict, path):
        torch.save(state_dict, path)

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)


class FakeEngine:
    """Writes two files per tag through its checkpoint engine, as DeepSpeed's save_checkpoint does."""

    def __init__(self):
        self.checkpoint_engine = FakeCheckpointEngine()

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # `latest` is ours, written after the marker
        d = os.path.join(save_dir, tag)
        self.checkpoint_engine.makedirs(d, exist_ok=True)
        self.checkpoint_engine.save({"module": torch.ones(3), **client_state},
                                    os.path.join(d, "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"optim": torch.zeros(5)}, os.path.join(d, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
        return True


def save(engine, ckpt_dir, step, keep_last=2):
    return checkpoint.save(engine, ckpt_dir, step, {"step": step}, keep_last, is_main=True, meta={"dp_size": 1})


def latest(ckpt_dir):
    with open(os.path.join(ckpt_dir, "latest")) as f:
        return f.read().strip()


def test_save_marks_complete_points_latest_and_keeps_last_k(tmp_path):
    ckpt = str(tmp_path / "checkpoints")
    engine = FakeEngine()
    for step in (2, 4, 6):
        assert save(engine, ckpt, step) == f"global_step{step}"
    assert latest(ckpt) == "global_step6"
    assert sorted(os.listdir(ckpt)) == ["global_step4", "global_step6", "latest"]
    marker = checkpoint.read_marker(ckpt, "global_step6")
    assert marker["step"] == 6 and marker["dp_size"] == 1
    assert set(marker["files"]) == {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "rng_state_rank00000.pt"}
    assert checkpoint.list_tags(ckpt) == ([(4, "global_step4"), (6, "global_step6")], [])


def test_failed_save_keeps_previous_checkpoint_and_says_so(tmp_path, monkeypatch, caplog):
    ckpt = str(tmp_path / "checkpoints")
    engine = FakeEngine()
    assert save(engine, ckpt, 2)
    monkeypatch.setenv(faults.ENV, "save_fail@4")  # disk full at the save of step 4
    with caplog.at_level(logging.ERROR, logger="pretrain.checkpoint"):
        assert save(engine, ckpt, 4) is None
    assert latest(ckpt) == "global_step2"
    assert not os.path.exists(os.path.join(ckpt, "global_step4"))  # no half-written leftovers
    assert checkpoint.latest_complete(ckpt) == "global_step2"
    text = caplog.text
    assert "No space left on device" in text and "global_step4 was NOT saved" in text
    assert "previous checkpoint global_step2 stays valid" in text
    monkeypatch.delenv(faults.ENV)
    assert save(engine, ckpt, 6) == "global_step6" and latest(ckpt) == "global_step6"  # the next save works


def test_unwritable_checkpoint_dir_is_a_failed_save_not_a_crash(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "checkpoints")
    engine = FakeEngine()
    assert save(engine, ckpt, 2)

    def refuse(state_dict, path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(FakeCheckpointEngine, "save", lambda self, sd, path: refuse(sd, path))
    engine2 = FakeEngine()  # a fresh guard wraps the refusing engine
    assert save(engine2, ckpt, 4) is None
    assert latest(ckpt) == "global_step2"


def _fake_tag(ckpt, step, marker=True, files=None, sizes=None):
    d = os.path.join(ckpt, f"global_step{step}")
    os.makedirs(d)
    files = files or {"mp_rank_00_model_states.pt": 10}
    for name, size in files.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(b"x" * size)
    if marker:
        listed = sizes or files
        with open(os.path.join(d, "COMPLETE"), "w") as f:
            json.dump({"step": step, "files": listed}, f)


def test_incomplete_and_damaged_tags_are_ignored_and_reported(tmp_path, caplog):
    ckpt = str(tmp_path)
    _fake_tag(ckpt, 5)
    _fake_tag(ckpt, 10, marker=False)  # killed during the save
    _fake_tag(ckpt, 15, sizes={"mp_rank_00_model_states.pt": 99})  # truncated after it was marked
    _fake_tag(ckpt, 20, files={"a.pt": 1}, sizes={"a.pt": 1, "zero_pp_rank_1_mp_rank_00_optim_states.pt": 7})
    os.makedirs(os.path.join(ckpt, "global_step5_universal"))  # not a training tag
    os.makedirs(os.path.join(ckpt, "notes"))
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert checkpoint.latest_complete(ckpt) == "global_step5"
    complete, incomplete = checkpoint.list_tags(ckpt)
    assert complete == [(5, "global_step5")]
    assert incomplete == ["global_step10", "global_step15", "global_step20"]
    text = caplog.text
    assert "global_step10 (no COMPLETE marker" in text
    assert "global_step15 (damaged after it was saved: mp_rank_00_model_states.pt has 10 bytes, 99 were written)" in text
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in text


def test_choose_without_checkpoints(tmp_path):
    assert checkpoint.choose(str(tmp_path / "none")) == (None, None)


def test_a_leftover_directory_is_replaced_not_mixed(tmp_path):
    ckpt = str(tmp_path)
    _fake_tag(ckpt, 4, marker=False, files={"stale_rank7.pt": 3})
    assert save(FakeEngine(), ckpt, 4) == "global_step4"
    assert "stale_rank7.pt" not in os.listdir(os.path.join(ckpt, "global_step4"))


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = checkpoint.rng_state()
    path = str(tmp_path / "rng.pt")
    torch.save(state, path)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.set_rng_state(torch.load(path, weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_prepare_module_drops_empty_extra_state_and_loads_strictly():
    class WithExtra(torch.nn.Linear):  # like megatron-core's local linear layers
        def get_extra_state(self):
            return None

        def set_extra_state(self, state):
            pass

    model = torch.nn.Sequential(WithExtra(2, 2), torch.nn.Linear(2, 1))
    assert "0._extra_state" in model.state_dict()
    checkpoint.prepare_module(model)
    sd = model.state_dict()
    assert "0._extra_state" not in sd and all(v is not None for v in sd.values())
    model.load_state_dict(sd, strict=True)  # the missing placeholder is supplied again
    model.load_state_dict({**sd, "0._extra_state": None}, strict=True)  # old checkpoints still load


# ------------------------------------------------------------------ resume compatibility


def _marker(cfg, dp=2):
    return {"model_shape": cfg.model_shape(), "optimizer_settings": cfg.optimizer_settings(), "dp_size": dp,
            "tp_size": 1, "zero_stage": cfg.train.zero_stage}


def test_model_shape_change_names_the_keys():
    old = load_config(None, ["model.hidden_size=64", "model.num_layers=2"])
    new = load_config(None, ["model.hidden_size=128", "model.num_layers=2", "model.num_attention_heads=8"])
    with pytest.raises(ValueError) as e:
        check_checkpoint_compat(new, 2, 1, _marker(old), "ckpt/global_step5")
    msg = str(e.value)
    assert "\n" not in msg
    assert "model.hidden_size=64 (now 128)" in msg and "model.num_attention_heads=4 (now 8)" in msg
    assert "model.num_layers" not in msg and "ckpt/global_step5" in msg


def test_optimizer_and_schedule_changes_are_allowed_and_reported():
    old = load_config(None, ["train.lr=1e-3", "train.steps=20"])
    new = load_config(None, ["train.lr=2e-3", "train.steps=30"])
    changed = check_checkpoint_compat(new, 2, 1, _marker(old), "x")
    assert changed == {"train.lr": (1e-3, 2e-3), "train.steps": (20, 30)}
    assert check_checkpoint_compat(old, 2, 1, _marker(old), "x") == {}


def test_other_data_parallel_size_needs_the_universal_path():
    cfg = load_config(None, [])
    with pytest.raises(ValueError, match="written with 2 data-parallel ranks, this run has 1.*load_universal=true"):
        check_checkpoint_compat(cfg, 1, 1, _marker(cfg, dp=2), "x")
    uni = load_config(None, ["train.load_universal=true"])
    assert check_checkpoint_compat(uni, 1, 1, _marker(cfg, dp=2), "x") == {}
    with pytest.raises(ValueError, match="without tensor parallelism"):
        check_checkpoint_compat(uni, 1, 2, _marker(cfg, dp=2), "x")


def test_data_continues_exactly_on_another_dp_size_only_in_the_global_order():
    from pretrain.trainer import data_resume_on_new_dp

    glob, stream = {"order": "global", "consumed_samples": 160}, {"order": "stream", "consumed_micro_batches": 10}
    assert data_resume_on_new_dp(load_config(None, []), glob, 2, 1, "global_step10") == "exact"
    cfg = load_config(None, ["data.order=stream"])
    with pytest.raises(ValueError, match="streamed data order.*set data.resume=approximate.*launch 2 data-parallel"):
        data_resume_on_new_dp(cfg, stream, 2, 1, "global_step10")
    with pytest.raises(ValueError, match="data.order=stream"):  # a streamed checkpoint under the global order
        data_resume_on_new_dp(load_config(None, []), stream, 2, 1, "global_step10")
    approx = load_config(None, ["data.order=stream", "data.resume=approximate"])
    assert data_resume_on_new_dp(approx, stream, 2, 1, "global_step10") == "approximate"


def test_old_markers_fall_back_to_the_hash():
    cfg = load_config(None, [])
    other = load_config(None, ["model.num_layers=7"])
    assert check_checkpoint_compat(cfg, 2, 1, {"model_shape_hash": cfg.model_shape_hash()}, "x") == {}
    with pytest.raises(ValueError, match="different model shape"):
        check_checkpoint_compat(cfg, 2, 1, {"model_shape_hash": other.model_shape_hash()}, "x")


# ------------------------------------------------------------------ the skip guard


class _Engine:
    def __init__(self, optimizer):
        self.optimizer = optimizer


def test_step_guard_skips_without_touching_weights_or_moments():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    skip = {"now": False}
    _install_step_guard(_Engine(opt), opt, lambda: skip["now"])
    p.grad = torch.ones(3)
    opt.step()
    assert opt.overflow is False and not torch.equal(p.detach(), torch.ones(3))
    before, moments = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    skip["now"] = True  # the ranks agreed: a non-finite loss somewhere
    opt.step()
    assert opt.overflow is True and torch.equal(p.detach(), before)
    assert torch.equal(opt.state[p]["exp_avg"], moments)
    skip["now"] = False
    p.grad = torch.tensor([1.0, float("nan"), 1.0])  # a non-finite gradient reaching the optimizer
    opt.step()
    assert opt.overflow is True and torch.equal(p.detach(), before)


# ------------------------------------------------------------------ stop requests and faults


def test_stop_request_votes(tmp_path):
    req = stopping.StopRequest(str(tmp_path))
    assert req.local_code() == stopping.NONE
    (tmp_path / "STOP").touch()
    assert req.local_code() == stopping.STOP_FILE_CODE
    req.consume_stop_file()
    assert not (tmp_path / "STOP").exists()
    late = stopping.StopRequest(str(tmp_path), exit_after_minutes=1.0, start_time=time.time() - 61)
    assert late.local_code() == stopping.TIME_BUDGET
    early = stopping.StopRequest(str(tmp_path), exit_after_minutes=1.0, start_time=time.time())
    assert early.local_code() == stopping.NONE
    worker = stopping.StopRequest(str(tmp_path), check_file=False)  # only the main rank stats the file
    (tmp_path / "STOP").touch()
    assert worker.local_code() == stopping.NONE


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGTERM"])
def test_signals_only_set_a_flag(tmp_path, name):
    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    req = stopping.StopRequest(str(tmp_path))
    req.install()
    try:
        os.kill(os.getpid(), sig)
        time.sleep(0.05)
        assert req.local_code() == stopping.SIGNAL and req.signal_name == name
    finally:
        req.uninstall()
    assert signal.getsignal(sig) == before


def test_fault_specs(monkeypatch):
    assert faults.parse("nan_loss@3:rank1, kill_in_save@10,nan_loss@6-") == [
        ("nan_loss", 3, 3, 1), ("kill_in_save", 10, 10, None), ("nan_loss", 6, float("inf"), None)]
    with pytest.raises(ValueError, match="bad fault"):
        faults.parse("explode@3")
    monkeypatch.setenv(faults.ENV, "nan_loss@3-4:rank1")
    assert faults.active("nan_loss", 3, rank=1) and faults.active("nan_loss", 4, rank=1)
    assert not faults.active("nan_loss", 3, rank=0) and not faults.active("nan_loss", 5, rank=1)
    loss = torch.tensor(2.0)
    monkeypatch.setenv("RANK", "1")
    assert torch.isnan(faults.poison_loss(loss, 3)) and faults.poison_loss(loss, 5) == 2.0
    monkeypatch.delenv(faults.ENV)
    assert not faults.active("nan_loss", 3, rank=1)


def test_new_train_fields_are_validated():
    from launch.config import ConfigError

    with pytest.raises(ConfigError, match="train.exit_after_minutes"):
        load_config(None, ["train.exit_after_minutes=-1"])
    with pytest.raises(ConfigError, match="train.max_nan_skips"):
        load_config(None, ["train.max_nan_skips=0"])
    with pytest.raises(ConfigError, match="train.nan_policy.*rollback"):
        load_config(None, ["train.nan_policy=ignore"])
