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

Everything streams: :func:`iter_documents` and the readers are generators (a ``.txt`` file is read
line by line, a ``.jsonl`` file one line at a time, the demo corpus is written to its cache as it is
collected and then read back from it), so memory does not grow with the size of the corpus.
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
from collections.abc import Iterable, Iterator

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


_BLANK_LINE = re.compile(r"[ \t\r\f\v]*\n?")


def read_txt(path: str) -> Iterator[str]:
    """Documents of a text file, one at a time: blocks separated by blank lines (lines holding only
    spaces, tabs and the like), stripped, empty ones dropped. Reads line by line."""
    lines: list[str] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if _BLANK_LINE.fullmatch(line):
                doc = "".join(lines).strip()
                lines = []
                if doc:
                    yield doc
            else:
                lines.append(line)
    doc = "".join(lines).strip()
    if doc:
        yield doc


def read_jsonl(path: str) -> Iterator[str]:
    """The non-empty ``text`` fields of a JSON-lines file, stripped, one line at a time."""
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
                yield text.strip()


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


def _collect_docstrings(files: list[str], max_bytes: int, workers: int, desc: str) -> Iterator[str]:
    """Docstrings of ``files`` in file order, de-duplicated, until ``max_bytes`` of UTF-8 text (yielded
    one at a time; only a 20-byte digest per document is kept, to de-duplicate)."""
    seen: set[bytes] = set()
    total = 0
    bar = tqdm(total=len(files), desc=desc, unit="file", disable=None, leave=False)
    pool = None
    try:
        if workers <= 1:
            results: Iterable[list[str]] = map(docstrings, files)
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
                    return
                seen.add(digest)
                total += size
                yield doc
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _demo_meta(name: str, cap_mb: float) -> dict:
    return {"format": _DEMO_FORMAT, "name": name, "max_mb": cap_mb, "python": sys.version.split()[0],
            "roots": demo_roots(name)}


def _build_demo_cache(name: str, cap_mb: float, cache: str, meta_path: str, workers: int) -> None:
    """Collect the demo corpus straight into ``cache`` (via a temporary file), then write its meta."""
    meta = _demo_meta(name, cap_mb)
    t0 = time.perf_counter()
    files = python_files(meta["roots"])
    workers = resolve_workers(workers)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.tmp{os.getpid()}"
    count = nbytes = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in _collect_docstrings(files, int(cap_mb * _MB), workers, desc=f"corpus {name}"):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                count += 1
                nbytes += len(doc.encode())
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("corpus %s: %d documents (%.1f MB, cap %.1f MB) from %d source files under %d roots "
             "in %.1f s with %d workers", name, count, nbytes / _MB, cap_mb, len(files), len(meta["roots"]),
             time.perf_counter() - t0, workers)
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**meta, "documents": count, "bytes": nbytes}, f, indent=1)
    os.replace(tmp, meta_path)


def demo_documents(name: str = DEMO, data_dir: str | None = None, max_mb: float = 48.0,
                   workers: int = 0) -> Iterator[str]:
    """The documents of the demo corpus ``demo`` or ``demo_stdlib``, streamed.

    With a ``data_dir`` the corpus is built into ``<data_dir>/corpus/<name>.jsonl`` when that cache is
    missing or stale (this happens on the call), then read back one line at a time; without one the
    documents are yielded as they are collected.

    Args:
        name: ``demo`` (stdlib + site-packages) or ``demo_stdlib`` (fixed stdlib slice, <= 2 MB).
        data_dir: cache directory root (``<data_dir>/corpus/<name>.jsonl``); None disables the cache.
        max_mb: cap in MB of UTF-8 text.
        workers: parsing processes; 0 = one per CPU core.
    """
    cap_mb = demo_cap_mb(name, max_mb)
    if not data_dir:
        return _collect_docstrings(python_files(demo_roots(name)), int(cap_mb * _MB), resolve_workers(workers),
                                   desc=f"corpus {name}")
    meta = _demo_meta(name, cap_mb)
    cache = os.path.join(data_dir, "corpus", f"{name}.jsonl")
    meta_path = os.path.join(data_dir, "corpus", f"{name}.meta.json")
    old: dict = {}
    if os.path.isfile(cache) and os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
    if {k: old.get(k) for k in meta} == meta:
        log.info("corpus %s: %d documents (%.1f MB) from cache %s", name, old.get("documents", 0),
                 old.get("bytes", 0) / _MB, cache)
    else:
        _build_demo_cache(name, cap_mb, cache, meta_path, workers)
    return read_jsonl(cache)


def demo_cap_mb(name: str, max_mb: float) -> float:
    """The cap in MB of the demo corpus ``name`` under ``data.corpus_max_mb=max_mb`` (checked)."""
    if name not in DEMO_NAMES:
        raise DataError(f"unknown demo corpus '{name}'; valid: {', '.join(DEMO_NAMES)}")
    cap_mb = min(max_mb, STDLIB_SLICE_MB) if name == DEMO_STDLIB else max_mb
    if cap_mb <= 0:
        raise DataError(f"data.corpus_max_mb={max_mb} leaves no room for the '{name}' corpus; make it positive")
    return cap_mb


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def iter_documents(corpus: list[str] | str, data_dir: str | None = None, max_mb: float = 48.0,
                   workers: int = 0) -> Iterator[str]:
    """The documents of ``corpus`` in entry order, streamed (nothing is gathered in memory).

    The entries are checked on the call (a missing file or a bad extension raises at once); the
    files are read, and a demo corpus built, as the iterator is consumed.

    Args:
        corpus: entries (paths, globs, ``demo``, ``demo_stdlib``); a single string is one entry.
        data_dir: where the demo corpora are cached (``<data_dir>/corpus/``); None = no cache.
        max_mb: cap of each demo corpus in MB of text (files are read in full).
        workers: processes for building a demo corpus; 0 = one per CPU core.

    Returns:
        An iterator of the documents (non-empty, stripped strings).

    Raises:
        DataError: an entry matches no file, a file is malformed, or the corpus holds no text (the
        last two while iterating).
    """
    if isinstance(corpus, str):
        corpus = [corpus]
    if not corpus:
        raise DataError("data.corpus is empty; list .txt/.jsonl paths or globs, or use [demo]")
    entries = [(e, None) if e in DEMO_NAMES else (e, expand_entry(e)) for e in corpus]
    for e, paths in entries:
        if paths is None:
            demo_cap_mb(e, max_mb)
    return _stream(entries, data_dir, max_mb, workers)


def _stream(entries: list[tuple[str, list[str] | None]], data_dir: str | None, max_mb: float,
            workers: int) -> Iterator[str]:
    count = nfiles = 0
    for entry, paths in entries:
        if paths is None:
            for doc in demo_documents(entry, data_dir, max_mb, workers):
                count += 1
                yield doc
            continue
        for path in paths:
            nfiles += 1
            for doc in read_txt(path) if path.endswith(".txt") else read_jsonl(path):
                count += 1
                yield doc
    if not count:
        raise DataError(f"corpus {[e for e, _ in entries]} holds no text ({nfiles} files read); "
                        "add non-empty .txt/.jsonl files or use data.corpus=[demo]")


def estimate_bytes(corpus: list[str] | str, max_mb: float = 48.0) -> int:
    """An upper bound (about) of the text bytes of ``corpus``: file sizes, and the cap of a demo corpus."""
    if isinstance(corpus, str):
        corpus = [corpus]
    total = 0
    for entry in corpus:
        if entry in DEMO_NAMES:
            total += int(demo_cap_mb(entry, max_mb) * _MB)
        else:
            total += sum(os.path.getsize(p) for p in expand_entry(entry))
    return total
