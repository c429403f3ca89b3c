"""Tokenizer: special ids, round trip, stable hash, word starts."""

from __future__ import annotations

import os

import pytest

from data_pipeline.errors import DataError
from data_pipeline.tokenizer import SPECIAL_TOKENS, Tokenizer, sha256_file, train_tokenizer


@pytest.fixture(scope="module")
def tok(prepared, data_cfg) -> Tokenizer:
    return Tokenizer.load(os.path.join(data_cfg.data_dir, prepared["tokenizer"]["path"]))


def test_special_ids(tok):
    assert (tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.unk_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(5)] == list(SPECIAL_TOKENS)
    assert tok.special_ids == {0, 1, 2, 3, 4}
    assert tok.vocab_size == 512


@pytest.mark.parametrize("text", [
    "Return the number of items in the list.",
    "If the value is None, raise a ValueError with a helpful message.",
    "  Create   a new\nobject from the given arguments and return it.  ",
])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids and not set(ids) & tok.special_ids
    assert tok.decode(ids) == " ".join(text.split())


def test_literal_special_text_is_not_special(tok):
    ids = tok.encode("put [MASK] and [CLS] here")
    assert tok.mask_id not in ids and tok.cls_id not in ids


def test_decode_drops_control_tokens(tok):
    ids = tok.encode("the value")
    assert tok.decode([tok.cls_id, *ids, tok.sep_id, tok.pad_id]) == "the value"


def test_word_starts(tok):
    ids = tok.encode("return the value")
    assert tok.is_word_start(ids[0])
    assert sum(tok.is_word_start(i) for i in ids) == 3
    assert not any(tok.is_word_start(i) for i in tok.special_ids)
    assert tok.word_start_table.shape == (tok.vocab_size,)


def test_sha256_stable_and_path_independent(tmp_path):
    docs = [f"Document number {i} says that the {w} is {v} and should be checked." for i, (w, v) in
            enumerate((w, v) for w in ("value", "item", "key", "name", "object") for v in ("set", "empty", "valid"))]
    a = train_tokenizer(docs * 4, str(tmp_path / "a" / "tok"), vocab_size=40, num_threads=1)
    b = train_tokenizer(docs * 4, str(tmp_path / "b" / "other"), vocab_size=40, num_threads=1)
    assert a.sha256 == b.sha256 == sha256_file(str(tmp_path / "a" / "tok.model"))
    assert Tokenizer.load(str(tmp_path / "a" / "tok")).sha256 == a.sha256
    assert os.path.isfile(tmp_path / "a" / "tok.vocab")


def test_vocab_too_large_and_empty_raise(tmp_path):
    with pytest.raises(DataError) as err:
        train_tokenizer(["tiny corpus of a few words"], str(tmp_path / "t"), vocab_size=5000, num_threads=1)
    assert "vocab_size" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError):
        train_tokenizer(["   ", ""], str(tmp_path / "t"), vocab_size=50)
    with pytest.raises(DataError):
        Tokenizer.load(str(tmp_path / "missing.model"))
