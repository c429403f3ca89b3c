"""Attention alone: forward + backward time and peak memory of every bertforge variant against SDPA
softmax and against the PyPI peers implementing the same ideas.

    .venv/bin/python bench/attention.py                       # full sweep: n in 512..8192, fp32 and bf16
    .venv/bin/python bench/attention.py --tiny --out /tmp/a.json

Shapes: B=1, H=12, d=64 (q, k, v: [B, H, n, d]); gradients for q, k, v and every parameter of the
module (backward with a fixed random output gradient). Each variant runs its default config
(model/attention/*: ``{name: <variant>}``) unless the row's name says otherwise (``linformer_k256``,
``*_reference``: the dense debugging path, ``yoso_e``: YOSO-E). The rows with a projection
(``shared_qkv``, ``sdpa_qkv_proj``) start from x [B, n, 768] instead of q, k, v.

Peers (matched settings, same inputs and output gradient):
    linformer_pkg    lucidrains ``linformer.LinformerSelfAttention`` (k=256, one E and one F shared by all
                     heads = our ``sharing: headwise``); its Q/K/V/out projections are replaced by
                     pass-throughs of our q, k, v so only the attention core is timed.
    reformer_lsh     ``reformer_pytorch.LSHAttention`` (shared QK as in Reformer, n_hashes=1 to match
                     bert_lsh's num_hashes=1, bucket_size=64 default), inputs [B*H, n, d].
    hf_yoso_e        ``transformers.models.yoso.YosoSelfAttention`` with ``use_expectation=True``: on CPU
                     that is the only path it has (its LSH sampling path needs CUDA kernels compiled by
                     ninja at import; they do not exist on CPU). Compare with our ``yoso_e``.

Timing: after one warm-up call per case, the cases of one (n, dtype) are timed in interleaved rounds
(the order rotated every round) and the median is reported, so ratios are measured side by side under
the same machine load. Peak memory: RSS growth during the warm-up call (see bench/common.py).
A case is skipped, with the reason in its row, when 4x its peak memory at the previous size would
exceed the memory budget, or 4x its time there would exceed ``--max-case-seconds``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

FULL_SIZES = [512, 1024, 2048, 4096, 8192]
TINY_SIZES = [128]
B, H, D_HEAD = 1, 12, 64
HIDDEN = H * D_HEAD

BASELINE = "sdpa"
VARIANTS = [
    "sdpa", "softmax", "sdpa_qkv_proj", "shared_qkv",
    "bert_lsh", "bert_lsh_reference",
    "yoso", "yoso_reference", "yoso_e",
    "linformer", "linformer_k256",
    "linformer_pkg", "reformer_lsh", "hf_yoso_e",
]
PEERS = {"linformer_pkg", "reformer_lsh", "hf_yoso_e"}


def _fixed(t):
    """A stand-in for a peer's nn.Linear that returns a preset tensor (our q, k or v)."""
    import torch

    class Fixed(torch.nn.Module):
        def forward(self, *_a, **_k):
            return t

    return Fixed()


def _qkv(n: int, dtype, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D_HEAD, generator=g).to(dtype).requires_grad_() for _ in range(3)]


def build_case(name: str, n: int, dtype) -> tuple[Callable[[], Any], list, dict]:
    """-> (forward fn returning the output, leaf tensors + parameters that get gradients, row info)."""
    import torch
    import torch.nn.functional as F

    from model.attention import registry

    dims = dict(num_heads=H, head_dim=D_HEAD, max_seq_len=n)
    info: dict[str, Any] = {"kind": "peer" if name in PEERS else ("baseline" if name == BASELINE else "bertforge")}

    if name == "sdpa":
        q, k, v = _qkv(n, dtype)
        info["config"] = "torch.nn.functional.scaled_dot_product_attention"
        return (lambda: F.scaled_dot_product_attention(q, k, v)), [q, k, v], info

    if name in ("sdpa_qkv_proj", "shared_qkv"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(B, n, HIDDEN, generator=g).to(dtype).requires_grad_()
        if name == "shared_qkv":
            from model.attention.shared_qkv import SharedQKVConfig, SharedQKVProjection

            proj = SharedQKVProjection(HIDDEN, H, SharedQKVConfig()).to(dtype)
            core = registry.build({"name": "shared_qkv"}, **dims)
            info["config"] = "{name: shared_qkv} projection (D->D + 3 diagonals) + its softmax core, from x"

            def fn():
                q, k, v = proj(x)
                return core(q, k, v, None)
        else:
            lin = torch.nn.Linear(HIDDEN, 3 * HIDDEN).to(dtype)
            proj = lin
            info["config"] = "nn.Linear(D, 3D) + SDPA, from x (the baseline of shared_qkv)"

            def fn():
                q, k, v = lin(x).view(B, n, 3, H, D_HEAD).permute(2, 0, 3, 1, 4)
                return F.scaled_dot_product_attention(q, k, v)
        return fn, [x, *proj.parameters()], info

    if name in ("linformer_pkg", "reformer_lsh", "hf_yoso_e"):
        q, k, v = _qkv(n, dtype)
        if name == "linformer_pkg":
            from linformer import LinformerSelfAttention

            kk = min(256, n)
            mod = LinformerSelfAttention(dim=HIDDEN, seq_len=n, k=kk, heads=H, share_kv=False).to(dtype)
            info["config"] = f"linformer==0.2.3 LinformerSelfAttention(k={kk}, share_kv=False, one_kv_head=False)"

            def fn():
                qf, kf, vf = (t.transpose(1, 2).reshape(B, n, HIDDEN) for t in (q, k, v))
                mod.to_q, mod.to_k, mod.to_v, mod.to_out = _fixed(qf), _fixed(kf), _fixed(vf), torch.nn.Identity()
                return mod(qf)
            params = [mod.proj_k, mod.proj_v]
            return fn, [q, k, v, *params], info
        if name == "reformer_lsh":
            from reformer_pytorch import LSHAttention

            mod = LSHAttention(bucket_size=64, n_hashes=1, causal=False)
            info["config"] = "reformer-pytorch==1.4.4 LSHAttention(bucket_size=64, n_hashes=1), shared QK"
            g = torch.Generator().manual_seed(0)
            qk = torch.randn(B * H, n, D_HEAD, generator=g).to(dtype).requires_grad_()
            vv = torch.randn(B * H, n, D_HEAD, generator=g).to(dtype).requires_grad_()
            return (lambda: mod(qk, vv)[0]), [qk, vv], info
        from transformers import YosoConfig as HFYosoConfig
        from transformers.models.yoso.modeling_yoso import YosoSelfAttention

        hcfg = HFYosoConfig(hidden_size=HIDDEN, num_attention_heads=H, use_expectation=True, hash_code_len=9,
                            num_hash=32, conv_window=None, max_position_embeddings=n + 2,
                            attention_probs_dropout_prob=0.0)
        mod = YosoSelfAttention(hcfg).to(dtype).train()
        mask = torch.zeros(B, n, dtype=dtype)  # HF's additive mask: 0 = attend
        info["config"] = "transformers==5.23.0 YosoSelfAttention(use_expectation=True, hash_code_len=9) (CPU: YOSO-E only)"

        def fn():
            qf, kf, vf = (t.transpose(1, 2).reshape(B, n, HIDDEN) for t in (q, k, v))
            mod.query, mod.key, mod.value = _fixed(qf), _fixed(kf), _fixed(vf)
            return mod(qf, attention_mask=mask)[0]
        return fn, [q, k, v], info

    # bertforge core attentions from the registry
    cfgs = {
        "softmax": {"name": "softmax"},
        "bert_lsh": {"name": "bert_lsh"},
        "bert_lsh_reference": {"name": "bert_lsh", "impl": "reference"},
        "yoso": {"name": "yoso"},
        "yoso_reference": {"name": "yoso", "impl": "reference"},
        "yoso_e": {"name": "yoso", "expectation": True},
        "linformer": {"name": "linformer"},
        "linformer_k256": {"name": "linformer", "k": 256},
    }
    if name not in cfgs:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    cfg = dict(cfgs[name])
    if cfg["name"] == "linformer":
        cfg["k"] = min(cfg.get("k", 128), n)
    core = registry.build(cfg, **dims).to(dtype).train()
    from model.kernels.dispatch import resolve_impl

    impl = getattr(core.cfg, "impl", None)
    resolved = resolve_impl(impl, torch.device("cpu"), variant=cfg["name"], head_dim=D_HEAD) if impl else None
    info["config"] = str({f: getattr(core.cfg, f) for f in core.cfg.__dataclass_fields__})
    info["impl"] = resolved
    q, k, v = _qkv(n, dtype)
    return (lambda: core(q, k, v, None)), [q, k, v, *core.parameters()], info


def _step(fn, leaves, grad_holder: dict) -> tuple[float, float]:
    for t in leaves:
        t.grad = None
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    if "g" not in grad_holder:
        import torch

        gen = torch.Generator().manual_seed(1)
        grad_holder["g"] = torch.randn(out.shape, generator=gen).to(out.dtype)
    out.backward(grad_holder["g"])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def run(sizes: list[int], dtypes: list[str], variants: list[str], repeats: int, max_case_s: float,
        mem_fraction: float, slow_s: float = 20.0, out: str | None = None) -> dict[str, Any]:
    import torch

    from model.kernels.yoso_torch import release_workspaces

    machine = common.machine()
    common.log(f"machine: {machine}")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows: list[dict[str, Any]] = []
    prev: dict[tuple[str, str], dict] = {}
    for dname in dtypes:
        for n in sizes:
            budget = common.available_bytes() * mem_fraction
            live: list[tuple[str, Any, list, dict, dict]] = []
            for name in variants:
                row: dict[str, Any] = {"variant": name, "n": n, "dtype": dname, "B": B, "H": H, "d": D_HEAD}
                p = prev.get((name, dname))
                if p is not None and p.get("status") == "skipped":
                    scale = (n / p["n"]) ** 2
                    row.update(status="skipped", kind=p.get("kind"), reason=p["reason"] + f" (at n={p['n']})",
                               predicted_peak_mem_mb=p["predicted_peak_mem_mb"] * scale,
                               predicted_fwd_bwd_ms=p["predicted_fwd_bwd_ms"] * scale,
                               predicted_from_n=p["predicted_from_n"])
                elif p is not None and p.get("status") == "ok":
                    scale = (n / p["n"]) ** 2
                    pred_mem = (p["peak_mem_mb"] or 0) * 2**20 * scale
                    pred_t = p["fwd_bwd_ms"] / 1e3 * scale
                    if pred_mem > budget:
                        row.update(status="skipped", kind="peer" if name in PEERS else "bertforge",
                                   reason=f"predicted peak {pred_mem / 2**30:.1f} GiB (n^2 from n={p['n']}) > "
                                          f"budget {budget / 2**30:.1f} GiB")
                    elif pred_t > max_case_s:
                        row.update(status="skipped", kind="peer" if name in PEERS else "bertforge",
                                   reason=f"predicted {pred_t:.0f} s per call (n^2 from n={p['n']}) > "
                                          f"--max-case-seconds {max_case_s:.0f}")
                    if row.get("status") == "skipped":
                        row.update(predicted_peak_mem_mb=pred_mem / 2**20, predicted_fwd_bwd_ms=pred_t * 1e3,
                                   predicted_from_n=p["n"])
                if row.get("status") == "skipped":
                    common.log(f"{dname} n={n} {name}: {row['reason']}")
                    rows.append(row)
                    prev[(name, dname)] = row
                    continue
                try:
                    fn, leaves, info = build_case(name, n, dt[dname])
                    row.update(info)
                    holder: dict = {}
                    release_workspaces()  # YOSO keeps its CPU workspace between calls: count it in its peak
                    with common.PeakRss() as m:
                        t_fwd, t_all = _step(fn, leaves, holder)
                    row.update(status="ok", peak_mem_mb=None if m.peak_bytes is None else m.peak_bytes / 2**20,
                               warmup_ms=t_all * 1e3, fwd_ms_all=[], fwd_bwd_ms_all=[])
                    live.append((name, fn, leaves, holder, row))
                except Exception as e:  # noqa: BLE001 - report the case, keep the sweep going
                    row.update(status="error", kind=row.get("kind", "peer" if name in PEERS else "bertforge"),
                               reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                    common.log(f"{dname} n={n} {name}: {row['reason']}")
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
                rows.append(row)
                prev[(name, dname)] = row
            reps = repeats
            for r in range(reps):
                order = live[r % max(len(live), 1):] + live[:r % max(len(live), 1)]
                for _name, fn, leaves, holder, row in order:
                    if r >= 1 and row["warmup_ms"] > slow_s * 1e3:
                        continue  # a very slow case: one timed call beside the warm-up is enough
                    try:
                        t_fwd, t_all = _step(fn, leaves, holder)
                        row["fwd_ms_all"].append(t_fwd * 1e3)
                        row["fwd_bwd_ms_all"].append(t_all * 1e3)
                    except Exception as e:  # noqa: BLE001
                        row.update(status="error", reason=f"{type(e).__name__}: {e}"[:300])
            base = None
            for name, _fn, _l, _h, row in live:
                if row["status"] == "ok":
                    row["fwd_ms"] = common.median(row["fwd_ms_all"]) or row["warmup_ms"]
                    row["fwd_bwd_ms"] = common.median(row["fwd_bwd_ms_all"]) or row["warmup_ms"]
                    row["repeats"] = len(row["fwd_bwd_ms_all"])
                    if name == BASELINE:
                        base = row
            for _name, _fn, _l, _h, row in live:
                if row["status"] == "ok" and base is not None:
                    row["time_vs_sdpa"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
                    if row.get("peak_mem_mb") and base.get("peak_mem_mb"):
                        row["mem_vs_sdpa"] = row["peak_mem_mb"] / base["peak_mem_mb"]
            for name, _fn, _l, _h, row in live:
                if row["status"] == "ok":
                    common.log(f"{dname} n={n} {name:20s} fwd+bwd {row['fwd_bwd_ms']:10.1f} ms  "
                               f"x{row.get('time_vs_sdpa', math.nan):6.2f} sdpa  peak {row['peak_mem_mb']:9.1f} MiB")
            del live
            if out:  # partial results after every (dtype, n): a long sweep cut short keeps what it measured
                common.write_json(out, _payload(machine, sizes, dtypes, variants, repeats, max_case_s, mem_fraction,
                                                slow_s, rows))
    return _payload(machine, sizes, dtypes, variants, repeats, max_case_s, mem_fraction, slow_s, rows)


def _payload(machine, sizes, dtypes, variants, repeats, max_case_s, mem_fraction, slow_s, rows) -> dict[str, Any]:
    return {"benchmark": "attention", "machine": common.finish_machine(machine),
            "settings": {"sizes": sizes, "dtypes": dtypes, "variants": variants, "repeats": repeats,
                         "B": B, "H": H, "d": D_HEAD, "max_case_seconds": max_case_s,
                         "slow_case_seconds": slow_s,
                         "slow_cases": "a case whose warm-up call took longer than slow_case_seconds is timed "
                                       "once (not every round)",
                         "memory_budget_fraction_of_available": mem_fraction,
                         "timing": "median of interleaved rounds after one warm-up call (rotated order)",
                         "memory": "RSS growth (VmHWM reset via /proc/self/clear_refs) during the warm-up "
                                   "call, heap trimmed and glibc's mmap threshold at 64 KiB for that call only "
                                   "(timed calls: glibc's steady-state 32 MiB threshold)"},
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    common.ensure_env()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=None)
    ap.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    ap.add_argument("--variants", type=lambda s: s.split(","), default=VARIANTS)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--max-case-seconds", type=float, default=120.0)
    ap.add_argument("--slow-case-seconds", type=float, default=20.0)
    ap.add_argument("--mem-fraction", type=float, default=0.6, help="share of available RAM a case may use")
    ap.add_argument("--out", default=os.path.join(common.RESULTS, "attention.json"))
    ap.add_argument("--tiny", action="store_true", help="small sizes, 1 repeat (the test)")
    ap.add_argument("--no-report", action="store_true", help="do not refresh BENCHMARKS.md")
    a = ap.parse_args(argv)
    sizes = a.sizes or (TINY_SIZES if a.tiny else FULL_SIZES)
    repeats = a.repeats if a.repeats is not None else (1 if a.tiny else 3)
    bad = [v for v in a.variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    if BASELINE not in a.variants:
        a.variants = [BASELINE, *a.variants]
    payload = run(sorted(sizes), a.dtypes, a.variants, repeats, a.max_case_seconds, a.mem_fraction,
                  a.slow_case_seconds, a.out)
    common.finish(payload, a.out, a.tiny, a.no_report)


if __name__ == "__main__":
    main()
