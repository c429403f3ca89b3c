"""Pretraining entry point.

    deepspeed --num_gpus 2 launch/train.py --config configs/demo.yaml train.steps=100 model.num_layers=4

On CPU set DS_ACCELERATOR=cpu (gloo). Also runs under torchrun, srun (see launch/slurm_env.py) or
as a plain ``python launch/train.py`` (a world of one).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script

from launch.cli import error_exit, setup_logging  # noqa: E402  (setup_logging re-exported)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")
    args = parser.parse_args(argv)
    from launch.slurm_env import SlurmEnvError, apply_slurm_env, in_slurm_task

    if in_slurm_task():  # `srun python launch/train.py`: rank and world size from SLURM_* before validation
        try:
            apply_slurm_env()
        except SlurmEnvError as e:
            return error_exit(e, int(os.environ.get("SLURM_PROCID", "0") or 0))
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    log = logging.getLogger("launch.train")

    from data_pipeline.errors import DataError
    from launch.config import ConfigError, load_config

    cfg = trainer = None
    try:
        cfg = load_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        from launch.distributed import init_distributed
        from pretrain.trainer import Trainer

        info = init_distributed(cfg.parallel.tensor_model_parallel_size, cfg.train.seed)
        trainer = Trainer(cfg, info)
        result = trainer.train()  # writes status.json itself, "failed" included
    except BaseException as e:
        if cfg is not None and trainer is None and rank == 0:
            _write_failed_status(cfg.train.run_dir, e)
        if not isinstance(e, (ConfigError, DataError, ValueError, FloatingPointError, OSError)):
            from pretrain.checkpoint import CheckpointError

            if not isinstance(e, CheckpointError):
                raise
        return error_exit(e, rank)
    from launch.distributed import shutdown_distributed

    shutdown_distributed()
    if rank == 0:
        if result["state"] == "preempted":
            log.info("preempted at step %d (%s); checkpoint %s; run dir %s", result["step"], result["reason"],
                     result["checkpoint"], cfg.train.run_dir)
        else:
            log.info("finished at step %d; val loss %s; run dir %s", result["step"],
                     f"{result['val/loss']:.4f}" if "val/loss" in result else "n/a", cfg.train.run_dir)
    return 0


def _write_failed_status(run_dir: str, e: BaseException) -> None:
    """status.json ``failed`` for errors before training started (the trainer writes its own)."""
    try:
        from pretrain.checkpoint import write_status

        write_status(run_dir, {"state": "failed", "step": None, "error": f"{type(e).__name__}: {e}"})
    except Exception:  # the status is a courtesy: never hide the original error
        logging.getLogger("launch.train").debug("could not write status.json", exc_info=True)


if __name__ == "__main__":
    sys.exit(main())
