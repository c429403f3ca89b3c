"""What every command-line entry point shares: rank-aware logging and the one-line error exit.

Bad input (a config key, a missing shard, a checkpoint of another tokenizer) ends a command with
exit code 2 and one line on stderr, ``error: <what is wrong and how to fix it>``; the traceback
goes to the debug log only.
"""

from __future__ import annotations

import logging
import sys
import warnings

EXIT_BAD_INPUT = 2


def setup_logging(rank: int) -> None:
    """INFO on rank 0, WARNING elsewhere; library chatter (DeepSpeed, megatron) at WARNING."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "megatron"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*Apex.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)


def error_exit(e: BaseException, rank: int = 0) -> int:
    """Write ``error: <e>`` once (rank 0) and return the bad-input exit code; traceback at debug."""
    logging.getLogger("launch.cli").debug("stopping", exc_info=e)
    if rank == 0:
        sys.stderr.write(f"error: {e}\n")
    return EXIT_BAD_INPUT
