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
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100
"""Label of positions that do not enter the MLM loss."""


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
    labels[chosen] = inputs[chosen]
    u = rng.random(k)
    to_mask = chosen[u < mask_token_prob]
    to_random = chosen[(u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)]
    inputs[to_mask] = mask_id
    if to_random.size:
        pool = _replacement_pool(int(vocab_size), specials)
        inputs[to_random] = pool[rng.integers(0, pool.size, size=to_random.size)]
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

    def __call__(self, ids: np.ndarray, seed: int, epoch: int, key: str) -> tuple[np.ndarray, np.ndarray]:
        return mask_tokens(ids, mask_rng(seed, epoch, key), special_ids=self.special_ids,
                           vocab_size=self.vocab_size, mask_id=self.mask_id, mask_prob=self.mask_prob,
                           mask_token_prob=self.mask_token_prob, random_token_prob=self.random_token_prob)
