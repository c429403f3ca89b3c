"""Corpus -> train/val split -> tokenizer -> packed sequences -> webdataset shards + manifest.json.

    python -m data_pipeline.prepare --config configs/demo.yaml [data.data_dir=/tmp/demo key=value ...]

Memory does not grow with the corpus: the documents are streamed and only one bucket of them (about
``data.prepare_bucket_mb`` MB of text) is held at a time. Steps, each with a progress bar:

1. spill: stream the documents of ``data.corpus`` (:mod:`data_pipeline.corpus`) into B on-disk bucket
   files under ``<data_dir>/.prepare/spill/``, B = ceil(corpus size / data.prepare_bucket_mb). A
   document goes to the bucket of its stable order hash (bucket b holds the hashes in [b/B, (b+1)/B)),
   so the buckets, each sorted by hash, concatenate to the hashed (shuffled) document order of the
   whole corpus. Its train/val split is a stable hash of its text too (``data.val_fraction``;
   duplicates land in the same split; at least one val document);
2. train the sentencepiece tokenizer on a ``data.tokenizer_sample_mb`` sample of the train documents
   read back from the buckets (reused when its inputs are unchanged; or ``data.tokenizer_model``);
3. bucket by bucket: sort by hash, tokenize in ``data.prepare_workers`` worker processes, and pack,
   RoBERTa FULL-SENTENCES style: documents are concatenated with a [SEP] between neighbours and cut
   into ``[CLS] <seq_len-2 tokens> [SEP]`` sequences. A separator never opens a sequence; when it
   would be the last body token, the sequence closes one token early instead (its [SEP] doubles as
   the separator) and ends with one [PAD]. The last, short sequence of each split is KEPT, padded with
   [PAD] to ``seq_len``. Packing and shard filling carry over from one bucket to the next, so the
   shards do not depend on the number of buckets;
4. write ``<data_dir>/{train,val}-%06d.tar`` (``samples_per_shard`` each, the last one shorter; key
   ``ids.npy`` = the ``seq_len`` ids as uint16, or int32 for vocabularies over 65536), each shard
   whole to a temporary file then renamed. After a bucket, a done record
   (``.prepare/<run>/bucket-NNNNN.json``, atomic) notes its shards and the state carried over;
5. write ``<data_dir>/manifest.json`` atomically, last (see :func:`prepare_data`), remove ``.prepare/``
   and log the tokenizing rate in tokens/s per worker process.

Re-running with the same data config finds a matching manifest and does nothing. A run that was
killed or crashed resumes: a finished spill is reused, the buckets with a done record (for the same
config, tokenizer and spill) are skipped with their shards kept, and the rest are redone, giving the
shards and manifest a clean run gives. ``--force`` redoes all.

Parallel preparation (a Slurm job array, slurm/prepare_data.sbatch): ``--part I --num-parts N`` packs
and writes only the I-th of N contiguous ranges of the (hashed) document order, as shards
``<split>-IIJJJJ.tar``, and records them in ``manifest.part-I-of-N.json``. The first part to take
``<data_dir>/.prepare.lock`` spills the corpus and trains the tokenizer, the others reuse both (a
part rerun with ``--force`` redoes its own shards but reuses a finished, matching spill). A part with
a matching part manifest is not redone, and a part resumes by bucket like a one-process run. The part
that finishes last merges the part manifests into ``manifest.json`` (``"parts": N``) and removes the
spill. Packing restarts at each range, so the shards differ slightly from a one-process run (one
short, padded row per range and split); the manifest describes exactly what was written.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import struct
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipeline.corpus import estimate_bytes, file_fingerprint, iter_documents, resolve_workers
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import Tokenizer, sha256_file, train_tokenizer, unit_hash

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKENIZER_PREFIX = "tokenizer"
FORMAT_VERSION = 2  # 2: documents are written in a hashed (shuffled) order
SPLITS = ("train", "val")
SAMPLE_KEY = "ids.npy"
STATE_DIR = ".prepare"
"""Work directory of an unfinished prepare in data_dir: the spilled buckets and the done records."""
_SPLIT_SALT = "bertforge-val-split"
_ORDER_SALT = "bertforge-document-order"
_SAMPLE_SALT = "tokenizer-sample"  # tokenizer.sample_lines's salt: the sample it would draw from all train docs
_SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
_SHARD_TMP_RE = re.compile(r"^(train|val)-\d{6}\.tar\.tmp\d+$")
MAX_PARTS = 100
"""``--num-parts`` limit: a part's shards are numbered ``<part:02d><index:04d>``."""
_PART_SHARDS = 10_000
_DATA_FIELDS = ("corpus", "corpus_max_mb", "vocab_size", "tokenizer_type", "tokenizer_sample_mb",
                "seq_len", "val_fraction", "samples_per_shard")
"""DataConfig fields that change the shards (masking, loader and memory fields do not)."""
_TOKENIZER_FIELDS = ("corpus", "corpus_max_mb", "vocab_size", "tokenizer_type", "tokenizer_sample_mb",
                     "val_fraction")
_MB = 1_000_000
_SPILL_VERSION = 1
_RECORD = struct.Struct("<ddQI")
"""A spilled document: order hash, split hash, document number, UTF-8 length; the text follows."""
_SPILL_BUFFER = 16 * _MB
"""Spilled bytes buffered in memory (at most; and at most a bucket's worth) before they are appended
to the bucket files."""
_CHUNK_DOCS = 256
"""Documents per task sent to a tokenizing worker."""


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_config_hash(cfg) -> str:
    """Hash of the data-relevant config fields plus (path, size, mtime) of the input files (and the
    sha256 of ``data.tokenizer_model`` when one is given)."""
    fields = {k: getattr(cfg, k) for k in _DATA_FIELDS}
    if cfg.tokenizer_model:
        fields["tokenizer_model_sha256"] = _given_tokenizer(cfg).sha256
    return _hash({"format": FORMAT_VERSION, "fields": fields, "files": file_fingerprint(list(cfg.corpus))})


def _tokenizer_hash(cfg) -> str:
    fields = {k: getattr(cfg, k) for k in _TOKENIZER_FIELDS}
    return _hash({"format": FORMAT_VERSION, "fields": fields, "files": file_fingerprint(list(cfg.corpus))})


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def split_of(doc: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` of documents (by a hash of their text), else ``train``."""
    return "val" if unit_hash(doc, _SPLIT_SALT) < val_fraction else "train"


def split_documents(docs: list[str], val_fraction: float) -> list[str]:
    """Split label of every document of an in-memory list, by the rule :func:`spill_corpus` applies to
    a stream: at least one val document when val_fraction > 0 and >= 2 docs."""
    labels = [split_of(d, val_fraction) for d in docs]
    if val_fraction > 0 and "val" not in labels and len(docs) >= 2:
        first = min(range(len(docs)), key=lambda i: unit_hash(docs[i], _SPLIT_SALT))
        labels[first] = "val"
    if "train" not in labels:
        raise DataError(f"all {len(docs)} documents went to validation; lower data.val_fraction "
                        f"(now {val_fraction}) or add documents")
    return labels


# --------------------------------------------------------------------------------------------
# Spill: the corpus streamed into hash buckets on disk
# --------------------------------------------------------------------------------------------


def num_buckets(corpus_bytes: int, bucket_mb: float) -> int:
    """Buckets of at most about ``bucket_mb`` MB each for a corpus of ``corpus_bytes``."""
    return max(1, math.ceil(corpus_bytes / (bucket_mb * _MB)))


def _spill_key(cfg, buckets: int) -> str:
    return _hash({"spill": _SPILL_VERSION, "corpus": list(cfg.corpus), "corpus_max_mb": cfg.corpus_max_mb,
                  "val_fraction": cfg.val_fraction, "buckets": buckets,
                  "files": file_fingerprint(list(cfg.corpus))})


def _bucket_path(spill_dir: str, b: int) -> str:
    return os.path.join(spill_dir, f"bucket-{b:05d}.bin")


def _spill_complete(spill_dir: str, meta: dict | None, key: str) -> bool:
    if not meta or meta.get("key") != key:
        return False
    for b, size in enumerate(meta["bucket_bytes"]):
        p = _bucket_path(spill_dir, b)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            return False
    return True


def spill_corpus(cfg, spill_dir: str, workers: int) -> dict:
    """Stream the documents of ``cfg.corpus`` into hash buckets under ``spill_dir``; reuse a finished
    spill of the same inputs. Holds one document (plus a bounded write buffer) at a time.

    Returns:
        The spill record (``spill.json``): ``key``, ``buckets``, ``counts`` and ``bucket_bytes`` per
        bucket, ``documents``, ``text_bytes``, ``train_documents``, ``train_bytes``, ``forced_val``
        (the number of the document made val so that the val split is not empty, or None).

    Raises:
        DataError: a corpus error, or every document went to validation.
    """
    buckets = num_buckets(estimate_bytes(list(cfg.corpus), cfg.corpus_max_mb), cfg.prepare_bucket_mb)
    key = _spill_key(cfg, buckets)
    meta_path = os.path.join(spill_dir, "spill.json")
    meta = _read_json(meta_path)
    if _spill_complete(spill_dir, meta, key):
        log.info("spill: reusing %s (%d documents in %d buckets)", spill_dir, meta["documents"], buckets)
        return meta
    docs = iter_documents(list(cfg.corpus), cfg.data_dir, cfg.corpus_max_mb, workers)
    shutil.rmtree(spill_dir, ignore_errors=True)
    os.makedirs(spill_dir)
    for b in range(buckets):
        open(_bucket_path(spill_dir, b), "wb").close()
    buffers = [bytearray() for _ in range(buckets)]
    buffered = 0
    flush_at = min(_SPILL_BUFFER, int(cfg.prepare_bucket_mb * _MB))
    counts, sizes = [0] * buckets, [0] * buckets

    def flush() -> None:
        for b, buf in enumerate(buffers):
            if buf:
                with open(_bucket_path(spill_dir, b), "ab") as f:
                    f.write(buf)
                sizes[b] += len(buf)
                buf.clear()

    t0 = time.perf_counter()
    n = text_bytes = val_docs = val_bytes = 0
    first_val: tuple[float, int, int] | None = None  # (split hash, number, bytes) of the likeliest val document
    bar = tqdm(total=estimate_bytes(list(cfg.corpus), cfg.corpus_max_mb), desc="spill", unit="B",
               unit_scale=True, disable=None, leave=False)
    try:
        pending = 0
        for doc in docs:
            data = doc.encode()
            order, split_h = unit_hash(doc, _ORDER_SALT), unit_hash(doc, _SPLIT_SALT)
            b = min(int(order * buckets), buckets - 1)  # monotone in the hash: buckets are hash ranges
            buffers[b] += _RECORD.pack(order, split_h, n, len(data))
            buffers[b] += data
            buffered += _RECORD.size + len(data)
            counts[b] += 1
            text_bytes += len(data)
            if split_h < cfg.val_fraction:
                val_docs += 1
                val_bytes += len(data)
            if first_val is None or split_h < first_val[0]:
                first_val = (split_h, n, len(data))
            n += 1
            pending += len(data)
            if pending >= 1 << 20:
                bar.update(pending)
                pending = 0
            if buffered >= flush_at:
                flush()
                buffered = 0
        flush()
    finally:
        bar.close()
    forced = None
    if cfg.val_fraction > 0 and val_docs == 0 and n >= 2 and first_val is not None:
        forced, val_docs, val_bytes = first_val[1], 1, first_val[2]
    if val_docs == n:
        raise DataError(f"all {n} documents went to validation; lower data.val_fraction "
                        f"(now {cfg.val_fraction}) or add documents")
    for b in range(buckets):
        with open(_bucket_path(spill_dir, b), "rb+") as f:
            os.fsync(f.fileno())
    meta = {"key": key, "buckets": buckets, "counts": counts, "bucket_bytes": sizes, "documents": n,
            "text_bytes": text_bytes, "train_documents": n - val_docs, "train_bytes": text_bytes - val_bytes,
            "forced_val": forced}
    _write_json(meta_path, meta)
    log.info("spill: %d documents (%.1f MB) into %d buckets of <= %.0f MB in %.1f s", n, text_bytes / _MB,
             buckets, cfg.prepare_bucket_mb, time.perf_counter() - t0)
    return meta


def read_bucket(spill_dir: str, b: int) -> list[tuple[float, int, float, str]]:
    """The documents of bucket ``b`` as (order hash, number, split hash, text), in the hashed order."""
    out = []
    path = _bucket_path(spill_dir, b)
    with open(path, "rb", buffering=1 << 20) as f:
        while head := f.read(_RECORD.size):
            if len(head) < _RECORD.size:
                raise DataError(f"{path} is truncated; remove {os.path.dirname(spill_dir)} and rerun")
            order, split_h, n, size = _RECORD.unpack(head)
            out.append((order, n, split_h, f.read(size).decode()))
    out.sort()  # by (order hash, number): numbers are unique, texts are never compared
    return out


def _label(n: int, split_h: float, val_fraction: float, forced: int | None) -> str:
    return "val" if split_h < val_fraction or n == forced else "train"


def _tokenizer_sample(cfg, spill_dir: str, meta: dict) -> list[str]:
    """The train documents the tokenizer trains on, in the hashed order: all of them when they fit in
    ``data.tokenizer_sample_mb`` (or it is <= 0), else the stable hash-selected fraction
    :func:`data_pipeline.tokenizer.sample_lines` would pick from all of them."""
    budget = cfg.tokenizer_sample_mb * _MB
    total = meta["train_bytes"]
    frac = None if cfg.tokenizer_sample_mb <= 0 or total <= budget else budget / total
    docs = []
    for b in tqdm(range(meta["buckets"]), desc="tokenizer sample", unit="bucket", disable=None, leave=False):
        for _, n, split_h, text in read_bucket(spill_dir, b):
            if _label(n, split_h, cfg.val_fraction, meta["forced_val"]) == "train" and (
                    frac is None or unit_hash(text, _SAMPLE_SALT) < frac):
                docs.append(text)
    return docs


# --------------------------------------------------------------------------------------------
# Packing and writing
# --------------------------------------------------------------------------------------------


class Packer:
    """Concatenate documents (a [SEP] between neighbours) into ``[CLS] ... [SEP]`` rows of seq_len."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, dtype: np.dtype) -> None:
        self.seq_len, self.body = seq_len, seq_len - 2
        self.cls_id, self.sep_id, self.pad_id, self.dtype = cls_id, sep_id, pad_id, dtype
        self.parts: list[np.ndarray] = []
        self.n = 0
        self._sep = np.array([sep_id], dtype=dtype)

    def _emit(self) -> np.ndarray:
        row = np.full(self.seq_len, self.pad_id, dtype=self.dtype)
        row[0] = self.cls_id
        row[1:1 + self.n] = np.concatenate(self.parts)
        row[1 + self.n] = self.sep_id
        self.parts, self.n = [], 0
        return row

    def add(self, tokens: np.ndarray) -> list[np.ndarray]:
        """Append one document's tokens; return the rows it completed."""
        out = []
        if tokens.size == 0:
            return out
        if self.n == self.body - 1:  # a separator here would end the row: close it instead
            out.append(self._emit())
        elif self.n:
            self.parts.append(self._sep)
            self.n += 1
        pos = 0
        while pos < tokens.size:
            take = min(self.body - self.n, tokens.size - pos)
            self.parts.append(tokens[pos:pos + take].astype(self.dtype, copy=False))
            self.n += take
            pos += take
            if self.n == self.body:
                out.append(self._emit())
        return out

    def finish(self) -> list[np.ndarray]:
        """The last, partial row (padded), if any."""
        return [self._emit()] if self.n else []

    def carry(self) -> list[int]:
        """The body of the open row (at most seq_len-3 ids), to continue it after a restart."""
        return np.concatenate(self.parts).tolist() if self.n else []

    def restore(self, carry: list[int]) -> None:
        """Continue the open row saved by :meth:`carry`."""
        self.parts = [np.array(carry, dtype=self.dtype)] if carry else []
        self.n = len(carry)


class ShardSink:
    """One split's rows -> ``<data_dir>/<split>-%06d.tar`` shards of exactly ``samples_per_shard`` rows
    (the last one may be shorter).

    Rows are buffered until a shard is full; the shard is then written whole to a temporary file and
    renamed, so a shard file is always complete. The buffered rows and the counters are what a bucket's
    done record carries over to the next bucket (:meth:`state`, :meth:`restore`).
    """

    def __init__(self, data_dir: str, split: str, samples_per_shard: int, pad_id: int,
                 part: int | None = None) -> None:
        self.data_dir, self.split, self.per_shard, self.pad_id = data_dir, split, samples_per_shard, pad_id
        # shard names: <split>-%06d.tar, or <split>-<part:02d>%04d.tar for one part of a parallel prepare
        self.fmt = f"{split}-%06d.tar" if part is None else f"{split}-{part:02d}%04d.tar"
        self.rows: list[np.ndarray] = []
        self.next_shard = 0
        self.written = 0
        self.new_shards: list[dict] = []
        """Shards finished since the last :meth:`take_shards`: name, split, samples, tokens, bytes, sha256."""

    def write(self, row: np.ndarray) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.per_shard:
            self._flush()

    def close(self) -> None:
        """Write the buffered rows as the last (short) shard."""
        self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if "%04d" in self.fmt and self.next_shard >= _PART_SHARDS:
            raise DataError(f"one part of a parallel prepare would write more than {_PART_SHARDS} {self.split} "
                            "shards; raise --num-parts or data.samples_per_shard")
        import webdataset as wds  # imports torch: keep it out of the worker processes

        name = self.fmt % self.next_shard
        path = os.path.join(self.data_dir, name)
        tmp = f"{path}.tmp{os.getpid()}"
        tokens = 0
        with open(tmp, "wb") as f:
            tw = wds.TarWriter(f, mtime=0)
            for i, row in enumerate(self.rows):
                buf = io.BytesIO()
                np.save(buf, row, allow_pickle=False)
                tw.write({"__key__": f"{self.split}-{self.written + i:09d}", SAMPLE_KEY: buf.getvalue()})
                tokens += int(np.count_nonzero(row != self.pad_id))
            tw.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.new_shards.append({"name": name, "split": self.split, "samples": len(self.rows), "tokens": tokens,
                                "bytes": os.path.getsize(path), "sha256": sha256_file(path)})
        self.written += len(self.rows)
        self.next_shard += 1
        self.rows = []

    def take_shards(self) -> list[dict]:
        out, self.new_shards = self.new_shards, []
        return out

    def state(self) -> dict:
        return {"next_shard": self.next_shard, "written": self.written}

    def restore(self, state: dict, rows: np.ndarray) -> None:
        self.next_shard, self.written = state["next_shard"], state["written"]
        self.rows = list(rows)


# --------------------------------------------------------------------------------------------
# Parallel tokenization
# --------------------------------------------------------------------------------------------

_worker_tok: Tokenizer | None = None


def _init_worker(model_path: str) -> None:
    global _worker_tok
    _worker_tok = Tokenizer(model_path)


def _encode_chunk(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tok is not None
    return _worker_tok.encode_batch(texts, num_threads=1)


def _chunks(docs: list[str], size: int):
    for i in range(0, len(docs), size):
        yield docs[i:i + size]


class Encoder:
    """Tokenize lists of documents in ``workers`` processes (started on first use, kept until close)."""

    def __init__(self, model_path: str, workers: int, chunk_docs: int = _CHUNK_DOCS) -> None:
        self.model_path, self.workers, self.chunk_docs = model_path, workers, chunk_docs
        self.pool = None

    def encode(self, docs: list[str]) -> Iterator[np.ndarray]:
        """The int32 token array of every document of ``docs``, in order."""
        if self.workers <= 1:
            if _worker_tok is None or _worker_tok.path != self.model_path:
                _init_worker(self.model_path)
            for chunk in _chunks(docs, self.chunk_docs):
                yield from _encode_chunk(chunk)
            return
        if self.pool is None:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self.model_path,))
        for arrays in self.pool.imap(_encode_chunk, _chunks(docs, self.chunk_docs)):
            yield from arrays

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _existing_manifest(data_dir: str, config_hash: str, name: str = MANIFEST) -> dict | None:
    """The manifest in ``data_dir`` if it matches ``config_hash``, its tokenizer and its shard files."""
    manifest = _read_json(os.path.join(data_dir, name))
    if manifest is None or manifest.get("format") != FORMAT_VERSION or manifest.get("config_hash") != config_hash:
        return None
    tok_path = os.path.join(data_dir, manifest["tokenizer"]["path"])
    if not os.path.isfile(tok_path) or sha256_file(tok_path) != manifest["tokenizer"]["sha256"]:
        return None
    for shard in manifest["shards"]:
        p = os.path.join(data_dir, shard["name"])
        if not os.path.isfile(p) or os.path.getsize(p) != shard["bytes"]:
            return None
    return manifest


def _given_tokenizer(cfg) -> Tokenizer:
    """``data.tokenizer_model``, checked: it exists, has our special ids and ``data.vocab_size`` pieces."""
    src = cfg.tokenizer_model
    if not os.path.isfile(src):
        raise DataError(f"data.tokenizer_model={src}: no such file; point it at an existing tokenizer.model "
                        "(e.g. another data dir's) or leave it empty to train one")
    tok = Tokenizer(src)
    if tok.vocab_size != cfg.vocab_size:
        raise DataError(f"data.tokenizer_model={src} has {tok.vocab_size} pieces but data.vocab_size="
                        f"{cfg.vocab_size}; set data.vocab_size={tok.vocab_size}")
    return tok


def _tokenizer_for(cfg, sample: Callable[[], list[str]], data_dir: str, workers: int) -> tuple[Tokenizer, bool]:
    """Reuse ``<data_dir>/tokenizer.model`` when it was trained from the same inputs, else train it on
    ``sample()``; with ``data.tokenizer_model``, copy that model in (``reused`` is then True)."""
    prefix = os.path.join(data_dir, TOKENIZER_PREFIX)
    if cfg.tokenizer_model:
        src = _given_tokenizer(cfg)
        if os.path.abspath(src.path) != os.path.abspath(prefix + ".model"):
            for ext in (".model", ".vocab"):
                if os.path.isfile(os.path.splitext(src.path)[0] + ext):
                    tmp = f"{prefix}{ext}.tmp{os.getpid()}"
                    shutil.copyfile(os.path.splitext(src.path)[0] + ext, tmp)
                    os.replace(tmp, prefix + ext)
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + ".json")  # no "trained from these inputs" claim for a copied model
        tok = Tokenizer(prefix + ".model")
        log.info("tokenizer: using %s (sha256 %s) from data.tokenizer_model", src.path, tok.sha256[:12])
        return tok, True
    meta_path = prefix + ".json"
    want = _tokenizer_hash(cfg)
    if os.path.isfile(prefix + ".model") and os.path.isfile(meta_path):
        meta = _read_json(meta_path) or {}
        if meta.get("config_hash") == want and meta.get("sha256") == sha256_file(prefix + ".model"):
            tok = Tokenizer(prefix + ".model")
            log.info("tokenizer: reusing %s (sha256 %s)", tok.path, tok.sha256[:12])
            return tok, True
    # sample_mb=0: the sample is already drawn (the same one train_tokenizer would draw from all train docs)
    tok = train_tokenizer(sample(), prefix, cfg.vocab_size, cfg.tokenizer_type, 0, num_threads=workers)
    _write_json(meta_path, {"config_hash": want, "sha256": tok.sha256})
    return tok, False


@contextlib.contextmanager
def _data_dir_lock(data_dir: str):
    """An exclusive flock on ``<data_dir>/.prepare.lock`` (parts of a parallel prepare take turns)."""
    with open(os.path.join(data_dir, ".prepare.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _part_manifest_name(part: int, num_parts: int) -> str:
    return f"manifest.part-{part:02d}-of-{num_parts:02d}.json"


def _done_path(run_dir: str, b: int) -> str:
    return os.path.join(run_dir, f"bucket-{b:05d}.json")


def _save_done(run_dir: str, b: int, record: dict, sinks: dict[str, ShardSink], seq_len: int,
               dtype: np.dtype) -> None:
    """Bucket ``b``'s done record: its rows not yet in a shard (``.npz``), then the record, atomically."""
    pending = os.path.join(run_dir, f"bucket-{b:05d}.pending.npz")
    tmp = f"{pending}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **{s: np.stack(sinks[s].rows) if sinks[s].rows else np.zeros((0, seq_len), dtype)
                       for s in SPLITS})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, pending)
    _write_json(_done_path(run_dir, b), record)


def _write_range(cfg, meta: dict, spill_dir: str, tok: Tokenizer, data_dir: str, run_dir: str, run_key: str,
                 workers: int, lo: int, hi: int, part: int | None) -> tuple[list[dict], dict[str, int], dict]:
    """Tokenize, pack and write the documents of ranks ``[lo, hi)`` of the hashed order, bucket by
    bucket, skipping the buckets a done record of ``run_key`` covers.

    Returns:
        The shards (train ones, then val ones), the documents per split, and the throughput of the
        buckets done now (tokens, seconds, processes, tokens_per_s_per_process).
    """
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
    packers = {s: Packer(cfg.seq_len, tok.cls_id, tok.sep_id, tok.pad_id, dtype) for s in SPLITS}
    sinks = {s: ShardSink(data_dir, s, cfg.samples_per_shard, tok.pad_id, part) for s in SPLITS}
    doc_counts = dict.fromkeys(SPLITS, 0)
    starts = np.concatenate([[0], np.cumsum(meta["counts"])]).tolist()
    todo = [b for b in range(meta["buckets"]) if max(starts[b], lo) < min(starts[b + 1], hi)]

    # resume: the buckets with a done record of this run are kept, with the state they carried over
    shards: list[dict] = []
    done = 0
    for b in todo:
        rec = _read_json(_done_path(run_dir, b))
        if rec is None or rec.get("key") != run_key:
            break
        shards.extend(rec["shards"])
        done += 1
    if done:
        rec = _read_json(_done_path(run_dir, todo[done - 1]))
        with np.load(os.path.join(run_dir, f"bucket-{todo[done - 1]:05d}.pending.npz")) as pending:
            for s in SPLITS:
                sinks[s].restore(rec["sinks"][s], pending[s])
                packers[s].restore(rec["carry"][s])
        doc_counts = rec["doc_counts"]
        log.info("prepare: resuming after bucket %d: %d of %d buckets done (%d shards kept)", todo[done - 1],
                 done, len(todo), len(shards))
    # shard files no done record lists are from an interrupted or older run: remove them
    keep = {x["name"] for x in shards}
    mine = _SHARD_RE if part is None else re.compile(rf"^(train|val)-{part:02d}\d{{4}}\.tar$")
    for name in os.listdir(data_dir):
        if (mine.match(name) and name not in keep) or _SHARD_TMP_RE.match(name):
            os.remove(os.path.join(data_dir, name))

    remaining = todo[done:]
    total_docs = sum(min(starts[b + 1], hi) - max(starts[b], lo) for b in remaining)
    bar = tqdm(total=total_docs, desc="tokenize+pack", unit="doc", disable=None, leave=False)
    encoder = Encoder(tok.path, workers)
    tokens_done = 0
    t0 = time.perf_counter()
    try:
        for b in remaining:
            recs = read_bucket(spill_dir, b)
            recs = recs[max(lo - starts[b], 0):min(hi, starts[b + 1]) - starts[b]]
            texts = [r[3] for r in recs]
            labels = [_label(r[1], r[2], cfg.val_fraction, meta["forced_val"]) for r in recs]
            del recs
            for i, (tokens, split) in enumerate(zip(encoder.encode(texts), labels)):
                tokens_done += tokens.size
                if tokens.size:
                    doc_counts[split] += 1
                for row in packers[split].add(tokens):
                    sinks[split].write(row)
                if i % 1024 == 1023:
                    bar.update(1024)
            bar.update(len(texts) % 1024)
            del texts, labels
            if b == todo[-1]:  # the end of the range: the last rows and shards of each split
                for s in SPLITS:
                    for row in packers[s].finish():
                        sinks[s].write(row)
                    sinks[s].close()
            new = [x for s in SPLITS for x in sinks[s].take_shards()]
            shards.extend(new)
            _save_done(run_dir, b, {"key": run_key, "bucket": b, "shards": new,
                                    "sinks": {s: sinks[s].state() for s in SPLITS},
                                    "carry": {s: packers[s].carry() for s in SPLITS},
                                    "doc_counts": doc_counts}, sinks, cfg.seq_len, dtype)
    finally:
        bar.close()
        encoder.close()
    seconds = time.perf_counter() - t0
    procs = max(workers, 1)
    throughput = {"tokens": int(tokens_done), "seconds": round(seconds, 3), "processes": procs,
                  "tokens_per_s_per_process": round(tokens_done / seconds / procs) if tokens_done else 0}
    ordered = [x for s in SPLITS for x in shards if x["split"] == s]
    return ordered, doc_counts, throughput


def _split_totals(shards: list[dict], doc_counts: dict[str, int]) -> dict:
    return {s: {"documents": doc_counts[s], "shards": sum(x["split"] == s for x in shards),
                "samples": sum(x["samples"] for x in shards if x["split"] == s),
                "tokens": sum(x["tokens"] for x in shards if x["split"] == s)} for s in SPLITS}


def _log_throughput(throughput: dict, what: str) -> None:
    if throughput["tokens"]:
        log.info("prepare: %stokenized %d tokens in %.1f s with %d worker processes: %d tokens/s per process",
                 what, throughput["tokens"], throughput["seconds"], throughput["processes"],
                 throughput["tokens_per_s_per_process"])


def prepare_data(cfg, force: bool = False, part: int | None = None, num_parts: int = 1) -> dict:
    """Build the tokenizer, shards and manifest for ``cfg`` (a DataConfig or an ExperimentConfig),
    streaming the corpus and resuming an interrupted run (see the module docstring).

    With ``num_parts`` > 1 this process writes part ``part`` only (see the module docstring) and
    returns the merged manifest if it was the last part to finish, else its part manifest
    (``"part"``, ``"num_parts"``, ``"shards"``, ``"splits"``).

    Returns:
        The manifest: ``format``, ``config_hash``, ``data_config`` (the fields hashed), ``seq_len``,
        ``vocab_size``, ``dtype``, ``special_ids``, ``tokenizer`` ({path relative to data_dir, sha256}),
        ``shards`` (per shard: name, split, samples, tokens (non-[PAD] ids), bytes, sha256),
        ``splits`` (per split: documents, shards, samples, tokens), ``corpus`` ({documents, mb}),
        ``packing``, ``parts``, ``buckets``, ``throughput`` (tokens, seconds, processes,
        tokens_per_s_per_process of the tokenizing done by this run), ``timings_s``, ``created``.

    Raises:
        DataError: empty corpus, untrainable tokenizer, too little text for a sequence, or a bad part.
    """
    cfg = getattr(cfg, "data", cfg)
    if not 1 <= num_parts <= MAX_PARTS:
        raise DataError(f"--num-parts {num_parts} must be in [1, {MAX_PARTS}]")
    if num_parts > 1 and (part is None or not 0 <= part < num_parts):
        raise DataError(f"--part {part} must be in [0, {num_parts - 1}] with --num-parts {num_parts}")
    if not cfg.prepare_bucket_mb > 0:
        raise DataError(f"data.prepare_bucket_mb={cfg.prepare_bucket_mb} must be positive (MB of text per bucket)")
    parallel = num_parts > 1
    data_dir = cfg.data_dir
    os.makedirs(data_dir, exist_ok=True)
    state_dir = os.path.join(data_dir, STATE_DIR)
    spill_dir = os.path.join(state_dir, "spill")
    config_hash = data_config_hash(cfg)
    if not force:
        existing = _existing_manifest(data_dir, config_hash)
        if existing is not None:
            log.info("prepare: %s is up to date (config hash %s, tokenizer %s): nothing to do; "
                     "%d train / %d val samples in %d shards", os.path.join(data_dir, MANIFEST), config_hash,
                     existing["tokenizer"]["sha256"][:12], existing["splits"]["train"]["samples"],
                     existing["splits"]["val"]["samples"], len(existing["shards"]))
            shutil.rmtree(state_dir, ignore_errors=True)  # left by a run killed after its manifest
            return existing
        if parallel and _existing_manifest(data_dir, config_hash, _part_manifest_name(part, num_parts)):
            log.info("prepare: part %d/%d is already written (%s)", part, num_parts,
                     _part_manifest_name(part, num_parts))
            with _data_dir_lock(data_dir):
                merged = _merge_parts(data_dir, num_parts, config_hash)
            return merged or _read_json(os.path.join(data_dir, _part_manifest_name(part, num_parts)))
    workers = resolve_workers(cfg.prepare_workers)
    run_dir = os.path.join(state_dir, f"part-{part:02d}-of-{num_parts:02d}" if parallel else "run")
    if force:  # a part keeps a finished spill that other parts may be reading; it is the same corpus
        shutil.rmtree(run_dir if parallel else state_dir, ignore_errors=True)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    # parts take turns here: the first spills the corpus and trains the tokenizer, the others reuse them
    with _data_dir_lock(data_dir) if parallel else contextlib.nullcontext():
        meta = spill_corpus(cfg, spill_dir, workers)
        timings["corpus"] = time.perf_counter() - t
        t = time.perf_counter()
        tok, reused = _tokenizer_for(cfg, lambda: _tokenizer_sample(cfg, spill_dir, meta), data_dir, workers)
        timings["tokenizer"] = time.perf_counter() - t
        t = time.perf_counter()
        # never an old manifest next to half-rewritten shards
        for name in [MANIFEST] + ([_part_manifest_name(part, num_parts)] if parallel else []):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(data_dir, name))

    n = meta["documents"]
    lo, hi = (part * n // num_parts, (part + 1) * n // num_parts) if parallel else (0, n)
    run_key = _hash({"config": config_hash, "tokenizer": tok.sha256, "spill": meta["key"], "range": [lo, hi],
                     "part": part, "num_parts": num_parts})
    os.makedirs(run_dir, exist_ok=True)
    shards, doc_counts, throughput = _write_range(cfg, meta, spill_dir, tok, data_dir, run_dir, run_key, workers,
                                                  lo, hi, part if parallel else None)
    timings["tokenize_pack_write"] = time.perf_counter() - t
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
    manifest = {
        "format": FORMAT_VERSION,
        "config_hash": config_hash,
        "data_config": {k: getattr(cfg, k) for k in _DATA_FIELDS},
        "seq_len": cfg.seq_len,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "sample_key": SAMPLE_KEY,
        "special_ids": {"pad": tok.pad_id, "cls": tok.cls_id, "sep": tok.sep_id, "mask": tok.mask_id,
                        "unk": tok.unk_id},
        "tokenizer": {"path": os.path.basename(tok.path), "sha256": tok.sha256, "reused": reused},
        "packing": "full-sentences: [CLS] + documents joined by [SEP] + [SEP]; last short row of a split kept, "
                   "[PAD]-padded" + (" (per part of a parallel prepare)" if parallel else ""),
        "corpus": {"documents": n, "mb": round(meta["text_bytes"] / _MB, 3)},
        "parts": num_parts,
        "buckets": meta["buckets"],
        "splits": _split_totals(shards, doc_counts),
        "shards": shards,
        "throughput": throughput,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if parallel:
        manifest.update(part=part, num_parts=num_parts, doc_counts=doc_counts)
        _write_json(os.path.join(data_dir, _part_manifest_name(part, num_parts)), manifest)
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("prepare: part %d/%d: documents %d..%d -> %d shards", part, num_parts, lo, hi, len(shards))
        _log_throughput(throughput, f"part {part}/{num_parts}: ")
        with _data_dir_lock(data_dir):
            merged = _merge_parts(data_dir, num_parts, config_hash)
        if merged is None:
            return manifest
        manifest = merged
    elif manifest["splits"]["train"]["samples"] == 0:
        raise DataError("the train split produced no sequence; add text to data.corpus")
    else:
        _write_json(os.path.join(data_dir, MANIFEST), manifest)
        shutil.rmtree(state_dir, ignore_errors=True)
        _log_throughput(throughput, "")
    splits, corpus = manifest["splits"], manifest["corpus"]
    disk = sum(x["bytes"] for x in manifest["shards"]) / _MB
    log.info("prepare: %d docs (%.1f MB text) -> train %d docs / %d tokens / %d samples / %d shards, "
             "val %d docs / %d tokens / %d samples / %d shards; %.1f MB of shards in %s",
             corpus["documents"], corpus["mb"], splits["train"]["documents"], splits["train"]["tokens"],
             splits["train"]["samples"], splits["train"]["shards"], splits["val"]["documents"],
             splits["val"]["tokens"], splits["val"]["samples"], splits["val"]["shards"], disk, data_dir)
    log.info("prepare: seconds per phase: %s (total %.1f)",
             ", ".join(f"{k} {v:.1f}" for k, v in manifest["timings_s"].items()),
             sum(manifest["timings_s"].values()))
    return manifest


def _merge_parts(data_dir: str, num_parts: int, config_hash: str) -> dict | None:
    """manifest.json from all part manifests once every part of this config is written, else None.
    The merging part also removes the spill (every part has read it)."""
    parts = []
    for i in range(num_parts):
        m = _read_json(os.path.join(data_dir, _part_manifest_name(i, num_parts)))
        if m is None or m.get("config_hash") != config_hash:
            return None  # a part still running, or of an older config: it has to be rerun
        parts.append(m)
    if len({m["tokenizer"]["sha256"] for m in parts}) != 1:
        raise DataError(f"the parts in {data_dir} used different tokenizers; rerun them all")
    shards = [s for m in parts for s in m["shards"]]
    doc_counts = {s: sum(m["doc_counts"][s] for m in parts) for s in SPLITS}
    merged = {k: v for k, v in parts[0].items() if k not in ("part", "num_parts", "doc_counts")}
    tokens = sum(m["throughput"]["tokens"] for m in parts)
    busy = sum(m["throughput"]["seconds"] * m["throughput"]["processes"] for m in parts)
    merged.update(shards=shards, splits=_split_totals(shards, doc_counts), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  timings_s={k: round(max(m["timings_s"].get(k, 0) for m in parts), 3) for k in parts[0]["timings_s"]},
                  throughput={"tokens": tokens, "seconds": round(max(m["throughput"]["seconds"] for m in parts), 3),
                              "processes": sum(m["throughput"]["processes"] for m in parts),
                              "tokens_per_s_per_process": round(tokens / busy) if busy else 0})
    if merged["splits"]["train"]["samples"] == 0:
        raise DataError("the train split produced no sequence; add text to data.corpus")
    _write_json(os.path.join(data_dir, MANIFEST), merged)
    for i in range(num_parts):
        os.remove(os.path.join(data_dir, _part_manifest_name(i, num_parts)))
    shutil.rmtree(os.path.join(data_dir, STATE_DIR), ignore_errors=True)
    log.info("prepare: merged %d parts into %s", num_parts, os.path.join(data_dir, MANIFEST))
    return merged


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m data_pipeline.prepare --config X.yaml [--force] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="experiment YAML (its data: section is used)")
    parser.add_argument("--force", action="store_true", help="rebuild even if manifest.json is up to date")
    parser.add_argument("--part", type=int, default=None,
                        help="write only this part (0-based) of --num-parts; e.g. $SLURM_ARRAY_TASK_ID")
    parser.add_argument("--num-parts", type=int, default=1,
                        help="split the shard writing into this many parts (the last one merges the manifest)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.data_dir=/tmp/demo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from launch.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        prepare_data(cfg.data, force=args.force, part=args.part, num_parts=args.num_parts)
    except (ConfigError, DataError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
