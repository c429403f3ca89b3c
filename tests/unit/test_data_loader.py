"""Loaders: batch format, data-parallel split, equal steps, epochs, exact resume, validation, errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from loader_helpers import keys_of, same_batch, take

from data_pipeline import loader as L
from data_pipeline.errors import DataError
from data_pipeline.masking import IGNORE_INDEX

PAD, CLS, SEP = 0, 1, 2





def test_batch_format(make_cfg):
    cfg = make_cfg()
    (batch,) = take(L.build_train_loader(cfg, 0, 1, 4), 1)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "token_type_ids"}
    for v in batch.values():
        assert v.dtype == torch.long and v.shape == (4, 64)
    assert torch.all(batch["token_type_ids"] == 0)
    original = torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])
    assert torch.equal(batch["attention_mask"], (original != PAD).long())
    assert torch.all(original[:, 0] == CLS)
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)
    assert torch.all((batch["labels"] != IGNORE_INDEX).sum(1) > 0)


def test_slot_segments_cover_everything_once():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(1, 30, size=int(rng.integers(1, 8))).tolist()
        order = rng.permutation(len(counts)).tolist()
        slots = int(rng.integers(1, 12))
        seen = []
        for s in range(slots):
            segs = L.slot_segments(counts, order, s, slots)
            seen += [(shard, i) for shard, lo, hi in segs for i in range(lo, hi)]
            size = sum(hi - lo for _, lo, hi in segs)
            assert sum(counts) // slots <= size <= -(-sum(counts) // slots)
        assert sorted(seen) == sorted((sh, i) for sh, n in enumerate(counts) for i in range(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_disjoint_equal_steps_and_epochs(make_cfg, prepared, workers):
    cfg = make_cfg(num_workers=workers)
    counts = [s["samples"] for s in prepared["shards"] if s["split"] == "train"]
    assert len(set(counts)) > 1  # unequal shards
    mb, dp = 16, 2
    loaders = [L.build_train_loader(cfg, r, dp, mb, with_keys=True) for r in range(dp)]
    spe = loaders[0].steps_per_epoch
    assert all(x.steps_per_epoch == spe for x in loaders)
    assert spe == max(1, workers) * ((sum(counts) // (dp * max(1, workers))) // mb)
    epochs = []
    for ld in loaders:
        batches = take(ld, spe + 1)
        assert ld.epoch == 1 and ld.state_dict()["consumed_micro_batches"] == spe + 1
        keys = keys_of(batches[:spe])
        assert len(keys) == len(set(keys)) == spe * mb
        epochs.append((set(keys), keys_of(batches[spe:])))
    assert not epochs[0][0] & epochs[1][0]  # ranks see disjoint samples
    assert len(epochs[0][0] | epochs[1][0]) > 0.97 * sum(counts)  # nearly everything every epoch
    assert epochs[0][1] != keys_of(take(L.build_train_loader(cfg, 0, dp, mb, with_keys=True), 1))  # reshuffled


@pytest.mark.parametrize("workers,k", [(0, 5), (2, 7), (2, 8)])
def test_resume_reproduces_the_remaining_batches(make_cfg, workers, k):
    cfg = make_cfg(num_workers=workers)
    mb = 64
    full_loader = L.build_train_loader(cfg, 1, 2, mb, with_keys=True)
    spe = full_loader.steps_per_epoch
    n = spe + 4  # cross an epoch boundary
    full = take(full_loader, n)
    resumed_loader = L.build_train_loader(cfg, 1, 2, mb, with_keys=True)
    resumed_loader.load_state_dict({**full_loader.state_dict(), "consumed_micro_batches": k})
    rest = take(resumed_loader, n - k)
    assert all(same_batch(a, b) for a, b in zip(full[k:], rest))
    late = take(L.build_train_loader(cfg, 1, 2, mb, consumed_micro_batches=spe + 1, with_keys=True), 3)
    assert all(same_batch(a, b) for a, b in zip(full[spe + 1:], late))
    assert resumed_loader.state_dict()["consumed_micro_batches"] == n


def test_resume_refuses_another_layout(make_cfg):
    cfg = make_cfg()
    state = L.build_train_loader(cfg, 0, 2, 8).state_dict()
    with pytest.raises(DataError, match="dp_size"):
        L.build_train_loader(cfg, 0, 4, 8).load_state_dict(state)


def test_fewer_shards_than_readers(make_cfg, data_cfg, prepared, tmp_path):
    """One train shard, 2 ranks x 2 workers: every rank still gets (disjoint) data."""
    d = tmp_path / "one_shard"
    d.mkdir()
    import json

    manifest = json.loads(json.dumps(prepared))
    first = next(s for s in manifest["shards"] if s["split"] == "train")
    manifest["shards"] = [first] + [s for s in manifest["shards"] if s["split"] == "val"]
    for s in manifest["shards"]:
        shutil.copy(os.path.join(data_cfg.data_dir, s["name"]), d / s["name"])
    (d / "manifest.json").write_text(json.dumps(manifest))
    cfg = make_cfg(num_workers=2, data_dir=str(d))
    loaders = [L.build_train_loader(cfg, r, 2, 8, with_keys=True) for r in range(2)]
    spe = loaders[0].steps_per_epoch
    assert spe == 2 * ((first["samples"] // 4) // 8) > 0
    keys = [set(keys_of(take(ld, spe))) for ld in loaders]
    assert len(keys[0]) == len(keys[1]) == spe * 8 and not keys[0] & keys[1]
    with pytest.raises(DataError, match="micro batch"):
        L.build_train_loader(cfg, 0, 2, 1000)


@pytest.mark.parametrize("workers", [0, 2])
def test_val_fixed_and_equal_across_ranks(make_cfg, prepared, workers):
    cfg = make_cfg(num_workers=workers)
    vals = [L.build_val_loader(cfg, r, 2, 8, with_keys=True) for r in range(2)]
    assert len(vals[0]) == len(vals[1]) > 0
    first, second = list(vals[0]), list(vals[0])
    assert len(first) == len(vals[0]) and all(same_batch(a, b) for a, b in zip(first, second))
    other = list(vals[1])
    assert not set(keys_of(first)) & set(keys_of(other))
    capped = L.build_val_loader(cfg, 0, 2, 8, max_batches=3, with_keys=True)
    assert len(capped) == 3 and all(same_batch(a, b) for a, b in zip(list(capped), first[:3]))
    if workers == 0:  # fixed order: rank 0 starts at the first val sample
        assert all(k.startswith("val-") for k in keys_of(first))
        assert keys_of(first)[:8] == [f"val-{i:09d}" for i in range(8)]


def test_missing_manifest_and_shard(tmp_path, make_cfg, data_cfg):
    with pytest.raises(DataError) as err:
        L.read_manifest(str(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and f"no manifest.json in {tmp_path}" in msg and "data_pipeline.prepare" in msg
    with pytest.raises(DataError):
        L.build_train_loader(make_cfg(data_dir=str(tmp_path)), 0, 1, 4)
    shutil.copy(os.path.join(data_cfg.data_dir, "manifest.json"), tmp_path / "manifest.json")
    with pytest.raises(DataError, match="missing") as err:
        L.read_manifest(str(tmp_path))
    assert "\n" not in str(err.value)
    assert L.read_manifest(data_cfg.data_dir, verify=True)["seq_len"] == 64


def test_seq_len_mismatch(make_cfg):
    with pytest.raises(DataError, match="seq_len"):
        L.build_train_loader(make_cfg(seq_len=128), 0, 1, 4)
