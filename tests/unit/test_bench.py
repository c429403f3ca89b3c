"""The benchmarks run end to end at tiny sizes and write a row for every variant / peer / pipeline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER_MODULES = {"linformer_pkg": "linformer", "reformer_lsh": "reformer_pytorch", "hf_yoso_e": "transformers"}

pytestmark = pytest.mark.slow  # three subprocesses, ~40-50 s together on 2 cores


def _run(script: str, *args: str, timeout: int = 120) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "bench", script), "--tiny", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def _machine_ok(d: dict) -> None:
    m = d["machine"]
    assert m["cores"] >= 1 and m["torch"] and "load_avg_start" in m and "load_avg_end" in m


def test_attention_tiny(tmp_path):
    from bench.attention import VARIANTS

    out = tmp_path / "attention.json"
    _run("attention.py", "--dtypes", "fp32", "--out", str(out))
    d = _load(out)
    _machine_ok(d)
    by = {r["variant"]: r for r in d["rows"]}
    assert set(by) == set(VARIANTS)
    for v in VARIANTS:
        r = by[v]
        mod = PEER_MODULES.get(v)
        if mod and importlib.util.find_spec(mod) is None:
            assert r["status"] == "error" and "No module" in r["reason"], r
            continue
        assert r["status"] == "ok", r
        assert r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0, r
        assert r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0
    assert by["sdpa"]["time_vs_sdpa"] == pytest.approx(1.0)


def test_train_step_tiny(tmp_path):
    from bench.train_step import TINY_PLAN

    out = tmp_path / "train_step.json"
    _run("train_step.py", "--dtypes", "fp32", "--out", str(out))
    d = _load(out)
    _machine_ok(d)
    assert d["settings"]["peak_flops"]["fp32"] > 0
    rows = d["rows"]
    (n, names), = TINY_PLAN.items()
    want = {"hf_bert" if x == "hf_bert" else f"bertforge/{x}" for x in names}
    assert {r["model"] for r in rows} == want
    for r in rows:
        assert r["status"] == "ok", r
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"], r
        assert r["flops_per_step"] > 0


def test_loader_tiny(tmp_path):
    out = tmp_path / "loader.json"
    _run("loader.py", "--out", str(out), "--data-dir", str(tmp_path / "shards"))
    d = _load(out)
    _machine_ok(d)
    pipes = {r["pipeline"] for r in d["rows"]}
    assert pipes == {"bertforge", "wds_plain", "wds_plain_nomask"}
    for r in d["rows"]:
        assert r["status"] == "ok", r
        assert r["samples_per_s"] > 0


def test_report_renders(tmp_path):
    """report.refresh builds the markdown and PNGs from whatever JSON files exist."""
    from bench import report

    res = tmp_path / "results"
    res.mkdir()
    (res / "loader.json").write_text(json.dumps({
        "benchmark": "loader", "machine": {"cpu": "x", "cores": 2, "torch": "t", "load_avg_start": [1, 1, 1],
                                           "load_avg_end": [1, 1, 1]},
        "settings": {"corpus": "demo_stdlib", "train_shards": 1, "train_samples": 10, "seq_len": 128,
                     "vocab_size": 512, "shuffle_buffer": 10, "timing": "t", "rounds": 1},
        "rows": [{"pipeline": "bertforge", "workers": 0, "status": "ok", "samples_per_s": 10.0, "vs_wds_plain": 1.0},
                 {"pipeline": "wds_plain", "workers": 0, "status": "ok", "samples_per_s": 10.0, "vs_wds_plain": 1.0}]}))
    md = tmp_path / "B.md"
    report.refresh(str(res), str(md))
    text = md.read_text()
    assert "## Data loader" in text and "| bertforge | 0 |" in text
    assert (res / "loader.png").exists()
