"""`make demo`: prepare the embedded default corpus, pretrain with the real deepspeed launcher on
2 ranks, then print the last validation loss beside the unigram entropy of the masked tokens.

A second run on the same data swaps in shared_qkv attention (``--second_attention``; its steps:
``--second_steps``, default the config's), and ``python -m pretrain.report`` compares both (loss,
throughput, FLOPs and the compute saved against softmax) in ``--report_dir``."""

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
    p.add_argument("--second_attention", default="{name: shared_qkv}",
                   help="model.attention of the second run, compared with the first (default: %(default)s)")
    p.add_argument("--second_steps", type=int, default=None,
                   help="train.steps of the second run (default: the same as the first); 0 skips it")
    p.add_argument("--second_run_dir", default="runs/demo_shared_qkv", help="run directory of the second run")
    p.add_argument("--report_dir", default="runs/report", help="where the comparison table and plots go")
    p.add_argument("overrides", nargs="*", help="dotted overrides of both runs, e.g. train.steps=100")
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
    t1 = time.time()
    second = None
    if args.second_steps != 0:
        extra = [f"model.attention={args.second_attention}", f"train.run_dir={args.second_run_dir}"]
        if args.second_steps is not None:
            extra.append(f"train.steps={args.second_steps}")
        second = subprocess.call([deepspeed, "--num_gpus", str(args.num_gpus), "launch/train.py", "--config",
                                  args.config, *args.overrides, *extra], cwd=ROOT, env=env)
    t2 = time.time()
    report_dirs = [cfg.train.run_dir] + ([args.second_run_dir] if second == 0 else [])
    report = subprocess.call([sys.executable, "-m", "pretrain.report", *report_dirs, "--out", args.report_dir],
                             cwd=ROOT, env=env)

    with open(os.path.join(ROOT, cfg.train.run_dir, "status.json")) as f:
        status = json.load(f)
    loss, entropy = status["val/loss"], status["val/unigram_entropy"]
    print()
    print(f"demo finished in {time.time() - t0:.0f}s (first run done after {t1 - t0:.0f}s"
          + (f", second run {t2 - t1:.0f}s" if second is not None else "") + ")")
    print(f"first run ({cfg.train.run_dir}, attention {cfg.model.attention['name']}) at step {status['step']}:")
    print(f"  validation MLM loss (last eval):           {loss:.4f} nats")
    print(f"  unigram entropy of masked val tokens:      {entropy:.4f} nats  (a model that ignores context)")
    print(f"  margin:                                    {entropy - loss:+.4f} nats "
          f"({'below' if loss < entropy else 'NOT below'} the unigram entropy)")
    print(f"  validation MLM accuracy:                   {status['val/mlm_accuracy']:.3f}")
    if second is not None:
        print()
        if second == 0:
            with open(os.path.join(ROOT, args.second_run_dir, "status.json")) as f:
                st2 = json.load(f)
            print(f"second run ({args.second_run_dir}, attention {args.second_attention}) at step {st2['step']}: "
                  f"validation MLM loss {st2['val/loss']:.4f} nats (unigram entropy {st2['val/unigram_entropy']:.4f})")
        else:
            print(f"second run ({args.second_run_dir}) FAILED with exit code {second}; the report covers the first "
                  "run only")
    print()
    tb = os.path.join(cfg.train.run_dir, "tb")
    print(f"TensorBoard:  {bindir}/tensorboard --logdir {tb} --port 6006")
    if second == 0:
        import yaml

        second_name = (yaml.safe_load(args.second_attention) or {}).get("name", "second")
        spec = f"{cfg.model.attention['name']}:{tb},{second_name}:{os.path.join(args.second_run_dir, 'tb')}"
        print(f"  both runs:  {bindir}/tensorboard --logdir_spec {spec} --port 6006")
    print(f"Checkpoints:  {os.path.join(cfg.train.run_dir, 'checkpoints')}")
    if report == 0:
        print(f"Report:       {os.path.join(args.report_dir, 'report.md')} (table above)")
        print(f"Plots:        {os.path.join(args.report_dir, 'val_loss_vs_flops.png')}, "
              f"{os.path.join(args.report_dir, 'val_loss_vs_tokens.png')}, "
              f"{os.path.join(args.report_dir, 'compute_saved.png')}")
    else:
        print(f"Report:       `python -m pretrain.report` failed with exit code {report}")
    if second not in (None, 0) or report != 0:
        sys.exit(1)

if __name__ == "__main__":
    main()
