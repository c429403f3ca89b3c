"""Tensor parallelism: a TP=2 model (2 gloo processes) computes what the TP=1 model computes.

This checks, for every variant, megatron's head layout (shared_qkv's fused linear_qkv), that
stochastic variants key their hashes by the GLOBAL head index, and that Linformer's head-shared E
gets the full gradient on every rank (the replicated-parameter hook all-reduces it over TP).
Run as a script, this file is the worker: ``python test_attn_tp.py OUT_DIR``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

ATTENTIONS = ["{name: softmax}", "{name: yoso, num_hashes: 8, hash_bits: 5}", "{name: bert_lsh}",
              "{name: linformer, k: 8, sharing: headwise}", "{name: linformer, k: 8, sharing: layerwise}",
              "{name: shared_qkv}"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, tp: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tp, 1)
    from launch.config import load_config
    from model.bert import attention_modules, build_model

    results = {}
    for att in ATTENTIONS:
        cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                 "model.max_position_embeddings=32", "data.seq_len=16", "model.vocab_size=256",
                                 "model.hidden_dropout=0.0", "model.attention_dropout=0.0",
                                 f"model.attention={att}", f"parallel.tensor_model_parallel_size={tp}"])
        torch.manual_seed(0)
        model = build_model(cfg, 100)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, 100, (2, 16), generator=g)
        am = torch.ones(2, 16, dtype=torch.long)
        am[1, 11:] = 0
        logits = model(ids, am, torch.zeros_like(ids))  # [b, s, vocab / tp]
        logits.pow(2).sum().backward()  # summed over ranks = the TP=1 loss
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        core = attention_modules(model)[0]
        e_grad = core.E.grad.clone() if hasattr(core, "E") else None
        results[att] = (torch.cat(parts, dim=-1), e_grad)
    if rank == 0:
        torch.save(results, out)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_equals_tp1(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = torch.load(tmp_path / "tp1.pt"), torch.load(tmp_path / "tp2.pt")
    for att in ATTENTIONS:
        torch.testing.assert_close(two[att][0], one[att][0], atol=1e-5, rtol=1e-4, msg=att)
        if one[att][1] is not None:
            torch.testing.assert_close(two[att][1], one[att][1], atol=1e-5, rtol=1e-4, msg=att)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    for degree in (1, 2):
        mp.spawn(_worker, args=(degree, _free_port(), os.path.join(sys.argv[1], f"tp{degree}.pt")), nprocs=degree)
