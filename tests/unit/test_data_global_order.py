"""The global data order (data.order=global): a seeded permutation per epoch read with random access, cut
into per-rank micro batches, so the samples of every optimizer step and the resume point do not depend on
the data-parallel size, the gradient accumulation or the number of DataLoader workers."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
import torch
from loader_helpers import copy_prepared, keys_of, rehash, take

from data_pipeline import loader as L
from data_pipeline.errors import DataError
from data_pipeline.global_order import GlobalTrainLoader, IndexPermutation

MB = 8


@pytest.fixture(scope="module")
def gcfg(make_cfg):
    """``gcfg(accum=1, num_workers=0, **data)``: a global-order config over the shared dataset."""

    def make(accum: int = 1, num_workers: int = 0, **data):
        cfg = make_cfg(num_workers=num_workers, order="global", **data)
        cfg.train.gradient_accumulation_steps = accum
        return cfg

    return make


def steps(cfg_of, dp: int, accum: int, n_steps: int, workers: int = 0, state: dict | None = None,
          mb: int = MB) -> list[dict[str, tuple]]:
    """Per optimizer step: ``{sample key: (input_ids, labels)}`` over every rank's micro batches."""
    cfg = cfg_of(accum=accum, num_workers=workers)
    loaders = [L.build_train_loader(cfg, r, dp, mb, with_keys=True) for r in range(dp)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    batches = [take(ld, n_steps * accum) for ld in loaders]
    out = []
    for s in range(n_steps):
        step = {}
        for r in range(dp):
            for b in batches[r][s * accum:(s + 1) * accum]:
                for i, k in enumerate(b["keys"]):
                    assert k not in step, f"{k} twice in step {s}"
                    step[k] = (b["input_ids"][i], b["labels"][i])
        out.append(step)
    return out


def same_steps(a: list[dict], b: list[dict]) -> bool:
    return [sorted(s) for s in a] == [sorted(s) for s in b] and all(
        torch.equal(x[k][0], y[k][0]) and torch.equal(x[k][1], y[k][1]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 12345])
def test_index_permutation_is_a_seeded_bijection(n):
    p = IndexPermutation(n, 1234, 0)(np.arange(n))
    assert sorted(p.tolist()) == list(range(n))
    assert np.array_equal(p, IndexPermutation(n, 1234, 0)(np.arange(n)))  # a pure function of the seed
    if n >= 64:
        assert not np.array_equal(p, IndexPermutation(n, 1234, 1)(np.arange(n)))  # another epoch
        assert not np.array_equal(p, np.arange(n))
        assert np.array_equal(IndexPermutation(n, 1234, 0)(np.arange(n)[::-1]), p[::-1])  # elementwise
    with pytest.raises(IndexError):
        IndexPermutation(n, 1234, 0)(np.array([n]))


def test_one_epoch_two_ranks_two_workers_sees_every_sample_once(gcfg, prepared):
    cfg = gcfg(num_workers=2)
    total = sum(s["samples"] for s in prepared["shards"] if s["split"] == "train")
    dp, n = 2, total // (2 * MB)
    loaders = [L.build_train_loader(cfg, r, dp, MB, with_keys=True) for r in range(dp)]
    assert all(isinstance(ld, GlobalTrainLoader) for ld in loaders)
    keys = [keys_of(take(ld, n + 1)) for ld in loaders]
    epoch = keys[0][: n * MB] + keys[1][: n * MB]
    assert len(set(epoch)) == len(epoch) == n * 2 * MB  # at most once ...
    first_epoch = {f"train-{i:09d}" for i in range(total)}
    assert set(epoch) <= first_epoch and len(first_epoch - set(epoch)) == total - n * 2 * MB < 2 * MB  # ... all
    rest = keys[0][n * MB:] + keys[1][n * MB:]  # the step over the epoch end: the rest, then epoch 1 begins
    assert first_epoch - set(epoch) <= set(rest)
    assert loaders[0].corrupt_samples_skipped == 0


def test_step_samples_do_not_depend_on_ranks_accumulation_or_workers(gcfg):
    want = steps(gcfg, dp=2, accum=1, n_steps=6, workers=2)  # global batch 16
    assert same_steps(steps(gcfg, dp=1, accum=2, n_steps=6), want)
    assert same_steps(steps(gcfg, dp=4, accum=1, n_steps=6, workers=1, mb=4), want)
    assert same_steps(steps(gcfg, dp=2, accum=2, n_steps=6, workers=3, mb=4), want)
    other_seed = steps(lambda **kw: _seeded(gcfg, **kw), dp=2, accum=1, n_steps=1)
    assert sorted(other_seed[0]) != sorted(want[0])


def _seeded(gcfg, **kw):
    cfg = gcfg(**kw)
    cfg.train.seed = 99
    return cfg


def test_resume_on_another_data_parallel_size_continues_the_same_samples(gcfg):
    full = steps(gcfg, dp=2, accum=1, n_steps=8, workers=2)
    first = [L.build_train_loader(gcfg(num_workers=2), r, 2, MB) for r in range(2)]
    for ld in first:
        take(ld, 5)  # 5 steps of a 2-rank run, then its checkpoint state
    state = json.loads(json.dumps(first[0].state_dict()))
    assert state["consumed_samples"] == 5 * 2 * MB and state["order"] == "global"
    resumed = steps(gcfg, dp=1, accum=2, n_steps=3, state=state)  # one rank, same global batch
    assert same_steps(resumed, full[5:])
    resumed4 = steps(gcfg, dp=4, accum=1, n_steps=3, workers=1, state=state, mb=4)
    assert same_steps(resumed4, full[5:])


def test_state_from_another_seed_or_order_is_refused(gcfg, make_cfg):
    state = L.build_train_loader(gcfg(), 0, 1, MB).state_dict()
    with pytest.raises(DataError, match="train.seed"):
        L.build_train_loader(_seeded(gcfg), 0, 1, MB).load_state_dict(state)
    stream_state = L.build_train_loader(make_cfg(), 0, 1, MB).state_dict()
    with pytest.raises(DataError, match="data.order=stream.*data.resume=approximate"):
        L.build_train_loader(gcfg(), 0, 1, MB).load_state_dict(stream_state)
    with pytest.raises(DataError, match="data.order=global"):
        L.build_train_loader(make_cfg(), 0, 1, MB).load_state_dict(state)
    ld = L.build_train_loader(gcfg(), 0, 2, MB)
    ld.load_state_dict(stream_state, approximate=True)
    assert ld.consumed_samples == 0


def test_bad_samples_become_empty_rows_counted_never_replaced(gcfg, data_cfg, tmp_path):
    d = tmp_path / "d"
    manifest = copy_prepared(data_cfg.data_dir, d)
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    (d / train[1]["name"]).unlink()  # a missing shard
    raw = (d / train[2]["name"]).read_bytes()
    (d / train[2]["name"]).write_bytes(raw[: len(raw) // 2])  # truncated mid-way: the tail is unreadable
    (d / train[3]["name"]).write_bytes(b"not a tar at all " * 100)  # garbage
    rehash(d, manifest)  # bad at the source: the manifest describes them as they are
    good = take(L.build_train_loader(gcfg(), 0, 1, 32, with_keys=True), 20)
    bad = take(L.build_train_loader(gcfg(data_dir=str(d)), 0, 1, 32, with_keys=True), 20)
    ld = L.build_train_loader(gcfg(data_dir=str(d)), 0, 1, 32, with_keys=True)
    take(ld, 20)
    lost = {s["name"].removesuffix(".tar") for s in train[1:4]}
    skipped = 0
    for g, b in zip(good, bad):
        for i, (kg, kb) in enumerate(zip(g["keys"], b["keys"])):
            if kb.startswith("<skipped"):
                skipped += 1
                assert b["attention_mask"][i].sum() == 0 and (b["labels"][i] == -100).all()
            else:  # every other sample is the one an intact dataset gives at that position
                assert kb == kg and torch.equal(b["input_ids"][i], g["input_ids"][i])
    positions_in_lost = sum(1 for g in good for k in g["keys"] if _shard_of(k, train) in lost)
    assert 0 < skipped and ld.corrupt_samples_skipped == skipped
    assert positions_in_lost >= skipped > positions_in_lost // 4  # all of shards 1 and 3, the tail of 2


def _shard_of(key: str, train: list[dict]) -> str:
    i, acc = int(key.rsplit("-", 1)[1]), 0
    for s in train:
        acc += s["samples"]
        if i < acc:
            return s["name"].removesuffix(".tar")
    raise AssertionError(key)


def test_changed_shard_is_an_error_unless_skipped(gcfg, data_cfg, tmp_path):
    d = tmp_path / "d"
    manifest = copy_prepared(data_cfg.data_dir, d)
    name = [s for s in manifest["shards"] if s["split"] == "train"][0]["name"]
    (d / name).write_bytes((d / name).read_bytes()[:-1024])
    with pytest.raises(DataError, match="data.on_checksum_mismatch=skip"):
        L.build_train_loader(gcfg(data_dir=str(d)), 0, 1, MB)
    ld = L.build_train_loader(gcfg(data_dir=str(d), on_checksum_mismatch="skip"), 0, 1, 64)
    take(ld, 10)
    assert ld.corrupt_samples_skipped > 0


def test_remote_shards_are_downloaded_verified_and_read_alike(gcfg, http_url, data_cfg, tmp_path):
    want = take(L.build_train_loader(gcfg(), 1, 2, 16, with_keys=True), 4)
    cache = tmp_path / "cache"
    for what, cfg in {"manifest at a URL": gcfg(data_dir=http_url, cache_dir=str(cache / "a")),
                      "pipe": gcfg(shard_url_prefix=f"pipe:cat {data_cfg.data_dir}/{{name}}",
                                   cache_dir=str(cache / "b"))}.items():
        got = take(L.build_train_loader(cfg, 1, 2, 16, with_keys=True), 4)
        assert [b["keys"] for b in got] == [b["keys"] for b in want], what
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(want, got)), what
    downloaded = sorted(p.name.split("-", 1)[1] for p in (cache / "a").glob("*.tar"))
    assert downloaded and not list((cache / "a").glob("*.tmp.*"))
    for name in downloaded:  # byte for byte the prepared shard
        assert (cache / "a" / next((cache / "a").glob(f"*-{name}")).name).read_bytes() == \
            open(f"{data_cfg.data_dir}/{name}", "rb").read()


def test_blend_proportions_and_resume_in_the_global_order(gcfg, data_cfg, tmp_path):
    copy_prepared(data_cfg.data_dir, tmp_path / "a")  # the copy is one dataset, the shared dir the other
    blend = json.dumps([{"data_dir": data_cfg.data_dir, "weight": 0.7}, {"data_dir": str(tmp_path / "a"),
                                                                          "weight": 0.3}])
    cfg = gcfg(blend=blend)
    ld = L.build_train_loader(cfg, 0, 1, 50, with_keys=True)
    keys = keys_of(take(ld, 200))  # 10,000 samples
    share = collections.Counter(k.split("/")[0] for k in keys)
    assert abs(share["0"] / 10_000 - 0.7) < 0.01 and abs(share["1"] / 10_000 - 0.3) < 0.01
    full = steps(lambda **kw: gcfg(blend=blend, **kw), dp=2, accum=1, n_steps=6)
    half = [L.build_train_loader(gcfg(blend=blend), r, 2, MB) for r in range(2)]
    for h in half:
        take(h, 3)
    resumed = steps(lambda **kw: gcfg(blend=blend, **kw), dp=1, accum=2, n_steps=3, state=half[0].state_dict())
    assert same_steps(resumed, full[3:])


def test_shard_hash_is_computed_once_per_node_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "shard.tar"
    f.write_bytes(b"x" * 5000)
    calls = []
    real = L.sha256_file
    monkeypatch.setattr(L, "sha256_file", lambda p: calls.append(p) or real(p))
    first = L._sha256_cached(str(f))
    L._hash_cache.clear()  # another process: only the stamp on disk is shared
    assert L._sha256_cached(str(f)) == first == real(str(f)) and len(calls) == 1
    assert len(list((tmp_path / "cache" / "verified").glob("*.json"))) == 1
    f.write_bytes(b"y" * 5000)  # same size, new mtime and content
    L._hash_cache.clear()
    assert L._sha256_cached(str(f)) == real(str(f)) != first and len(calls) == 2
