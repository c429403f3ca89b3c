"""Compute, MFU and memory in TensorBoard, read back from real 2-rank deepspeed runs (the cached softmax
and shared_qkv runs of test_train_deepspeed.py), served by a real `tensorboard` over HTTP, and
compared by `python -m pretrain.report`; plus one run whose loader is slowed on purpose."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from ds_launch import BIN, ROOT, TINY, _port, env, run
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow

# the cached launches of test_train_deepspeed.py (same keys and overrides: each is paid once per session)
RUNS = {
    "softmax": ("zero1", "train.steps=20", "train.zero_stage=1"),
    "shared_qkv": ("variant_shared_qkv", "train.steps=20", "train.save_every=0", "model.attention={name: shared_qkv}"),
}
WORLD_BATCH, SEQ = 2 * 8, 64  # 2 ranks x train.micro_batch_size=8 (ds_launch.TINY), data.seq_len=64

COMPUTE = ["compute/attention_flops", "compute/softmax_attention_flops", "compute/attention_saved_pct",
           "compute/model_flops", "compute/softmax_model_flops", "compute/model_saved_pct",
           "compute/cumulative_saved_pflops", "compute/attention_params_saved_pct", "compute/cumulative_pflops"]
PERF = ["perf/tokens_per_sec", "perf/samples_per_sec", "perf/step_time_s", "perf/data_wait_pct",
        "perf/tflops_per_device", "perf/mfu", "perf/peak_tflops_per_device"]
OTHER = ["memory/peak_gb", "data/epoch", "data/tokens", "train/loss", "train/lr", "val/loss",
         "loss_vs_gflops/train_loss", "loss_vs_gflops/val_loss"]


def _accumulator(run_dir: str) -> EventAccumulator:
    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _get(runs, variant: str):
    run_dir, proc = runs.get(*RUNS[variant])
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n---stderr---\n" + proc.stderr[-3000:]
    return run_dir, proc


@pytest.mark.parametrize("variant", sorted(RUNS))
def test_every_tag_is_logged_finite_and_equals_model_flops(runs, variant):
    from launch.config import load_config
    from model.flops import model_flops, model_params
    from pretrain.report import read_hparams

    run_dir, proc = _get(runs, variant)
    acc = _accumulator(run_dir)
    s = _scalars(acc)
    missing = [t for t in COMPUTE + PERF + OTHER if t not in s]
    assert not missing, f"tags missing from the event file: {missing}"
    for tag, series in s.items():
        assert all(math.isfinite(v) for _, v in series), (tag, series)
    log_steps = [st for st, _ in s["train/loss"]]
    for tag in COMPUTE + PERF[:-1] + ["memory/peak_gb"]:
        assert [st for st, _ in s[tag]] == log_steps, tag  # every logging step

    hp = read_hparams(acc)
    assert hp["variant"] == variant and hp["zero_stage"] == 1 and hp["seq_len"] == SEQ
    assert hp["num_layers"] == 2 and hp["hidden_size"] == 64 and hp["dp_size"] == 2
    assert "custom_scalars__config__" in acc.Tags()["tensors"]

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    vocab = int(hp["vocab_rows"])
    # one optimizer step of the global batch: 16 sequences of 64 (padded) tokens; attention FLOPs do
    # not depend on the predicted tokens, the MLM head does (about 15% of the tokens)
    none = model_flops(cfg, WORLD_BATCH, SEQ, 0, vocab)
    lo = model_flops(cfg, WORLD_BATCH, SEQ, int(0.05 * WORLD_BATCH * SEQ), vocab)
    hi = model_flops(cfg, WORLD_BATCH, SEQ, int(0.25 * WORLD_BATCH * SEQ), vocab)
    v = {tag: dict(s[tag]) for tag in COMPUTE}
    cum = cum_saved = 0.0
    prev = 0
    for st in log_steps:
        assert v["compute/attention_flops"][st] == pytest.approx(none["attention_total"], rel=1e-6)
        assert v["compute/softmax_attention_flops"][st] == pytest.approx(none["softmax_attention_total"], rel=1e-6)
        model, softmax = v["compute/model_flops"][st], v["compute/softmax_model_flops"][st]
        assert lo["total"] <= model <= hi["total"]
        # the rest of the model is the same in both: the difference is the attention's
        assert softmax - model == pytest.approx(none["softmax_attention_total"] - none["attention_total"],
                                                rel=1e-3, abs=1e3)
        assert v["compute/model_saved_pct"][st] == pytest.approx(100 * (1 - model / softmax), abs=1e-4)
        assert v["compute/attention_saved_pct"][st] == pytest.approx(none["attention_saved_pct"], abs=1e-4)
        cum += model * (st - prev)
        cum_saved += (softmax - model) * (st - prev)
        prev = st
        assert v["compute/cumulative_pflops"][st] == pytest.approx(cum / 1e15, rel=1e-4)
        assert v["compute/cumulative_saved_pflops"][st] == pytest.approx(cum_saved / 1e15, rel=1e-4, abs=1e-12)
    p = model_params(cfg, vocab)
    assert v["compute/attention_params_saved_pct"][log_steps[-1]] == pytest.approx(
        100 * (1 - p["attention"] / p["softmax_attention"]), abs=1e-4)

    perf = {tag: dict(s[tag]) for tag in PERF}
    peak = s["perf/peak_tflops_per_device"][0][1]
    assert 1e-4 < peak < 1000
    for st in log_steps:
        tok = perf["perf/tokens_per_sec"][st]
        assert tok > 0 and perf["perf/step_time_s"][st] > 0
        assert 0.5 * SEQ < tok / perf["perf/samples_per_sec"][st] <= SEQ + 1e-3  # real tokens per sequence
        assert 0 <= perf["perf/data_wait_pct"][st] < 100
        assert perf["perf/tflops_per_device"][st] > 0
        assert 0 < perf["perf/mfu"][st] < 2
        assert perf["perf/mfu"][st] == pytest.approx(perf["perf/tflops_per_device"][st] / peak, rel=1e-4)
        # TFLOP/s per device: the window's FLOPs over its seconds, shared by the 2 ranks
        assert perf["perf/tflops_per_device"][st] * 2 * 1e12 == pytest.approx(
            v["compute/model_flops"][st] / perf["perf/step_time_s"][st], rel=1e-3)
    waits = sorted(perf["perf/data_wait_pct"].values())
    assert waits[len(waits) // 2] < 50, waits  # the normal loader keeps up
    assert all(0.1 < g < 64 for _, g in s["memory/peak_gb"])
    assert s["data/tokens"][-1][1] == pytest.approx(sum(
        perf["perf/tokens_per_sec"][st] * perf["perf/step_time_s"][st] * (st - p0)
        for p0, st in zip([0] + log_steps[:-1], log_steps)), rel=1e-3)

    # loss against FLOPs: one point per train/loss, the step axis is the cumulative GFLOPs
    lvf = s["loss_vs_gflops/train_loss"]
    assert [val for _, val in lvf] == [val for _, val in s["train/loss"]]
    assert [st for st, _ in lvf] == [int(v["compute/cumulative_pflops"][st] * 1e6) for st in log_steps]
    assert "MFU" in proc.stdout + proc.stderr and "MFU peak" in proc.stdout + proc.stderr


def test_shared_qkv_saves_compute_and_softmax_does_not(runs):
    final = {}
    for variant in RUNS:
        s = _scalars(_accumulator(_get(runs, variant)[0]))
        final[variant] = {t: s[t][-1][1] for t in COMPUTE}
    sm, sq = final["softmax"], final["shared_qkv"]
    for tag in ("compute/attention_saved_pct", "compute/model_saved_pct", "compute/cumulative_saved_pflops",
                "compute/attention_params_saved_pct"):
        assert sm[tag] == 0, tag
        assert sq[tag] > 0, tag
    assert sq["compute/attention_saved_pct"] > sq["compute/model_saved_pct"]
    assert sq["compute/softmax_attention_flops"] == pytest.approx(sm["compute/softmax_attention_flops"], rel=1e-6)
    assert sq["compute/attention_flops"] < sm["compute/attention_flops"]


def test_tensorboard_serves_the_scalars_over_http(runs, tmp_path):
    dirs = {v: os.path.join(_get(runs, v)[0], "tb") for v in RUNS}
    port = _port()
    spec = ",".join(f"{v}:{d}" for v, d in dirs.items())
    log = open(tmp_path / "tensorboard.log", "w")
    server = subprocess.Popen([os.path.join(BIN, "tensorboard"), "--logdir_spec", spec, "--host", "127.0.0.1",
                               "--port", str(port), "--load_fast", "false"],
                              cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def fetch(path: str):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            return json.loads(r.read())

    try:
        deadline = time.time() + 120
        names: dict[str, str] = {}  # --logdir_spec name -> TensorBoard's run name ("softmax/." here)
        while True:
            try:
                tags = fetch("/data/plugin/scalars/tags")
                names = {v: r for v in RUNS for r in tags if r.split("/")[0] == v}
                if len(names) == len(RUNS) and all("compute/model_saved_pct" in tags[r] for r in names.values()):
                    break
            except OSError:
                pass
            assert server.poll() is None, open(tmp_path / "tensorboard.log").read()[-2000:]
            assert time.time() < deadline, "tensorboard did not serve the runs within 120 s"
            time.sleep(0.5)
        for variant in RUNS:
            expect = _scalars(_accumulator(os.path.dirname(dirs[variant])))
            for tag in ("compute/model_saved_pct", "compute/cumulative_saved_pflops", "perf/mfu", "memory/peak_gb"):
                q = urllib.parse.urlencode({"run": names[variant], "tag": tag})
                got = fetch(f"/data/plugin/scalars/scalars?{q}")  # [[wall_time, step, value], ...]
                assert [(st, pytest.approx(val, rel=1e-6, abs=1e-12)) for _, st, val in got] == expect[tag], tag
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def test_report_table_and_plots_match_the_event_files(runs, tmp_path):
    dirs = [_get(runs, v)[0] for v in ("softmax", "shared_qkv")]
    out = str(tmp_path / "report")
    proc = run([sys.executable, "-m", "pretrain.report", *dirs, "--out", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_flops.png", "compute_saved.png"):
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 5000 and open(path, "rb").read(4) == b"\x89PNG"
        assert path in proc.stdout
    lines = [ln for ln in open(os.path.join(out, "report.md")).read().splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    assert [r["variant"] for r in rows] == ["softmax", "shared_qkv"]
    for r, d in zip(rows, dirs):
        s = _scalars(_accumulator(d))
        assert float(r["final val loss"]) == pytest.approx(s["val/loss"][-1][1], abs=1e-4)
        assert float(r["total FLOPs"]) == pytest.approx(s["compute/cumulative_pflops"][-1][1] * 1e15, rel=1e-3)
        assert float(r["peak memory (GB)"]) == pytest.approx(max(v for _, v in s["memory/peak_gb"]), abs=0.005)
        toks = sorted(v for _, v in s["perf/tokens_per_sec"])
        assert min(toks) - 1 <= float(r["tokens/s"]) <= max(toks) + 1
        total, saved = s["compute/cumulative_pflops"][-1][1], s["compute/cumulative_saved_pflops"][-1][1]
        assert float(r["saved % (model)"]) == pytest.approx(100 * saved / (total + saved), abs=0.005)
    assert float(rows[0]["saved % (model)"]) == 0 and float(rows[1]["saved % (model)"]) > 0


SLOW_LOADER = '''
import os, sys, time
sys.path.insert(0, {root!r})
from data_pipeline import global_order

_iter = global_order.GlobalTrainLoader.__iter__  # the default data.order=global


def _slow(self):
    for batch in _iter(self):
        time.sleep({delay})
        yield batch


global_order.GlobalTrainLoader.__iter__ = _slow
from launch.train import main

sys.exit(main())
'''


def test_data_wait_rises_with_a_slow_loader(runs, tiny_data, tmp_path):
    """The trainer times the loader: a loader slowed by 0.25 s a batch shows above 50% data wait."""
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_LOADER.format(root=ROOT, delay=0.25))
    run_dir = str(tmp_path / "slow")
    proc = run([os.path.join(BIN, "deepspeed"), "--num_gpus", "1", "--master_port", str(_port()), str(script),
                "--config", "configs/demo.yaml", *TINY, f"data.data_dir={tiny_data}", f"train.run_dir={run_dir}",
                "train.steps=8", "train.save_every=0", "train.eval_every=100"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    waits = [v for _, v in _scalars(_accumulator(run_dir))["perf/data_wait_pct"]]
    assert len(waits) == 4 and min(waits) > 50, waits
    assert glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))
