"""pretrain.report on synthetic event files written with SummaryWriter: table, JSON and PNG plots."""

from __future__ import annotations

import json
import os
import statistics

import pytest

from pretrain.metrics import Metrics
from pretrain.report import COLUMNS, load_run, main, read_scalars, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir: str, variant: str, saved_pct: float, loss0: float, steps=(10, 20, 30, 40),
               start_tokens: float = 0.0) -> dict:
    """A run as the trainer writes it: per logging step perf/compute/memory, val every 20 steps."""
    m = Metrics(run_dir, True)
    m.hparams_start({"variant": variant, "zero_stage": 1, "seq_len": 64})
    per_step = 1e12  # FLOPs of one step
    expect = {"tokens": [], "mem": [], "mfu": [], "attn": []}
    cum = saved = 0.0
    for i, step in enumerate(steps):
        tokens_per_sec = 1000.0 + 100 * i
        mem = 1.0 + 0.25 * (i % 3)
        mfu = 0.01 * (i + 1)
        window = 10 * per_step
        softmax = window / (1 - saved_pct / 100)
        cum += window
        saved += softmax - window
        attn_saved = 2 * saved_pct
        m.scalars(step, {"train/loss": loss0 - 0.01 * step, "perf/tokens_per_sec": tokens_per_sec,
                         "memory/peak_gb": mem, "perf/mfu": mfu, "compute/model_saved_pct": saved_pct,
                         "compute/attention_saved_pct": attn_saved, "compute/cumulative_pflops": cum / 1e15,
                         "compute/cumulative_saved_pflops": saved / 1e15,
                         "data/tokens": start_tokens + 640.0 * step})
        if step % 20 == 0:
            m.scalars(step, {"val/loss": loss0 - 0.012 * step})
        expect["tokens"].append(tokens_per_sec)
        expect["mem"].append(mem)
        expect["mfu"].append(mfu)
        expect["attn"].append(attn_saved)
    m.hparams_end("success")
    m.close()
    return {"val": loss0 - 0.012 * max(s for s in steps if s % 20 == 0), "tokens": statistics.median(expect["tokens"]),
            "flops": cum, "saved_pct": 100 * saved / (cum + saved), "saved_pflops": saved / 1e15,
            "mem": max(expect["mem"]), "mfu": 100 * statistics.median(expect["mfu"]), "steps": max(steps),
            "attn": statistics.median(expect["attn"])}


def _parse_table(md: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


@pytest.fixture
def two_runs(tmp_path):
    a, b = str(tmp_path / "softmax_run"), str(tmp_path / "shared_run")
    return {a: ("softmax", _write_run(a, "softmax", 0.0, 6.0)),
            b: ("shared_qkv", _write_run(b, "shared_qkv", 12.5, 6.2))}


def test_table_json_and_pngs_match_the_event_files(two_runs, tmp_path):
    out = str(tmp_path / "report")
    result = write_report(list(two_runs), out)
    for key in ("val_loss_vs_tokens", "val_loss_vs_flops", "compute_saved"):
        path = result["files"][key]
        assert os.path.getsize(path) > 5000
        with open(path, "rb") as f:
            assert f.read(8) == PNG
    md = open(result["files"]["report_md"]).read()
    rows = _parse_table(md)
    assert [h for _, h, _ in COLUMNS] == list(next(iter(rows.values())))
    for run_dir, (variant, e) in two_runs.items():
        r = rows[os.path.basename(run_dir)]
        assert r["variant"] == variant
        assert int(r["steps"]) == e["steps"]
        assert float(r["final val loss"]) == pytest.approx(e["val"], abs=1e-4)
        assert float(r["tokens/s"]) == pytest.approx(e["tokens"], abs=0.5)
        assert float(r["total FLOPs"]) == pytest.approx(e["flops"], rel=1e-3)
        assert float(r["saved % (model)"]) == pytest.approx(e["saved_pct"], abs=0.005)
        assert float(r["saved % (attention)"]) == pytest.approx(e["attn"], abs=0.005)
        assert float(r["saved PFLOPs"]) == pytest.approx(e["saved_pflops"], rel=1e-3, abs=1e-12)
        assert float(r["peak memory (GB)"]) == pytest.approx(e["mem"], abs=0.005)
        assert float(r["MFU %"]) == pytest.approx(e["mfu"], abs=0.005)
    assert float(rows["softmax_run"]["saved % (model)"]) == 0.0
    assert float(rows["shared_run"]["saved % (model)"]) == pytest.approx(12.5, abs=0.01)
    data = json.load(open(result["files"]["report_json"]))
    assert [r["run"] for r in data["runs"]] == ["softmax_run", "shared_run"]
    for name in ("val_loss_vs_tokens.png", "val_loss_vs_flops.png", "compute_saved.png"):
        assert name in md


def test_a_resumed_run_keeps_the_last_value_of_a_relogged_step(tmp_path):
    run = str(tmp_path / "resumed")
    _write_run(run, "softmax", 0.0, 6.0, steps=(10, 20, 30))  # first launch, preempted after step 30
    _write_run(run, "softmax", 0.0, 5.0, steps=(30, 40), start_tokens=1e6)  # second launch re-logs 30
    s = read_scalars(run, ["data/tokens"])["data/tokens"]
    assert [st for st, _ in s] == [10, 20, 30, 40]
    assert dict(s)[30] == pytest.approx(1e6 + 640 * 30)
    assert load_run(run).last("val/loss") == pytest.approx(5.0 - 0.012 * 40)


def test_cli_writes_and_fails_cleanly(two_runs, tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert main([*two_runs, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| softmax_run | softmax |" in printed and os.path.join(out, "val_loss_vs_flops.png") in printed
    assert main([str(tmp_path / "missing"), "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", out]) == 2
    assert "no TensorBoard scalars" in capsys.readouterr().err


def test_runs_with_one_basename_are_named_by_path(tmp_path):
    a, b = str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")
    _write_run(a, "softmax", 0.0, 6.0)
    _write_run(b, "shared_qkv", 10.0, 6.0)
    rows = write_report([a, b], str(tmp_path / "out"))["rows"]
    assert [r["run"] for r in rows] == [os.path.normpath(a), os.path.normpath(b)]
