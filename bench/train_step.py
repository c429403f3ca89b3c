"""A full training step (forward, backward, AdamW step) of bertforge's BERT against Hugging Face
``transformers``' BertForMaskedLM of the same size: tokens/s and MFU.

    .venv/bin/python bench/train_step.py                 # n=128 (softmax, shared_qkv), n=2048 (softmax,
                                                         # linformer, yoso, bert_lsh), fp32 and bf16
    .venv/bin/python bench/train_step.py --tiny --out /tmp/t.json

Model: 4 layers, hidden 256, 4 heads, FFN 1024, vocab 8192, dropout 0 (configs/demo.yaml's shape),
max_position_embeddings = n. One process; bertforge's model is built as the trainer builds it
(``launch.distributed.init_distributed`` -> a gloo world of one + megatron parallel_state, then
``model.bert.build_model``), loss = loss_sum / num_predicted as in pretrain/trainer.py, the optimizer is
the trainer's AdamW with its parameter groups (``pretrain.trainer.param_groups``), stepped directly (no
DeepSpeed engine around it, so both models run the same optimizer code). HF: BertForMaskedLM with its
default attention implementation (sdpa), the same AdamW. 15% of tokens are predicted.
bf16: what the trainer runs (DeepSpeed's bf16 mode): bf16 weights and activations, AdamW on fp32 master
weights (gradients copied up, weights copied back each step), for both models; HF is also timed with
``torch.autocast("cpu", torch.bfloat16)`` (``hf_bert_autocast``, its usual mixed precision).
bertforge cannot run under CPU autocast: megatron's linear layers' custom autograd backward gets a
bf16 input and fp32 gradient and fails ("expected m1 and m2 to have the same dtype").

FLOPs: ``model.flops.model_flops`` (the project's count, 1 multiply-add = 2 FLOPs) for each bertforge
step; HF's step is counted as the softmax model with the MLM head run on every token (HF computes the
vocabulary logits at all positions; bertforge only at the predicted ones). MFU = FLOPs / time / peak,
with the peak measured by a GEMM probe (``pretrain.compute.gemm_probe_tflops``, 1024^3 matmul, best of
5 chunks, per dtype) on this machine at the start of the run.

Ceilings (``noattn``, ``hf_bert_noattn``; "ceiling: no attention at all"): the same two models at the same
n with the attention scores removed, timed in the same interleaved rounds. Neither is a real model; they
bound what any attention variant can reach here, since everything else in the step (embeddings, Q/K/V and
output projections, FFN, LayerNorms, MLM head, loss, AdamW) is kept:
- ``bertforge/noattn``: a bench-only core attention ``bench_noattn`` (registered at run time through
  ``model.attention.register`` by this script, not part of the library) returning V unchanged. Q and K
  are still produced by megatron's fused QKV linear; their gradients are zeros, so the QKV GEMMs
  (forward and backward) cost what they cost with real attention.
- ``hf_bert_noattn``: HF's BertForMaskedLM with ``config._attn_implementation = "bench_noattn"``, an
  attention function registered through ``transformers.AttentionInterface`` that returns V (plus
  ``0 * (Q + K)``, so the query/key linears keep their backward and AdamW update as in the real model).
FLOPs of both: the softmax count minus the core attention (``model.flops.attention_flops``' ``core_*``).

Timing: one warm-up step per model, then interleaved rounds (rotated order), median step time.
``--models A,B,...`` runs those rows instead of the plan's; ``NAME+fused_adamw`` is row NAME with
``torch.optim.AdamW(fused=True)``; ``linformer+paper_form`` is Linformer with E and F applied to K and V
(the paper's form) instead of to the layer input (``LinformerSelfAttention``, the default), for an A/B. Every row's AdamW is fused by default (what ``pretrain/trainer.py`` and
HF's Trainer, ``adamw_torch_fused``, build); ``--adamw loop`` switches every row to the for-loop AdamW.
``--profile NAME[,NAME]`` adds a torch.profiler table (top ops by self CPU time) of one more step of
those rows to the JSON (``profile_top``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

LAYERS, HIDDEN, HEADS, FFN, VOCAB = 4, 256, 4, 1024, 8192
FULL_PLAN = {128: ["softmax", "shared_qkv", "hf_bert"],
             2048: ["softmax", "linformer", "linformer+paper_form", "yoso", "bert_lsh", "hf_bert", "noattn",
                    "hf_bert_noattn"]}
TINY_PLAN = {32: ["softmax", "shared_qkv", "linformer", "linformer+paper_form", "yoso", "bert_lsh", "hf_bert", "noattn",
                  "hf_bert_noattn"]}
CEILINGS = ("noattn", "hf_bert_noattn")  # "ceiling: no attention at all" (see the docstring)
CEILING_NOTE = "ceiling: no attention at all (V passed through)"
NOATTN = "bench_noattn"  # the bench-only core attention registered by register_noattn()


def register_noattn() -> None:
    """Register the bench-only stand-ins (idempotent): core attention ``bench_noattn`` in bertforge's
    registry, attention function ``bench_noattn`` in transformers' AttentionInterface."""
    from model.attention import CoreAttention, available, register

    if NOATTN not in available():
        @register(NOATTN)
        class _NoAttention(CoreAttention):  # noqa: F841 - registered by the decorator
            """Bench-only ceiling: no scores at all, the output is V ([b, h, s, d])."""

            def forward(self, q, k, v, key_padding_mask):
                return v

    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - HF rows then report the error
        return

    def hf_noattn(module, query, key, value, attention_mask, **kwargs):
        # [b, h, s, d] -> [b, s, h, d] as HF's sdpa_attention_forward returns; 0 * (q + k) keeps the
        # query/key linears in the graph (their backward and AdamW update run as in the real model).
        out = value + 0.0 * (query + key)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(NOATTN, hf_noattn)


def noattn_flops(n: int, batch: int, num_masked: int) -> float:
    """FLOPs of the softmax model minus its core attention (the ceilings' count)."""
    from model.flops import attention_flops, model_flops

    cfg = experiment_cfg("softmax", n, False)
    a = attention_flops("softmax", batch, n, HEADS, HIDDEN // HEADS, HIDDEN, n)
    return model_flops(cfg, batch, n, num_masked, VOCAB)["total"] - LAYERS * (a["core_fwd"] + a["core_bwd"])
TOKENS_PER_STEP = 2048  # batch = TOKENS_PER_STEP // n (16 x 128 as in the demo; 1 x 2048)


def _dist() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from launch.distributed import init_distributed

    init_distributed(tensor_model_parallel_size=1, seed=0)


def experiment_cfg(attention: str, n: int, bf16: bool):
    from launch.config import load_config

    extra = f", k: {min(128, n // 2)}" if attention == "linformer" else ""  # k < n also in the tiny run

    overrides = [f"model.num_layers={LAYERS}", f"model.hidden_size={HIDDEN}", f"model.num_attention_heads={HEADS}",
                 f"model.ffn_hidden_size={FFN}", f"model.max_position_embeddings={n}", f"model.vocab_size={VOCAB}",
                 "model.hidden_dropout=0.0", "model.attention_dropout=0.0", f"data.vocab_size={VOCAB}",
                 f"data.seq_len={n}", "train.bf16=false",  # bf16 = autocast here (see the docstring)
                 f"model.attention={{name: {attention}{extra}}}"]
    return load_config(None, overrides)


def make_batch(batch: int, n: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, n), generator=g)
    pick = torch.rand(batch, n, generator=g) < 0.15
    pick[:, 0] = True  # at least one prediction per row
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": torch.ones(batch, n, dtype=torch.long),
            "token_type_ids": torch.zeros(batch, n, dtype=torch.long), "labels": labels}


class Case:
    def __init__(self, name: str, n: int, bf16: bool, tokens_per_step: int = TOKENS_PER_STEP,
                 autocast: bool = False, noattn: bool = False, adamw: str = "default",
                 paper_form: bool = False) -> None:
        import torch

        from model.flops import model_flops
        from pretrain.trainer import param_groups

        self.name, self.n, self.bf16 = name, n, bf16
        self.paper_form = paper_form  # Linformer layers in the paper's form (LinformerSelfAttention.compress_input off)
        # default: fused AdamW, what both trainers run (pretrain.trainer._fused_adamw; HF Trainer's
        # adamw_torch_fused since torch 2.8); loop: the plain for-loop AdamW, to show the optimizer's share
        opt_kw = {} if adamw == "loop" else {"fused": True}
        self.batch = max(1, tokens_per_step // n)
        self.data = make_batch(self.batch, n)
        num_masked = int((self.data["labels"] != -100).sum())
        torch.manual_seed(0)
        if name == "hf_bert":
            from transformers import BertConfig, BertForMaskedLM

            hcfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                              num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=n,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, type_vocab_size=2)
            if noattn:
                register_noattn()
                hcfg._attn_implementation = NOATTN
            self.model = BertForMaskedLM(hcfg).train()
            self.impl = getattr(self.model.config, "_attn_implementation", None)
            cfg = experiment_cfg("softmax", n, bf16)
            if noattn:
                self.flops = noattn_flops(n, self.batch, self.batch * n)
                self.flops_note = f"{CEILING_NOTE}; softmax count minus core attention, MLM head on all tokens"
            else:
                self.flops = model_flops(cfg, self.batch, n, self.batch * n, VOCAB)["total"]
                self.flops_note = "softmax count, MLM head on all tokens"
            self.opt = torch.optim.AdamW(param_groups(self.model, 0.01), lr=1e-4, **opt_kw)
        else:
            from model.bert import build_model

            if name == "noattn":
                register_noattn()
            cfg = experiment_cfg(NOATTN if name == "noattn" else name, n, bf16)
            self.model = build_model(cfg, VOCAB).train()
            self.impl = None
            if name == "noattn":
                self.flops = noattn_flops(n, self.batch, num_masked)
                self.flops_note = f"{CEILING_NOTE}; softmax count minus core attention"
            else:
                self.flops = model_flops(cfg, self.batch, n, num_masked, VOCAB,
                                         linformer_input_form=not paper_form)["total"]
                self.flops_note = "model.flops.model_flops" + (" (paper form)" if paper_form else "")
            t = cfg.train
            self.opt = torch.optim.AdamW(param_groups(self.model, t.weight_decay), lr=t.lr,
                                         betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps, **opt_kw)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.step_no = 0
        self.autocast = bf16 and autocast
        self.master: list | None = None
        if bf16 and not autocast:
            # DeepSpeed's bf16 mode (what the trainer runs): bf16 weights and activations, fp32 master
            # weights in the optimizer, gradients copied up and weights copied back every step.
            groups = self.opt.param_groups
            self.model.to(torch.bfloat16)
            self.pairs = []
            new_groups = []
            for g in groups:
                masters = []
                for p in g["params"]:
                    m = p.detach().float().clone().requires_grad_()
                    self.pairs.append((p, m))
                    masters.append(m)
                new_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": masters})
            self.opt = torch.optim.AdamW(new_groups, **opt_kw)  # groups carry the flags of the first
            self.master = [m for _, m in self.pairs]

    def step(self) -> float:
        import torch

        from model.attention.base import set_step

        set_step(self.step_no)
        self.step_no += 1
        d = self.data
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast), _linformer_form(self.paper_form):
            if self.name == "hf_bert":
                loss = self.model(**d).loss
            else:
                loss_sum, cnt, _ = self.model(input_ids=d["input_ids"], attention_mask=d["attention_mask"],
                                              tokentype_ids=d["token_type_ids"], labels=d["labels"])
                loss = loss_sum / cnt.clamp(min=1.0)
        loss.backward()
        if self.master is not None:
            for p, m in self.pairs:
                m.grad = None if p.grad is None else p.grad.float()
            self.opt.step()
            with torch.no_grad():
                for p, m in self.pairs:
                    p.copy_(m)
        else:
            self.opt.step()
        dt = time.perf_counter() - t0
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"{self.name}: non-finite loss")
        return dt


@contextlib.contextmanager
def _linformer_form(paper: bool):
    """Run Linformer's megatron layers in the paper's form (E K, F V) instead of compressing their input."""
    from model.attention.megatron_adapter import LinformerSelfAttention

    before = LinformerSelfAttention.compress_input
    LinformerSelfAttention.compress_input = not paper and before
    try:
        yield
    finally:
        LinformerSelfAttention.compress_input = before


def profile_step(case: Case, top: int = 15) -> list[dict[str, Any]]:
    """One more step of ``case`` under torch.profiler: the ``top`` ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        case.step()
    evs = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in evs) or 1.0
    evs.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "self_pct": round(100.0 * e.self_cpu_time_total / total, 1)} for e in evs[:top]]


def run(plan: dict[int, list[str]], dtypes: list[str], repeats: int,
        tokens_per_step: int = TOKENS_PER_STEP, autocast_row: bool = True,
        profile: list[str] | None = None, adamw: str = "default") -> dict[str, Any]:
    import torch

    from model.attention.base import set_seed
    from pretrain.compute import gemm_probe_tflops

    _dist()
    set_seed(0)
    machine = common.machine()
    common.log(f"machine: {machine}")
    peaks = {}
    for dname in dtypes:
        tdt = torch.float32 if dname == "fp32" else torch.bfloat16
        peaks[dname] = gemm_probe_tflops("cpu", tdt, n=1024, seconds=1.0, chunks=5) * 1e12
        common.log(f"GEMM probe {dname}: {peaks[dname] / 1e9:.1f} GFLOP/s")
    rows = []
    for dname in dtypes:
        for n, names in plan.items():
            cases, crow = [], {}
            run_names = list(names) + (["hf_bert_autocast"] if dname == "bf16" and "hf_bert" in names
                                       and autocast_row else [])
            for name in run_names:
                # "<row>+fused_adamw": that row with fused AdamW; "linformer+paper_form": the paper's E K, F V
                base_name, _, variant = name.partition("+")
                row_adamw = "fused" if variant == "fused_adamw" else adamw
                hf = base_name.startswith("hf_bert")
                ceiling = base_name in CEILINGS
                row: dict[str, Any] = {"model": (base_name if hf else f"bertforge/{base_name}")
                                       + (f"+{variant}" if variant else ""),
                                       "attention": ("none (V passthrough)" if ceiling else
                                                     "softmax (HF sdpa)" if hf else base_name),
                                       "ceiling": ceiling, "adamw": row_adamw,
                                       "n": n, "dtype": dname,
                                       "precision": ("fp32" if dname == "fp32" else
                                                     "bf16 autocast, fp32 weights" if name == "hf_bert_autocast"
                                                     else "bf16 weights, fp32 master AdamW (DeepSpeed bf16 style)")}
                try:
                    c = Case("hf_bert" if hf else base_name, n, dname == "bf16", tokens_per_step,
                             autocast=base_name == "hf_bert_autocast", noattn=base_name == "hf_bert_noattn",
                             adamw=row_adamw, paper_form=variant == "paper_form")
                    c.key = name
                    row.update(batch=c.batch, tokens_per_step=c.batch * n, params=c.params, flops_per_step=c.flops,
                               flops_note=c.flops_note, hf_attn_implementation=c.impl)
                    row["warmup_s"] = c.step()
                    row.update(status="ok", step_s_all=[])
                    cases.append(c)
                    crow[name] = row
                except Exception as e:  # noqa: BLE001 - report, continue
                    row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    common.log(f"{dname} n={n} {name}: {row['reason']}")
                rows.append(row)
            for r in range(repeats):
                k = r % max(len(cases), 1)
                for c in cases[k:] + cases[:k]:
                    crow[c.key]["step_s_all"].append(c.step())
            base = crow.get("hf_bert")
            for c in cases:
                row = crow[c.key]
                row["step_s"] = common.median(row["step_s_all"]) or row["warmup_s"]
                row["tokens_per_s"] = row["tokens_per_step"] / row["step_s"]
                row["achieved_gflops"] = c.flops / row["step_s"] / 1e9
                row["mfu"] = c.flops / row["step_s"] / peaks[dname]
                # best of the rounds: on this shared machine a round is either quiet or slowed by other jobs,
                # so the fastest round of each row is the less load-sensitive estimate (medians stay primary)
                row["step_s_min"] = min(row["step_s_all"]) if row["step_s_all"] else row["warmup_s"]
                row["tokens_per_s_best"] = row["tokens_per_step"] / row["step_s_min"]
                if base is not None and base.get("status") == "ok":
                    base_tps = base["tokens_per_step"] / (common.median(base["step_s_all"]) or base["warmup_s"])
                    row["tokens_per_s_vs_hf"] = row["tokens_per_s"] / base_tps
                    base_best = base["tokens_per_step"] / (min(base["step_s_all"]) if base["step_s_all"]
                                                           else base["warmup_s"])
                    row["tokens_per_s_vs_hf_best"] = row["tokens_per_s_best"] / base_best
                fused_base = crow.get("hf_bert+fused_adamw")
                if "+fused_adamw" in c.key and fused_base is not None and fused_base.get("status") == "ok":
                    row["tokens_per_s_vs_hf_fused_adamw"] = row["tokens_per_s"] / (
                        fused_base["tokens_per_step"] / common.median(fused_base["step_s_all"]))
                common.log(f"{dname} n={n} {row['model']:22s} {row['tokens_per_s']:9.0f} tok/s "
                           f"x{row.get('tokens_per_s_vs_hf', float('nan')):5.2f} HF (best-of x"
                           f"{row.get('tokens_per_s_vs_hf_best', float('nan')):5.2f})  MFU {100 * row['mfu']:5.1f}%")
            for c in cases:
                if profile and (c.key in profile or crow[c.key]["model"] in profile):
                    crow[c.key]["profile_top"] = profile_step(c)
                    top = ", ".join(f"{e['op']} {e['self_pct']}%" for e in crow[c.key]["profile_top"][:6])
                    common.log(f"{dname} n={n} {crow[c.key]['model']} profile: {top}")
            del cases
    return {"benchmark": "train_step", "machine": common.finish_machine(machine),
            "settings": {"plan": {str(k): v for k, v in plan.items()}, "dtypes": dtypes, "repeats": repeats,
                         "layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "ffn": FFN, "vocab": VOCAB,
                         "tokens_per_step": tokens_per_step,
                         "peak_flops": {k: v for k, v in peaks.items()},
                         "peak_source": "GEMM probe (pretrain.compute.gemm_probe_tflops, 1024^3, best of 5 chunks)",
                         "bf16": "bf16 weights + fp32 master AdamW (both); hf_bert_autocast: autocast, fp32 weights",
                         "timing": "median of interleaved rounds after one warm-up step (rotated order)",
                         "timing_best": "step_s_min / tokens_per_s_best / tokens_per_s_vs_hf_best: fastest round",
                         "adamw": adamw,
                         "ceilings": f"{', '.join(CEILINGS)}: {CEILING_NOTE} (bench-only stand-ins, see "
                                     "bench/train_step.py's docstring)"},
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    common.ensure_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="subset of the plan's sequence lengths")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "train_step.json"))
    ap.add_argument("--models", type=lambda s: s.split(","), default=None,
                    help="rows to run instead of the plan's (e.g. hf_bert,softmax,linformer,noattn,hf_bert_noattn; "
                         "NAME+fused_adamw: that row with fused AdamW); hf_bert_autocast (bf16) only when named")
    ap.add_argument("--profile", type=lambda s: s.split(","), default=None,
                    help="rows to profile once after the timed rounds (e.g. linformer)")
    ap.add_argument("--adamw", choices=["default", "fused", "loop"], default="default",
                    help="default (= fused): AdamW(fused=True), what pretrain/trainer.py and HF's Trainer "
                         "(adamw_torch_fused) build; loop: the plain for-loop AdamW, to show the optimizer's share")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--no-report", action="store_true")
    a = ap.parse_args(argv)
    plan = dict(TINY_PLAN if a.tiny else FULL_PLAN)
    if a.sizes:
        plan = {n: v for n, v in plan.items() if n in a.sizes}
    if a.models:  # these rows at each of the plan's sizes (a "+fused_adamw" suffix: that row with fused AdamW)
        plan = {n: [x for x in a.models if x != "hf_bert_autocast"] for n in plan}
    repeats = a.repeats if a.repeats is not None else (1 if a.tiny else 5)
    payload = run(plan, a.dtypes, repeats, 256 if a.tiny else TOKENS_PER_STEP,
                  autocast_row=a.models is None or "hf_bert_autocast" in a.models, profile=a.profile,
                  adamw="fused" if a.adamw == "default" else a.adamw)
    common.finish(payload, a.out, a.tiny, a.no_report)


if __name__ == "__main__":
    main()
