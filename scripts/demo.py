"""`make demo`: prepare the embedded default corpus, pretrain with the real deepspeed launcher on
2 ranks, then print the last validation loss beside the unigram entropy of the masked tokens."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(cmd: list[str], env: dict) -> None:
    print("+ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    if rc != 0:
        sys.exit(f"demo: `{' '.join(cmd)}` failed with exit code {rc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--num_gpus", type=int, default=2, help="ranks on this machine (CPU ranks without a GPU)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = p.parse_args()

    from launch.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.setdefault("PYTHONPATH", ROOT)
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except ImportError:
        env.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.time()
    run([sys.executable, "-m", "data_pipeline.prepare", "--config", args.config, *args.overrides], env)
    deepspeed = shutil.which("deepspeed", path=env["PATH"]) or "deepspeed"
    run([deepspeed, "--num_gpus", str(args.num_gpus), "launch/train.py", "--config", args.config,
         *args.overrides], env)
    with open(os.path.join(ROOT, cfg.train.run_dir, "status.json")) as f:
        status = json.load(f)
    loss, entropy = status["val/loss"], status["val/unigram_entropy"]
    print()
    print(f"demo finished in {time.time() - t0:.0f}s at step {status['step']}")
    print(f"  validation MLM loss (last eval):           {loss:.4f} nats")
    print(f"  unigram entropy of masked val tokens:      {entropy:.4f} nats  (a model that ignores context)")
    print(f"  margin:                                    {entropy - loss:+.4f} nats "
          f"({'below' if loss < entropy else 'NOT below'} the unigram entropy)")
    print(f"  validation MLM accuracy:                   {status['val/mlm_accuracy']:.3f}")
    print()
    print(f"TensorBoard:  {bindir}/tensorboard --logdir {os.path.join(cfg.train.run_dir, 'tb')} --port 6006")
    print(f"Checkpoints:  {os.path.join(cfg.train.run_dir, 'checkpoints')}")


if __name__ == "__main__":
    main()
