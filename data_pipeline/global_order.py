"""The ``data.order: global`` train loader: the sample at global position p is a fixed function of (seed, p).

Order (single dataset of N train samples, positions p = 0, 1, 2, ... over the whole run):

- epoch ``e = p // N``; the epoch's index ``i = p % N`` goes through :class:`IndexPermutation`, a
  seeded bijection of ``[0, N)`` keyed by (seed, e) (a Feistel network, O(1) memory at any N), to a
  sample index, and that to ``(shard, index in shard)`` by the manifest's per-shard counts;
- the sample is read with random access from its tar through ``wids``' indexed reader
  (:class:`wids.wids.IndexedTarSamples`, an mmap of the tar and an index of its members), masked with
  (seed, e, key), so a sample is masked the same way whoever reads it;
- every epoch is a full permutation: each sample exactly once per epoch, nothing dropped; a global
  batch may span the end of one epoch and the start of the next.

Batches: with micro batch ``mb``, ``A`` = train.gradient_accumulation_steps and ``D`` data-parallel ranks,
global batch ``G = mb * A * D``. Starting from ``start`` consumed samples, micro batch ``j`` of rank r
(step ``s = j // A``, micro step ``m = j % A``) holds positions ``start + s*G + r*mb*A + m*mb + [0, mb)``:
each optimizer step consumes the G positions after the previous one, cut into per-rank micro batches.
DataLoader worker ``w`` of W builds micro batches ``j = w, w + W, ...``; the DataLoader's round-robin
yields them in j order. Hence the sequence of samples and the resume point (``consumed_samples``) do not
depend on the data-parallel size, the accumulation or the number of workers: a run resumed on another
DP size (a universal checkpoint) continues with exactly the samples an uninterrupted run would have
seen next, only grouped into other micro batches.

Blending (``data.blend``): global position p goes to dataset ``d = schedule[p % period]`` (the blend
schedule of :mod:`data_pipeline.loader`) as that dataset's own position ``q`` (how many of the first p
positions went to d), and q is placed in dataset d's epochs as above (each dataset its own permutation
keyed by its index in the blend). Proportions are the weights' to within one sample of any prefix.

Bad data: a sample that cannot be read (its shard missing, not a tar, truncated before it, its
``ids.npy`` not ``seq_len`` integers; a shard whose sha256 differs with ``data.on_checksum_mismatch:
skip``) becomes an all-[PAD] row with no labels: it adds nothing to the loss, shapes and steps stay
equal on every rank, and it is counted in ``corrupt_samples_skipped`` (``data/corrupt_samples_skipped``).
No other sample is read in its place, so nothing is repeated.

Remote shards (``pipe:``, http(s)): downloaded once per node into ``data.cache_dir`` (a file lock keeps
concurrent processes from downloading the same shard twice, a temp file + rename keeps a killed download
from leaving a partial shard), checked against manifest.json's size and sha256, then read like local ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from data_pipeline.errors import DataError
from data_pipeline.loader import (
    _SKIPPED,
    BLEND_PERIOD,
    SAMPLE_KEY,
    _Split,
    _worker,
    blend_quotas,
    blend_schedule,
    cache_root,
    check_blend_tokenizers,
    derive_seed,
    is_remote,
)
from data_pipeline.tokenizer import sha256_file

log = logging.getLogger(__name__)

_MASK64 = np.uint64((1 << 64) - 1)


def _mix64(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64's finalizer of ``x + key`` (uint64 arrays, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(key & int(_MASK64))) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class IndexPermutation:
    """A seeded bijection of ``[0, n)``: 4 Feistel rounds on 2h bits (``2^(2h) < 4n``), cycle-walked.

    Applying a bijection of the larger domain until the value falls into ``[0, n)`` is a bijection of
    ``[0, n)``; fewer than 4 walks are needed on average. Vectorized over numpy arrays.
    """

    ROUNDS = 4

    def __init__(self, n: int, *seed_parts) -> None:
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.low = np.uint64((1 << (bits // 2)) - 1)
        self.keys = [derive_seed(*seed_parts, "feistel", r) for r in range(self.ROUNDS)]

    def _once(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.low
        for key in self.keys:
            left, right = right, left ^ (_mix64(right, key) & self.low)
        return (left << self.half) | right

    def __call__(self, i) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64)
        if x.size and (x.max() >= self.n):
            raise IndexError(f"index {int(x.max())} outside [0, {self.n})")
        out = self._once(x)
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._once(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


def default_cache_dir() -> str:
    return os.path.join(cache_root(), "shards")


class ShardStore:
    """Random access to the samples of one split's shards for one process (an LRU of open indexed tars).

    :meth:`sample` returns ``(key, ids)`` or None for a sample that cannot be read; the reason is logged
    once per shard.
    """

    def __init__(self, split: _Split, cache_dir: str, max_open: int, on_mismatch: str) -> None:
        self.split, self.max_open, self.on_mismatch = split, max_open, on_mismatch
        self.cache_dir = cache_dir or default_cache_dir()
        self.shards = [s for s in split.manifest["shards"] if s["split"] == "train"]
        self.bad: dict[int, str] = dict(split.bad)
        self.open: OrderedDict[int, object] = OrderedDict()
        self.length: dict[int, int] = {}
        self._reported: set[int] = set()
        self.decoder = split.reader()  # its decode(): ``seq_len`` integer ids or None

    def _report(self, shard: int, why: str) -> None:
        if shard not in self._reported:
            self._reported.add(shard)
            log.warning("skipping the samples of shard %s: %s", self.split.paths[shard], why)

    def _local(self, shard: int) -> str:
        """A local path of the shard: itself, or its verified download in the cache."""
        loc = self.split.paths[shard]
        if not is_remote(loc):
            return loc
        meta = self.shards[shard]
        tag = hashlib.sha256(loc.encode()).hexdigest()[:16]
        local = os.path.join(self.cache_dir, f"{tag}-{meta['name']}")
        os.makedirs(self.cache_dir, exist_ok=True)
        with open(local + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node, whoever asks first
            if not os.path.exists(local):
                tmp = f"{local}.tmp.{os.getpid()}"
                try:
                    with wds.gopen(loc, "rb") as src, open(tmp, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
                    if os.path.getsize(tmp) != meta["bytes"] or sha256_file(tmp) != meta["sha256"]:
                        if self.on_mismatch != "skip":
                            raise DataError(f"shard {loc} (downloaded to {tmp}) does not match its size/sha256 "
                                            "in manifest.json; re-upload the prepared shards, or set "
                                            "data.on_checksum_mismatch=skip to train without it")
                        raise OSError("does not match its sha256 in manifest.json")
                    os.replace(tmp, local)  # a killed download leaves a .tmp file, never a partial shard
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
        return local

    def _get(self, shard: int):
        if shard in self.open:
            self.open.move_to_end(shard)
            return self.open[shard]
        if shard in self.bad:
            self._report(shard, self.bad[shard])
            return None
        from wids.wids import IndexedTarSamples

        try:
            tar = IndexedTarSamples(path=self._local(shard))
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - anything the index cannot parse makes the shard unreadable
            self.bad[shard] = f"cannot be indexed as a tar ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            self._report(shard, self.bad[shard])
            return None
        self.length[shard] = len(tar)
        if len(tar) < int(self.shards[shard]["samples"]):
            log.warning("shard %s holds %d samples, manifest.json says %d; the missing ones are skipped",
                        self.split.paths[shard], len(tar), self.shards[shard]["samples"])
        self.open[shard] = tar
        while len(self.open) > self.max_open:
            _, old = self.open.popitem(last=False)
            old.close()
        return tar

    def sample(self, shard: int, index: int) -> tuple[str, np.ndarray] | None:
        tar = self._get(shard)
        if tar is None or index >= self.length[shard]:
            return None
        try:
            raw = tar[index]
            payload = raw.get("." + SAMPLE_KEY, raw.get(SAMPLE_KEY))  # wids: a BytesIO over the mmap
            ids = None if payload is None else self.decoder.decode({SAMPLE_KEY: payload.read()})
        except Exception as e:  # noqa: BLE001 - a damaged member: skip the sample, keep the run
            log.warning("sample %d of shard %s cannot be read (%s)", index, self.split.paths[shard], e)
            return None
        if ids is None:
            log.warning("sample %s of shard %s does not decode to %d ids", raw.get("__key__"),
                        self.split.paths[shard], self.split.seq_len)
            return None
        return raw["__key__"], ids

    def close(self) -> None:
        for tar in self.open.values():
            tar.close()
        self.open.clear()


class _Source:
    """One prepared train set in the global order: its split, per-epoch permutations and shard offsets."""

    def __init__(self, split: _Split, seed: int, index: int) -> None:
        self.split, self.seed, self.index = split, seed, index
        self.n = split.total
        if self.n == 0:
            raise DataError(f"no train samples in {split.data_dir}; add text and re-run the preparation")
        self.starts = np.concatenate([[0], np.cumsum(split.counts)]).astype(np.int64)
        self._perms: OrderedDict[int, IndexPermutation] = OrderedDict()

    def perm(self, epoch: int) -> IndexPermutation:
        if epoch not in self._perms:
            self._perms[epoch] = IndexPermutation(self.n, self.seed, epoch, "global-order", self.index)
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def locate(self, q: np.ndarray) -> list[tuple[int, int, int]]:
        """``(epoch, shard, index in shard)`` of this dataset's positions ``q``."""
        epochs = q // self.n
        out = np.empty_like(q)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.perm(int(e))(q[sel] % self.n)
        shards = np.searchsorted(self.starts, out, side="right") - 1
        return [(int(e), int(s), int(i - self.starts[s])) for e, s, i in zip(epochs, shards, out)]


class _GlobalStream(IterableDataset):
    """This DataLoader worker's micro batches ``j = first + worker, first + worker + W, ...``."""

    def __init__(self, loader: "GlobalTrainLoader", first: int) -> None:
        super().__init__()
        self.ld, self.first = loader, first

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        ld = self.ld
        stores = [ShardStore(src.split, ld.cache_dir, ld.open_shards, ld.on_mismatch) for src in ld.sources]
        try:
            j = self.first + worker
            while True:
                yield ld.make_batch(j, stores)
                j += num_workers
        finally:
            for s in stores:
                s.close()


class GlobalTrainLoader:
    """Infinite, exactly resumable train loader of one data-parallel rank in the global order (module doc).

    Attributes:
        steps_per_epoch: micro batches per rank per pass over the data (``N // (mb * D)``, for logging;
            epochs are not cut at batch boundaries).
        consumed_samples: global samples before this rank's next micro batch's step (the resume point).
        consumed_micro_batches: micro batches this rank has consumed since ``consumed_samples`` was 0, when
            the layout never changed (kept for the trainer's bookkeeping).
        epoch: the epoch of the next step's first sample (blends: of the whole blend's size).
        corrupt_samples_skipped: samples of this rank replaced by empty rows (see module doc).
    """

    def __init__(self, cfg, dp_rank: int, dp_size: int, micro_batch_size: int, consumed_micro_batches: int = 0,
                 *, with_keys: bool = False) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be positive")
        d = cfg.data
        self.seed, self.dp_rank, self.dp_size, self.mb = int(cfg.train.seed), dp_rank, dp_size, micro_batch_size
        self.accum = int(cfg.train.gradient_accumulation_steps)
        self.global_batch = self.mb * self.accum * self.dp_size
        self.num_workers = int(d.num_workers)
        self.cache_dir, self.open_shards = d.cache_dir, int(d.open_shards)
        self.on_mismatch = d.on_checksum_mismatch
        self.with_keys = with_keys
        blend = list(getattr(d, "blend", []) or [])
        if blend:
            dirs = [str(b["data_dir"]) for b in blend]
            check_blend_tokenizers(d.data_dir, dirs)
            self.quotas = blend_quotas([float(b["weight"]) for b in blend])
            splits = [_Split(cfg, "train", x) for x in dirs]
        else:
            self.quotas = (BLEND_PERIOD,)
            splits = [_Split(cfg, "train")]
        self.sources = [_Source(sp, self.seed, i) for i, sp in enumerate(splits)]
        self.total = sum(src.n for src in self.sources)
        self.steps_per_epoch = max(1, self.total // (self.mb * self.dp_size))
        self.consumed_micro_batches = int(consumed_micro_batches)
        self.consumed_samples = self.consumed_micro_batches * self.mb * self.dp_size
        self._done = 0  # micro batches since consumed_samples was last set
        self._base = self.consumed_samples
        self.corrupt_samples_skipped = 0
        self.shard_hash = hashlib.sha256(json.dumps(
            [list(self.quotas) if blend else None] + [[(s["name"], s["sha256"]) for s in src.split.manifest["shards"]
                                                       if s["split"] == "train"] for src in self.sources]
        ).encode()).hexdigest()[:16]
        log.info("train loader (global order): rank %d/%d, %d samples in %d shard(s)%s, micro batch %d x %d "
                 "accumulation x %d ranks = global batch %d, %d worker(s), resuming at sample %d",
                 dp_rank, dp_size, self.total, sum(len(s.split.paths) for s in self.sources),
                 f" of {len(self.sources)} blended dirs" if blend else "", self.mb, self.accum, dp_size,
                 self.global_batch, self.num_workers, self.consumed_samples)

    # ---- positions -------------------------------------------------------------------------

    def positions(self, j: int) -> np.ndarray:
        """Global sample positions of this rank's micro batch ``j`` (counted from ``_base``)."""
        s, m = divmod(j, self.accum)
        first = self._base + s * self.global_batch + self.dp_rank * self.mb * self.accum + m * self.mb
        return first + np.arange(self.mb, dtype=np.int64)

    def locate(self, p: np.ndarray) -> list[tuple[int, int, int, int]]:
        """``(dataset, epoch, shard, index)`` of global positions ``p``."""
        if len(self.sources) == 1:
            return [(0, *x) for x in self.sources[0].locate(p)]
        choice, prefix = blend_schedule(self.quotas)
        period = len(choice)
        full, rest = np.divmod(p, period)
        ds = choice[rest]
        q = full * np.asarray(self.quotas, dtype=np.int64)[ds] + prefix[rest, ds]
        out: list = [None] * len(p)
        for dset in np.unique(ds):
            sel = np.nonzero(ds == dset)[0]
            for k, loc in zip(sel, self.sources[int(dset)].locate(q[sel])):
                out[k] = (int(dset), *loc)
        return out

    def make_batch(self, j: int, stores: list[ShardStore]) -> dict:
        """Read, mask and stack micro batch ``j``."""
        seq_len = self.sources[0].split.seq_len
        inputs, labels, attn, keys = [], [], [], []
        skipped = 0
        for dset, epoch, shard, index in self.locate(self.positions(j)):
            src = self.sources[dset]
            got = stores[dset].sample(shard, index)
            if got is None:  # an empty row: no attention, no labels (module doc)
                skipped += 1
                pad = src.split.pad_id
                inputs.append(np.full(seq_len, pad, dtype=np.int64))
                labels.append(np.full(seq_len, -100, dtype=np.int64))
                attn.append(np.zeros(seq_len, dtype=np.int64))
                keys.append(f"{dset}/<skipped:{shard}:{index}>" if len(self.sources) > 1 else
                            f"<skipped:{shard}:{index}>")
                continue
            key, ids = got
            x, y = src.split.masker(ids, self.seed, epoch, key)
            inputs.append(np.asarray(x, dtype=np.int64))
            labels.append(np.asarray(y, dtype=np.int64))
            attn.append((ids != src.split.pad_id).astype(np.int64))
            keys.append(f"{dset}/{key}" if len(self.sources) > 1 else key)
        input_ids = torch.from_numpy(np.stack(inputs))
        batch = {"input_ids": input_ids, "attention_mask": torch.from_numpy(np.stack(attn)),
                 "labels": torch.from_numpy(np.stack(labels)), "token_type_ids": torch.zeros_like(input_ids),
                 _SKIPPED: skipped}
        if self.with_keys:
            batch["keys"] = keys
        return batch

    # ---- state -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.total

    def state_dict(self) -> dict:
        """What a checkpoint needs: the global resume point (valid for any DP size, accumulation, workers)."""
        return {"order": "global", "consumed_samples": self.consumed_samples, "epoch": self.epoch,
                "consumed_micro_batches": self.consumed_micro_batches, "steps_per_epoch": self.steps_per_epoch,
                "dp_size": self.dp_size, "num_workers": self.num_workers, "micro_batch_size": self.mb,
                "seed": self.seed, "shards": self.shard_hash, "corrupt_samples_skipped": self.corrupt_samples_skipped}

    def load_state_dict(self, state: dict, approximate: bool = False) -> None:
        """Continue at ``state["consumed_samples"]``; refuse another seed, shards/blend or a stream-order state."""
        if state.get("order") != "global":
            if not approximate:
                raise DataError("cannot resume the train loader exactly: the checkpoint was written with "
                                "data.order=stream; set data.order=stream to continue it exactly, or "
                                "data.resume=approximate to switch to the global order at the same position")
            samples = int(state["consumed_micro_batches"]) * int(state.get("micro_batch_size", self.mb)) \
                * int(state.get("dp_size", self.dp_size))
        else:
            for key in ("seed", "shards"):
                if key in state and state[key] != getattr(self, {"shards": "shard_hash"}.get(key, key)):
                    what = " (the train shards or data.blend)" if key == "shards" else " (train.seed)"
                    raise DataError(f"cannot resume the train loader exactly: {key}{what} changed since the "
                                    f"checkpoint ({state[key]!r} -> {self.state_dict()[key]!r}); restore it, or "
                                    "start a new run_dir")
            samples = int(state["consumed_samples"])
        self._base = self.consumed_samples = samples
        self._done = 0
        self.consumed_micro_batches = int(state.get("consumed_micro_batches", self.consumed_micro_batches))
        self.corrupt_samples_skipped = int(state.get("corrupt_samples_skipped", 0))

    def _advance(self) -> None:
        self._done += 1
        self.consumed_micro_batches += 1
        s, m = divmod(self._done, self.accum)
        self.consumed_samples = self._base + s * self.global_batch + m * self.mb * self.dp_size

    def __iter__(self) -> Iterator[dict]:
        stream = _GlobalStream(self, self._done)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers)
        for batch in loader:
            self.corrupt_samples_skipped += int(batch.pop(_SKIPPED))
            self._advance()
            yield batch
