"""Helpers that start the real deepspeed launcher for the integration tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)

# A tiny model and corpus: the fixed stdlib slice, small vocabulary, short sequences.
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
        "model.max_position_embeddings=64", "data.corpus=[demo_stdlib]", "data.vocab_size=512",
        "data.seq_len=64", "data.samples_per_shard=400", "data.val_fraction=0.05",
        "data.shuffle_buffer=200", "train.micro_batch_size=8", "train.lr=2e-3", "train.warmup_steps=4",
        "train.bf16=false", "train.log_every=2", "train.eval_every=10", "train.eval_batches=4", "train.save_every=10"]


def env(extra: dict | None = None) -> dict:
    e = dict(os.environ)
    e["PATH"] = BIN + os.pathsep + e.get("PATH", "")
    e["PYTHONPATH"] = ROOT
    e["DS_ACCELERATOR"] = "cpu"
    e.setdefault("OMP_NUM_THREADS", "1")
    e.pop("BERTFORGE_FAULT_INJECT", None)  # fault injection only where a test asks for it
    e.update(extra or {})
    return e


_HUNG: list[str] = []  # the first command that ran past its timeout: later ones fail at once


def run(cmd: list[str], timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; past ``timeout`` kill the whole group (the launcher's
    workers too) and fail, and fail every later call at once, so one hang costs one timeout, not
    one per test (a stale build lock once made every launch of a CI run wait until killed)."""
    import pytest

    if _HUNG:
        pytest.fail(f"skipped: an earlier command hung past its timeout: {_HUNG[0]}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        _HUNG.append(" ".join(cmd[:4]) + " ...")
        pytest.fail(f"{' '.join(cmd)} ran past {timeout}s; its output:\n{out[-3000:]}\n---stderr---\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def launch_cmd(run_dir: str, data_dir: str, *overrides: str, nproc: int = 2) -> list[str]:
    return [os.path.join(BIN, "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(_port()),
            "launch/train.py", "--config", "configs/demo.yaml", *TINY,
            f"data.data_dir={data_dir}", f"train.run_dir={run_dir}", *overrides]


def launch(run_dir: str, data_dir: str, *overrides: str, nproc: int = 2,
           extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """The real deepspeed launcher, `nproc` CPU ranks (``extra_env``: e.g. BERTFORGE_FAULT_INJECT)."""
    return run(launch_cmd(run_dir, data_dir, *overrides, nproc=nproc), extra_env=extra_env)


class Background:
    """A launch running in the background, its output going to ``<log>`` (read while it runs)."""

    def __init__(self, run_dir: str, data_dir: str, *overrides: str, nproc: int = 2, log: str,
                 extra_env: dict | None = None) -> None:
        self.log_path = log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(launch_cmd(run_dir, data_dir, *overrides, nproc=nproc), cwd=ROOT,
                                     env=env(extra_env), stdout=self._log, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        """Poll the output for the regular expression ``pattern``; fail if the launch ends first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.output())
            if m:
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"launch ended (rc {self.proc.returncode}) before {pattern!r}:\n"
                                     + self.output()[-4000:])
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n" + self.output()[-4000:])

    def worker_pid(self, local_rank: int) -> int:
        """The pid of the training process of ``local_rank`` (a grandchild of the deepspeed runner)."""
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if any(c.endswith("launch/train.py") for c in cmd) and f"--local_rank={local_rank}" in cmd:
                return child.pid
        raise AssertionError(f"no worker with --local_rank={local_rank} under pid {self.proc.pid}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        """End the launch and its workers (cleanup after a failed test)."""
        import psutil

        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scalars(run_dir: str, tag: str = "train/loss") -> dict[int, float]:
    """``tag`` by step from a run's TensorBoard event files, read with TensorBoard's own reader."""
    import glob

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[int, float] = {}
    for f in sorted(glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents.*"))):
        acc = EventAccumulator(f, size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update((e.step, e.value) for e in acc.Scalars(tag))
    return out
