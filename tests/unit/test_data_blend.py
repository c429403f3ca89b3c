"""Corpus blending (data.blend): proportions, determinism, exact resume, equal steps across ranks,
the shared-tokenizer check and the config validation of data.blend."""

from __future__ import annotations

import collections
import json
import os
import shutil

import pytest
from loader_helpers import keys_of, same_batch, take

from data_pipeline import loader as L
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import sha256_file
from launch.config import ConfigError, load_config


def _subset(src: str, dst, pick) -> str:
    """A prepared dir in ``dst`` with the train shards ``pick`` keeps (by index), all val shards, the tokenizer."""
    dst.mkdir()
    manifest = json.loads(open(os.path.join(src, "manifest.json")).read())
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    manifest["shards"] = pick(train) + [s for s in manifest["shards"] if s["split"] == "val"]
    for name in [s["name"] for s in manifest["shards"]] + [manifest["tokenizer"]["path"]]:
        shutil.copy(os.path.join(src, name), dst / name)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return str(dst)


@pytest.fixture(scope="module")
def dirs(data_cfg, prepared, tmp_path_factory) -> tuple[str, str]:
    """Two prepared dirs with one tokenizer: disjoint slices (13 and 4 shards) of the shared train shards."""
    root = tmp_path_factory.mktemp("blend")
    a = _subset(data_cfg.data_dir, root / "a", lambda t: t[: len(t) // 2])
    b = _subset(data_cfg.data_dir, root / "b", lambda t: t[-4:])
    return a, b


@pytest.fixture(scope="module")
def blend_cfg(make_cfg, dirs):
    def make(weights=(0.7, 0.3), num_workers: int = 0, **data):
        blend = json.dumps([{"data_dir": d, "weight": w} for d, w in zip(dirs, weights)])
        return make_cfg(num_workers=num_workers, blend=blend, **data)

    return make


def test_schedule_exact_at_every_prefix():
    quotas = L.blend_quotas([0.5, 0.2, 0.3])
    assert sum(quotas) == L.BLEND_PERIOD
    choice, prefix = L.blend_schedule(quotas)
    for n in list(range(1, 5000)) + [L.BLEND_PERIOD, 3 * L.BLEND_PERIOD + 17]:
        counts = L.blend_counts(quotas, n)
        assert sum(counts) == n
        assert all(abs(c - q * n / L.BLEND_PERIOD) < 1 for c, q in zip(counts, quotas))
    assert L.blend_counts(quotas, 2 * L.BLEND_PERIOD + 5) == [2 * q + int(c) for q, c in zip(quotas, prefix[5])]
    assert L.blend_quotas([1, 1]) == (L.BLEND_PERIOD // 2, L.BLEND_PERIOD // 2)


def test_realized_proportions_over_10k_samples(blend_cfg):
    mb, n = 50, 200  # 10,000 samples: several epochs of the smaller dataset
    ld = L.build_train_loader(blend_cfg((0.7, 0.3)), 0, 1, mb, with_keys=True)
    assert isinstance(ld, L.BlendedTrainLoader)
    keys = keys_of(take(ld, n))
    share = collections.Counter(k.split("/")[0] for k in keys)
    assert len(keys) == 10_000
    assert abs(share["0"] / 10_000 - 0.7) < 0.01 and abs(share["1"] / 10_000 - 0.3) < 0.01
    assert ld.state_dict()["dataset_samples"] == [share["0"], share["1"]]
    assert ld.state_dict()["dataset_epochs"][1] >= 1  # the small dataset went round at least once


def test_deterministic(blend_cfg):
    cfg = blend_cfg((0.6, 0.4))
    one = take(L.build_train_loader(cfg, 0, 1, 16, with_keys=True), 12)
    two = take(L.build_train_loader(cfg, 0, 1, 16, with_keys=True), 12)
    assert all(same_batch(a, b) for a, b in zip(one, two))
    assert {k.split("/")[0] for k in keys_of(one)} == {"0", "1"}  # batches mix the datasets


@pytest.mark.parametrize("workers,k", [(0, 7), (2, 9)])
def test_exact_resume(blend_cfg, workers, k):
    cfg = blend_cfg((0.7, 0.3), num_workers=workers)
    mb = 24  # 0.3 * 24 is fractional: the resume point falls inside the datasets' batches
    full_loader = L.build_train_loader(cfg, 1, 2, mb, with_keys=True)
    n = 60  # dataset 1 (421 samples per rank) goes into its second epoch
    full = take(full_loader, n)
    assert full_loader.state_dict()["dataset_epochs"] == [0, 1]
    stopped = L.build_train_loader(cfg, 1, 2, mb, with_keys=True)
    take(stopped, k)
    state = stopped.state_dict()
    assert state["consumed_micro_batches"] == k and sum(state["dataset_samples"]) == k * mb
    assert any(c % mb for c in state["dataset_samples"])
    resumed = L.build_train_loader(cfg, 1, 2, mb, with_keys=True)
    resumed.load_state_dict(state)
    rest = take(resumed, n - k)
    assert len(rest) == n - k and all(same_batch(a, b) for a, b in zip(full[k:], rest))
    assert resumed.state_dict()["consumed_micro_batches"] == n
    late = L.build_train_loader(cfg, 1, 2, mb, consumed_micro_batches=n - 5, with_keys=True)  # near 1's new epoch
    assert all(same_batch(a, b) for a, b in zip(full[n - 5:], take(late, 5)))
    with pytest.raises(DataError, match="data.blend"):  # other weights, other schedule: refused
        L.build_train_loader(blend_cfg((0.5, 0.5), num_workers=workers), 1, 2, mb).load_state_dict(state)


def test_two_ranks_equal_steps_disjoint(blend_cfg):
    cfg = blend_cfg((0.7, 0.3))
    loaders = [L.build_train_loader(cfg, r, 2, 16, with_keys=True) for r in range(2)]
    spe = loaders[0].steps_per_epoch
    assert spe == loaders[1].steps_per_epoch == sum(x.steps_per_epoch for x in loaders[0].loaders)
    keys = [keys_of(take(ld, 20)) for ld in loaders]
    assert len(keys[0]) == len(keys[1]) == 20 * 16
    assert [ld.state_dict()["dataset_samples"] for ld in loaders][0] == loaders[1].state_dict()["dataset_samples"]
    assert not set(keys[0]) & set(keys[1])


def test_empty_blend_is_the_plain_loader(make_cfg):
    cfg = make_cfg()
    assert cfg.data.blend == []
    assert type(L.build_train_loader(cfg, 0, 1, 4)) is L.TrainLoader


def test_tokenizer_mismatch_one_line(blend_cfg, dirs, tmp_path):
    other = tmp_path / "other_tok"
    shutil.copytree(dirs[1], other)
    manifest = json.loads((other / "manifest.json").read_text())
    tok = other / manifest["tokenizer"]["path"]
    tok.write_bytes(tok.read_bytes() + b"\0")
    manifest["tokenizer"]["sha256"] = sha256_file(str(tok))
    (other / "manifest.json").write_text(json.dumps(manifest))
    cfg = blend_cfg()
    cfg.data.blend[1]["data_dir"] = str(other)
    with pytest.raises(DataError) as err:
        L.build_train_loader(cfg, 0, 1, 8)
    msg = str(err.value)
    assert "\n" not in msg and "data.blend[1]" in msg and "tokenizer" in msg


@pytest.mark.parametrize("blend,match", [
    ('[{data_dir: a, weight: -0.5}, {data_dir: b, weight: 1}]', r"data.blend\[0\].weight=-0.5 must be"),
    ('[{data_dir: a, weight: 0}, {data_dir: b, weight: 0.0}]', "all zero"),
    ('[{data_dir: a, weight: 1, wieght: 2}]', r"unknown config key 'data.blend\[0\].wieght'; valid keys"),
    ('[{data_dir: a}]', "no weight"),
    ('[{data_dir: a, weight: lots}]', "must be a finite number"),
    ('[a]', "must be a mapping"),
])
def test_bad_blend_config_one_line(blend, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, [f"data.blend={blend}"])
    assert "\n" not in str(err.value)


def test_good_blend_config():
    cfg = load_config(None, ["data.blend=[{data_dir: a, weight: 3}, {data_dir: b, weight: 1}]"])
    assert cfg.data.blend == [{"data_dir": "a", "weight": 3}, {"data_dir": "b", "weight": 1}]
    assert L.blend_quotas([e["weight"] for e in cfg.data.blend]) == (3 * L.BLEND_PERIOD // 4, L.BLEND_PERIOD // 4)


def test_prepare_with_another_dirs_tokenizer_then_blend(data_cfg, prepared, blend_cfg, dirs, tmp_path):
    """data.tokenizer_model: a different corpus sharded with the shared dir's tokenizer (no training)
    gets the same tokenizer sha256, so it blends with that dir; a batch mixes samples of both."""
    import dataclasses
    import random

    from data_pipeline.prepare import prepare_data

    rng = random.Random(0)
    words = "alpha beta gamma delta shard tensor rank epoch token batch loss weight layer head".split()
    text = tmp_path / "other.txt"
    text.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."
                                for _ in range(400)))
    own = os.path.join(data_cfg.data_dir, prepared["tokenizer"]["path"])
    cfg = dataclasses.replace(data_cfg, corpus=[str(text)], data_dir=str(tmp_path / "other"), tokenizer_model=own)
    manifest = prepare_data(cfg)
    assert manifest["tokenizer"]["sha256"] == prepared["tokenizer"]["sha256"] and manifest["tokenizer"]["reused"]
    assert manifest["splits"]["train"]["samples"] > 0
    assert prepare_data(cfg)["created"] == manifest["created"]  # up to date: nothing redone

    blended = blend_cfg((0.5, 0.5))
    blended.data.blend[1]["data_dir"] = cfg.data_dir
    keys = keys_of(take(L.build_train_loader(blended, 0, 1, 16, with_keys=True), 4))
    assert collections.Counter(k.split("/")[0] for k in keys) == {"0": 32, "1": 32}

    with pytest.raises(DataError, match=r"^data.tokenizer_model=\S+ has 512 pieces but data.vocab_size=256; "
                                        r"set data.vocab_size=512$"):
        prepare_data(dataclasses.replace(cfg, vocab_size=256, data_dir=str(tmp_path / "x")))
    with pytest.raises(DataError, match=r"^data.tokenizer_model=\S+: no such file"):
        prepare_data(dataclasses.replace(cfg, tokenizer_model=str(tmp_path / "none.model"),
                                         data_dir=str(tmp_path / "y")))
