"""Gather the documents of a corpus: text files, JSON-lines files, globs, or the embedded demo corpus.

Corpus entries (``data.corpus`` is a list of them):

- ``path/to/file.txt``: documents separated by one or more blank lines;
- ``path/to/file.jsonl``: one JSON object per line, the document in its ``text`` field;
- a glob of either (``shards/**/*.jsonl``), expanded in sorted order;
- ``demo``: docstrings (module, class, function) of the standard library and of the site-packages
  of the running interpreter, found by parsing their sources with :mod:`ast`;
- ``demo_stdlib``: the same, restricted to the standard library and capped at 2 MB, so it does not
  depend on what is installed (the tests use it).

The demo corpora are built in parallel, deterministically (sorted files, ordered results, first
occurrence wins when de-duplicating) and cached as ``<data_dir>/corpus/<name>.jsonl``.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterable

from tqdm import tqdm

from data_pipeline.errors import DataError

log = logging.getLogger(__name__)

DEMO = "demo"
DEMO_STDLIB = "demo_stdlib"
DEMO_NAMES = (DEMO, DEMO_STDLIB)
STDLIB_SLICE_MB = 2.0
"""Cap of ``demo_stdlib`` in MB (the configured cap applies too when it is smaller)."""
MIN_DOC_CHARS = 40
"""Docstrings shorter than this (about a sentence) are skipped."""
MIN_DOC_WORDS = 6
"""Docstrings with fewer words than this are skipped."""
_SKIP_DIRS = frozenset({"test", "tests", "testing", "idle_test", "__pycache__", "site-packages",
                        "dist-packages", "node_modules"})
_DEMO_FORMAT = 1  # bump when the extraction rules change, so stale caches are rebuilt
_MB = 1_000_000


def resolve_workers(workers: int) -> int:
    """``workers`` processes, where 0 means one per CPU core."""
    return workers if workers > 0 else (os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def expand_entry(entry: str) -> list[str]:
    """Paths named by one corpus entry (a path or a glob), sorted; raises DataError if none."""
    entry = os.path.expanduser(entry)
    paths = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
    paths = [p for p in paths if os.path.isfile(p)]
    if not paths:
        raise DataError(f"corpus entry '{entry}' matches no file; give existing .txt/.jsonl paths or globs, "
                        f"or '{DEMO}' for the built-in corpus")
    for p in paths:
        if not p.endswith((".txt", ".jsonl")):
            raise DataError(f"corpus file '{p}' is neither .txt nor .jsonl; convert it or drop it from data.corpus")
    return paths


def read_txt(path: str) -> list[str]:
    """Documents of a text file: blocks separated by blank lines, stripped, empty ones dropped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text) if d.strip()]


def read_jsonl(path: str) -> list[str]:
    """The non-empty ``text`` fields of a JSON-lines file."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno} has no string 'text' field; every line needs {{\"text\": ...}}")
            if text.strip():
                docs.append(text.strip())
    return docs


def file_fingerprint(corpus: list[str]) -> list[list]:
    """(path, size, mtime_ns) of every file the non-demo entries name, to notice changed inputs."""
    out = []
    for entry in corpus:
        if entry in DEMO_NAMES:
            continue
        try:
            paths = expand_entry(entry)
        except DataError:
            out.append([entry, None, None])
            continue
        for p in paths:
            st = os.stat(p)
            out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


# --------------------------------------------------------------------------------------------
# Demo corpus: docstrings of the Python sources on this machine
# --------------------------------------------------------------------------------------------


def demo_roots(name: str) -> list[str]:
    """Source roots of a demo corpus: the stdlib, plus (for ``demo``) the interpreter's site dirs."""
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    roots = [stdlib]
    if name == DEMO:
        sites = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
        sites |= {p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")}
        for p in sorted(os.path.realpath(s) for s in sites if os.path.isdir(s)):
            if p not in roots:
                roots.append(p)
    return roots


def _is_test_file(name: str) -> bool:
    return name.startswith("test_") or name.endswith("_test.py") or name in ("conftest.py", "tests.py")


def python_files(roots: list[str]) -> list[str]:
    """``.py`` files under ``roots`` in a deterministic order, test dirs and files skipped."""
    out = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
            out.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                       if f.endswith(".py") and not _is_test_file(f))
    return out


def docstrings(path: str) -> list[str]:
    """Cleaned docstrings of the module, classes and functions of one source file (long enough ones)."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError, RecursionError, MemoryError, OSError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                doc = doc.strip()
                if len(doc) >= MIN_DOC_CHARS and len(doc.split()) >= MIN_DOC_WORDS:
                    docs.append(doc)
    return docs


def _collect_docstrings(files: list[str], max_bytes: int, workers: int, desc: str) -> list[str]:
    """Docstrings of ``files`` in file order, de-duplicated, until ``max_bytes`` of UTF-8 text."""
    seen: set[bytes] = set()
    docs: list[str] = []
    total = 0
    full = False
    bar = tqdm(total=len(files), desc=desc, unit="file", disable=None, leave=False)
    try:
        if workers <= 1:
            results: Iterable[list[str]] = map(docstrings, files)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            # imap keeps the file order, so the corpus does not depend on the worker count
            results = pool.imap(docstrings, files, chunksize=4)
        for file_docs in results:
            bar.update(1)
            for doc in file_docs:
                digest = hashlib.sha1(doc.encode()).digest()
                if digest in seen:
                    continue
                size = len(doc.encode())
                if total + size > max_bytes:
                    full = True
                    break
                seen.add(digest)
                docs.append(doc)
                total += size
            if full:
                break
    finally:
        bar.close()
        if workers > 1 and pool is not None:
            pool.terminate()
            pool.join()
    return docs


def _write_jsonl(path: str, docs: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def demo_documents(name: str = DEMO, data_dir: str | None = None, max_mb: float = 48.0,
                   workers: int = 0) -> list[str]:
    """Build (or read from its cache) the demo corpus ``demo`` or ``demo_stdlib``.

    Args:
        name: ``demo`` (stdlib + site-packages) or ``demo_stdlib`` (fixed stdlib slice, <= 2 MB).
        data_dir: cache directory root (``<data_dir>/corpus/<name>.jsonl``); None disables the cache.
        max_mb: cap in MB of UTF-8 text.
        workers: parsing processes; 0 = one per CPU core.
    """
    if name not in DEMO_NAMES:
        raise DataError(f"unknown demo corpus '{name}'; valid: {', '.join(DEMO_NAMES)}")
    cap_mb = min(max_mb, STDLIB_SLICE_MB) if name == DEMO_STDLIB else max_mb
    if cap_mb <= 0:
        raise DataError(f"data.corpus_max_mb={max_mb} leaves no room for the '{name}' corpus; make it positive")
    roots = demo_roots(name)
    meta = {"format": _DEMO_FORMAT, "name": name, "max_mb": cap_mb, "python": sys.version.split()[0],
            "roots": roots}
    cache = meta_path = None
    if data_dir:
        cache = os.path.join(data_dir, "corpus", f"{name}.jsonl")
        meta_path = os.path.join(data_dir, "corpus", f"{name}.meta.json")
        if os.path.isfile(cache) and os.path.isfile(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            if {k: old.get(k) for k in meta} == meta:
                docs = read_jsonl(cache)
                log.info("corpus %s: %d documents (%.1f MB) from cache %s", name, len(docs),
                         old.get("bytes", 0) / _MB, cache)
                return docs
    t0 = time.perf_counter()
    files = python_files(roots)
    workers = resolve_workers(workers)
    docs = _collect_docstrings(files, int(cap_mb * _MB), workers, desc=f"corpus {name}")
    nbytes = sum(len(d.encode()) for d in docs)
    log.info("corpus %s: %d documents (%.1f MB, cap %.1f MB) from %d source files under %d roots "
             "in %.1f s with %d workers", name, len(docs), nbytes / _MB, cap_mb, len(files), len(roots),
             time.perf_counter() - t0, workers)
    if cache and meta_path:
        _write_jsonl(cache, docs)
        tmp = f"{meta_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**meta, "documents": len(docs), "bytes": nbytes}, f, indent=1)
        os.replace(tmp, meta_path)
    return docs


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def iter_documents(corpus: list[str] | str, data_dir: str | None = None, max_mb: float = 48.0,
                   workers: int = 0) -> list[str]:
    """All documents of ``corpus`` in entry order.

    Args:
        corpus: entries (paths, globs, ``demo``, ``demo_stdlib``); a single string is one entry.
        data_dir: where the demo corpora are cached (``<data_dir>/corpus/``); None = no cache.
        max_mb: cap of each demo corpus in MB of text (files are read whole).
        workers: processes for building a demo corpus; 0 = one per CPU core.

    Returns:
        The documents (non-empty, stripped strings).

    Raises:
        DataError: an entry matches no file, a file is malformed, or the corpus holds no text.
    """
    if isinstance(corpus, str):
        corpus = [corpus]
    if not corpus:
        raise DataError("data.corpus is empty; list .txt/.jsonl paths or globs, or use [demo]")
    docs: list[str] = []
    nfiles = 0
    for entry in corpus:
        if entry in DEMO_NAMES:
            docs.extend(demo_documents(entry, data_dir, max_mb, workers))
            continue
        for path in expand_entry(entry):
            nfiles += 1
            docs.extend(read_txt(path) if path.endswith(".txt") else read_jsonl(path))
    if not docs:
        raise DataError(f"corpus {list(corpus)} holds no text ({nfiles} files read); "
                        "add non-empty .txt/.jsonl files or use data.corpus=[demo]")
    return docs

