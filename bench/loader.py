"""Data loader throughput (samples/s): bertforge's train loader against a plain webdataset pipeline
reading the same shards, prepared from the ``demo_stdlib`` corpus.

    .venv/bin/python bench/loader.py                     # shards in data/bench_loader (prepared once)
    .venv/bin/python bench/loader.py --tiny --out /tmp/l.json --data-dir /tmp/l

Pipelines (micro batch 32, seq_len 128, one data-parallel rank; ``workers`` = DataLoader workers):
    bertforge            ``data_pipeline.loader.build_train_loader`` with the default ``data.order=global``:
                         seeded per-epoch permutation, random access through ``wids`` (mmap), .npy decode,
                         keyed MLM masking (``Masker``), collate.
    bertforge_stream     the same with ``data.order=stream``: seeded shard order, slot split, seeded
                         shuffle buffer, sequential tar reads.
    wds_plain            ``webdataset.WebDataset(shards).shuffle(buffer)`` -> np.load of ``ids.npy`` ->
                         the same ``Masker`` per sample (seeded by key) -> stack into the same batch dict,
                         batched by ``wds.WebLoader`` (same number of workers).
    wds_plain_nomask     the same without masking (the reading and decoding alone).
Each round reads ``--samples`` samples from a fresh iterator (worker start-up included) for every
pipeline, in rotated order; samples/s is the median over rounds.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

MICRO_BATCH = 32


def data_cfg(data_dir: str, tiny: bool):
    from launch.config import load_config

    over = ["data.corpus=[demo_stdlib]", f"data.data_dir={data_dir}", "data.seq_len=128",
            f"data.vocab_size={512 if tiny else 8192}", f"data.samples_per_shard={200 if tiny else 1000}",
            "data.val_fraction=0.01", "data.shuffle_buffer=2000"]
    if tiny:
        over.append("data.corpus_max_mb=0.3")
    return load_config(None, over)


def prepare(cfg) -> dict:
    from data_pipeline.prepare import prepare_data

    return prepare_data(cfg)


def _train_shards(data_dir: str) -> list[str]:
    from data_pipeline.loader import read_manifest

    m = read_manifest(data_dir)
    return [os.path.join(data_dir, s["name"]) for s in m["shards"] if s["split"] == "train"]


def bertforge_iter(cfg, workers: int, order: str = "global"):
    import dataclasses

    from data_pipeline.loader import build_train_loader

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers, order=order))
    return iter(build_train_loader(cfg, 0, 1, MICRO_BATCH))


def wds_iter(cfg, workers: int, mask: bool):
    import numpy as np
    import torch
    import webdataset as wds

    from data_pipeline.loader import _Split

    split = _Split(cfg, "train")
    masker, pad, seed = split.masker, split.pad_id, cfg.train.seed

    def decode(sample):
        ids = np.load(io.BytesIO(sample["ids.npy"]), allow_pickle=False)
        if mask:
            x, y = masker(ids, seed, 0, sample["__key__"])
        else:
            x, y = ids, ids
        return x, y, (ids != pad).astype(np.int64)

    def collate(samples):
        xs, ys, am = zip(*samples)
        x = torch.from_numpy(np.stack(xs))
        return {"input_ids": x, "labels": torch.from_numpy(np.stack(ys)),
                "attention_mask": torch.from_numpy(np.stack(am)), "token_type_ids": torch.zeros_like(x)}

    urls = split.paths
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker, empty_check=False)
          .repeat().shuffle(cfg.data.shuffle_buffer).map(decode).batched(MICRO_BATCH, collation_fn=collate))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    return iter(loader)


def run(cfg, workers_list: list[int], samples: int, rounds: int) -> dict[str, Any]:
    machine = common.machine()
    common.log(f"machine: {machine}")
    from data_pipeline.loader import read_manifest

    man = read_manifest(cfg.data.data_dir)
    train_samples = sum(int(s["samples"]) for s in man["shards"] if s["split"] == "train")
    pipes = []
    for w in workers_list:
        pipes += [("bertforge", w, lambda w=w: bertforge_iter(cfg, w)),
                  ("bertforge_stream", w, lambda w=w: bertforge_iter(cfg, w, "stream")),
                  ("wds_plain", w, lambda w=w: wds_iter(cfg, w, True)),
                  ("wds_plain_nomask", w, lambda w=w: wds_iter(cfg, w, False))]
    times: dict[tuple[str, int], list[float]] = {(p, w): [] for p, w, _ in pipes}
    errors: dict[tuple[str, int], str] = {}
    nb = max(1, samples // MICRO_BATCH)
    for r in range(rounds + 1):  # round 0: warm-up (page cache, imports), not counted
        k = r % len(pipes)
        for name, w, make in pipes[k:] + pipes[:k]:
            if (name, w) in errors:
                continue
            try:
                t0 = time.perf_counter()
                it = make()
                got = 0
                for _ in range(nb):
                    got += next(it)["input_ids"].shape[0]
                dt = time.perf_counter() - t0
                del it
                if r:
                    times[(name, w)].append(got / dt)
            except Exception as e:  # noqa: BLE001
                errors[(name, w)] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                common.log(f"{name} workers={w}: {errors[(name, w)]}")
    rows = []
    for name, w, _ in pipes:
        row: dict[str, Any] = {"pipeline": name, "workers": w, "micro_batch": MICRO_BATCH,
                               "samples_per_round": nb * MICRO_BATCH}
        if (name, w) in errors:
            row.update(status="error", reason=errors[(name, w)])
        else:
            row.update(status="ok", samples_per_s=common.median(times[(name, w)]),
                       samples_per_s_all=times[(name, w)])
        rows.append(row)
    for row in rows:
        base = next((x for x in rows if x["pipeline"] == "wds_plain" and x["workers"] == row["workers"]), None)
        if row["status"] == "ok" and base and base["status"] == "ok":
            row["vs_wds_plain"] = row["samples_per_s"] / base["samples_per_s"]
        if row["status"] == "ok":
            common.log(f"{row['pipeline']:18s} workers={row['workers']} {row['samples_per_s']:9.0f} samples/s "
                       f"x{row.get('vs_wds_plain', float('nan')):.2f} wds_plain")
    return {"benchmark": "loader", "machine": common.finish_machine(machine),
            "settings": {"corpus": "demo_stdlib", "data_dir": cfg.data.data_dir, "seq_len": cfg.data.seq_len,
                         "vocab_size": cfg.data.vocab_size, "train_samples": train_samples,
                         "train_shards": len(_train_shards(cfg.data.data_dir)),
                         "shuffle_buffer": cfg.data.shuffle_buffer, "rounds": rounds,
                         "timing": "samples/s of a fresh iterator reading samples_per_round samples "
                                   "(worker start-up included), median of rotated rounds after a warm-up round"},
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    common.ensure_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--samples", type=int, default=None, help="samples read per round and pipeline")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds")
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "loader.json"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args(argv)
    data_dir = a.data_dir or os.path.join(common.REPO, "data", "bench_loader_tiny" if a.tiny else "bench_loader")
    cfg = data_cfg(data_dir, a.tiny)
    t0 = time.perf_counter()
    prepare(cfg)
    common.log(f"shards ready in {data_dir} ({time.perf_counter() - t0:.1f} s)")
    workers = a.workers or ([0] if a.tiny else [0, 2])
    samples = a.samples or (128 if a.tiny else 4096)
    rounds = a.repeats if a.repeats is not None else (1 if a.tiny else 5)
    payload = run(cfg, workers, samples, rounds)
    common.finish(payload, a.out, a.tiny, a.no_report)


if __name__ == "__main__":
    main()
