"""Corpus gathering: text/jsonl/glob entries, the demo corpora, and one-line errors."""

from __future__ import annotations

import json
import os
import time

import pytest

from data_pipeline import corpus as C
from data_pipeline.errors import DataError


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_txt_jsonl_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("First doc line one.\nline two.\n\n  \n\nSecond doc.\n\n\n\nThird doc.\n")
    (tmp_path / "b.txt").write_text("Only doc of b.")
    with open(tmp_path / "c.jsonl", "w") as f:
        f.write(json.dumps({"text": "JSON doc one."}) + "\n\n")
        f.write(json.dumps({"text": "   "}) + "\n")
        f.write(json.dumps({"text": "JSON doc two.", "meta": 1}) + "\n")
    docs = list(C.iter_documents([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")]))
    assert docs == ["First doc line one.\nline two.", "Second doc.", "Third doc.", "Only doc of b.",
                    "JSON doc one.", "JSON doc two."]
    assert list(C.iter_documents(str(tmp_path / "b.txt"))) == ["Only doc of b."]


@pytest.mark.parametrize("setup", ["no_match", "whitespace_only", "empty_list", "bad_ext", "bad_json", "no_text"])
def test_bad_corpus_raises_one_line(tmp_path, setup):
    entry = str(tmp_path / "x.txt")
    if setup == "no_match":
        entry = str(tmp_path / "nothing-*.txt")
    elif setup == "whitespace_only":
        (tmp_path / "x.txt").write_text("\n\n   \n\t\n")
    elif setup == "bad_ext":
        entry = str(tmp_path / "x.csv")
        (tmp_path / "x.csv").write_text("a,b\n")
    elif setup == "bad_json":
        entry = str(tmp_path / "x.jsonl")
        (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{not json\n')
    elif setup == "no_text":
        entry = str(tmp_path / "x.jsonl")
        (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError) as err:
        list(C.iter_documents([] if setup == "empty_list" else [entry]))
    msg = _one_line(err)
    assert isinstance(err.value, ValueError)
    if setup == "no_match":
        assert "matches no file" in msg and "nothing-*.txt" in msg
    if setup == "whitespace_only":
        assert "holds no text" in msg
    if setup == "bad_json":
        assert "x.jsonl:2" in msg


def test_python_files_skip_tests_and_are_sorted(tmp_path):
    for rel in ["pkg/__init__.py", "pkg/b.py", "pkg/a.py", "pkg/test_a.py", "pkg/a_test.py", "pkg/tests/t.py",
                "pkg/test/u.py", "pkg/conftest.py", "pkg/sub/c.py", "pkg/site-packages/x.py"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text('"""doc"""\n')
    files = [os.path.relpath(f, tmp_path) for f in C.python_files([str(tmp_path)])]
    assert files == ["pkg/__init__.py", "pkg/a.py", "pkg/b.py", "pkg/sub/c.py"]


def test_docstrings_filters_short_ones(tmp_path):
    src = ('"""Module docstring that is long enough to count as a real sentence."""\n'
           "class A:\n    '''Short.'''\n    def f(self):\n"
           "        '''Return the answer, computed with great care and some patience.'''\n"
           "async def g():\n    '''An async function that also documents itself at length.'''\n")
    (tmp_path / "m.py").write_text(src)
    (tmp_path / "broken.py").write_text("def (:\n")
    docs = C.docstrings(str(tmp_path / "m.py"))
    assert len(docs) == 3 and all(len(d) >= C.MIN_DOC_CHARS for d in docs)
    assert C.docstrings(str(tmp_path / "broken.py")) == []


def test_demo_stdlib_is_deterministic_capped_and_cached(tmp_path):
    cap = 0.2
    docs = list(C.demo_documents(C.DEMO_STDLIB, str(tmp_path), max_mb=cap, workers=2))
    assert docs and len(set(docs)) == len(docs)
    assert sum(len(d.encode()) for d in docs) <= cap * 1_000_000
    assert all(len(d) >= C.MIN_DOC_CHARS for d in docs)
    assert os.path.isfile(tmp_path / "corpus" / "demo_stdlib.jsonl")
    t0 = time.perf_counter()
    cached = list(C.iter_documents(["demo_stdlib"], str(tmp_path), max_mb=cap, workers=2))
    assert time.perf_counter() - t0 < 1.0
    assert cached == docs
    # same documents with one process and no cache: the order does not depend on the worker count
    assert list(C.demo_documents(C.DEMO_STDLIB, None, max_mb=cap, workers=1)) == docs
    # another cap rebuilds instead of reusing the cache
    smaller = list(C.demo_documents(C.DEMO_STDLIB, str(tmp_path), max_mb=0.05, workers=1))
    assert smaller == docs[:len(smaller)] and len(smaller) < len(docs)


def test_demo_roots():
    assert C.demo_roots(C.DEMO_STDLIB) == C.demo_roots(C.DEMO)[:1]
    assert any("site-packages" in r for r in C.demo_roots(C.DEMO))


def test_txt_reader_streams_and_splits_like_the_blank_line_rule(tmp_path):
    """Read line by line, a .txt file gives the documents of re.split on blank lines of the whole text."""
    import re

    text = ("\n  \nfirst\nstill first \n\t\n\n\nsecond\x0b\n\x0b \n third \r\n\r\nfourth\u00a0\n\u00a0\nstill fourth\n"
            "last line without newline  ")
    (tmp_path / "t.txt").write_text(text, newline="")
    with open(tmp_path / "t.txt", encoding="utf-8") as f:  # universal newlines, as the reader sees them
        whole = f.read()
    expected = [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", whole) if d.strip()]
    reader = C.read_txt(str(tmp_path / "t.txt"))
    assert not isinstance(reader, list) and list(reader) == expected
    assert expected[0] == "first\nstill first" and expected[2] == "third"
    assert expected[-1] == "fourth\u00a0\n\u00a0\nstill fourth\nlast line without newline"  # NBSP is text


def test_iter_documents_is_lazy(tmp_path):
    """Entries are checked at the call; documents come one at a time, so a bad line late in a file only
    stops the stream when it is reached."""
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{broken\n')
    with pytest.raises(DataError, match="matches no file"):
        C.iter_documents([str(tmp_path / "a.jsonl"), str(tmp_path / "missing.txt")])
    it = C.iter_documents([str(tmp_path / "a.jsonl")])
    assert next(it) == "one" and next(it) == "two"
    with pytest.raises(DataError, match=r"a.jsonl:3 is not valid JSON"):
        next(it)
    assert C.estimate_bytes([str(tmp_path / "a.jsonl"), "demo_stdlib"], max_mb=1.0) == (
        os.path.getsize(tmp_path / "a.jsonl") + 1_000_000)
