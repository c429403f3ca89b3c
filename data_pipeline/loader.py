"""Train and validation loaders over the webdataset shards, data-parallel aware and exactly resumable.

The default train order (``data.order: global``) lives in :mod:`data_pipeline.global_order`: random
access, independent of the data-parallel size and the workers. This module holds what it shares (manifest,
shard checks, decoding, blend schedule), the validation loader, and the streamed train order
(``data.order: stream``) described next, for shards that can only be read front to back.

Streamed train pipeline, per data-parallel rank (``dp_rank`` / ``dp_size`` are arguments: tensor-parallel peers
pass the same data-parallel rank and get the same batches; ``torch.distributed``'s global rank is
never consulted):

1. **order**: in epoch ``e`` the train shards are permuted with a generator seeded by (seed, e);
   their samples, concatenated in that order, form the epoch's sample sequence of length N;
2. **split by rank, then by worker**: with W = max(1, num_workers) DataLoader workers there are
   ``dp_size * W`` slots; slot ``dp_rank * W + worker`` owns the contiguous range
   ``[slot * N // S, (slot + 1) * N // S)`` of that sequence. Whole shards go to one slot when they
   fit; a shard that straddles a boundary is read by both slots, each taking its part (a tar is read
   sequentially, so a slot skips the samples before its range). Slots never overlap, every rank
   gets data even with fewer shards than slots, and unequal shards cannot unbalance the ranks;
3. **seeded shuffle**: a buffer of ``data.shuffle_buffer`` samples per slot, seeded by
   (seed, epoch, slot) through sha256 (no pid/time seeds);
4. **decode** ``ids.npy`` -> **mask** with :func:`data_pipeline.masking.mask_rng` (seed, epoch, key)
   -> **batch** of ``micro_batch_size``;
5. every worker yields exactly ``(N // S) // micro_batch_size`` batches per epoch (the tail is
   dropped), so every rank takes the same ``steps_per_epoch = W * that`` micro-batches per epoch,
   and the DataLoader's round-robin over workers makes the batch order a pure function of
   (seed, dp_rank, dp_size, num_workers, micro_batch_size). It is infinite: epochs follow each other.

Bad data (training goes on): a shard that cannot be opened or read (missing file, unreachable URL,
garbage bytes, a tar truncated mid-way) and a sample whose ``ids.npy`` does not decode to ``seq_len``
integer ids are skipped with a warning and counted in ``TrainLoader.corrupt_samples_skipped`` (the
trainer logs it as ``data/corrupt_samples_skipped``, summed over data-parallel ranks). A local shard
whose size or sha256 differs from the manifest is a one-line error by default; with
``data.on_checksum_mismatch: skip`` its samples are skipped and counted the same way. **Equal step
counts**: the plan (slots, ``steps_per_epoch``) comes from the manifest's sample counts, never from what
could be read, so every rank keeps its step count; a slot left short by skipped samples **refills** from
the samples after its range (the next slots' ranges in the epoch's order, wrapping around; read
unshuffled, not counted again), so no sample is invented and only the short slot's batches change. If no
sample of the split can be read at all, the loader raises DataError.

Remote shards: ``data.data_dir`` may be an http(s) URL (manifest.json is fetched from it and the shards
are read next to it), and ``data.shard_url_prefix`` may name where the shards live: a directory, a URL,
or a ``pipe:`` command, with ``{name}`` standing for the shard's file name when it is not last
(``pipe:aws s3 cp s3://bucket/data/{name} -``). Streams are opened with ``webdataset.gopen``. Remote
shards are not checksummed (each slot streams only part of a shard; hashing would need a second full
download): only the tar and sample checks above apply to them.

Resume: ``build_train_loader(..., consumed_micro_batches=k)`` (or ``load_state_dict``) continues
with exactly the batches an uninterrupted run yields after its first k: workers replay their
epoch's stream without decoding or masking the skipped batches, and at most W-1 batches are
produced and dropped to re-align the round-robin. Resuming needs the same dp_size, num_workers,
micro_batch_size and shards; :meth:`TrainLoader.load_state_dict` refuses anything else (the trainer
then stops with a one-line error unless ``data.resume: approximate``).

Blending (``data.blend``, see :class:`BlendedTrainLoader`): one train loader as above per prepared dir,
interleaved sample by sample by a fixed schedule over this rank's sample positions (largest deficit
``weight * (i + 1) - taken`` first), so proportions match the weights to within one sample and resume
follows from the consumed count. Empty ``data.blend`` leaves everything above unchanged.

Validation: the val shards in manifest order, no shuffle, split into contiguous ranges the same way,
masks seeded by (seed, 0, key) so every evaluation sees identical batches; finite.

Batches: ``{"input_ids", "attention_mask", "labels", "token_type_ids"}``, int64 tensors of shape
``[micro_batch_size, seq_len]``; attention_mask is 1 at real tokens and 0 at [PAD]; labels are -100
where nothing is predicted; token_type_ids are zeros.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import random
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.errors import DataError
from data_pipeline.masking import Masker, word_start_table
from data_pipeline.prepare import FORMAT_VERSION, MANIFEST, SAMPLE_KEY
from data_pipeline.tokenizer import sha256_file

log = logging.getLogger(__name__)

_PREPARE_HINT = "python -m data_pipeline.prepare --config <your config>"
_warned: set[str] = set()
_SKIPPED = "_corrupt_samples_skipped"  # private batch key: samples skipped since the worker's last batch
_hash_cache: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, so rebuilt loaders do not re-hash


def is_remote(location: str) -> bool:
    """True for locations only webdataset's gopen can open (``pipe:`` commands, URLs)."""
    return location.startswith("pipe:") or "://" in location


def shard_location(data_dir: str, name: str, prefix: str = "") -> str:
    """Where shard ``name`` is read from: ``prefix`` (``{name}`` replaced, else ``prefix/name``) or ``data_dir``."""
    base = prefix or data_dir
    if "{name}" in base:
        return base.replace("{name}", name)
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def cache_root() -> str:
    """bertforge's per-user cache (``$BERTFORGE_CACHE_DIR``, else ``~/.cache/bertforge``)."""
    return os.environ.get("BERTFORGE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bertforge")


def _sha256_cached(path: str) -> str:
    """sha256 of a local file, computed once per node: a stamp in ``<cache_root>/verified`` records it with
    the file's size and mtime, and every later process (another rank, a worker, the next launch) whose
    file still has that size and mtime reads the stamp instead of hashing the file again. A lock makes
    the ranks of a node that start together wait for the first one's hash. Without a writable cache
    the file is hashed in every process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key in _hash_cache:
        return _hash_cache[key]
    stamp = os.path.join(cache_root(), "verified",
                         hashlib.sha256(key[0].encode()).hexdigest()[:32] + ".json")
    try:
        os.makedirs(os.path.dirname(stamp), exist_ok=True)
        lock = open(stamp + ".lock", "a")
    except OSError:
        _hash_cache[key] = sha256_file(path)
        return _hash_cache[key]
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(stamp) as f:
                rec = json.load(f)
            if (rec.get("path"), rec.get("size"), rec.get("mtime_ns")) == key:
                _hash_cache[key] = str(rec["sha256"])
                return _hash_cache[key]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        digest = sha256_file(path)
        _hash_cache[key] = digest
        tmp = f"{stamp}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                json.dump({"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": digest}, f)
            os.replace(tmp, stamp)
        except OSError:
            pass
    return digest


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def read_manifest(data_dir: str, verify: bool = False) -> dict:
    """Load ``<data_dir>/manifest.json`` (``data_dir`` may be an http(s) URL) and check its shard files.

    A local shard file that is missing is a warning (the train loader skips and counts it) unless every
    shard is missing (a wrong or unprepared ``data_dir``). With ``verify``, every local shard must exist
    and match the manifest's size and sha256. Remote shards are not checked here.

    Raises:
        DataError: missing or unreadable manifest, all shard files missing, (``verify``) a changed shard.
    """
    path = shard_location(data_dir, MANIFEST)
    try:
        if is_remote(data_dir):
            with wds.gopen(path, "rb") as f:
                manifest = json.loads(f.read().decode())
        else:
            if not os.path.isfile(path):
                raise DataError(f"no {MANIFEST} in {data_dir}: run `{_PREPARE_HINT}` first")
            with open(path) as f:
                manifest = json.load(f)
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        msg = str(e).replace("\n", " ")
        raise DataError(f"{path} is unreadable ({msg}); re-run `{_PREPARE_HINT}`") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} has format {manifest.get('format')}, this code reads {FORMAT_VERSION}; "
                        f"re-run `{_PREPARE_HINT}`")
    if is_remote(data_dir):
        return manifest
    missing = [s["name"] for s in manifest["shards"] if not os.path.isfile(os.path.join(data_dir, s["name"]))]
    if missing and (verify or len(missing) == len(manifest["shards"])):
        raise DataError(f"shard {os.path.join(data_dir, missing[0])} listed in {path} is missing "
                        f"({len(missing)} of {len(manifest['shards'])} missing); re-run `{_PREPARE_HINT}`")
    if missing:
        log.warning("%d shard(s) listed in %s are missing (first: %s); their samples will be skipped",
                    len(missing), path, missing[0])
    if verify:
        for shard in manifest["shards"]:
            p = os.path.join(data_dir, shard["name"])
            if os.path.getsize(p) != shard["bytes"] or sha256_file(p) != shard["sha256"]:
                raise DataError(f"shard {p} does not match {path} (size or sha256); re-run `{_PREPARE_HINT}`")
    return manifest


# --------------------------------------------------------------------------------------------
# Pure planning helpers
# --------------------------------------------------------------------------------------------


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from ``parts`` via sha256 (stable across processes, never Python's hash())."""
    return int.from_bytes(hashlib.sha256("\0".join(map(str, parts)).encode()).digest()[:8], "little")


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The permutation of shard indices used in ``epoch``."""
    rng = np.random.Generator(np.random.PCG64(derive_seed(seed, epoch, "shards")))
    return rng.permutation(num_shards).tolist()


def slot_segments(counts: list[int], order: list[int], slot: int, num_slots: int) -> list[tuple[int, int, int]]:
    """``(shard, lo, hi)`` pieces of the slot's contiguous range of the concatenated samples."""
    total = sum(counts)
    a, b = slot * total // num_slots, (slot + 1) * total // num_slots
    segments, offset = [], 0
    for shard in order:
        n = counts[shard]
        lo, hi = max(a, offset), min(b, offset + n)
        if lo < hi:
            segments.append((shard, lo - offset, hi - offset))
        offset += n
        if offset >= b:
            break
    return segments


def batches_per_slot(total: int, num_slots: int, micro_batch_size: int) -> int:
    """Batches every slot can deliver: its smallest range, floor-divided into micro batches."""
    return (total // num_slots) // micro_batch_size


def _tar_samples(location: str) -> Iterator[dict]:
    """The samples of one tar shard, opened with ``webdataset.gopen`` (a path, URL or ``pipe:``)."""
    stream = wds.gopen(location, "rb")
    try:
        files = ({**f, "__url__": location} for f in wds.tariterators.tar_file_iterator(stream))
        yield from wds.tariterators.group_by_keys(files)
    finally:
        stream.close()


class SegmentReader:
    """Reads ``(key, ids)`` of the samples in segments, skipping what cannot be read (see module doc).

    Attributes:
        skipped: samples skipped so far (unreadable shards, tails of broken tars, undecodable samples).
    """

    def __init__(self, locations: list[str], bad: dict[int, str], seq_len: int) -> None:
        self.locations, self.bad, self.seq_len = locations, bad, seq_len
        self.skipped = 0

    def _skip(self, n: int, count: bool, msg: str, *args) -> None:
        if count and n > 0:
            self.skipped += n
            log.warning("skipping %d sample(s): " + msg, n, *args)

    def decode(self, sample: dict) -> np.ndarray | None:
        """The sample's ids, or None when its ``ids.npy`` is missing or not ``seq_len`` integers."""
        try:
            ids = np.load(io.BytesIO(sample[SAMPLE_KEY]), allow_pickle=False)
        except (KeyError, ValueError, OSError, EOFError):
            return None
        if ids.ndim != 1 or len(ids) != self.seq_len or ids.dtype.kind not in "iu":
            return None
        return ids

    def read(self, segments: list[tuple[int, int, int]], count: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """Yield the readable samples of ``segments``; ``count=False`` skips silently (refill reads)."""
        for shard, lo, hi in segments:
            loc = self.locations[shard]
            if shard in self.bad:
                self._skip(hi - lo, count, "shard %s %s", loc, self.bad[shard])
                continue
            i = 0
            samples = _tar_samples(loc)
            try:
                for sample in samples:
                    if i >= hi:
                        break
                    if i >= lo:
                        ids = self.decode(sample)
                        if ids is None:
                            self._skip(1, count, "sample %s of shard %s does not decode to %d ids",
                                       sample.get("__key__"), loc, self.seq_len)
                        else:
                            yield sample["__key__"], ids
                    i += 1
            except (OSError, ValueError, EOFError, tarfile.TarError, KeyError) as e:
                self._skip(hi - max(i, lo), count, "shard %s is unreadable after %d samples (%s)",
                           loc, i, str(e).splitlines()[0] if str(e) else type(e).__name__)
                i = hi
            finally:
                samples.close()
            self._skip(hi - max(i, lo), count, "shard %s ends after %d samples, %s says %d",
                       loc, i, MANIFEST, hi)


def slot_stream(reader: SegmentReader, counts: list[int], order: list[int], slot: int, num_slots: int,
                shuffle: int, rng: random.Random) -> Iterator[tuple[str, np.ndarray]]:
    """The slot's own samples (buffer-shuffled), then refill samples from the following slots' ranges.

    Raises:
        DataError: the refill went all the way round without finding a readable sample.
    """
    yield from shuffle_buffer(reader.read(slot_segments(counts, order, slot, num_slots)), shuffle, rng)
    while True:
        found = False
        for k in range(1, num_slots + 1):
            for item in reader.read(slot_segments(counts, order, (slot + k) % num_slots, num_slots), count=False):
                found = True
                yield item
        if not found:
            raise DataError(f"no readable sample in {len(counts)} shard(s) (first: {reader.locations[0]}); "
                            f"check the warnings above, then re-run `{_PREPARE_HINT} --force`")


def shuffle_buffer(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """Seeded buffer shuffle: keep ``size`` items, emit a random one per new item, then the rest."""
    if size <= 1:
        yield from stream
        return
    buf: list = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class _Collate:
    """Decode, mask and stack one micro batch."""

    def __init__(self, masker: Masker, pad_id: int, seed: int, with_keys: bool) -> None:
        self.masker, self.pad_id, self.seed, self.with_keys = masker, pad_id, seed, with_keys

    def __call__(self, samples: list[tuple[str, np.ndarray]], epoch: int) -> dict:
        inputs, labels, attn = [], [], []
        for key, ids in samples:
            x, y = self.masker(ids, self.seed, epoch, key)
            inputs.append(x)
            labels.append(y)
            attn.append(ids != self.pad_id)
        input_ids = torch.from_numpy(np.stack(inputs))
        batch = {"input_ids": input_ids,
                 "attention_mask": torch.from_numpy(np.stack(attn).astype(np.int64)),
                 "labels": torch.from_numpy(np.stack(labels)),
                 "token_type_ids": torch.zeros_like(input_ids)}
        if self.with_keys:
            batch["keys"] = [k for k, _ in samples]
        return batch


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _Split:
    """The shards of one split and what the loaders need from the manifest."""

    def __init__(self, cfg, split: str, data_dir: str | None = None) -> None:
        d = cfg.data
        self.data_dir = data_dir or d.data_dir
        manifest = read_manifest(self.data_dir)
        if manifest["seq_len"] != d.seq_len:
            raise DataError(f"shards in {self.data_dir} hold seq_len={manifest['seq_len']} but data.seq_len="
                            f"{d.seq_len}; re-run `{_PREPARE_HINT}` or set data.seq_len={manifest['seq_len']}")
        self._check_tokenizer(d, manifest)
        changed = [k for k, v in manifest["data_config"].items() if getattr(d, k, v) != v and k != "seq_len"]
        if changed and self.data_dir not in _warned:
            _warned.add(self.data_dir)
            log.warning("data config differs from the one %s was prepared with (%s); using the shards as they are",
                        os.path.join(self.data_dir, MANIFEST), ", ".join(changed))
        self.manifest = manifest
        shards = [s for s in manifest["shards"] if s["split"] == split]
        prefix = getattr(d, "shard_url_prefix", "")
        self.paths = [shard_location(self.data_dir, s["name"], prefix) for s in shards]
        self.counts = [int(s["samples"]) for s in shards]
        self.total = sum(self.counts)
        self.seq_len = int(manifest["seq_len"])
        self.bad = self._check_shards(shards, getattr(d, "on_checksum_mismatch", "error"))
        sp = manifest["special_ids"]
        self.pad_id = sp["pad"]
        masking = getattr(d, "masking", "token")
        word_start = (word_start_table(os.path.join(self.data_dir, manifest["tokenizer"]["path"]),
                                       manifest["tokenizer"]["sha256"]) if masking == "whole_word" else None)
        self.masker = Masker(special_ids=frozenset(sp.values()), vocab_size=manifest["vocab_size"],
                             mask_id=sp["mask"], mask_prob=d.mask_prob, mask_token_prob=d.mask_token_prob,
                             random_token_prob=d.random_token_prob, masking=masking,
                             max_ngram=getattr(d, "max_ngram", 1), word_start=word_start)


    def _check_tokenizer(self, d, manifest: dict) -> None:
        """One-line DataError when the shards were made with another tokenizer than the config's."""
        made = manifest.get("data_config", {})
        for key in ("vocab_size", "tokenizer_type"):
            if key in made and getattr(d, key, made[key]) != made[key]:
                raise DataError(f"shards in {self.data_dir} were made with another tokenizer ({key}={made[key]!r}, "
                                f"config data.{key}={getattr(d, key)!r}); set data.{key}={made[key]!r} or re-run "
                                f"`{_PREPARE_HINT} --force`")
        tok = manifest.get("tokenizer", {})
        path = os.path.join(self.data_dir, tok.get("path", ""))
        if not is_remote(self.data_dir) and tok.get("path") and os.path.isfile(path):
            if _sha256_cached(path) != tok.get("sha256"):
                raise DataError(f"shards in {self.data_dir} were made with another tokenizer than {path} (sha256 "
                                f"{tok.get('sha256', '?')[:12]} in {MANIFEST}); re-run `{_PREPARE_HINT} --force`")

    def _check_shards(self, shards: list[dict], on_mismatch: str) -> dict[int, str]:
        """``{shard index: why}`` of the local shards to skip: missing, or (``skip`` mode) changed ones.

        Raises:
            DataError: a local shard's size or sha256 differs from the manifest and ``on_mismatch`` is error.
        """
        bad = {}
        for i, (shard, loc) in enumerate(zip(shards, self.paths)):
            if is_remote(loc):
                continue  # not checksummed: see the module doc
            if not os.path.isfile(loc):
                bad[i] = "is missing"
            elif os.path.getsize(loc) != shard["bytes"] or _sha256_cached(loc) != shard["sha256"]:
                if on_mismatch != "skip":
                    raise DataError(f"shard {loc} does not match its size/sha256 in {MANIFEST}; re-run "
                                    f"`{_PREPARE_HINT} --force`, or set data.on_checksum_mismatch=skip to "
                                    "train without it")
                bad[i] = "does not match its sha256 in " + MANIFEST
        return bad

    def reader(self) -> SegmentReader:
        return SegmentReader(self.paths, self.bad, self.seq_len)


# --------------------------------------------------------------------------------------------
# Train
# --------------------------------------------------------------------------------------------


class _TrainStream(IterableDataset):
    """Infinite stream of one rank's train batches, in this DataLoader worker's slot."""

    def __init__(self, split: _Split, seed: int, dp_rank: int, dp_size: int, workers: int, micro_batch_size: int,
                 per_slot: int, shuffle: int, start_epoch: int, start_batch: int, with_keys: bool) -> None:
        super().__init__()
        self.split, self.seed, self.dp_rank, self.dp_size = split, seed, dp_rank, dp_size
        self.workers, self.mb, self.per_slot, self.shuffle = workers, micro_batch_size, per_slot, shuffle
        self.start_epoch, self.start_batch = start_epoch, start_batch
        self.collate = _Collate(split.masker, split.pad_id, seed, with_keys)

    def epoch_batches(self, epoch: int, worker: int, skip: int = 0) -> Iterator[dict]:
        """This slot's batches of ``epoch``, the first ``skip`` of them replayed but not produced.

        Each batch carries the samples skipped since the previous one under a private key that
        :class:`TrainLoader` pops (skips while replaying are not reported again).
        """
        slot = self.dp_rank * self.workers + worker
        num_slots = self.dp_size * self.workers
        order = shard_order(len(self.split.counts), self.seed, epoch)
        reader = self.split.reader()
        stream = slot_stream(reader, self.split.counts, order, slot, num_slots, self.shuffle,
                             random.Random(derive_seed(self.seed, epoch, "shuffle", num_slots, slot)))
        reported = 0
        for b in range(self.per_slot):
            samples = [next(stream) for _ in range(self.mb)]
            if b >= skip:
                batch = self.collate(samples, epoch)
                batch[_SKIPPED] = reader.skipped - reported
                reported = reader.skipped
                yield batch
            else:
                reported = reader.skipped
        stream.close()

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        if num_workers != self.workers:
            raise RuntimeError(f"stream planned for {self.workers} workers runs in {num_workers}")
        epoch, skip = self.start_epoch, self.start_batch // self.workers
        while True:
            yield from self.epoch_batches(epoch, worker, skip)
            epoch, skip = epoch + 1, 0


def _refuse_global_state(state: dict) -> None:
    if state.get("order") == "global":
        raise DataError("cannot resume the streamed train loader exactly: the checkpoint was written with "
                        "data.order=global; set data.order=global to continue it exactly")


class TrainLoader:
    """Infinite, resumable iterator of one data-parallel rank's training micro batches.

    Attributes:
        steps_per_epoch: micro batches per epoch, the same on every rank.
        consumed_micro_batches: micro batches this loader has yielded (plus the resumed offset).
        epoch: the epoch of the next batch.
        corrupt_samples_skipped: samples of this rank skipped as unreadable (see module doc), since the
            start of the run (restored from a checkpoint's loader state).
    """

    def __init__(self, cfg, dp_rank: int, dp_size: int, micro_batch_size: int, consumed_micro_batches: int = 0,
                 *, with_keys: bool = False, data_dir: str | None = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
        self.split = _Split(cfg, "train", data_dir)
        self.seed, self.dp_rank, self.dp_size, self.mb = int(cfg.train.seed), dp_rank, dp_size, micro_batch_size
        self.num_workers = int(cfg.data.num_workers)
        self.shuffle = int(cfg.data.shuffle_buffer)
        self.with_keys = with_keys
        self.workers = max(1, self.num_workers)
        num_slots = dp_size * self.workers
        self.per_slot = batches_per_slot(self.split.total, num_slots, micro_batch_size)
        if self.per_slot == 0:
            raise DataError(f"{self.split.total} train samples cannot give every one of dp_size={dp_size} x "
                            f"max(1, data.num_workers={self.num_workers}) readers a micro batch of "
                            f"{micro_batch_size}; add text, lower data.num_workers or the micro batch size")
        self.steps_per_epoch = self.per_slot * self.workers
        self.consumed_micro_batches = int(consumed_micro_batches)
        self.corrupt_samples_skipped = 0
        self.shard_hash = hashlib.sha256(json.dumps(
            [(s["name"], s["sha256"]) for s in self.split.manifest["shards"] if s["split"] == "train"]).encode()
        ).hexdigest()[:16]
        log.info("train loader: rank %d/%d, %d samples in %d shards, %d worker(s), micro batch %d -> "
                 "%d micro batches per epoch, resuming at %d", dp_rank, dp_size, self.split.total,
                 len(self.split.paths), self.num_workers, micro_batch_size, self.steps_per_epoch,
                 self.consumed_micro_batches)

    @property
    def epoch(self) -> int:
        return self.consumed_micro_batches // self.steps_per_epoch

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this loader exactly."""
        return {"order": "stream", "epoch": self.epoch, "consumed_micro_batches": self.consumed_micro_batches,
                "steps_per_epoch": self.steps_per_epoch, "dp_size": self.dp_size,
                "num_workers": self.num_workers, "micro_batch_size": self.mb, "seed": self.seed,
                "shards": self.shard_hash, "corrupt_samples_skipped": self.corrupt_samples_skipped}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["consumed_micro_batches"]``; refuse a state from another layout."""
        _refuse_global_state(state)
        mine = self.state_dict()
        for key in ("dp_size", "num_workers", "micro_batch_size", "seed", "shards"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"cannot resume the train loader exactly: {key} was {state[key]!r}, now "
                                f"{mine[key]!r}; restore the old value (or start the data order afresh)")
        self.consumed_micro_batches = int(state["consumed_micro_batches"])
        self.corrupt_samples_skipped = int(state.get("corrupt_samples_skipped", 0))

    def __iter__(self) -> Iterator[dict]:
        consumed = self.consumed_micro_batches
        discard = consumed % self.workers
        aligned = consumed - discard
        stream = _TrainStream(self.split, self.seed, self.dp_rank, self.dp_size, self.workers, self.mb,
                              self.per_slot, self.shuffle, aligned // self.steps_per_epoch,
                              aligned % self.steps_per_epoch, self.with_keys)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers)
        for i, batch in enumerate(loader):
            skipped = batch.pop(_SKIPPED)
            if i < discard:
                continue
            self.corrupt_samples_skipped += skipped
            self.consumed_micro_batches += 1
            yield batch


def build_train_loader(cfg, dp_rank: int, dp_size: int, micro_batch_size: int, consumed_micro_batches: int = 0,
                       **kw) -> TrainLoader:
    """The training loader of data-parallel rank ``dp_rank`` of ``dp_size``: with ``data.order: global``
    (the default) :class:`data_pipeline.global_order.GlobalTrainLoader`, else the streaming loaders of
    this module (see module doc).

    Args:
        cfg: the ExperimentConfig (uses data.*, train.seed).
        dp_rank, dp_size: data-parallel rank and size (not the global rank).
        micro_batch_size: sequences per batch.
        consumed_micro_batches: batches this rank already consumed (resume point).
        **kw: ``with_keys=True`` adds ``batch["keys"]`` (sample keys); ``data_dir`` overrides cfg.data.data_dir.
    """
    if getattr(cfg.data, "order", "stream") == "global" and kw.get("data_dir") is None:
        from data_pipeline.global_order import GlobalTrainLoader

        return GlobalTrainLoader(cfg, dp_rank, dp_size, micro_batch_size, consumed_micro_batches,
                                 with_keys=kw.get("with_keys", False))
    if getattr(cfg.data, "blend", None) and kw.get("data_dir") is None:
        return BlendedTrainLoader(cfg, dp_rank, dp_size, micro_batch_size, consumed_micro_batches,
                                  with_keys=kw.get("with_keys", False))
    return TrainLoader(cfg, dp_rank, dp_size, micro_batch_size, consumed_micro_batches, **kw)


# --------------------------------------------------------------------------------------------
# Blending
# --------------------------------------------------------------------------------------------

BLEND_PERIOD = 1 << 16
"""Length of the blend schedule's period (see :func:`blend_quotas`)."""


def blend_quotas(weights: list[float], period: int = BLEND_PERIOD) -> tuple[int, ...]:
    """Integer shares of ``period`` proportional to ``weights`` (largest remainder, ties to the lower index)."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise DataError(f"blend weights {list(weights)} must be >= 0 and not all zero")
    exact = [w / total * period for w in weights]
    quotas = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda d: (-(exact[d] - quotas[d]), d))
    for d in by_remainder[:period - sum(quotas)]:
        quotas[d] += 1
    return tuple(quotas)


_schedule_cache: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}


def blend_schedule(quotas: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``(choice, prefix)`` of one period: ``choice[i]`` is the dataset of position i, ``prefix[n]`` the
    per-dataset counts of positions ``0..n-1``.

    Position i goes to the dataset with the largest deficit ``quota_d * (i + 1) - count_d * period``
    (Megatron's BlendedDataset rule, in integers; ties to the lowest index). Every dataset then stays
    within one sample of ``quota_d / period`` of every prefix and holds exactly ``quota_d`` at the end
    of the period, so the schedule repeats with that period.
    """
    if quotas not in _schedule_cache:
        period, n = sum(quotas), len(quotas)
        counts = [0] * n
        choice = np.empty(period, dtype=np.int64)
        prefix = np.zeros((period + 1, n), dtype=np.int64)
        for i in range(period):
            best, best_deficit = 0, None
            for d in range(n):
                deficit = quotas[d] * (i + 1) - counts[d] * period
                if best_deficit is None or deficit > best_deficit:
                    best, best_deficit = d, deficit
            counts[best] += 1
            choice[i] = best
            prefix[i + 1] = counts
        assert counts == list(quotas)
        _schedule_cache[quotas] = (choice, prefix)
    return _schedule_cache[quotas]


def blend_counts(quotas: tuple[int, ...], n: int) -> list[int]:
    """How many of the first ``n`` blended samples each dataset gives (a pure function of n)."""
    _, prefix = blend_schedule(quotas)
    period = sum(quotas)
    full, rest = divmod(int(n), period)
    return [full * q + int(c) for q, c in zip(quotas, prefix[rest])]


def check_blend_tokenizers(primary: str, dirs: list[str]) -> None:
    """One-line DataError unless every blended dir was prepared with ``primary``'s tokenizer (sha256)."""
    ref = read_manifest(primary).get("tokenizer", {}).get("sha256")
    for i, d in enumerate(dirs):
        sha = read_manifest(d).get("tokenizer", {}).get("sha256")
        if sha != ref:
            raise DataError(f"data.blend[{i}].data_dir={d} was prepared with tokenizer sha256 {str(sha)[:12]}, "
                            f"data.data_dir={primary} with {str(ref)[:12]}: blended datasets must share one "
                            f"tokenizer; re-prepare {d} with that tokenizer or drop it from data.blend")


class BlendedTrainLoader:
    """Infinite, resumable blend of several prepared train sets for one data-parallel rank.

    ``data.blend`` lists ``{data_dir, weight}``. Each dir gets its own :class:`TrainLoader` (same rank,
    micro batch and seed; its own shard order, epochs, workers and bad-data handling). This rank's
    blended sample position i takes the next sample of dataset ``blend_schedule(quotas)[0][i % period]``
    and ``micro_batch_size`` consecutive positions form a batch, so batches mix datasets and every rank
    takes the same steps (the schedule is the same on every rank, applied to its own positions). The
    proportions are the weights' to within one sample of every prefix (weights rounded to 1/65536).

    Resume: after k micro batches, dataset d has given ``blend_counts(quotas, k * mb)[d]`` samples, so
    its loader resumes at ``count // mb`` batches and drops the first ``count % mb`` samples of the next.

    Attributes:
        steps_per_epoch: the sum of the datasets' own steps_per_epoch (one blended "epoch" has as many
            samples as one pass over every dataset); each dataset reshuffles on its own epochs.
        consumed_micro_batches, epoch, corrupt_samples_skipped: as for :class:`TrainLoader`.
    """

    def __init__(self, cfg, dp_rank: int, dp_size: int, micro_batch_size: int, consumed_micro_batches: int = 0,
                 *, with_keys: bool = False) -> None:
        self.blend = [{"data_dir": str(b["data_dir"]), "weight": float(b["weight"])} for b in cfg.data.blend]
        dirs = [b["data_dir"] for b in self.blend]
        check_blend_tokenizers(cfg.data.data_dir, dirs)
        self.quotas = blend_quotas([b["weight"] for b in self.blend])
        self.mb, self.dp_size, self.with_keys = micro_batch_size, dp_size, with_keys
        self.loaders = [TrainLoader(cfg, dp_rank, dp_size, micro_batch_size, with_keys=with_keys, data_dir=d)
                        for d in dirs]
        self.steps_per_epoch = sum(ld.steps_per_epoch for ld in self.loaders)
        self.num_workers, self.seed = self.loaders[0].num_workers, self.loaders[0].seed
        self.shard_hash = hashlib.sha256(json.dumps(
            [self.quotas, [ld.shard_hash for ld in self.loaders]]).encode()).hexdigest()[:16]
        self.consumed_micro_batches = int(consumed_micro_batches)
        self.corrupt_samples_skipped = 0
        blend_schedule(self.quotas)
        log.info("blended train loader: %s -> %d micro batches per epoch, resuming at %d",
                 ", ".join(f"{d} x{q / BLEND_PERIOD:.4f}" for d, q in zip(dirs, self.quotas)),
                 self.steps_per_epoch, self.consumed_micro_batches)

    @property
    def epoch(self) -> int:
        return self.consumed_micro_batches // self.steps_per_epoch

    def dataset_samples(self) -> list[int]:
        """Samples each dataset has given this rank so far."""
        return blend_counts(self.quotas, self.consumed_micro_batches * self.mb)

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this blend exactly (the datasets' positions follow from it)."""
        counts = self.dataset_samples()
        return {"order": "stream", "epoch": self.epoch, "consumed_micro_batches": self.consumed_micro_batches,
                "steps_per_epoch": self.steps_per_epoch, "dp_size": self.dp_size,
                "num_workers": self.num_workers, "micro_batch_size": self.mb, "seed": self.seed,
                "shards": self.shard_hash, "corrupt_samples_skipped": self.corrupt_samples_skipped,
                "blend": self.blend, "dataset_samples": counts,
                "dataset_epochs": [c // (ld.steps_per_epoch * self.mb) for c, ld in zip(counts, self.loaders)]}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["consumed_micro_batches"]``; refuse a state from another layout or blend."""
        _refuse_global_state(state)
        mine = self.state_dict()
        for key in ("dp_size", "num_workers", "micro_batch_size", "seed", "shards"):
            if key in state and state[key] != mine[key]:
                what = " (data.blend dirs/weights or their shards)" if key == "shards" else ""
                raise DataError(f"cannot resume the blended train loader exactly: {key}{what} was {state[key]!r}, "
                                f"now {mine[key]!r}; restore the old value (or start the data order afresh)")
        self.consumed_micro_batches = int(state["consumed_micro_batches"])
        self.corrupt_samples_skipped = int(state.get("corrupt_samples_skipped", 0))

    def __iter__(self) -> Iterator[dict]:
        choice, _ = blend_schedule(self.quotas)
        period = len(choice)
        pos = self.consumed_micro_batches * self.mb
        counts = blend_counts(self.quotas, pos)
        n = len(self.loaders)
        drop = [c % self.mb for c in counts]  # samples of the next batch already taken before the resume
        for ld, c in zip(self.loaders, counts):
            ld.consumed_micro_batches = c // self.mb
        iters: list[Iterator[dict] | None] = [None] * n
        current: list[dict | None] = [None] * n
        row = [self.mb] * n
        while True:
            picks = []
            for _ in range(self.mb):
                d = int(choice[pos % period])
                pos += 1
                if row[d] == self.mb:
                    if iters[d] is None:
                        iters[d] = iter(self.loaders[d])
                    before = self.loaders[d].corrupt_samples_skipped
                    current[d] = next(iters[d])
                    if drop[d] == 0:  # a resumed partial batch was counted before the checkpoint
                        self.corrupt_samples_skipped += self.loaders[d].corrupt_samples_skipped - before
                    row[d], drop[d] = drop[d], 0
                picks.append((d, current[d], row[d]))  # the batch itself: current[d] may move on
                row[d] += 1
            batch = {k: torch.stack([b[k][r] for _, b, r in picks])
                     for k in ("input_ids", "attention_mask", "labels", "token_type_ids")}
            if self.with_keys:
                batch["keys"] = [f"{d}/{b['keys'][r]}" for d, b, r in picks]
            self.consumed_micro_batches += 1
            yield batch


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


class _ValStream(IterableDataset):
    def __init__(self, split: _Split, seed: int, dp_rank: int, dp_size: int, workers: int, micro_batch_size: int,
                 per_slot: int, num_batches: int, with_keys: bool) -> None:
        super().__init__()
        self.split, self.dp_rank, self.dp_size, self.workers = split, dp_rank, dp_size, workers
        self.mb, self.per_slot, self.num_batches = micro_batch_size, per_slot, num_batches
        self.collate = _Collate(split.masker, split.pad_id, seed, with_keys)

    def __iter__(self) -> Iterator[dict]:
        worker, _ = _worker()
        slot = self.dp_rank * self.workers + worker
        reader = self.split.reader()
        stream = slot_stream(reader, self.split.counts, list(range(len(self.split.counts))), slot,
                             self.dp_size * self.workers, 0, random.Random(0))
        for b in range(self.per_slot):
            if b * self.workers + worker >= self.num_batches:  # round-robin index of this batch
                break
            yield self.collate([next(stream) for _ in range(self.mb)], 0)
        stream.close()


class ValLoader:
    """Finite, fixed-order validation batches of one data-parallel rank; iterate it once per evaluation."""

    def __init__(self, cfg, dp_rank: int, dp_size: int, micro_batch_size: int, max_batches: int = 0,
                 *, with_keys: bool = False, data_dir: str | None = None) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        self.split = _Split(cfg, "val", data_dir)
        total, num_workers = self.split.total, int(cfg.data.num_workers)
        self.workers, self.per_slot, self._loader = 1, 0, None
        if total == 0:
            log.warning("no validation samples in %s (data.val_fraction=0?): validation is skipped",
                        self.split.data_dir)
            self.num_batches = 0
            return
        # as many workers as can each fill a batch (fewer than asked for a small val split)
        for w in range(max(1, num_workers), 0, -1):
            if batches_per_slot(total, dp_size * w, micro_batch_size) > 0:
                self.workers = w
                break
        self.per_slot = batches_per_slot(total, dp_size * self.workers, micro_batch_size)
        if self.per_slot == 0:
            raise DataError(f"{total} validation samples are too few for dp_size={dp_size} x micro batch "
                            f"{micro_batch_size}; raise data.val_fraction or lower the micro batch size")
        self.num_batches = self.per_slot * self.workers
        if max_batches > 0:
            self.num_batches = min(self.num_batches, max_batches)
        stream = _ValStream(self.split, int(cfg.train.seed), dp_rank, dp_size, self.workers, micro_batch_size,
                            self.per_slot, self.num_batches, with_keys)
        nw = self.workers if num_workers > 0 else 0
        self._loader = DataLoader(stream, batch_size=None, num_workers=nw, persistent_workers=nw > 0)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict]:
        if self._loader is None:
            return iter(())
        return iter(self._loader)


def build_val_loader(cfg, dp_rank: int, dp_size: int, micro_batch_size: int, max_batches: int = 0,
                     **kw) -> ValLoader:
    """The validation loader of data-parallel rank ``dp_rank`` (every rank gets ``len()`` batches).

    Args:
        max_batches: cap on batches per evaluation; 0 = all.
        **kw: ``with_keys``, ``data_dir`` as for :func:`build_train_loader`.
    """
    return ValLoader(cfg, dp_rank, dp_size, micro_batch_size, max_batches, **kw)
