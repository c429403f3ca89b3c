"""Pure, seeded dynamic MLM masking (BERT's 80/10/10 rule).

Masks are a function of ``(seed, epoch, sample key)`` only: :func:`mask_rng` derives the generator
with sha256 (never Python's salted ``hash()``), so every process, worker layout and resume sees the
same masks for the same sample in the same epoch.

Rules:

- candidates are the non-special tokens; [PAD] [CLS] [SEP] [MASK] and [UNK] are never chosen
  (predicting [UNK] teaches nothing) and never drawn as random replacements;
- ``k = floor(p*n) + Bernoulli(frac(p*n))`` of the ``n`` candidates are chosen (unbiased: the rate
  over many tokens converges to ``mask_prob``), at least one when ``n >= 1``;
- each chosen token independently becomes [MASK] with ``mask_token_prob``, a uniformly drawn
  non-special token with ``random_token_prob``, and stays unchanged otherwise;
- labels hold the original id at chosen positions and -100 elsewhere.

Whole-word masking (:func:`mask_whole_words`, ``data.masking: whole_word``) chooses words instead of
tokens, for sentencepiece vocabularies:

- a word is a piece starting with "\u2581" (a word start) plus the non-start pieces after it; a
  non-start piece right after a special token (a word cut by packing) also opens a word; special
  tokens never belong to a word. Which ids start a word is a bool table over the vocabulary, built
  once per tokenizer (:func:`word_start_table`, ``Tokenizer.word_start_table``);
- the budget is in tokens, as in Megatron and Hugging Face: ``k`` is drawn as above from the ``n``
  maskable tokens; words are visited in a seeded random order and taken while they fit in the
  budget (a word that would overshoot is skipped); at least one word is taken;
- with ``max_ngram = N > 1`` each visited word opens a span of ``m`` consecutive whole words,
  ``m`` drawn from 1..N with probability proportional to 1/m (Megatron's n-gram masking); a span
  never crosses a special token and never overlaps an earlier one; too long a span is shortened
  until it fits, or skipped;
- the 80/10/10 rule then applies per chosen token (not per word), as in Google's BERT and Megatron.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions that do not enter the MLM loss."""
MASKING_MODES = ("token", "whole_word")
"""Valid values of ``data.masking``."""


def mask_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """A numpy Generator derived from (seed, epoch, key) with sha256: stable across processes/runs."""
    digest = hashlib.sha256(f"{int(seed)}\0{int(epoch)}\0{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


@functools.lru_cache(maxsize=16)
def _replacement_pool(vocab_size: int, special_ids: frozenset[int]) -> np.ndarray:
    pool = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), np.fromiter(special_ids, dtype=np.int64))
    if pool.size == 0:
        raise ValueError(f"vocab_size={vocab_size} leaves no non-special token to draw")
    pool.setflags(write=False)
    return pool


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, *, special_ids: Iterable[int], vocab_size: int,
                mask_id: int, mask_prob: float = 0.15, mask_token_prob: float = 0.8,
                random_token_prob: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Mask one sequence.

    Args:
        ids: 1-D integer array of token ids (may contain specials and padding).
        rng: the generator of this sample, e.g. ``mask_rng(seed, epoch, key)``.
        special_ids: ids never chosen and never drawn as replacements.
        vocab_size: replacements are drawn from ``[0, vocab_size)`` minus ``special_ids``.
        mask_id: id of [MASK].
        mask_prob: fraction of non-special tokens chosen for prediction.
        mask_token_prob: of the chosen, the fraction replaced by [MASK].
        random_token_prob: of the chosen, the fraction replaced by a random non-special token.

    Returns:
        ``(input_ids, labels)``, both int64 with the shape of ``ids``.
    """
    specials = frozenset(int(i) for i in special_ids)
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"mask_tokens takes a 1-D array, got shape {ids.shape}")
    inputs = ids.astype(np.int64, copy=True)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    candidates = np.flatnonzero(~np.isin(inputs, np.fromiter(specials, dtype=np.int64)))
    n = candidates.size
    if n == 0:
        return inputs, labels
    expected = mask_prob * n
    k = int(expected) + int(rng.random() < expected - int(expected))
    k = min(max(k, 1), n)
    chosen = rng.choice(candidates, size=k, replace=False)
    _apply_8010(inputs, labels, chosen, rng, specials, vocab_size, mask_id, mask_token_prob, random_token_prob)
    return inputs, labels


def _apply_8010(inputs: np.ndarray, labels: np.ndarray, chosen: np.ndarray, rng: np.random.Generator,
                specials: frozenset[int], vocab_size: int, mask_id: int, mask_token_prob: float,
                random_token_prob: float) -> None:
    """Label the ``chosen`` positions and apply MASK / random / keep to each of them, in place."""
    labels[chosen] = inputs[chosen]
    u = rng.random(chosen.size)
    to_mask = chosen[u < mask_token_prob]
    to_random = chosen[(u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)]
    inputs[to_mask] = mask_id
    if to_random.size:
        pool = _replacement_pool(int(vocab_size), specials)
        inputs[to_random] = pool[rng.integers(0, pool.size, size=to_random.size)]


@functools.lru_cache(maxsize=8)
def word_start_table(model_path: str, sha256: str = "") -> np.ndarray:
    """Read-only bool array over the vocabulary of the sentencepiece model at ``model_path``: which ids
    begin a word (specials excluded). Cached per (path, sha256), so it is built once per tokenizer."""
    from data_pipeline.tokenizer import Tokenizer

    table = np.array(Tokenizer.load(model_path).word_start_table, dtype=bool)
    table.setflags(write=False)
    log.info("whole-word masking: %d of %d pieces start a word (%s)", int(table.sum()), table.size, model_path)
    return table


def _word_spans(inputs: np.ndarray, maskable: np.ndarray, word_start: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(starts, ends, segment)`` of the words of one sequence: token ranges ``[start, end)`` and the
    number of special tokens before each word (spans must not cross one)."""
    safe = np.where(maskable, inputs, 0)
    prev_maskable = np.concatenate(([False], maskable[:-1]))
    opens = maskable & (word_start[safe] | ~prev_maskable)
    starts = np.flatnonzero(opens)
    # a word ends at the next opening or at the next special token, whichever comes first
    boundaries = np.flatnonzero(opens | ~maskable)
    nxt = np.searchsorted(boundaries, starts, side="right")
    ends = np.append(boundaries, inputs.size)[nxt]
    segment = np.cumsum(~maskable)[starts]
    return starts, ends, segment


def select_whole_words(ids: np.ndarray, rng: np.random.Generator, *, special_ids: Iterable[int],
                       word_start: np.ndarray, mask_prob: float = 0.15,
                       max_ngram: int = 1) -> list[tuple[int, int]]:
    """The token spans ``[start, end)`` chosen by whole-word (n-gram) masking, in selection order.

    Each span covers one or more consecutive whole words. See the module docstring for the rules.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"whole-word masking takes a 1-D array, got shape {ids.shape}")
    if max_ngram < 1:
        raise ValueError(f"max_ngram={max_ngram} must be >= 1")
    inputs = ids.astype(np.int64, copy=False)
    maskable = ~np.isin(inputs, np.fromiter((int(i) for i in special_ids), dtype=np.int64))
    n = int(maskable.sum())
    if n == 0:
        return []
    expected = mask_prob * n
    k = int(expected) + int(rng.random() < expected - int(expected))
    k = min(max(k, 1), n)
    starts, ends, segment = _word_spans(inputs, maskable, word_start)
    n_words = starts.size
    order = rng.permutation(n_words)
    if max_ngram > 1:
        pvals = 1.0 / np.arange(1, max_ngram + 1)
        grams = rng.choice(max_ngram, size=n_words, p=pvals / pvals.sum()) + 1
    else:
        grams = np.ones(n_words, dtype=np.int64)
    taken = np.zeros(n_words, dtype=bool)
    spans: list[tuple[int, int]] = []
    covered = 0
    starts_l, ends_l, seg_l, grams_l = starts.tolist(), ends.tolist(), segment.tolist(), grams.tolist()
    for w in order.tolist():
        if taken[w]:
            continue
        m = grams_l[w]
        # shorten the span to words of the same segment that are still free and fit in the budget
        last = w
        while last + 1 < n_words and last + 1 - w < m and seg_l[last + 1] == seg_l[w] and not taken[last + 1]:
            last += 1
        while last >= w and covered + ends_l[last] - starts_l[w] > k:
            last -= 1
        if last < w:
            continue
        taken[w:last + 1] = True
        spans.append((starts_l[w], ends_l[last]))
        covered += ends_l[last] - starts_l[w]
        if covered >= k:
            break
    if not spans:  # every word is longer than the budget: take one anyway
        w = int(order[0])
        spans.append((starts_l[w], ends_l[w]))
    return spans


def mask_whole_words(ids: np.ndarray, rng: np.random.Generator, *, special_ids: Iterable[int], vocab_size: int,
                     mask_id: int, word_start: np.ndarray, mask_prob: float = 0.15, max_ngram: int = 1,
                     mask_token_prob: float = 0.8,
                     random_token_prob: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Mask one sequence by whole words (or n-gram spans of whole words); arguments as in
    :func:`mask_tokens` plus ``word_start`` (bool table over the vocabulary) and ``max_ngram``."""
    specials = frozenset(int(i) for i in special_ids)
    ids = np.asarray(ids)
    spans = select_whole_words(ids, rng, special_ids=specials, word_start=word_start, mask_prob=mask_prob,
                               max_ngram=max_ngram)
    inputs = ids.astype(np.int64, copy=True)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    if not spans:
        return inputs, labels
    chosen = np.concatenate([np.arange(a, b) for a, b in spans])
    _apply_8010(inputs, labels, chosen, rng, specials, vocab_size, mask_id, mask_token_prob, random_token_prob)
    return inputs, labels


@dataclass(frozen=True)
class Masker:
    """:func:`mask_tokens` with its parameters bound; ``masker(ids, seed, epoch, key)``."""

    special_ids: frozenset
    vocab_size: int
    mask_id: int
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    masking: str = "token"
    """``token`` (:func:`mask_tokens`) or ``whole_word`` (:func:`mask_whole_words`)."""
    max_ngram: int = 1
    word_start: np.ndarray | None = field(default=None, compare=False, repr=False)
    """Bool table over the vocabulary (which ids start a word); required for ``whole_word``."""

    def __post_init__(self) -> None:
        if self.masking not in MASKING_MODES:
            raise ValueError(f"masking={self.masking!r} is invalid; valid choices: {', '.join(MASKING_MODES)}")
        if self.masking == "whole_word" and self.word_start is None:
            raise ValueError("whole_word masking needs word_start (e.g. Tokenizer.word_start_table)")

    def __call__(self, ids: np.ndarray, seed: int, epoch: int, key: str) -> tuple[np.ndarray, np.ndarray]:
        if self.masking == "whole_word":
            return mask_whole_words(ids, mask_rng(seed, epoch, key), special_ids=self.special_ids,
                                    vocab_size=self.vocab_size, mask_id=self.mask_id, word_start=self.word_start,
                                    mask_prob=self.mask_prob, max_ngram=self.max_ngram,
                                    mask_token_prob=self.mask_token_prob,
                                    random_token_prob=self.random_token_prob)
        return mask_tokens(ids, mask_rng(seed, epoch, key), special_ids=self.special_ids,
                           vocab_size=self.vocab_size, mask_id=self.mask_id, mask_prob=self.mask_prob,
                           mask_token_prob=self.mask_token_prob, random_token_prob=self.random_token_prob)
