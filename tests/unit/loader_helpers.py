"""Small helpers the loader tests share: take batches, list their sample keys, compare two batches."""

from __future__ import annotations

import itertools

import torch


def take(loader, n: int) -> list[dict]:
    """The first ``n`` batches of a fresh iterator over ``loader``."""
    return list(itertools.islice(iter(loader), n))


def keys_of(batches) -> list[str]:
    """Sample keys of ``batches`` in order (loaders built with ``with_keys=True``)."""
    return [k for b in batches for k in b["keys"]]


def same_batch(a: dict, b: dict) -> bool:
    """Equal field names, tensors equal element for element, keys equal."""
    return a.keys() == b.keys() and all(a[k] == b[k] if k == "keys" else torch.equal(a[k], b[k]) for k in a)
