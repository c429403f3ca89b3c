"""DeepSpeed checkpoints that a crash or kill cannot corrupt.

Layout: ``<run_dir>/checkpoints/global_step<N>/`` as DeepSpeed writes it, plus ``COMPLETE`` written
by rank 0 only after every rank finished its files (a barrier), and DeepSpeed's ``latest`` file
written by us, atomically, only after the marker (``save_checkpoint(..., save_latest=False)``), so
``zero_to_fp32`` and ``ds_to_universal`` keep working. Resume takes the newest COMPLETE tag.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

from launch.distributed import barrier

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
_TAG = re.compile(r"^global_step(\d+)$")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_tags(ckpt_dir: str) -> tuple[list[tuple[int, str]], list[str]]:
    """(complete tags sorted by step, incomplete tag names) in ``ckpt_dir``."""
    complete, incomplete = [], []
    if not os.path.isdir(ckpt_dir):
        return complete, incomplete
    for name in os.listdir(ckpt_dir):
        m = _TAG.match(name)
        if not m or not os.path.isdir(os.path.join(ckpt_dir, name)):
            continue
        if os.path.isfile(os.path.join(ckpt_dir, name, MARKER)):
            complete.append((int(m.group(1)), name))
        else:
            incomplete.append(name)
    return sorted(complete), sorted(incomplete)


def latest_complete(ckpt_dir: str) -> str | None:
    """Newest complete tag; incomplete ones (a save that was killed) are reported and ignored."""
    complete, incomplete = list_tags(ckpt_dir)
    newest = complete[-1][0] if complete else -1
    for name in incomplete:
        if int(_TAG.match(name).group(1)) > newest:
            logger.warning("ignoring incomplete checkpoint %s (no %s marker: the save was interrupted)",
                           os.path.join(ckpt_dir, name), MARKER)
    return complete[-1][1] if complete else None


def save(engine, ckpt_dir: str, step: int, client_state: dict, keep_last: int, is_main: bool) -> str:
    """Save on every rank, then mark complete and point ``latest`` at it; prune to ``keep_last``."""
    tag = f"global_step{step}"
    t0 = time.perf_counter()
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's files are on disk before the marker says so
    if is_main:
        _atomic_write(os.path.join(ckpt_dir, tag, MARKER),
                      json.dumps({"step": step, "time": time.time()}) + "\n")
        _atomic_write(os.path.join(ckpt_dir, "latest"), tag)
        complete, _ = list_tags(ckpt_dir)
        for _, old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        logger.info("saved checkpoint %s in %.1fs", os.path.join(ckpt_dir, tag), time.perf_counter() - t0)
    barrier()
    return tag


def load(engine, ckpt_dir: str) -> dict | None:
    """Load the newest complete checkpoint into ``engine``; returns its client_state or None."""
    import torch.distributed as dist

    tag = [latest_complete(ckpt_dir)]
    if dist.is_initialized():  # every rank loads the tag rank 0 chose
        dist.broadcast_object_list(tag, src=0)
    if tag[0] is None:
        return None
    path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag[0])
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag[0])}")
    logger.info("resumed from %s", path)
    return client_state or {}
