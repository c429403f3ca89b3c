"""prepare: packing, shards vs manifest, idempotence, CLI errors."""

from __future__ import annotations

import io
import logging
import os
import tarfile
import time

import numpy as np
import pytest

from data_pipeline import prepare as P
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import sha256_file
from launch.config import DataConfig

CLS, SEP, PAD = 1, 2, 0


def _rows(path: str) -> list[tuple[str, np.ndarray]]:
    """(key, ids) of every sample of a tar, read with the tarfile module (independent of the loader)."""
    out = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            assert m.name.endswith(".ids.npy")
            out.append((m.name[: -len(".ids.npy")], np.load(io.BytesIO(tf.extractfile(m).read()))))
    return out


def test_manifest_matches_shards(prepared, data_cfg):
    d = data_cfg.data_dir
    assert prepared["seq_len"] == 64 and prepared["vocab_size"] == 512 and prepared["dtype"] == "uint16"
    assert prepared["tokenizer"]["sha256"] == sha256_file(os.path.join(d, prepared["tokenizer"]["path"]))
    keys = set()
    for split in ("train", "val"):
        shards = [s for s in prepared["shards"] if s["split"] == split]
        assert shards and [s["name"] for s in shards] == [f"{split}-{i:06d}.tar" for i in range(len(shards))]
        assert all(s["samples"] == data_cfg.samples_per_shard for s in shards[:-1])
        assert shards[-1]["samples"] < data_cfg.samples_per_shard  # unequal shards for the loader tests
        for s in shards:
            path = os.path.join(d, s["name"])
            assert sha256_file(path) == s["sha256"] and os.path.getsize(path) == s["bytes"]
            rows = _rows(path)
            assert len(rows) == s["samples"]
            assert sum(int(np.count_nonzero(r != PAD)) for _, r in rows) == s["tokens"]
            for key, r in rows:
                keys.add(key)
                assert r.dtype == np.uint16 and r.shape == (64,)
                real = r[r != PAD]
                assert np.all(r[: real.size] != PAD), "padding only at the tail"
                assert real[0] == CLS and real[-1] == SEP and real[1] != SEP
                assert not np.any(real[1:] == CLS)
                assert not np.any((real[1:-1] == SEP) & (real[2:] == SEP)), "no empty documents"
        tot = prepared["splits"][split]
        assert tot["samples"] == sum(s["samples"] for s in shards)
        assert tot["tokens"] == sum(s["tokens"] for s in shards)
        assert tot["shards"] == len(shards)
    assert len(keys) == sum(s["samples"] for s in prepared["shards"])
    # only the very last row of a split may be short: every other row is full or ends one early
    assert prepared["splits"]["train"]["tokens"] > 0.98 * 64 * prepared["splits"]["train"]["samples"]


def test_second_run_is_a_no_op(prepared, data_cfg, caplog):
    mtimes = {s["name"]: os.path.getmtime(os.path.join(data_cfg.data_dir, s["name"])) for s in prepared["shards"]}
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="data_pipeline.prepare"):
        again = P.prepare_data(data_cfg)
    assert time.perf_counter() - t0 < 2.0
    assert "up to date" in caplog.text
    assert again["config_hash"] == prepared["config_hash"] and again["shards"] == prepared["shards"]
    assert mtimes == {n: os.path.getmtime(os.path.join(data_cfg.data_dir, n)) for n in mtimes}


def _pack(docs, seq_len=8):
    p = P.Packer(seq_len, CLS, SEP, PAD, np.dtype(np.int32))
    rows = [r for d in docs for r in p.add(np.array(d, dtype=np.int32))]
    return [r.tolist() for r in rows + p.finish()]


def test_packer_full_sentences():
    # body of 6 tokens per row; documents joined by [SEP]
    assert _pack([[10, 11, 12], [20, 21, 22, 23, 24, 25, 26]]) == [
        [CLS, 10, 11, 12, SEP, 20, 21, SEP],
        [CLS, 22, 23, 24, 25, 26, SEP, PAD]]  # last short row kept, padded
    # a document that ends a row exactly: the next row does not open with a separator
    assert _pack([[10, 11, 12, 13, 14, 15], [20]]) == [[CLS, 10, 11, 12, 13, 14, 15, SEP],
                                                       [CLS, 20, SEP, PAD, PAD, PAD, PAD, PAD]]
    # a separator that would be the last body token closes the row one early instead
    assert _pack([[10, 11, 12, 13, 14], [20, 21]]) == [[CLS, 10, 11, 12, 13, 14, SEP, PAD],
                                                       [CLS, 20, 21, SEP, PAD, PAD, PAD, PAD]]
    assert _pack([[], [10]]) == [[CLS, 10, SEP, PAD, PAD, PAD, PAD, PAD]]


def test_split_is_stable_and_near_fraction():
    docs = [f"document {i}" for i in range(4000)]
    labels = P.split_documents(docs, 0.1)
    assert labels == P.split_documents(docs, 0.1)
    assert abs(labels.count("val") / len(docs) - 0.1) < 0.02
    assert P.split_documents(docs[:3], 0.01).count("val") == 1  # at least one val document
    assert "val" not in P.split_documents(docs[:50], 0.0)


def _txt_cfg(tmp_path, **kw) -> DataConfig:
    words = "the value of each item is checked against the key and returned when valid".split()
    rng = np.random.default_rng(0)
    text = "\n\n".join(" ".join(rng.choice(words, size=rng.integers(5, 40))) for _ in range(300))
    (tmp_path / "corpus.txt").write_text(text)
    base = dict(corpus=[str(tmp_path / "corpus.txt")], data_dir=str(tmp_path / "out"), vocab_size=32,
                seq_len=16, val_fraction=0.1, samples_per_shard=100, prepare_workers=1, tokenizer_sample_mb=1.0)
    return DataConfig(**{**base, **kw})


def test_txt_corpus_and_tokenizer_reuse(tmp_path):
    cfg = _txt_cfg(tmp_path)
    m1 = P.prepare_data(cfg)
    assert m1["tokenizer"]["reused"] is False and m1["splits"]["val"]["samples"] > 0
    m2 = P.prepare_data(DataConfig(**{**cfg.__dict__, "seq_len": 32}))
    assert m2["tokenizer"]["reused"] is True and m2["tokenizer"]["sha256"] == m1["tokenizer"]["sha256"]
    assert m2["config_hash"] != m1["config_hash"] and m2["seq_len"] == 32
    names = sorted(n for n in os.listdir(cfg.data_dir) if n.endswith(".tar"))
    assert names == sorted(s["name"] for s in m2["shards"])  # old shards removed
    # touching the input file invalidates the manifest
    os.utime(cfg.corpus[0], ns=(1, 1))
    assert P.data_config_hash(DataConfig(**{**cfg.__dict__, "seq_len": 32})) != m2["config_hash"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert P.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: config file not found")
    (tmp_path / "empty.txt").write_text("\n\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  corpus: [{tmp_path / 'empty.txt'}]\n  data_dir: {tmp_path / 'out'}\n")
    assert P.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: corpus") and "holds no text" in err[-1]
    assert P.main(["--config", str(cfg), "data.vocab_size=oops"]) == 2
    assert "data.vocab_size" in capsys.readouterr().err


def test_cli_builds(tmp_path):
    cfg = _txt_cfg(tmp_path)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(f"data:\n  corpus: [{cfg.corpus[0]}]\n  vocab_size: 32\n  seq_len: 16\n"
                         f"  samples_per_shard: 100\n  prepare_workers: 2\n")
    assert P.main(["--config", str(yaml_path), f"data.data_dir={tmp_path / 'cli'}"]) == 0
    assert os.path.isfile(tmp_path / "cli" / "manifest.json")
    with pytest.raises(DataError):
        P.prepare_data(DataConfig(corpus=[str(tmp_path / "none-*.jsonl")], data_dir=str(tmp_path / "x")))
