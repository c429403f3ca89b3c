"""Corpus -> train/val split -> tokenizer -> packed sequences -> webdataset shards + manifest.json.

    python -m data_pipeline.prepare --config configs/demo.yaml [data.data_dir=/tmp/demo key=value ...]

Steps:

1. gather the documents of ``data.corpus`` (:mod:`data_pipeline.corpus`);
2. split them into train/val by a stable hash of each document's text (``data.val_fraction``;
   duplicates land in the same split);
3. train the sentencepiece tokenizer on the train documents (reused when its inputs are unchanged);
4. tokenize in parallel and pack, RoBERTa FULL-SENTENCES style: documents are concatenated with a
   [SEP] between neighbours and cut into ``[CLS] <seq_len-2 tokens> [SEP]`` sequences. A separator
   never opens a sequence; when it would be the last body token, the sequence closes one token
   early instead (its [SEP] doubles as the separator) and ends with one [PAD]. The last, short
   sequence of each split is KEPT, padded with [PAD] to ``seq_len``;
5. write ``<data_dir>/{train,val}-%06d.tar`` (``samples_per_shard`` each; key ``ids.npy`` = the
   ``seq_len`` ids as uint16, or int32 for vocabularies over 65536) with ``webdataset.ShardWriter``;
6. write ``<data_dir>/manifest.json`` atomically (see :func:`prepare_data`).

Re-running with the same data config finds a matching manifest and does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from typing import Any

import numpy as np
from tqdm import tqdm

from data_pipeline.corpus import file_fingerprint, iter_documents, resolve_workers
from data_pipeline.errors import DataError
from data_pipeline.tokenizer import Tokenizer, sha256_file, train_tokenizer, unit_hash

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKENIZER_PREFIX = "tokenizer"
FORMAT_VERSION = 2  # 2: documents are written in a hashed (shuffled) order
SPLITS = ("train", "val")
SAMPLE_KEY = "ids.npy"
_SPLIT_SALT = "bertforge-val-split"
_ORDER_SALT = "bertforge-document-order"
_SHARD_RE = re.compile(r"^(train|val)-\d{6}\.tar$")
_DATA_FIELDS = ("corpus", "corpus_max_mb", "vocab_size", "tokenizer_type", "tokenizer_sample_mb",
                "seq_len", "val_fraction", "samples_per_shard")
"""DataConfig fields that change the shards (masking and loader fields do not)."""
_TOKENIZER_FIELDS = ("corpus", "corpus_max_mb", "vocab_size", "tokenizer_type", "tokenizer_sample_mb",
                     "val_fraction")
_MB = 1_000_000


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_config_hash(cfg) -> str:
    """Hash of the data-relevant config fields plus (path, size, mtime) of the input files."""
    fields = {k: getattr(cfg, k) for k in _DATA_FIELDS}
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


def split_of(doc: str, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` of documents (by a hash of their text), else ``train``."""
    return "val" if unit_hash(doc, _SPLIT_SALT) < val_fraction else "train"


def split_documents(docs: list[str], val_fraction: float) -> list[str]:
    """Split label of every document; at least one val document when val_fraction > 0 and >= 2 docs."""
    labels = [split_of(d, val_fraction) for d in docs]
    if val_fraction > 0 and "val" not in labels and len(docs) >= 2:
        first = min(range(len(docs)), key=lambda i: unit_hash(docs[i], _SPLIT_SALT))
        labels[first] = "val"
    if "train" not in labels:
        raise DataError(f"all {len(docs)} documents went to validation; lower data.val_fraction "
                        f"(now {val_fraction}) or add documents")
    return labels


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


class SplitWriter:
    """Write one split's rows to ``<data_dir>/<split>-%06d.tar`` and count what each shard holds."""

    def __init__(self, data_dir: str, split: str, samples_per_shard: int, pad_id: int) -> None:
        self.data_dir, self.split, self.per_shard, self.pad_id = data_dir, split, samples_per_shard, pad_id
        self.writer = None
        self.samples: list[int] = []
        self.tokens: list[int] = []
        self.count = 0

    def write(self, row: np.ndarray) -> None:
        if self.writer is None:  # open lazily: an empty split writes no empty shard
            import webdataset as wds  # imports torch: keep it out of the worker processes

            self.writer = wds.ShardWriter(os.path.join(self.data_dir, f"{self.split}-%06d.tar"),
                                          maxcount=self.per_shard, maxsize=float("inf"), verbose=0, mtime=0)
        buf = io.BytesIO()
        np.save(buf, row, allow_pickle=False)
        self.writer.write({"__key__": f"{self.split}-{self.count:09d}", SAMPLE_KEY: buf.getvalue()})
        shard = self.count // self.per_shard
        if shard == len(self.samples):
            self.samples.append(0)
            self.tokens.append(0)
        self.samples[shard] += 1
        self.tokens[shard] += int(np.count_nonzero(row != self.pad_id))
        self.count += 1

    def close(self) -> list[dict]:
        """Close the last shard; return ``{name, split, samples, tokens}`` per shard."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        return [{"name": f"{self.split}-{i:06d}.tar", "split": self.split, "samples": s, "tokens": t}
                for i, (s, t) in enumerate(zip(self.samples, self.tokens))]


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


def tokenize_documents(docs: list[str], model_path: str, workers: int, chunk_docs: int = 256):
    """Yield the int32 token array of every document, in order, encoded by ``workers`` processes."""
    bar = tqdm(total=len(docs), desc="tokenize", unit="doc", disable=None, leave=False)
    try:
        if workers <= 1:
            _init_worker(model_path)
            for chunk in _chunks(docs, chunk_docs):
                yield from _encode_chunk(chunk)
                bar.update(len(chunk))
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(model_path,)) as pool:
            for arrays in pool.imap(_encode_chunk, _chunks(docs, chunk_docs)):
                yield from arrays
                bar.update(len(arrays))
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def _existing_manifest(data_dir: str, config_hash: str) -> dict | None:
    """The manifest in ``data_dir`` if it matches ``config_hash``, its tokenizer and its shard files."""
    path = os.path.join(data_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("format") != FORMAT_VERSION or manifest.get("config_hash") != config_hash:
        return None
    tok_path = os.path.join(data_dir, manifest["tokenizer"]["path"])
    if not os.path.isfile(tok_path) or sha256_file(tok_path) != manifest["tokenizer"]["sha256"]:
        return None
    for shard in manifest["shards"]:
        p = os.path.join(data_dir, shard["name"])
        if not os.path.isfile(p) or os.path.getsize(p) != shard["bytes"]:
            return None
    return manifest


def _remove_outputs(data_dir: str) -> None:
    for name in os.listdir(data_dir):
        if name == MANIFEST or _SHARD_RE.match(name):
            os.remove(os.path.join(data_dir, name))


def _tokenizer_for(cfg, train_docs: list[str], data_dir: str, workers: int) -> tuple[Tokenizer, bool]:
    """Reuse ``<data_dir>/tokenizer.model`` when it was trained from the same inputs, else train it."""
    prefix = os.path.join(data_dir, TOKENIZER_PREFIX)
    meta_path = prefix + ".json"
    want = _tokenizer_hash(cfg)
    if os.path.isfile(prefix + ".model") and os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("config_hash") == want and meta.get("sha256") == sha256_file(prefix + ".model"):
            tok = Tokenizer(prefix + ".model")
            log.info("tokenizer: reusing %s (sha256 %s)", tok.path, tok.sha256[:12])
            return tok, True
    tok = train_tokenizer(train_docs, prefix, cfg.vocab_size, cfg.tokenizer_type, cfg.tokenizer_sample_mb,
                          num_threads=workers)
    _write_json(meta_path, {"config_hash": want, "sha256": tok.sha256})
    return tok, False


def prepare_data(cfg, force: bool = False) -> dict:
    """Build the tokenizer, shards and manifest for ``cfg`` (a DataConfig or an ExperimentConfig).

    Returns:
        The manifest: ``format``, ``config_hash``, ``data_config`` (the fields hashed), ``seq_len``,
        ``vocab_size``, ``dtype``, ``special_ids``, ``tokenizer`` ({path relative to data_dir, sha256}),
        ``shards`` (per shard: name, split, samples, tokens (non-[PAD] ids), bytes, sha256),
        ``splits`` (per split: documents, shards, samples, tokens), ``corpus`` ({documents, mb}),
        ``packing``, ``timings_s``, ``created``.

    Raises:
        DataError: empty corpus, untrainable tokenizer, or too little text for a sequence.
    """
    cfg = getattr(cfg, "data", cfg)
    data_dir = cfg.data_dir
    os.makedirs(data_dir, exist_ok=True)
    config_hash = data_config_hash(cfg)
    if not force:
        existing = _existing_manifest(data_dir, config_hash)
        if existing is not None:
            log.info("prepare: %s is up to date (config hash %s, tokenizer %s): nothing to do; "
                     "%d train / %d val samples in %d shards", os.path.join(data_dir, MANIFEST), config_hash,
                     existing["tokenizer"]["sha256"][:12], existing["splits"]["train"]["samples"],
                     existing["splits"]["val"]["samples"], len(existing["shards"]))
            return existing
    workers = resolve_workers(cfg.prepare_workers)
    timings: dict[str, float] = {}
    t = time.perf_counter()

    docs = iter_documents(list(cfg.corpus), data_dir, cfg.corpus_max_mb, workers)
    timings["corpus"] = time.perf_counter() - t
    t = time.perf_counter()
    labels = split_documents(docs, cfg.val_fraction)
    # Sources arrive grouped (one package's docstrings after another); the loader only shuffles
    # shards and a buffer, so without this a stretch of training would see one domain at a time.
    # A hashed order is a stable shuffle: the same corpus always gives the same shards.
    order = sorted(range(len(docs)), key=lambda i: unit_hash(docs[i], _ORDER_SALT))
    docs, labels = [docs[i] for i in order], [labels[i] for i in order]
    train_docs = [d for d, s in zip(docs, labels) if s == "train"]
    timings["split"] = time.perf_counter() - t
    t = time.perf_counter()

    tok, reused = _tokenizer_for(cfg, train_docs, data_dir, workers)
    timings["tokenizer"] = time.perf_counter() - t
    t = time.perf_counter()
    del train_docs

    _remove_outputs(data_dir)  # never leave an old manifest next to half-rewritten shards
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
    packers = {s: Packer(cfg.seq_len, tok.cls_id, tok.sep_id, tok.pad_id, dtype) for s in SPLITS}
    writers = {s: SplitWriter(data_dir, s, cfg.samples_per_shard, tok.pad_id) for s in SPLITS}
    doc_counts = dict.fromkeys(SPLITS, 0)
    for tokens, split in zip(tokenize_documents(docs, tok.path, workers), labels):
        if tokens.size:
            doc_counts[split] += 1
        for row in packers[split].add(tokens):
            writers[split].write(row)
    shards: list[dict] = []
    for s in SPLITS:
        for row in packers[s].finish():
            writers[s].write(row)
        shards.extend(writers[s].close())
    timings["tokenize_pack_write"] = time.perf_counter() - t
    t = time.perf_counter()
    for shard in shards:
        p = os.path.join(data_dir, shard["name"])
        shard["bytes"] = os.path.getsize(p)
        shard["sha256"] = sha256_file(p)
    timings["hash"] = time.perf_counter() - t
    splits = {s: {"documents": doc_counts[s], "shards": sum(x["split"] == s for x in shards),
                  "samples": sum(x["samples"] for x in shards if x["split"] == s),
                  "tokens": sum(x["tokens"] for x in shards if x["split"] == s)} for s in SPLITS}
    if splits["train"]["samples"] == 0:
        raise DataError("the train split produced no sequence; add text to data.corpus")
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
                   "[PAD]-padded",
        "corpus": {"documents": len(docs), "mb": round(sum(len(d.encode()) for d in docs) / _MB, 3)},
        "splits": splits,
        "shards": shards,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write_json(os.path.join(data_dir, MANIFEST), manifest)
    disk = sum(x["bytes"] for x in shards) / _MB
    log.info("prepare: %d docs (%.1f MB text) -> train %d docs / %d tokens / %d samples / %d shards, "
             "val %d docs / %d tokens / %d samples / %d shards; %.1f MB of shards in %s",
             len(docs), manifest["corpus"]["mb"], splits["train"]["documents"], splits["train"]["tokens"],
             splits["train"]["samples"], splits["train"]["shards"], splits["val"]["documents"],
             splits["val"]["tokens"], splits["val"]["samples"], splits["val"]["shards"], disk, data_dir)
    log.info("prepare: seconds per phase: %s (total %.1f)",
             ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), sum(timings.values()))
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m data_pipeline.prepare --config X.yaml [--force] [key=value ...]``."""
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="experiment YAML (its data: section is used)")
    parser.add_argument("--force", action="store_true", help="rebuild even if manifest.json is up to date")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.data_dir=/tmp/demo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from launch.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        prepare_data(cfg.data, force=args.force)
    except (ConfigError, DataError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
