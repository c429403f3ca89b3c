"""Multi-node launch without Slurm, and tensor parallelism under the real deepspeed launcher.

* Two "nodes" on loopback: two ``deepspeed --no_ssh --node_rank {0,1} --num_nodes 2 --num_gpus 1`` runs
  of one rank each over one hostfile form the same 2-rank world as ``deepspeed --num_gpus 2`` on one
  node, so they log the same losses as the cached 2-rank run.
* TP=2 x DP=1 on 2 ranks logs the same losses as TP=1 on 1 rank (DP is 1 in both, so the data order is
  the same) for softmax and a hashed variant. Dropout is 0 in these runs (demo.yaml): megatron's
  dropout RNG tracker is CUDA-only, so on CPU dropout masks would differ between layouts.
* A world size that TP does not divide stops with one line through the launcher.
* ZeRO-Offload (``train.offload_optimizer``, torch AdamW on the CPU) logs the losses of the same run
  without offload.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from ds_launch import BIN, ROOT, TINY, _port, env, launch, scalars

pytestmark = pytest.mark.slow


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n---stderr---\n" + proc.stderr[-4000:]


def test_two_nodes_on_loopback_match_one_node(runs, tiny_data, tmp_path):
    ref_dir, ref = runs.get("zero1", "train.steps=20", "train.zero_stage=1")
    ok(ref)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only: --no_ssh never contacts them
    run_dir, port = str(tmp_path / "two_nodes"), _port()
    procs, logs = [], []
    for node_rank in (0, 1):
        cmd = [os.path.join(BIN, "deepspeed"), "--no_ssh", f"--node_rank={node_rank}", "--num_nodes", "2",
               "--num_gpus", "1", "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "launch/train.py", "--config", "configs/demo.yaml", *TINY,
               f"data.data_dir={tiny_data}", f"train.run_dir={run_dir}", "train.steps=20", "train.zero_stage=1"]
        log = open(tmp_path / f"node{node_rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        rcs = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    out = "".join(open(tmp_path / f"node{i}.log").read()[-3000:] for i in (0, 1))
    assert rcs == [0, 0], out
    status = json.load(open(os.path.join(run_dir, "status.json")))
    assert status["state"] == "finished" and status["step"] == 20, status
    one, two = scalars(ref_dir), scalars(run_dir)
    assert sorted(two) == sorted(one) and max(one) == 20, (one, two)
    diff = max(abs(one[s] - two[s]) for s in one)
    print(f"two nodes vs one node: max |loss diff| {diff:.2e} over {len(one)} logged steps")
    assert diff <= 1e-5, f"two nodes vs one node: max |loss diff| {diff:.2e}\n{one}\n{two}"


@pytest.mark.parametrize("attention", ["{name: softmax}", "{name: yoso, num_hashes: 8, hash_bits: 5}"],
                         ids=["softmax", "yoso"])
def test_tp2_matches_tp1(tiny_data, tmp_path, attention):
    common = ["train.steps=10", "train.log_every=1", "train.save_every=0", "train.eval_every=10",
              "train.zero_stage=1", "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
              f"model.attention={attention}"]
    tp1 = launch(str(tmp_path / "tp1"), tiny_data, *common, nproc=1)
    ok(tp1)
    tp2 = launch(str(tmp_path / "tp2"), tiny_data, *common, "parallel.tensor_model_parallel_size=2", nproc=2)
    ok(tp2)
    assert "tp 0/2, dp 0/1" in tp2.stdout + tp2.stderr, "the 2-rank run did not use TP=2 x DP=1"
    one, two = scalars(str(tmp_path / "tp1")), scalars(str(tmp_path / "tp2"))
    assert sorted(one) == list(range(1, 11)) and sorted(two) == sorted(one), (one, two)
    diff = max(abs(one[s] - two[s]) for s in one)
    print(f"TP=2 vs TP=1 ({attention}): max |loss diff| {diff:.2e} over 10 steps")
    assert diff <= 1e-4, f"TP=2 vs TP=1 ({attention}): max |loss diff| {diff:.2e}\n{one}\n{two}"
    # the model learns under TP: the loss after 10 steps is below the first one
    assert two[10] < two[1], two
    vone, vtwo = scalars(str(tmp_path / "tp1"), "val/loss"), scalars(str(tmp_path / "tp2"), "val/loss")
    assert vone and abs(vone[10] - vtwo[10]) <= 1e-4, (vone, vtwo)


def test_world_not_divisible_by_tp_stops_in_one_line(tiny_data, tmp_path):
    proc = launch(str(tmp_path / "bad_tp"), tiny_data, "train.steps=2", "parallel.tensor_model_parallel_size=2",
                  nproc=1)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "world size 1 is not divisible by parallel.tensor_model_parallel_size=2" in errors[0], errors
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_zero_offload_matches_no_offload(runs, tiny_data, tmp_path):
    ref_dir, ref = runs.get("zero1", "train.steps=20", "train.zero_stage=1")
    ok(ref)
    run_dir = str(tmp_path / "offload")
    proc = launch(run_dir, tiny_data, "train.steps=20", "train.zero_stage=1", "train.offload_optimizer=true")
    ok(proc)
    one, off = scalars(ref_dir), scalars(run_dir)
    assert sorted(off) == sorted(one) and max(off) == 20, (one, off)
    diff = max(abs(one[s] - off[s]) for s in one)
    print(f"ZeRO-Offload vs none: max |loss diff| {diff:.2e}")
    assert diff <= 1e-5, f"offload vs none: max |loss diff| {diff:.2e}\n{one}\n{off}"
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "global_step20", "COMPLETE"))
    from launch.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.offload_optimizer=true needs ZeRO"):
        load_config(None, ["train.zero_stage=0", "train.offload_optimizer=true"])
