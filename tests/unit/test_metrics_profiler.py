"""Cross-check: the analytic FLOPs that TensorBoard logs (model/flops.py through the trainer's forward
hook) against DeepSpeed's flops profiler on the same training step of the softmax BERT."""

from __future__ import annotations

import pytest
import torch

from pretrain.compute import FLOP_FIELDS, FlopsTracker


@pytest.mark.parametrize("layers,hidden,heads,seq", [(2, 64, 4, 64), (2, 128, 4, 128)])
def test_analytic_flops_match_deepspeed_profiler_on_one_step(megatron_world, layers, hidden, heads, seq):
    from deepspeed.profiling.flops_profiler import FlopsProfiler

    from launch.config import load_config
    from model.bert import build_model

    cfg = load_config(None, [f"model.num_layers={layers}", f"model.hidden_size={hidden}",
                             f"model.num_attention_heads={heads}", f"model.max_position_embeddings={seq}",
                             f"data.seq_len={seq}", "model.attention={name: softmax}"])
    torch.manual_seed(0)
    model = build_model(cfg, 500)
    model.train()
    tracker = FlopsTracker(cfg, model.vocab_size)
    hook = tracker.attach(model)
    g = torch.Generator().manual_seed(0)
    b = 8
    ids = torch.randint(5, 500, (b, seq), generator=g)
    mask = torch.ones(b, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0  # padding: computed by the kernel, counted by both
    labels = torch.full((b, seq), -100)
    picked = (torch.rand(b, seq, generator=g) < 0.15) & mask.bool()
    labels[picked] = ids[picked]

    prof = FlopsProfiler(model)
    prof.start_profile()
    loss, n, _ = model(input_ids=ids, attention_mask=mask, tokentype_ids=torch.zeros_like(ids), labels=labels)
    profiled_fwd = prof.get_total_flops()
    prof.end_profile()
    (loss / n).backward()
    hook.remove()

    analytic = dict(zip(FLOP_FIELDS, tracker.local_window()))["model"]  # fwd + bwd of this step
    from model.flops import model_flops

    fwd = model_flops(cfg, b, seq, int(picked.sum()), model.vocab_size)["fwd"]
    assert abs(profiled_fwd - fwd) <= 0.10 * fwd, (profiled_fwd, fwd)
    # the profiler measures the forward only; DeepSpeed counts a training step as 3x it (backward = 2x)
    assert abs(3 * profiled_fwd - analytic) <= 0.10 * analytic, (3 * profiled_fwd, analytic)
