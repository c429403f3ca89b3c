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

Parallel preparation (a Slurm job array, slurm/prepare_data.sbatch): ``--part I --num-parts N`` packs
and writes only the I-th of N contiguous ranges of the (hashed) document order, as shards
``<split>-IIJJJJ.tar``, and records them in ``manifest.part-I-of-N.json``. Every part gathers the same
corpus; the first to take ``<data_dir>/.prepare.lock`` trains the tokenizer, the others reuse it. The
part that finishes last merges the part manifests into ``manifest.json`` (``"parts": N``). Packing
restarts at each range, so the shards differ slightly from a one-process run (one short, padded row
per range and split); the manifest describes exactly what was written.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
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
MAX_PARTS = 100
"""``--num-parts`` limit: a part's shards are numbered ``<part:02d><index:04d>``."""
_PART_SHARDS = 10_000
_DATA_FIELDS = ("corpus", "corpus_max_mb", "vocab_size", "tokenizer_type", "tokenizer_sample_mb",
                "seq_len", "val_fraction", "samples_per_shard")
"""DataConfig fields that change the shards (masking and loader fields do not)."""
_TOKENIZER_FIELDS = ("corpus", "corpus_max_mb", "vocab_size", "tokenizer_type", "tokenizer_sample_mb",
                     "val_fraction")
_MB = 1_000_000


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

    def __init__(self, data_dir: str, split: str, samples_per_shard: int, pad_id: int,
                 part: int | None = None) -> None:
        self.data_dir, self.split, self.per_shard, self.pad_id = data_dir, split, samples_per_shard, pad_id
        # shard names: <split>-%06d.tar, or <split>-<part:02d>%04d.tar for one part of a parallel prepare
        self.fmt = f"{split}-%06d.tar" if part is None else f"{split}-{part:02d}%04d.tar"
        self.writer = None
        self.samples: list[int] = []
        self.tokens: list[int] = []
        self.count = 0

    def write(self, row: np.ndarray) -> None:
        if self.writer is None:  # open lazily: an empty split writes no empty shard
            import webdataset as wds  # imports torch: keep it out of the worker processes

            self.writer = wds.ShardWriter(os.path.join(self.data_dir, self.fmt),
                                          maxcount=self.per_shard, maxsize=float("inf"), verbose=0, mtime=0)
        buf = io.BytesIO()
        np.save(buf, row, allow_pickle=False)
        self.writer.write({"__key__": f"{self.split}-{self.count:09d}", SAMPLE_KEY: buf.getvalue()})
        shard = self.count // self.per_shard
        if "%04d" in self.fmt and shard >= _PART_SHARDS:
            raise DataError(f"one part of a parallel prepare would write more than {_PART_SHARDS} {self.split} "
                            "shards; raise --num-parts or data.samples_per_shard")
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
        return [{"name": self.fmt % i, "split": self.split, "samples": s, "tokens": t}
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


def _tokenizer_for(cfg, train_docs: list[str], data_dir: str, workers: int) -> tuple[Tokenizer, bool]:
    """Reuse ``<data_dir>/tokenizer.model`` when it was trained from the same inputs, else train it;
    with ``data.tokenizer_model``, copy that model in (``reused`` is then True)."""
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


def _write_shards(cfg, docs: list[str], labels: list[str], tok: Tokenizer, data_dir: str, workers: int,
                  part: int | None = None) -> tuple[list[dict], dict[str, int]]:
    """Tokenize, pack and write ``docs``; return the shards (with bytes and sha256) and documents per split."""
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
    packers = {s: Packer(cfg.seq_len, tok.cls_id, tok.sep_id, tok.pad_id, dtype) for s in SPLITS}
    writers = {s: SplitWriter(data_dir, s, cfg.samples_per_shard, tok.pad_id, part) for s in SPLITS}
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
    for shard in shards:
        p = os.path.join(data_dir, shard["name"])
        shard["bytes"] = os.path.getsize(p)
        shard["sha256"] = sha256_file(p)
    return shards, doc_counts


def _split_totals(shards: list[dict], doc_counts: dict[str, int]) -> dict:
    return {s: {"documents": doc_counts[s], "shards": sum(x["split"] == s for x in shards),
                "samples": sum(x["samples"] for x in shards if x["split"] == s),
                "tokens": sum(x["tokens"] for x in shards if x["split"] == s)} for s in SPLITS}


def prepare_data(cfg, force: bool = False, part: int | None = None, num_parts: int = 1) -> dict:
    """Build the tokenizer, shards and manifest for ``cfg`` (a DataConfig or an ExperimentConfig).

    With ``num_parts`` > 1 this process writes part ``part`` only (see the module docstring) and
    returns the merged manifest if it was the last part to finish, else its part manifest
    (``"part"``, ``"num_parts"``, ``"shards"``, ``"splits"``).

    Returns:
        The manifest: ``format``, ``config_hash``, ``data_config`` (the fields hashed), ``seq_len``,
        ``vocab_size``, ``dtype``, ``special_ids``, ``tokenizer`` ({path relative to data_dir, sha256}),
        ``shards`` (per shard: name, split, samples, tokens (non-[PAD] ids), bytes, sha256),
        ``splits`` (per split: documents, shards, samples, tokens), ``corpus`` ({documents, mb}),
        ``packing``, ``parts``, ``timings_s``, ``created``.

    Raises:
        DataError: empty corpus, untrainable tokenizer, too little text for a sequence, or a bad part.
    """
    cfg = getattr(cfg, "data", cfg)
    if not 1 <= num_parts <= MAX_PARTS:
        raise DataError(f"--num-parts {num_parts} must be in [1, {MAX_PARTS}]")
    if num_parts > 1 and (part is None or not 0 <= part < num_parts):
        raise DataError(f"--part {part} must be in [0, {num_parts - 1}] with --num-parts {num_parts}")
    parallel = num_parts > 1
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

    # parts take turns here: the first builds the corpus cache and the tokenizer, the others reuse them
    with _data_dir_lock(data_dir) if parallel else contextlib.nullcontext():
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
        if parallel:  # the old manifest and this part's old shards go; other parts' shards stay
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(data_dir, MANIFEST))
            mine = re.compile(rf"^(train|val)-{part:02d}\d{{4}}\.tar$")
            for name in os.listdir(data_dir):
                if mine.match(name):
                    os.remove(os.path.join(data_dir, name))

    corpus = {"documents": len(docs), "mb": round(sum(len(d.encode()) for d in docs) / _MB, 3)}
    if parallel:
        lo, hi = part * len(docs) // num_parts, (part + 1) * len(docs) // num_parts
        docs, labels = docs[lo:hi], labels[lo:hi]
    else:
        _remove_outputs(data_dir)  # never leave an old manifest next to half-rewritten shards
    shards, doc_counts = _write_shards(cfg, docs, labels, tok, data_dir, workers, part if parallel else None)
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
        "corpus": corpus,
        "parts": num_parts,
        "splits": _split_totals(shards, doc_counts),
        "shards": shards,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if parallel:
        manifest.update(part=part, num_parts=num_parts, doc_counts=doc_counts)
        _write_json(os.path.join(data_dir, _part_manifest_name(part, num_parts)), manifest)
        log.info("prepare: part %d/%d: documents %d..%d -> %d shards", part, num_parts, lo, hi, len(shards))
        with _data_dir_lock(data_dir):
            merged = _merge_parts(data_dir, num_parts, config_hash)
        if merged is None:
            return manifest
        manifest = merged
    elif manifest["splits"]["train"]["samples"] == 0:
        raise DataError("the train split produced no sequence; add text to data.corpus")
    else:
        _write_json(os.path.join(data_dir, MANIFEST), manifest)
    splits = manifest["splits"]
    disk = sum(x["bytes"] for x in manifest["shards"]) / _MB
    log.info("prepare: %d docs (%.1f MB text) -> train %d docs / %d tokens / %d samples / %d shards, "
             "val %d docs / %d tokens / %d samples / %d shards; %.1f MB of shards in %s",
             corpus["documents"], corpus["mb"], splits["train"]["documents"], splits["train"]["tokens"],
             splits["train"]["samples"], splits["train"]["shards"], splits["val"]["documents"],
             splits["val"]["tokens"], splits["val"]["samples"], splits["val"]["shards"], disk, data_dir)
    log.info("prepare: seconds per phase: %s (total %.1f)",
             ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), sum(timings.values()))
    return manifest


def _merge_parts(data_dir: str, num_parts: int, config_hash: str) -> dict | None:
    """manifest.json from all part manifests once every part of this config is written, else None."""
    parts = []
    for i in range(num_parts):
        try:
            with open(os.path.join(data_dir, _part_manifest_name(i, num_parts))) as f:
                m = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None
        if m.get("config_hash") != config_hash:
            return None  # a part of an older config: it has to be rerun
        parts.append(m)
    if len({m["tokenizer"]["sha256"] for m in parts}) != 1:
        raise DataError(f"the parts in {data_dir} used different tokenizers; rerun them all")
    shards = [s for m in parts for s in m["shards"]]
    doc_counts = {s: sum(m["doc_counts"][s] for m in parts) for s in SPLITS}
    merged = {k: v for k, v in parts[0].items() if k not in ("part", "num_parts", "doc_counts")}
    merged.update(shards=shards, splits=_split_totals(shards, doc_counts), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  timings_s={k: round(max(m["timings_s"].get(k, 0) for m in parts), 3) for k in parts[0]["timings_s"]})
    if merged["splits"]["train"]["samples"] == 0:
        raise DataError("the train split produced no sequence; add text to data.corpus")
    _write_json(os.path.join(data_dir, MANIFEST), merged)
    for i in range(num_parts):
        os.remove(os.path.join(data_dir, _part_manifest_name(i, num_parts)))
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
