"""Train and validation loaders over the webdataset shards, data-parallel aware and exactly resumable.

Train pipeline, per data-parallel rank (``dp_rank`` / ``dp_size`` are arguments: tensor-parallel peers
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

Resume: ``build_train_loader(..., consumed_micro_batches=k)`` (or ``load_state_dict``) continues
with exactly the batches an uninterrupted run yields after its first k: workers replay their
epoch's stream without decoding or masking the skipped batches, and at most W-1 batches are
produced and dropped to re-align the round-robin. Resuming needs the same dp_size, num_workers,
micro_batch_size and shards; :meth:`TrainLoader.load_state_dict` refuses anything else.

Validation: the val shards in manifest order, no shuffle, split into contiguous ranges the same way,
masks seeded by (seed, 0, key) so every evaluation sees identical batches; finite.

Batches: ``{"input_ids", "attention_mask", "labels", "token_type_ids"}``, int64 tensors of shape
``[micro_batch_size, seq_len]``; attention_mask is 1 at real tokens and 0 at [PAD]; labels are -100
where nothing is predicted; token_type_ids are zeros.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
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


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def read_manifest(data_dir: str, verify: bool = False) -> dict:
    """Load ``<data_dir>/manifest.json`` and check that its shard files exist (and, with
    ``verify``, that their sha256 match).

    Raises:
        DataError: missing or unreadable manifest, missing or changed shard files.
    """
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"no {MANIFEST} in {data_dir}: run `{_PREPARE_HINT}` first")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e}); re-run `{_PREPARE_HINT}`") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{path} has format {manifest.get('format')}, this code reads {FORMAT_VERSION}; "
                        f"re-run `{_PREPARE_HINT}`")
    for shard in manifest["shards"]:
        p = os.path.join(data_dir, shard["name"])
        if not os.path.isfile(p):
            raise DataError(f"shard {p} listed in {path} is missing; re-run `{_PREPARE_HINT}`")
        if os.path.getsize(p) != shard["bytes"] or (verify and sha256_file(p) != shard["sha256"]):
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


def read_segments(paths: list[str], segments: list[tuple[int, int, int]]) -> Iterator[tuple[str, bytes]]:
    """``(key, ids.npy bytes)`` of the samples in ``segments``, read with webdataset's tar reader."""
    for shard, lo, hi in segments:
        i = 0
        samples = wds.tariterators.tarfile_samples([{"url": paths[shard]}])
        for sample in samples:
            if i >= hi:
                break
            if i >= lo:
                yield sample["__key__"], sample[SAMPLE_KEY]
            i += 1
        samples.close()
        if i < hi:
            raise DataError(f"shard {paths[shard]} holds {i} samples, fewer than {MANIFEST} says; "
                            f"re-run `{_PREPARE_HINT} --force`")


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

    def __call__(self, samples: list[tuple[str, bytes]], epoch: int) -> dict:
        inputs, labels, attn = [], [], []
        for key, raw in samples:
            try:
                ids = np.load(io.BytesIO(raw), allow_pickle=False)
            except ValueError as e:
                raise DataError(f"sample {key} is not a valid .npy ({e}); re-run `{_PREPARE_HINT} --force`") from None
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
        changed = [k for k, v in manifest["data_config"].items() if getattr(d, k, v) != v and k != "seq_len"]
        if changed and self.data_dir not in _warned:
            _warned.add(self.data_dir)
            log.warning("data config differs from the one %s was prepared with (%s); using the shards as they are",
                        os.path.join(self.data_dir, MANIFEST), ", ".join(changed))
        self.manifest = manifest
        shards = [s for s in manifest["shards"] if s["split"] == split]
        self.paths = [os.path.join(self.data_dir, s["name"]) for s in shards]
        self.counts = [int(s["samples"]) for s in shards]
        self.total = sum(self.counts)
        sp = manifest["special_ids"]
        self.pad_id = sp["pad"]
        masking = getattr(d, "masking", "token")
        word_start = (word_start_table(os.path.join(self.data_dir, manifest["tokenizer"]["path"]),
                                       manifest["tokenizer"]["sha256"]) if masking == "whole_word" else None)
        self.masker = Masker(special_ids=frozenset(sp.values()), vocab_size=manifest["vocab_size"],
                             mask_id=sp["mask"], mask_prob=d.mask_prob, mask_token_prob=d.mask_token_prob,
                             random_token_prob=d.random_token_prob, masking=masking,
                             max_ngram=getattr(d, "max_ngram", 1), word_start=word_start)


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
        """This slot's batches of ``epoch``, the first ``skip`` of them replayed but not produced."""
        slot = self.dp_rank * self.workers + worker
        num_slots = self.dp_size * self.workers
        order = shard_order(len(self.split.counts), self.seed, epoch)
        segments = slot_segments(self.split.counts, order, slot, num_slots)
        stream = read_segments(self.split.paths, segments)
        stream = shuffle_buffer(stream, self.shuffle,
                                random.Random(derive_seed(self.seed, epoch, "shuffle", num_slots, slot)))
        for b in range(self.per_slot):
            samples = [next(stream) for _ in range(self.mb)]
            if b >= skip:
                yield self.collate(samples, epoch)
        stream.close()

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        if num_workers != self.workers:
            raise RuntimeError(f"stream planned for {self.workers} workers runs in {num_workers}")
        epoch, skip = self.start_epoch, self.start_batch // self.workers
        while True:
            yield from self.epoch_batches(epoch, worker, skip)
            epoch, skip = epoch + 1, 0


class TrainLoader:
    """Infinite, resumable iterator of one data-parallel rank's training micro batches.

    Attributes:
        steps_per_epoch: micro batches per epoch, the same on every rank.
        consumed_micro_batches: micro batches this loader has yielded (plus the resumed offset).
        epoch: the epoch of the next batch.
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
        return {"epoch": self.epoch, "consumed_micro_batches": self.consumed_micro_batches,
                "steps_per_epoch": self.steps_per_epoch, "dp_size": self.dp_size,
                "num_workers": self.num_workers, "micro_batch_size": self.mb, "seed": self.seed,
                "shards": self.shard_hash}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["consumed_micro_batches"]``; refuse a state from another layout."""
        mine = self.state_dict()
        for key in ("dp_size", "num_workers", "micro_batch_size", "seed", "shards"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"cannot resume the train loader exactly: {key} was {state[key]!r}, now "
                                f"{mine[key]!r}; restore the old value (or start the data order afresh)")
        self.consumed_micro_batches = int(state["consumed_micro_batches"])

    def __iter__(self) -> Iterator[dict]:
        consumed = self.consumed_micro_batches
        discard = consumed % self.workers
        aligned = consumed - discard
        stream = _TrainStream(self.split, self.seed, self.dp_rank, self.dp_size, self.workers, self.mb,
                              self.per_slot, self.shuffle, aligned // self.steps_per_epoch,
                              aligned % self.steps_per_epoch, self.with_keys)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers)
        for i, batch in enumerate(loader):
            if i < discard:
                continue
            self.consumed_micro_batches += 1
            yield batch


def build_train_loader(cfg, dp_rank: int, dp_size: int, micro_batch_size: int, consumed_micro_batches: int = 0,
                       **kw) -> TrainLoader:
    """The training loader of data-parallel rank ``dp_rank`` of ``dp_size`` (see module doc).

    Args:
        cfg: the ExperimentConfig (uses data.*, train.seed).
        dp_rank, dp_size: data-parallel rank and size (not the global rank).
        micro_batch_size: sequences per batch.
        consumed_micro_batches: batches this rank already consumed (resume point).
        **kw: ``with_keys=True`` adds ``batch["keys"]`` (sample keys); ``data_dir`` overrides cfg.data.data_dir.
    """
    return TrainLoader(cfg, dp_rank, dp_size, micro_batch_size, consumed_micro_batches, **kw)


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
        segments = slot_segments(self.split.counts, list(range(len(self.split.counts))), slot,
                                 self.dp_size * self.workers)
        stream = read_segments(self.split.paths, segments)
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
