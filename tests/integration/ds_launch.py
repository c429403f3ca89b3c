"""Helpers that start the real deepspeed launcher for the integration tests."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

# A tiny model and corpus: the fixed stdlib slice, small vocabulary, short sequences.
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.max_position_embeddings=64", "data.corpus=[demo_stdlib]", "data.vocab_size=512",
        "data.seq_len=64", "data.samples_per_shard=400", "data.val_fraction=0.05",
        "data.shuffle_buffer=200", "train.micro_batch_size=8", "train.lr=2e-3", "train.warmup_steps=4",
        "train.bf16=false", "train.log_every=2", "train.eval_every=10", "train.eval_batches=4", "train.save_every=10"]


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = ROOT
    e["DS_ACCELERATOR"] = "cpu"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    return proc


def launch(run_dir: str, data_dir: str, *overrides: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """The real deepspeed launcher, `nproc` CPU ranks."""
    cmd = [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_port()),
           "launch/train.py", "--config", "configs/demo.yaml", *TINY,
           f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", *overrides]
    return run(cmd)


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


