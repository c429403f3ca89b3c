"""Bad data and remote shards in the loaders: skipped-and-counted corruption with equal step counts,
the checksum policy, the tokenizer check, and shards read over http and through ``pipe:``."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from loader_helpers import copy_prepared, keys_of, rehash, same_batch, take

from data_pipeline import loader as L
from data_pipeline.errors import DataError


def _train(manifest: dict) -> list[dict]:
    return [s for s in manifest["shards"] if s["split"] == "train"]


def _readable(path: str) -> int:
    """Complete samples a (possibly truncated) tar yields before it breaks."""
    n = 0
    try:
        with tarfile.open(path, "r|*") as tf:
            for member in tf:
                tf.extractfile(member).read()
                n += 1
    except (tarfile.TarError, OSError, EOFError):
        pass
    return n


def _break_one_sample(path: str, index: int) -> str:
    """Rewrite the tar at ``path`` with the ``ids.npy`` of sample ``index`` replaced by garbage; its key."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for i, (m, data) in enumerate(members):
            if i == index:
                data = b"not a numpy file"
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data))
    with open(path, "wb") as f:
        f.write(out.getvalue())
    return members[index][0].name.split(".")[0]


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory, data_cfg, prepared):
    """A copy with a truncated shard, a garbage shard, a missing shard and one undecodable sample.

    The manifest is rewritten to match (the shards were bad when hashed, or were read remotely), so
    only the read-time checks see the damage. Returns (dir, expected skip count, keys never to appear).
    """
    d = tmp_path_factory.mktemp("corrupt") / "data"
    manifest = copy_prepared(data_cfg.data_dir, d)
    trunc, garbage, missing, broken = _train(manifest)[:4]
    p = d / trunc["name"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2 + 100])
    (d / garbage["name"]).write_bytes(os.urandom(4096))
    (d / missing["name"]).unlink()
    bad_key = _break_one_sample(str(d / broken["name"]), 5)
    good_trunc = _readable(str(p))
    assert 0 < good_trunc < trunc["samples"]
    rehash(d, manifest)
    expected = (trunc["samples"] - good_trunc) + garbage["samples"] + missing["samples"] + 1
    never = {bad_key}
    for s in (garbage, missing):  # their keys, from the intact originals
        with tarfile.open(os.path.join(data_cfg.data_dir, s["name"])) as tf:
            never |= {m.name.split(".")[0] for m in tf.getmembers()}
    return str(d), expected, never


def test_reader_skips_and_counts_every_bad_sample(make_cfg, corrupt):
    d, expected, never = corrupt
    split = L._Split(make_cfg(data_dir=d), "train")
    reader = split.reader()
    keys = [k for k, _ in reader.read([(i, 0, n) for i, n in enumerate(split.counts)])]
    assert reader.skipped == expected
    assert len(keys) == split.total - expected and not set(keys) & never


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_data_training_goes_on_with_equal_steps(make_cfg, corrupt, workers):
    d, expected, never = corrupt
    cfg = make_cfg(num_workers=workers, data_dir=d)
    dp, mb = 2, 16
    loaders = [L.build_train_loader(cfg, r, dp, mb, with_keys=True) for r in range(dp)]
    spe = loaders[0].steps_per_epoch
    assert spe == loaders[1].steps_per_epoch == max(1, workers) * ((L._Split(cfg, "train").total
                                                                    // (dp * max(1, workers))) // mb)
    for ld in loaders:
        batches = take(ld, spe + 1)  # a whole epoch and into the next: no rank runs short
        assert len(batches) == spe + 1 and all(b["input_ids"].shape == (mb, 64) for b in batches)
        keys = keys_of(batches[:spe])
        # refills repeat samples another slot reads, never more than were skipped; bad ones never show
        assert len(keys) - len(set(keys)) <= ld.corrupt_samples_skipped and not set(keys) & never
    skipped = [ld.corrupt_samples_skipped for ld in loaders]
    assert 0 < sum(skipped) <= 2 * expected  # at most every bad sample in each of the two epochs started
    assert loaders[0].state_dict()["corrupt_samples_skipped"] == skipped[0]


def test_short_rank_refills_from_the_next_samples(make_cfg, data_cfg, tmp_path):
    """Only 2 of the train shards are left: the ranks whose ranges held the rest refill, same step count."""
    manifest = copy_prepared(data_cfg.data_dir, tmp_path / "d")
    for s in _train(manifest)[2:]:
        (tmp_path / "d" / s["name"]).unlink()
    cfg = make_cfg(data_dir=str(tmp_path / "d"))
    loaders = [L.build_train_loader(cfg, r, 2, 8, with_keys=True) for r in range(2)]
    spe = loaders[0].steps_per_epoch
    for ld in loaders:
        batches = take(ld, spe)
        assert len(batches) == spe and len(set(keys_of(batches))) <= 2 * 250
    assert sum(ld.corrupt_samples_skipped for ld in loaders) > 0
    for s in _train(manifest)[:2]:
        (tmp_path / "d" / s["name"]).unlink()
    with pytest.raises(DataError, match="no readable sample") as err:  # nothing left: an error, not a hang
        take(L.build_train_loader(cfg, 0, 2, 8), 1)
    assert "\n" not in str(err.value)


def test_checksum_mismatch_error_and_skip(make_cfg, data_cfg, prepared, tmp_path):
    manifest = copy_prepared(data_cfg.data_dir, tmp_path / "d")
    shard = _train(manifest)[1]
    p = tmp_path / "d" / shard["name"]
    raw = bytearray(p.read_bytes())
    raw[700] ^= 0xFF  # same size, different sha256
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        L.build_train_loader(make_cfg(data_dir=str(tmp_path / "d")), 0, 1, 8)
    msg = str(err.value)
    assert "\n" not in msg and str(p) in msg and "sha256" in msg and "on_checksum_mismatch=skip" in msg
    cfg = make_cfg(data_dir=str(tmp_path / "d"), on_checksum_mismatch="skip")
    split = L._Split(cfg, "train")
    reader = split.reader()
    keys = list(reader.read([(i, 0, n) for i, n in enumerate(split.counts)]))
    assert reader.skipped == shard["samples"] and len(keys) == split.total - shard["samples"]
    ld = L.build_train_loader(cfg, 0, 2, 8)
    assert len(take(ld, ld.steps_per_epoch)) == ld.steps_per_epoch


def test_tokenizer_mismatch(make_cfg, data_cfg, tmp_path):
    with pytest.raises(DataError, match="another tokenizer") as err:
        L.build_train_loader(make_cfg(vocab_size=1024), 0, 1, 8)
    assert "\n" not in str(err.value) and "data.vocab_size=512" in str(err.value)
    copy_prepared(data_cfg.data_dir, tmp_path / "d")
    (tmp_path / "d" / "tokenizer.model").write_bytes(b"some other tokenizer")
    with pytest.raises(DataError, match="another tokenizer") as err:
        L.build_val_loader(make_cfg(data_dir=str(tmp_path / "d")), 0, 1, 8)
    assert "\n" not in str(err.value) and "tokenizer.model" in str(err.value)


def test_remote_shards_give_the_same_batches(make_cfg, data_cfg, http_url):
    local = make_cfg()
    want = take(L.build_train_loader(local, 1, 2, 16, with_keys=True), 4)
    want_val = list(L.build_val_loader(local, 0, 1, 8, max_batches=2, with_keys=True))
    remotes = {"manifest at a URL": make_cfg(data_dir=http_url),
               "http prefix": make_cfg(shard_url_prefix=http_url + "/"),
               "pipe": make_cfg(shard_url_prefix=f"pipe:cat {data_cfg.data_dir}/{{name}}")}
    for what, cfg in remotes.items():
        got = take(L.build_train_loader(cfg, 1, 2, 16, with_keys=True), 4)
        assert all(same_batch(a, b) for a, b in zip(want, got)) and len(got) == 4, what
        val = list(L.build_val_loader(cfg, 0, 1, 8, max_batches=2, with_keys=True))
        assert len(val) == 2 and all(same_batch(a, b) for a, b in zip(want_val, val)), what
    assert L.read_manifest(http_url) == L.read_manifest(data_cfg.data_dir)


def test_unreachable_remote_shard_is_skipped(make_cfg, http_url):
    cfg = make_cfg(shard_url_prefix=http_url + "/nowhere/")
    split = L._Split(cfg, "train")
    reader = split.reader()
    assert list(reader.read([(0, 0, split.counts[0])])) == [] and reader.skipped == split.counts[0]


def test_resume_over_bad_data_is_exact(make_cfg, corrupt):
    cfg = make_cfg(data_dir=corrupt[0])
    full_loader = L.build_train_loader(cfg, 0, 2, 32, with_keys=True)
    full = take(full_loader, full_loader.steps_per_epoch + 2)
    k = full_loader.steps_per_epoch - 3
    resumed = L.build_train_loader(cfg, 0, 2, 32, with_keys=True)
    resumed.load_state_dict({**full_loader.state_dict(), "consumed_micro_batches": k})
    assert all(same_batch(a, b) for a, b in zip(full[k:], take(resumed, len(full) - k)))


def test_new_data_fields_are_validated():
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="on_checksum_mismatch") as err:
        load_config(None, ["data.on_checksum_mismatch=ignore"])
    assert "\n" not in str(err.value) and "error, skip" in str(err.value)
    with pytest.raises(ConfigError, match="only placeholder allowed is one {name}"):
        load_config(None, ["data.shard_url_prefix=pipe:cat /d/{shard}"])
    assert L.shard_location("/d", "a.tar", "pipe:cat /x/{name}") == "pipe:cat /x/a.tar"
    assert L.shard_location("http://h/d/", "a.tar") == "http://h/d/a.tar"
