"""Fault injection for the reliability tests: NEVER set in production.

The environment variable ``BERTFORGE_FAULT_INJECT`` holds comma-separated faults ``<kind>@<steps>[:rank<r>]``
(``<steps>``: ``3``, ``3-5`` or ``6-`` for "6 and later"; steps are 1-based optimizer steps, the number the
step will have once taken; without ``:rank<r>`` the fault fires on every rank):

    nan_loss@3:rank1        rank 1 multiplies its training loss of step 3 by NaN
    nan_loss@6-             every rank, every step from 6 on
    kill_in_save@10:rank1   in the checkpoint save at step 10, rank 1 writes half of its first file, then
                            SIGKILLs itself (a real kill while a checkpoint file is partly written)
    save_fail@3:rank1       in the save at step 3, rank 1's checkpoint file writes fail with ENOSPC

Unset, every hook is a no-op costing one dict lookup.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal

logger = logging.getLogger(__name__)

ENV = "BERTFORGE_FAULT_INJECT"
KINDS = ("nan_loss", "kill_in_save", "save_fail")
_SPEC = re.compile(r"^(?P<kind>[a-z_]+)@(?P<lo>\d+)(?P<range>-(?P<hi>\d*))?(?::rank(?P<rank>\d+))?$")


def parse(text: str) -> list[tuple[str, int, float, int | None]]:
    """``"nan_loss@3-5:rank1,kill_in_save@10"`` -> ``[(kind, first, last, rank or None), ...]``."""
    faults = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = _SPEC.match(part)
        if not m or m["kind"] not in KINDS:
            raise ValueError(f"{ENV}: bad fault {part!r}; expected <kind>@<step>[-[<last>]][:rank<r>] with kind "
                             f"one of {', '.join(KINDS)}")
        lo = int(m["lo"])
        hi: float = lo if not m["range"] else (int(m["hi"]) if m["hi"] else float("inf"))
        faults.append((m["kind"], lo, hi, int(m["rank"]) if m["rank"] is not None else None))
    return faults


def active(kind: str, step: int, rank: int | None = None) -> bool:
    """Whether fault ``kind`` fires at ``step`` on ``rank`` (default: this process's RANK)."""
    text = os.environ.get(ENV)
    if not text:
        return False
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    return any(k == kind and lo <= step <= hi and r in (None, rank) for k, lo, hi, r in parse(text))


def poison_loss(loss, step: int):
    """``loss * NaN`` when ``nan_loss`` fires at ``step`` on this rank, else ``loss`` unchanged."""
    if active("nan_loss", step):
        logger.warning("FAULT INJECTION (%s): poisoning the loss of step %d with NaN", ENV, step)
        return loss * float("nan")
    return loss


def before_checkpoint_write(path: str, step: int, data: bytes | None = None) -> None:
    """Hook run before each checkpoint file write of the save at ``step``.

    ``save_fail`` raises ``OSError(ENOSPC)``; ``kill_in_save`` writes half of ``data`` (the serialized
    file) to ``path`` and SIGKILLs this process.
    """
    if active("save_fail", step):
        logger.warning("FAULT INJECTION (%s): failing the write of %s", ENV, path)
        raise OSError(errno.ENOSPC, "No space left on device (injected fault)", path)
    if active("kill_in_save", step):
        logger.warning("FAULT INJECTION (%s): SIGKILL while %s is half written", ENV, path)
        with open(path, "wb") as f:
            f.write((data or b"\0" * 4096)[: max(1, len(data or b"") // 2)])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
