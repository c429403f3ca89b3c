"""prepare at scale: the corpus is streamed through on-disk hash buckets (memory bounded by the bucket
size, not the corpus), the shards do not depend on the bucket count, and a crashed run resumes from
its last finished bucket, ending with the shards and manifest of a clean run."""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
import os
import tracemalloc

import numpy as np
import pytest

from data_pipeline import corpus as C
from data_pipeline import prepare as P
from data_pipeline.errors import DataError
from launch.config import DataConfig

_WORDS = np.array("the value of each item is checked against the key and returned when valid alpha beta gamma "
                  "delta shard tensor rank epoch token batch loss weight".split())
_VOLATILE = ("created", "timings_s", "throughput", "tokenizer")


def _write_corpus(path, mb: float, seed: int = 0) -> None:
    """Documents of 10-60 words separated by blank lines, about ``mb`` MB, written as generated."""
    rng = np.random.default_rng(seed)
    n = 0
    with open(path, "w") as f:
        while n < mb * 1_000_000:
            doc = " ".join(rng.choice(_WORDS, size=int(rng.integers(10, 60)))) + ".\n\n"
            f.write(doc)
            n += len(doc)


def _cfg(tmp_path, name: str, corpus_mb: float = 0.3, **kw) -> DataConfig:
    path = tmp_path / f"corpus-{corpus_mb}.txt"
    if not path.exists():
        _write_corpus(path, corpus_mb)
    base = dict(corpus=[str(path)], data_dir=str(tmp_path / name), vocab_size=48, seq_len=32, val_fraction=0.05,
                samples_per_shard=40, prepare_workers=1, tokenizer_sample_mb=0.1, prepare_bucket_mb=128.0)
    return DataConfig(**{**base, **kw})


def _stable(manifest: dict) -> dict:
    """The manifest without what differs between equal runs (times, and whether the tokenizer was reused)."""
    out = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    out["tokenizer_sha256"] = manifest["tokenizer"]["sha256"]
    return out


def _tars(data_dir: str) -> dict[str, int]:
    return {n: os.stat(os.path.join(data_dir, n)).st_mtime_ns for n in sorted(os.listdir(data_dir))
            if n.endswith(".tar")}


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean one-bucket run over the 0.3 MB corpus: (its dir's parent, config, manifest)."""
    tmp = tmp_path_factory.mktemp("stream")
    cfg = _cfg(tmp, "clean")
    return tmp, cfg, P.prepare_data(cfg)


def test_many_small_buckets_give_the_shards_of_one_big_bucket(clean):
    tmp, cfg, one = clean
    assert one["buckets"] == 1
    many = P.prepare_data(dataclasses.replace(cfg, data_dir=str(tmp / "many"), prepare_bucket_mb=0.01))
    assert many["buckets"] >= 25
    # byte-identical shards: same document order, and packing and shard filling carry across buckets
    assert _stable(many) | {"buckets": 1} == _stable(one)
    assert [s["name"] for s in many["shards"] if s["split"] == "train"] == [
        f"train-{i:06d}.tar" for i in range(many["splits"]["train"]["shards"])]
    assert not os.path.exists(os.path.join(tmp / "many", P.STATE_DIR)), "the work dir goes once done"
    assert set(_tars(str(tmp / "many"))) == {s["name"] for s in many["shards"]}


def test_memory_is_bounded_by_the_bucket_not_the_corpus(tmp_path):
    """A 5 MB corpus through 0.25 MB buckets: the traced peak stays a fraction of the corpus (holding
    the corpus, or a list of it, would exceed it)."""
    import webdataset  # noqa: F401  (imported before tracing: its import is not the pipeline's memory)

    cfg = _cfg(tmp_path, "out", corpus_mb=5.0, vocab_size=40, seq_len=128, samples_per_shard=500,
               tokenizer_sample_mb=0.25, prepare_bucket_mb=0.25)
    assert isinstance(C.iter_documents(cfg.corpus), collections.abc.Iterator)
    tracemalloc.start()
    try:
        manifest = P.prepare_data(cfg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manifest["buckets"] >= 20 and manifest["corpus"]["mb"] > 4.9
    assert peak < 3.5e6, f"peak {peak / 1e6:.1f} MB of Python memory for a 5 MB corpus in 0.25 MB buckets"


@pytest.mark.parametrize("where", ["after_bucket", "mid_bucket"])
def test_crash_then_rerun_redoes_only_the_unfinished_buckets(clean, monkeypatch, caplog, where):
    tmp, cfg, reference = clean
    cfg = dataclasses.replace(cfg, data_dir=str(tmp / f"crash-{where}"), prepare_bucket_mb=0.02)
    crash_after = 4  # buckets 0..4 finish, then the run dies (before or while writing bucket 5's shards)
    save_done, flush = P._save_done, P.ShardSink._flush
    flushes = []

    def dying_save_done(run_dir, b, *args):
        save_done(run_dir, b, *args)
        if where == "after_bucket" and b == crash_after:
            raise RuntimeError("killed")

    def dying_flush(self):
        flush(self)
        if where == "mid_bucket" and len(os.listdir(run_dir)) == 2 * (crash_after + 1):
            flushes.append(self.new_shards[-1]["name"] if self.new_shards else None)
            if len(flushes) == 2:
                raise RuntimeError("killed")

    run_dir = os.path.join(cfg.data_dir, P.STATE_DIR, "run")
    monkeypatch.setattr(P, "_save_done", dying_save_done)
    monkeypatch.setattr(P.ShardSink, "_flush", dying_flush)
    with pytest.raises(RuntimeError, match="killed"):
        P.prepare_data(cfg)
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(cfg.data_dir, P.MANIFEST))
    done = sorted(n for n in os.listdir(run_dir) if n.endswith(".json"))
    assert done == [f"bucket-{b:05d}.json" for b in range(crash_after + 1)]
    kept = {n: t for n, t in _tars(cfg.data_dir).items()
            if any(n == s["name"] for d in done for s in P._read_json(os.path.join(run_dir, d))["shards"])}
    assert kept, "the finished buckets have written shards"
    if where == "mid_bucket":
        assert set(_tars(cfg.data_dir)) - set(kept), "shards of the unfinished bucket were on disk"

    read = []
    monkeypatch.setattr(P, "read_bucket", lambda d, b, _r=P.read_bucket: read.append(b) or _r(d, b))
    with caplog.at_level(logging.INFO, logger="data_pipeline.prepare"):
        resumed = P.prepare_data(cfg)
    assert "spill: reusing" in caplog.text and f"resuming after bucket {crash_after}" in caplog.text
    assert read == list(range(crash_after + 1, resumed["buckets"])), "only the unfinished buckets are redone"
    assert {n: t for n, t in _tars(cfg.data_dir).items() if n in kept} == kept, "finished shards untouched"
    assert _stable(resumed) | {"buckets": 1} == _stable(reference)
    assert set(_tars(cfg.data_dir)) == {s["name"] for s in resumed["shards"]}
    assert not os.path.exists(os.path.join(cfg.data_dir, P.STATE_DIR))
    # finished: a rerun does nothing, --force redoes all
    read.clear()
    assert P.prepare_data(cfg)["created"] == resumed["created"] and read == []
    forced = P.prepare_data(cfg, force=True)
    assert _stable(forced) == _stable(resumed) and read[-1] == forced["buckets"] - 1


def test_parts_with_buckets_and_rerun(clean, caplog):
    tmp, cfg, _ = clean
    by_buckets = {}
    for mb in (128.0, 0.02):
        part_cfg = dataclasses.replace(cfg, data_dir=str(tmp / f"parts-{mb}"), prepare_bucket_mb=mb)
        first = P.prepare_data(part_cfg, part=1, num_parts=3)
        assert first["part"] == 1 and first["shards"][0]["name"] == "train-010000.tar"
        assert P.prepare_data(part_cfg, part=1, num_parts=3)["part"] == 1  # written: not redone
        P.prepare_data(part_cfg, part=0, num_parts=3)
        merged = P.prepare_data(part_cfg, part=2, num_parts=3)
        assert merged["parts"] == 3 and "part" not in merged
        assert set(_tars(part_cfg.data_dir)) == {s["name"] for s in merged["shards"]}
        assert not os.path.exists(os.path.join(part_cfg.data_dir, P.STATE_DIR)), "the last part removes the spill"
        with caplog.at_level(logging.INFO, logger="data_pipeline.prepare"):
            assert P.prepare_data(part_cfg, part=0, num_parts=3)["created"] == merged["created"]
        assert "up to date" in caplog.text
        by_buckets[mb] = _stable(merged)
    assert by_buckets[0.02]["buckets"] > 1
    assert by_buckets[0.02] | {"buckets": 1} == by_buckets[128.0]


def test_throughput_is_recorded_and_bucket_bound_is_checked(clean, tmp_path):
    _, cfg, manifest = clean
    t = manifest["throughput"]
    assert t["tokens"] > 0 and t["processes"] == 1 and t["tokens_per_s_per_process"] > 0
    with pytest.raises(DataError, match=r"^data.prepare_bucket_mb=0.0 must be positive"):
        P.prepare_data(dataclasses.replace(cfg, data_dir=str(tmp_path / "x"), prepare_bucket_mb=0.0))
