"""Small helpers the loader tests share: take batches, list their sample keys, compare two batches,
copy a prepared dataset and re-describe its shards in the manifest."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import torch

from data_pipeline.tokenizer import sha256_file


def take(loader, n: int) -> list[dict]:
    """The first ``n`` batches of a fresh iterator over ``loader``."""
    return list(itertools.islice(iter(loader), n))


def keys_of(batches) -> list[str]:
    """Sample keys of ``batches`` in order (loaders built with ``with_keys=True``)."""
    return [k for b in batches for k in b["keys"]]


def same_batch(a: dict, b: dict) -> bool:
    """Equal field names, tensors equal element for element, keys equal."""
    return a.keys() == b.keys() and all(a[k] == b[k] if k == "keys" else torch.equal(a[k], b[k]) for k in a)


def copy_prepared(src: str, dst) -> dict:
    """Copy the prepared dataset (manifest, tokenizer, shards) into ``dst``; return its manifest."""
    dst.mkdir()
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), dst / name)
    return json.loads((dst / "manifest.json").read_text())


def rehash(d, manifest: dict) -> None:
    """Make the manifest describe the shard files as they are now (bad at the source, not changed since)."""
    for s in manifest["shards"]:
        p = d / s["name"]
        if p.exists():
            s["bytes"], s["sha256"] = p.stat().st_size, sha256_file(str(p))
    (d / "manifest.json").write_text(json.dumps(manifest))
