"""MLM masking: rates, 80/10/10, specials, determinism."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.masking import IGNORE_INDEX, Masker, mask_rng, mask_tokens

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
