"""MLM masking: rates, 80/10/10, specials, determinism; whole-word and n-gram masking."""

from __future__ import annotations

import glob
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.masking import (
    IGNORE_INDEX,
    Masker,
    mask_rng,
    mask_tokens,
    mask_whole_words,
    select_whole_words,
    word_start_table,
)

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIALS = frozenset({PAD, CLS, SEP, MASK, UNK})
VOCAB = 512


def _sequences(n: int, seq_len: int = 128, seed: int = 0) -> list[np.ndarray]:
    """Realistic rows: [CLS] tokens (with inner [SEP]s and some [UNK]) [SEP] then padding."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        real = int(rng.integers(seq_len // 2, seq_len + 1))
        row = np.full(seq_len, PAD, dtype=np.uint16)
        row[:real] = rng.integers(5, VOCAB, size=real)
        row[rng.integers(1, real - 1, size=2)] = SEP
        row[rng.integers(1, real - 1, size=1)] = UNK
        row[0], row[real - 1] = CLS, SEP
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def masked():
    masker = Masker(special_ids=SPECIALS, vocab_size=VOCAB, mask_id=MASK)
    rows = _sequences(2000)
    return rows, [masker(r, seed=7, epoch=0, key=f"train-{i:09d}") for i, r in enumerate(rows)]


def test_rates(masked):
    rows, out = masked
    orig = np.concatenate(rows).astype(np.int64)
    inp = np.concatenate([o[0] for o in out])
    lab = np.concatenate([o[1] for o in out])
    candidates = ~np.isin(orig, list(SPECIALS))
    chosen = lab != IGNORE_INDEX
    assert candidates.sum() >= 100_000
    assert abs(chosen.sum() / candidates.sum() - 0.15) < 0.005
    assert np.all(lab[chosen] == orig[chosen])
    k = chosen.sum()
    frac_mask = np.sum(inp[chosen] == MASK) / k
    frac_random = np.sum((inp[chosen] != MASK) & (inp[chosen] != orig[chosen])) / k
    frac_same = np.sum(inp[chosen] == orig[chosen]) / k
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_random - 0.1) < 0.01 and abs(frac_same - 0.1) < 0.01


def test_specials_never_chosen_or_drawn(masked):
    rows, out = masked
    orig = np.concatenate(rows).astype(np.int64)
    inp = np.concatenate([o[0] for o in out])
    lab = np.concatenate([o[1] for o in out])
    special = np.isin(orig, list(SPECIALS))
    assert np.all(lab[special] == IGNORE_INDEX)
    assert np.all(inp[special] == orig[special])  # specials are untouched
    replaced = (lab != IGNORE_INDEX) & (inp != orig) & (inp != MASK)
    assert replaced.sum() > 0 and not np.isin(inp[replaced], list(SPECIALS)).any()
    assert np.all(inp[lab == IGNORE_INDEX] == orig[lab == IGNORE_INDEX])
    assert all(o[0].dtype == np.int64 and o[1].dtype == np.int64 for o in out)


def test_every_row_with_a_real_token_gets_a_label():
    masker = Masker(special_ids=SPECIALS, vocab_size=VOCAB, mask_id=MASK)
    for i in range(50):
        _, lab = masker(np.array([CLS, 100, SEP, PAD]), seed=0, epoch=0, key=str(i))
        assert lab.tolist() == [IGNORE_INDEX, 100, IGNORE_INDEX, IGNORE_INDEX]
    inp, lab = masker(np.array([CLS, SEP, PAD, UNK]), seed=0, epoch=0, key="x")
    assert np.all(lab == IGNORE_INDEX) and inp.tolist() == [CLS, SEP, PAD, UNK]


def test_seeded_determinism():
    row = _sequences(1, seed=3)[0]
    m = Masker(special_ids=SPECIALS, vocab_size=VOCAB, mask_id=MASK)
    a, b = m(row, 1, 0, "k"), m(row, 1, 0, "k")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for other in (m(row, 1, 0, "k2"), m(row, 1, 1, "k"), m(row, 2, 0, "k")):
        assert not np.array_equal(a[1], other[1])
    direct = mask_tokens(row, mask_rng(1, 0, "k"), special_ids=SPECIALS, vocab_size=VOCAB, mask_id=MASK)
    assert np.array_equal(direct[0], a[0])


def test_mask_rng_is_stable_across_processes():
    """Derived with sha256, not Python's per-process salted hash()."""
    code = "from data_pipeline.masking import mask_rng; print(mask_rng(5, 2, 'train-000000001').integers(1 << 62))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(s), "PATH": ""},
                           cwd=Path(__file__).resolve().parents[2]).stdout for s in (1, 2)}
    assert outs == {f"{mask_rng(5, 2, 'train-000000001').integers(1 << 62)}\n"}


def test_rejects_2d():
    with pytest.raises(ValueError):
        mask_tokens(np.zeros((2, 3), dtype=np.int64), mask_rng(0, 0, ""), special_ids=SPECIALS, vocab_size=VOCAB,
                    mask_id=MASK)


# --------------------------------------------------------------------------------------------
# Whole-word and n-gram masking
# --------------------------------------------------------------------------------------------

# hand-made vocabulary: 5 specials, then pieces; "▁" marks a word start
_PIECES = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "▁the", "▁quick", "bro", "wn", "▁fox", "ju", "mps",
           "▁over", "▁a", "la", "zy", "▁dog", "s", "▁", "."]
_WS = np.array([p.startswith("\u2581") for p in _PIECES], dtype=bool)
_P = {p: i for i, p in enumerate(_PIECES)}


def _row(*pieces: str) -> np.ndarray:
    return np.array([_P[p] for p in pieces], dtype=np.int64)


# [CLS] the quick|bro|wn fox [SEP] ju|mps over a|la|zy dog|s|. [SEP] [PAD] [PAD]
# "ju mps" follows a special token: a word cut by packing, still one word; "." is a non-start piece
# continuing "dog s".
_FIXTURE = _row("[CLS]", "▁the", "▁quick", "bro", "wn", "▁fox", "[SEP]", "ju", "mps", "▁over", "▁a", "la", "zy",
                "▁dog", "s", ".", "[SEP]", "[PAD]", "[PAD]")
_FIXTURE_WORDS = [(1, 2), (2, 5), (5, 6), (7, 9), (9, 10), (10, 13), (13, 16)]


def _words_of(row: np.ndarray, ws: np.ndarray) -> list[tuple[int, int]]:
    """Reference word segmentation, written independently of the masking module (plain loop)."""
    words, start = [], None
    for i, t in enumerate(row.tolist()):
        if t in SPECIALS:
            if start is not None:
                words.append((start, i))
            start = None
        elif ws[t] or start is None:
            if start is not None:
                words.append((start, i))
            start = i
    if start is not None:
        words.append((start, len(row)))
    return words


def _assert_whole_words(row: np.ndarray, labels: np.ndarray, words: list[tuple[int, int]]) -> int:
    """Every word is labelled entirely or not at all; nothing outside words is labelled. Returns #words hit."""
    chosen = labels != IGNORE_INDEX
    in_word = np.zeros(row.size, dtype=bool)
    hit = 0
    for a, b in words:
        in_word[a:b] = True
        assert chosen[a:b].all() or not chosen[a:b].any(), f"partial word {row[a:b].tolist()} in {row.tolist()}"
        hit += int(chosen[a:b].all())
    assert not chosen[~in_word].any()
    return hit


def test_reference_words_of_the_fixture():
    assert _words_of(_FIXTURE, _WS) == _FIXTURE_WORDS


def test_whole_words_on_hand_made_fixture():
    masker = Masker(special_ids=SPECIALS, vocab_size=len(_PIECES), mask_id=MASK, masking="whole_word",
                    word_start=_WS, mask_prob=0.3)
    special = np.isin(_FIXTURE, list(SPECIALS))
    seen = set()
    for i in range(400):
        inp, lab = masker(_FIXTURE, seed=3, epoch=0, key=f"k{i}")
        assert _assert_whole_words(_FIXTURE, lab, _FIXTURE_WORDS) >= 1
        assert np.all(inp[special] == _FIXTURE[special]) and np.all(lab[special] == IGNORE_INDEX)
        chosen = lab != IGNORE_INDEX
        assert np.all(lab[chosen] == _FIXTURE[chosen])
        assert np.all(inp[~chosen] == _FIXTURE[~chosen])
        # budget: floor/ceil of 0.3 * 15 maskable tokens, never exceeded except by the one forced word
        assert chosen.sum() <= 5 or len([w for w in _FIXTURE_WORDS if chosen[w[0]]]) == 1
        seen.update(w for w in _FIXTURE_WORDS if chosen[w[0]])
    assert seen == set(_FIXTURE_WORDS)  # every word, the cut one ("ju mps") included, gets chosen sometimes


def test_ngram_spans_are_contiguous_whole_words():
    row = np.tile(_FIXTURE[1:16], 6)  # 90 tokens, specials inside
    row = np.concatenate(([CLS], row, [SEP]))
    words = _words_of(row, _WS)
    starts = {a: i for i, (a, _) in enumerate(words)}
    ends = {b: i for i, (_, b) in enumerate(words)}
    special = np.isin(row, list(SPECIALS))
    lengths = {1: [], 3: []}
    for n in (1, 3):
        for i in range(300):
            spans = select_whole_words(row, mask_rng(0, 0, f"s{i}"), special_ids=SPECIALS, word_start=_WS,
                                       mask_prob=0.15, max_ngram=n)
            covered = np.zeros(row.size, dtype=int)
            for a, b in spans:
                assert a in starts and b in ends, (a, b)  # starts at a word start, ends at a word end
                assert not special[a:b].any()  # never crosses a special token
                k = ends[b] - starts[a] + 1
                assert 1 <= k <= n
                lengths[n].append(k)
                covered[a:b] += 1
            assert covered.max() <= 1  # spans never overlap
            # within the token budget (or the single forced word)
            assert covered.sum() <= int(0.15 * (~special).sum()) + 1 or len(spans) == 1
    assert set(lengths[1]) == {1}
    counts = np.bincount(lengths[3], minlength=4)[1:] / len(lengths[3])
    assert counts[1] > 0.1 and counts[2] > 0.05 and counts[0] > counts[1] > counts[2]  # ∝ 1/n, shortened to fit


def test_whole_word_determinism_and_epochs():
    row = np.concatenate(([CLS], np.tile(_FIXTURE[1:16], 6), [SEP]))
    m = Masker(special_ids=SPECIALS, vocab_size=len(_PIECES), mask_id=MASK, masking="whole_word", word_start=_WS,
               max_ngram=3)
    a = m(row, 1, 0, "k")
    resumed = pickle.loads(pickle.dumps(m))  # e.g. a DataLoader worker after a resume
    b = resumed(row, 1, 0, "k")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    direct = mask_whole_words(row, mask_rng(1, 0, "k"), special_ids=SPECIALS, vocab_size=len(_PIECES),
                              mask_id=MASK, word_start=_WS, max_ngram=3)
    assert np.array_equal(direct[0], a[0]) and np.array_equal(direct[1], a[1])
    for other in (m(row, 1, 1, "k"), m(row, 1, 0, "k2"), m(row, 2, 0, "k")):
        assert not np.array_equal(a[1], other[1])


def test_whole_word_edge_cases():
    m = Masker(special_ids=SPECIALS, vocab_size=len(_PIECES), mask_id=MASK, masking="whole_word", word_start=_WS)
    inp, lab = m(_row("[CLS]", "[SEP]", "[PAD]", "[UNK]"), 0, 0, "x")
    assert np.all(lab == IGNORE_INDEX) and inp.tolist() == [CLS, SEP, PAD, UNK]
    # a single three-piece word longer than the 1-token budget is still taken whole
    _, lab = m(_row("[CLS]", "▁quick", "bro", "wn", "[SEP]"), 0, 0, "y")
    assert lab.tolist() == [IGNORE_INDEX, _P["▁quick"], _P["bro"], _P["wn"], IGNORE_INDEX]
    with pytest.raises(ValueError, match="word_start"):
        Masker(special_ids=SPECIALS, vocab_size=VOCAB, mask_id=MASK, masking="whole_word")
    with pytest.raises(ValueError, match="valid choices: token, whole_word"):
        Masker(special_ids=SPECIALS, vocab_size=VOCAB, mask_id=MASK, masking="span")
    with pytest.raises(ValueError):
        select_whole_words(np.zeros((2, 3), dtype=np.int64), mask_rng(0, 0, ""), special_ids=SPECIALS,
                           word_start=_WS)


# --- statistics on rows of the real tokenizer of the shared test dataset --------------------


@pytest.fixture(scope="module")
def real(data_cfg, prepared):
    """(word-start table, vocab size, 2000 rows of 128 tokens: two packed 64-token samples each)."""
    path = os.path.join(data_cfg.data_dir, prepared["tokenizer"]["path"])
    table = word_start_table(path, prepared["tokenizer"]["sha256"])
    samples = []
    for shard in sorted(glob.glob(os.path.join(data_cfg.data_dir, "train-*.tar"))):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".npy"):
                    samples.append(np.load(io.BytesIO(tar.extractfile(member).read())).astype(np.int64))
    rows = [np.concatenate(samples[i:i + 2]) for i in range(0, len(samples) - 1, 2)][:2000]
    assert len(rows) >= 1000 and rows[0].size == 128
    return table, int(prepared["vocab_size"]), rows


def test_word_start_table_once_per_tokenizer(data_cfg, prepared, real):
    from data_pipeline.tokenizer import Tokenizer

    table = real[0]
    path = os.path.join(data_cfg.data_dir, prepared["tokenizer"]["path"])
    assert word_start_table(path, prepared["tokenizer"]["sha256"]) is table  # cached, not rebuilt
    assert not table.flags.writeable and table.dtype == bool and table.size == real[1]
    tok = Tokenizer.load(path)
    expect = [tok.id_to_piece(i).startswith("\u2581") and i >= 5 for i in range(tok.vocab_size)]
    assert table.tolist() == expect and 0 < table.sum() < table.size


@pytest.mark.parametrize("masking,ngram", [("token", 1), ("whole_word", 1), ("whole_word", 3)])
def test_rates_on_real_rows(real, masking, ngram):
    table, vocab, rows = real
    m = Masker(special_ids=SPECIALS, vocab_size=vocab, mask_id=MASK, masking=masking, max_ngram=ngram,
               word_start=table if masking == "whole_word" else None)
    out = [m(r, 11, 2, f"train-{i:09d}") for i, r in enumerate(rows)]
    orig = np.concatenate(rows)
    inp = np.concatenate([o[0] for o in out])
    lab = np.concatenate([o[1] for o in out])
    maskable = ~np.isin(orig, list(SPECIALS))
    chosen = lab != IGNORE_INDEX
    assert maskable.sum() >= 100_000
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.005
    assert not chosen[~maskable].any() and np.all(inp[~maskable] == orig[~maskable])
    k = chosen.sum()
    frac_mask = np.sum(inp[chosen] == MASK) / k
    frac_random = np.sum((inp[chosen] != MASK) & (inp[chosen] != orig[chosen])) / k
    frac_same = np.sum(inp[chosen] == orig[chosen]) / k
    assert abs(frac_mask - 0.8) < 0.01 and abs(frac_random - 0.1) < 0.01 and abs(frac_same - 0.1) < 0.01
    replaced = chosen & (inp != MASK) & (inp != orig)
    assert replaced.sum() > 0 and inp[replaced].min() >= 5 and inp[replaced].max() < vocab  # never special
    if masking == "whole_word":
        hit = sum(_assert_whole_words(r, o[1], _words_of(r, table)) for r, o in zip(rows[:300], out[:300]))
        assert hit > 300


def test_loader_whole_word_batches(make_cfg, real):
    from data_pipeline import loader as L

    table = real[0]
    cfg = make_cfg(masking="whole_word", max_ngram=2)
    it = iter(L.build_train_loader(cfg, 0, 1, 8))
    for _ in range(2):
        batch = next(it)
        for x, y in zip(batch["input_ids"].numpy(), batch["labels"].numpy()):
            orig = np.where(y != IGNORE_INDEX, y, x)
            _assert_whole_words(orig, y, _words_of(orig, table))
    assert (batch["labels"] != IGNORE_INDEX).any()


def test_config_fields_and_errors():
    from launch.config import ConfigError, load_config

    cfg = load_config(None, [])
    assert cfg.data.masking == "token" and cfg.data.max_ngram == 1  # the old behaviour by default
    cfg = load_config(None, ["data.masking=whole_word", "data.max_ngram=3"])
    assert cfg.data.masking == "whole_word" and cfg.data.max_ngram == 3
    for overrides, pattern in ((["data.masking=span"], "valid choices: token, whole_word"),
                               (["data.masking=whole_word", "data.max_ngram=0"], "data.max_ngram=0"),
                               (["data.max_ngram=2"], "needs data.masking=whole_word")):
        with pytest.raises(ConfigError, match=pattern) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)
