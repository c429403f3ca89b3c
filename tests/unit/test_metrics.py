"""pretrain.metrics / pretrain.compute: throughput and data wait, analytic FLOPs of the batches a
forward hook sees, the per-device peak, memory peaks, hparams and custom scalars in the event file."""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from launch.config import load_config
from model.flops import model_flops, model_params
from pretrain import compute
from pretrain.compute import FLOP_FIELDS, FlopsTracker, MemorySampler
from pretrain.metrics import CUSTOM_SCALARS_LAYOUT, Metrics, Throughput, TrainMonitor

SHAPE = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
         "model.max_position_embeddings=64", "data.seq_len=64"]
VOCAB = 512


def _cfg(attention: str = "{name: softmax}", *extra: str):
    return load_config(None, [*SHAPE, f"model.attention={attention}", *extra])


class _FakeBert(torch.nn.Module):
    """The trainer's forward signature; no compute."""

    vocab_size = VOCAB

    def forward(self, input_ids, attention_mask=None, tokentype_ids=None, labels=None):
        return input_ids.float().sum()


def _batch(b: int, s: int, predicted: int):
    ids = torch.randint(5, VOCAB, (b, s))
    labels = torch.full((b, s), -100)
    labels.view(-1)[:predicted] = 7
    return ids, labels


def _acc(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


# ------------------------------------------------------------------------------------------ throughput


def test_data_wait_pct_high_with_a_slow_loader_and_low_without():
    def window(wait_s: float, compute_s: float) -> float:
        thr = Throughput(0, 10)
        for _ in range(2):
            t0 = time.perf_counter()
            time.sleep(wait_s)  # the loader
            wait = time.perf_counter() - t0
            time.sleep(compute_s)  # forward/backward/step
            thr.add(100, 2, wait)
        return thr.report(2, 200, 4)["perf/data_wait_pct"]

    assert window(0.06, 0.01) > 50
    assert window(0.0, 0.03) < 10


def test_throughput_window_fields():
    thr = Throughput(10, 20)
    time.sleep(0.02)
    thr.add(640, 10)
    out = thr.report(12, 1280, 20)
    assert out["window_steps"] == 2 and out["window_s"] >= 0.02
    assert out["perf/tokens_per_sec"] == pytest.approx(1280 / out["window_s"])
    assert out["perf/step_time_s"] == pytest.approx(out["window_s"] / 2)
    assert thr.tokens == 0 and thr.samples == 0


# ------------------------------------------------------------------------------------------ FLOPs


def test_hook_counts_training_forwards_of_the_real_batch_only():
    cfg = _cfg()
    model = _FakeBert()
    tracker = FlopsTracker(cfg, VOCAB)
    handle = tracker.attach(model)
    model.train()
    ids, labels = _batch(4, 64, 30)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), tokentype_ids=torch.zeros_like(ids), labels=labels)
    model(ids, torch.ones_like(ids), torch.zeros_like(ids), labels)  # positional
    ids2, labels2 = _batch(2, 48, 11)  # another padded length
    model(input_ids=ids2, labels=labels2)
    model.eval()
    model(input_ids=ids, labels=labels)  # evaluation: not counted
    handle.remove()
    got = dict(zip(FLOP_FIELDS, tracker.local_window()))
    a = model_flops(cfg, 8, 64, 60, VOCAB)
    b = model_flops(cfg, 2, 48, 11, VOCAB)
    assert got["model"] == pytest.approx(a["total"] + b["total"], rel=1e-12)
    assert got["softmax_model"] == pytest.approx(a["softmax_total"] + b["softmax_total"], rel=1e-12)
    assert got["attention"] == pytest.approx(a["attention_total"] + b["attention_total"], rel=1e-12)
    assert tracker.local_window() == [0.0] * 4  # the window was reset


def test_window_values_shared_qkv_saves_and_accumulates():
    cfg = _cfg("{name: shared_qkv}")
    tracker = FlopsTracker(cfg, VOCAB)
    tracker.observe(16, 64, 150)
    summed = [2 * x for x in tracker.local_window()]  # two data-parallel ranks
    v = tracker.window_values(summed, steps=2)
    f = model_flops(cfg, 32, 64, 300, VOCAB)
    assert v["compute/model_flops"] == pytest.approx(f["total"] / 2)
    assert v["compute/softmax_model_flops"] == pytest.approx(f["softmax_total"] / 2)
    assert v["compute/attention_flops"] == pytest.approx(f["attention_total"] / 2)
    assert v["compute/model_saved_pct"] == pytest.approx(f["saved_pct"])
    assert v["compute/attention_saved_pct"] == pytest.approx(f["attention_saved_pct"])
    assert 0 < v["compute/model_saved_pct"] < v["compute/attention_saved_pct"]
    p = model_params(cfg, VOCAB)
    assert v["compute/attention_params_saved_pct"] == pytest.approx(
        100 * (1 - p["attention"] / p["softmax_attention"]))
    saved = (f["softmax_total"] - f["total"]) / 1e15
    assert v["compute/cumulative_saved_pflops"] == pytest.approx(saved)
    v2 = tracker.window_values(summed, steps=2)
    assert v2["compute/cumulative_saved_pflops"] == pytest.approx(2 * saved)
    assert v2["compute/cumulative_pflops"] == pytest.approx(2 * f["total"] / 1e15)


def test_softmax_saves_nothing():
    tracker = FlopsTracker(_cfg(), VOCAB)
    tracker.observe(8, 64, 70)
    v = tracker.window_values(tracker.local_window(), 1)
    assert v["compute/model_saved_pct"] == 0 and v["compute/attention_saved_pct"] == 0
    assert v["compute/cumulative_saved_pflops"] == 0 and v["compute/attention_params_saved_pct"] == 0


def test_cumulative_continues_from_the_event_files_after_a_resume(tmp_path):
    m = Metrics(str(tmp_path), True)
    for step, total, saved in [(10, 1.0, 0.1), (20, 2.0, 0.2), (30, 3.0, 0.3)]:  # 30: after the checkpoint
        m.scalars(step, {"compute/cumulative_pflops": total, "compute/cumulative_saved_pflops": saved})
    m.close()
    tracker = FlopsTracker(_cfg("{name: shared_qkv}"), VOCAB)
    assert tracker.restore_from_events(m.log_dir, 20)
    tracker.observe(4, 64, 40)
    local = tracker.local_window()
    v = tracker.window_values(local, 1)
    model, softmax = local[FLOP_FIELDS.index("model")], local[FLOP_FIELDS.index("softmax_model")]
    assert v["compute/cumulative_pflops"] == pytest.approx(2.0 + model / 1e15, rel=1e-6)
    assert v["compute/cumulative_saved_pflops"] == pytest.approx(0.2 + (softmax - model) / 1e15, rel=1e-5)
    assert not FlopsTracker(_cfg(), VOCAB).restore_from_events(str(tmp_path / "nothing"), 20)


def test_variant_name():
    assert compute.variant_name(_cfg("{name: shared_qkv}")) == "shared_qkv"
    hybrid = _cfg("{name: shared_qkv}", "model.layer_attention=[{layers: [0, 0], name: softmax}]")
    assert compute.variant_name(hybrid) == "hybrid(softmax,shared_qkv)"


# ------------------------------------------------------------------------------------------ peak, memory


def test_peak_table_and_override(monkeypatch):
    assert compute.table_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.0
    assert compute.table_peak_tflops("NVIDIA H100 PCIe", torch.bfloat16) == 756.0
    assert compute.table_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32) == 19.5
    assert compute.table_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, allow_tf32=True) == 156.0
    assert compute.table_peak_tflops("Some New Accelerator", torch.bfloat16) is None
    monkeypatch.setenv(compute.PEAK_ENV, "12.5")
    assert compute.device_peak_tflops(torch.device("cpu"), torch.float32) == (12.5, f"${compute.PEAK_ENV}")
    monkeypatch.setenv(compute.PEAK_ENV, "fast")
    with pytest.raises(ValueError, match=compute.PEAK_ENV):
        compute.device_peak_tflops(torch.device("cpu"), torch.float32)


def test_gemm_probe_measures_a_plausible_rate():
    rate = compute.gemm_probe_tflops("cpu", torch.float32, n=256, seconds=0.05, chunks=2)
    assert 1e-4 < rate < 100  # TFLOP/s of a CPU


def test_memory_sampler_sees_a_transient_allocation():
    mem = MemorySampler(torch.device("cpu"), interval=0.01)
    try:
        base = mem.window_peak_gb()
        assert base > 0.05  # a Python process with torch holds far more than 50 MB
        x = torch.ones(50_000_000)  # 200 MB, freed before the next read
        time.sleep(0.1)
        del x
        time.sleep(0.05)
        peak = mem.window_peak_gb()
        assert peak > base + 0.15, (base, peak)
        assert mem.window_peak_gb() < peak - 0.1  # a new window no longer holds the freed block
    finally:
        mem.close()


# ------------------------------------------------------------------------------------------ event file


def test_loss_vs_flops_hparams_and_custom_scalars_in_the_event_file(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    from pretrain.report import read_hparams

    m = Metrics(str(tmp_path), True)
    m.flops_axis = lambda: 123.7
    m.hparams_start({"variant": "shared_qkv", "zero_stage": 1, "seq_len": 64, "bf16": False, "attention": {"a": 1}})
    m.custom_scalars()
    m.scalars(5, {"train/loss": 2.0, "val/loss": 2.5, "perf/mfu": None})
    m.hparams_end("success")
    m.close()
    assert len(glob.glob(os.path.join(m.log_dir, "events.out.tfevents.*"))) == 1  # one file: one run
    acc = _acc(m.log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("loss_vs_gflops/train_loss")] == [(123, 2.0)]
    assert [(e.step, e.value) for e in acc.Scalars("loss_vs_gflops/val_loss")] == [(123, 2.5)]
    assert "perf/mfu" not in acc.Tags()["scalars"]
    hp = read_hparams(acc)
    assert hp["variant"] == "shared_qkv" and hp["zero_stage"] == 1 and hp["seq_len"] == 64 and hp["bf16"] == "false"
    assert hp["attention"] == "{'a': 1}"
    content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    exp = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.EXPERIMENT_TAG]).experiment
    assert "val/loss" in [mi.name.tag for mi in exp.metric_infos]
    end = plugin_data_pb2.HParamsPluginData.FromString(content[metadata.SESSION_END_INFO_TAG])
    assert end.session_end_info.status == api_pb2.STATUS_SUCCESS
    raw = acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    titles = {c.title: [ch.title for ch in c.chart] for c in layout.category}
    assert set(titles) == set(CUSTOM_SCALARS_LAYOUT)
    charts = {ch.title: list(ch.multiline.tag) for c in layout.category for ch in c.chart}
    assert charts["cumulative saved PFLOPs"] == ["^compute/cumulative_saved_pflops$"]


def test_train_monitor_end_to_end_single_process(tmp_path, monkeypatch):
    from launch.distributed import DistInfo

    monkeypatch.setenv(compute.PEAK_ENV, "0.5")
    cfg = _cfg("{name: shared_qkv}")
    info = DistInfo(rank=0, world_size=1, local_rank=0, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1,
                    device=torch.device("cpu"))
    metrics = Metrics(str(tmp_path), True)
    model = _FakeBert()
    mon = TrainMonitor(cfg, model, info, metrics)
    mon.start()
    assert mon.peak_tflops == 0.5
    model.train()
    for _ in range(3):
        ids, labels = _batch(8, 64, 50)
        model(input_ids=ids, labels=labels)
    local = mon.local_flops()
    perf = {"perf/data_wait_pct": 3.0, "window_s": 0.5, "window_steps": 3.0}
    v = mon.window_values(3, local, perf)
    f = model_flops(cfg, 24, 64, 150, VOCAB)
    assert v["perf/tflops_per_device"] == pytest.approx(f["total"] / 0.5 / 1e12)
    assert v["perf/mfu"] == pytest.approx(v["perf/tflops_per_device"] / 0.5)
    assert v["perf/data_wait_pct"] == 3.0 and v["memory/peak_gb"] > 0.05
    assert v["perf/peak_tflops_per_device"] == 0.5
    assert v["compute/model_flops"] == pytest.approx(f["total"] / 3)
    metrics.scalars(3, {"train/loss": 4.0, **v})
    with open(tmp_path / "status.json", "w") as fh:
        fh.write('{"state": "failed"}')
    mon.close()
    metrics.close()
    acc = _acc(metrics.log_dir)
    assert acc.Scalars("loss_vs_gflops/train_loss")[0].step == int(f["total"] / 1e9)
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    end = acc.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_END_INFO_TAG]
    assert plugin_data_pb2.HParamsPluginData.FromString(end).session_end_info.status == api_pb2.STATUS_FAILURE
