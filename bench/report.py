"""Refresh BENCHMARKS.md and the PNG plots from the JSON files in bench/results/.

    .venv/bin/python bench/report.py [--results DIR] [--md PATH]

Every benchmark script calls ``refresh()`` after writing its JSON (unless ``--no-report`` or ``--tiny``).
The markdown has one section per benchmark present: the machine it ran on (CPU model, cores, load
average at start and end, torch version), a table of every row, the checks against the figures the
issues ask for (pass / fail / not measured), and the plots.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

MD = os.path.join(common.REPO, "BENCHMARKS.md")


def _load(results: str, name: str) -> dict | None:
    path = os.path.join(results, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _machine(m: dict) -> str:
    return (f"Machine: {m.get('cpu')} ({m.get('cores')} cores, torch threads {m.get('torch_threads')}), "
            f"{m.get('mem_total_gb', '?')} GiB RAM, torch {m.get('torch')}, Python {m.get('python')}; "
            f"load average (1/5/15 min) {m.get('load_avg_start')} at start, {m.get('load_avg_end')} at end "
            f"(the 2 cores were shared with other jobs); run at {m.get('time_utc')}.")


def _f(x: Any, fmt: str = "{:.1f}") -> str:
    if x is None:
        return "—"
    try:
        return fmt.format(x)
    except (TypeError, ValueError):
        return str(x)


def _row(rows: list[dict], **kw) -> dict | None:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _check(desc: str, value: float | None, ok: bool | None, detail: str) -> str:
    verdict = "not measured" if ok is None else ("PASS" if ok else "FAIL")
    return f"| {desc} | {_f(value, '{:.2f}')} | {verdict} | {detail} |"


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------


def attention_checks(d: dict) -> list[str]:
    rows = d["rows"]

    def t(v, n, dt="fp32"):
        r = _row(rows, variant=v, n=n, dtype=dt)
        return r.get("fwd_bwd_ms") if r and r.get("status") == "ok" else None

    def mem(v, n, dt="fp32", predicted=True):
        r = _row(rows, variant=v, n=n, dtype=dt)
        if not r:
            return None, ""
        if r.get("status") == "ok":
            return r.get("peak_mem_mb"), "measured"
        if predicted and r.get("predicted_peak_mem_mb"):
            return r["predicted_peak_mem_mb"], f"extrapolated (n^2 from n={r.get('predicted_from_n')})"
        return None, ""

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = ["| Figure (attention alone, CPU, fp32) | measured | verdict | detail |", "|---|---|---|---|"]
    m_lsh, how_lsh = mem("bert_lsh", 8192, predicted=False)
    m_ref, how_ref = mem("bert_lsh_reference", 8192)
    r = ratio(m_lsh, m_ref)
    out.append(_check("BERT-LSH peak memory at n=8192 <= 1/8 of the dense form (ratio <= 0.125)", r,
                      None if r is None else r <= 0.125,
                      f"bert_lsh {_f(m_lsh)} MiB ({how_lsh or 'not measured'}); dense reference "
                      f"{_f(m_ref)} MiB ({how_ref or 'n/a'})"))
    m4, _ = mem("bert_lsh", 4096, predicted=False)
    m4r, how4 = mem("bert_lsh_reference", 4096)
    r4 = ratio(m4, m4r)
    out.append(_check("(same at n=4096, for reference)", r4, None if r4 is None else r4 <= 0.125,
                      f"bert_lsh {_f(m4)} MiB; dense {_f(m4r)} MiB ({how4})"))
    r = ratio(t("bert_lsh", 2048), t("sdpa", 2048))
    out.append(_check("BERT-LSH time at n=2048 <= 1.5x SDPA", r, None if r is None else r <= 1.5,
                      f"{_f(t('bert_lsh', 2048))} ms vs {_f(t('sdpa', 2048))} ms"))
    for n, need, label in ((4096, 1.0, "YOSO at least as fast as SDPA at n=4096 (speed-up >= 1)"),
                           (8192, 2.0, "YOSO >= 2x faster than SDPA at n=8192")):
        s = ratio(t("sdpa", n), t("yoso", n))
        out.append(_check(label, s, None if s is None else s >= need,
                          f"yoso {_f(t('yoso', n))} ms vs sdpa {_f(t('sdpa', n))} ms"))
    for n, need in ((4096, 7.0), (8192, 15.0)):
        s = ratio(t("sdpa", n), t("linformer_k256", n))
        out.append(_check(f"Linformer (k=256) >= {need:.0f}x faster than SDPA at n={n}", s,
                          None if s is None else s >= need,
                          f"linformer_k256 {_f(t('linformer_k256', n))} ms vs sdpa {_f(t('sdpa', n))} ms"))
    for n in (2048, 4096, 8192):
        s = ratio(t("linformer_pkg", n), t("linformer_k256", n))
        out.append(_check(f"Linformer at least as fast as the `linformer` package (k=256, headwise) at n={n}", s,
                          None if s is None else s >= 1.0,
                          f"ours {_f(t('linformer_k256', n))} ms vs package {_f(t('linformer_pkg', n))} ms"))
    return out


def attention_section(d: dict, out_dir: str) -> list[str]:
    rows = d["rows"]
    s = d["settings"]
    mach = [_machine(d["machine"])] if "parts" not in d else [
        f"{', '.join(pt['settings'].get('dtypes', []))} run: " + _machine(pt["machine"]) for pt in d["parts"]]
    lines = ["## Attention alone (`bench/attention.py`)", "", *[m + "\n" for m in mach],
             f"B={s['B']}, H={s['H']}, d={s['d']}; forward + backward (gradients for q, k, v and every parameter); "
             f"{s['timing']}, {s['repeats']} rounds; a case slower than {s.get('slow_case_seconds')} s per call is timed "
             f"once. Peak memory: {s['memory']}. Skips: {s.get('max_case_seconds')} s per call predicted, or "
             f"{s.get('memory_budget_fraction_of_available')} of available RAM predicted (n^2 scaling from the previous "
             "size; the prediction is shown).", ""]
    for dt in s["dtypes"]:
        lines += [f"### {dt}", "", "| variant | kind | n | fwd ms | fwd+bwd ms | x SDPA time | peak MiB | x SDPA mem | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["dtype"] != dt:
                continue
            note = r.get("reason", "") if r.get("status") != "ok" else (f"impl={r['impl']}" if r.get("impl") else "")
            if r.get("status") == "skipped":
                note += f" [predicted {_f(r.get('predicted_fwd_bwd_ms'), '{:.0f}')} ms, {_f(r.get('predicted_peak_mem_mb'), '{:.0f}')} MiB]"
            lines.append(f"| {r['variant']} | {r.get('kind', '')} | {r['n']} | {_f(r.get('fwd_ms'))} | "
                         f"{_f(r.get('fwd_bwd_ms'))} | {_f(r.get('time_vs_sdpa'), '{:.2f}')} | {_f(r.get('peak_mem_mb'))} | "
                         f"{_f(r.get('mem_vs_sdpa'), '{:.2f}')} | {note} |")
        lines.append("")
    lines += ["Configs of the rows:", ""]
    seen = set()
    for r in rows:
        if r.get("config") and r["variant"] not in seen:
            seen.add(r["variant"])
            lines.append(f"- `{r['variant']}`: {r['config']}")
    lines.append("")
    for png in _plot_attention(d, out_dir):
        lines.append(f"![{os.path.basename(png)}]({os.path.relpath(png, common.REPO)})")
    lines.append("")
    return lines


def _plot_attention(d: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pngs = []
    for dt in d["settings"]["dtypes"]:
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        variants = []
        for r in d["rows"]:
            if r["variant"] not in variants:
                variants.append(r["variant"])
        cmap = plt.get_cmap("tab20")
        for vi, v in enumerate(variants):
            pts = [(r["n"], r["fwd_bwd_ms"], r.get("peak_mem_mb")) for r in d["rows"]
                   if r["variant"] == v and r["dtype"] == dt and r.get("status") == "ok"]
            if not pts:
                continue
            style = "--" if v in ("linformer_pkg", "reformer_lsh", "hf_yoso_e") else "-"
            lw = 2.5 if v == "sdpa" else 1.2
            color = "black" if v == "sdpa" else cmap(vi % 20)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", lw=lw, label=v, color=color)
            mp = [p for p in pts if p[2]]
            axes[1].plot([p[0] for p in mp], [p[2] for p in mp], style, marker="o", lw=lw, label=v, color=color)
        for ax, yl in zip(axes, ("forward + backward (ms)", "peak RSS growth (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length n")
            ax.set_ylabel(yl)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"Attention alone, B=1 H=12 d=64, {dt} (dashed: PyPI peers)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"attention_{dt}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        pngs.append(path)
    return pngs


# ------------------------------------------------------------------------------------------------
# train step
# ------------------------------------------------------------------------------------------------


CEILING_N = 2048
CEILING_FILE = "focus_train_step_ceiling_2048"  # bench/train_step.py --models ...,noattn,hf_bert_noattn
FUSED = "+fused_adamw"  # rows run with torch.optim.AdamW(fused=True) (what-if; the trainer's AdamW is the default)


def _tps(rows: list[dict], model: str, n: int, dt: str, key: str = "tokens_per_s") -> float | None:
    r = _row(rows, model=model, n=n, dtype=dt)
    return r.get(key) if r and r.get("status") == "ok" else None


def _has_ceiling(d: dict | None, dt: str, n: int = CEILING_N) -> bool:
    return bool(d) and _tps(d["rows"], "bertforge/noattn", n, dt) is not None


def _ceiling_n(d: dict) -> int:
    return next((r["n"] for r in d["rows"] if r.get("model") == "bertforge/noattn"), CEILING_N)


def ceiling_figures(d: dict, dt: str, n: int = CEILING_N, key: str = "tokens_per_s") -> dict[str, float | None]:
    """Ratios to HF softmax of one run: linformer, bertforge without attention, HF without attention,
    and linformer's share of bertforge's ceiling (``key``: tokens_per_s = medians, tokens_per_s_best)."""
    rows = d["rows"]
    hf = _tps(rows, "hf_bert", n, dt, key)

    def ratio(model):
        a = _tps(rows, model, n, dt, key)
        return a / hf if a and hf else None

    lin, bf_ceil, hf_ceil = ratio("bertforge/linformer"), ratio("bertforge/noattn"), ratio("hf_bert_noattn")
    return {"linformer": lin, "ceiling": bf_ceil, "hf_ceiling": hf_ceil,
            "share": lin / bf_ceil if lin and bf_ceil else None}


def train_checks(d: dict, ceiling: dict | None = None) -> list[str]:
    """The issue's training-step figures from ``d``; the linformer row also states the attention-free
    ceiling, from ``d`` when it has the ceiling rows, else from ``ceiling`` (the focused run)."""
    rows = d["rows"]
    out = ["| Figure (full training step) | dtype | measured | verdict | detail |", "|---|---|---|---|---|"]

    def tps(model, n, dt):
        return _tps(rows, model, n, dt)

    for dt in d["settings"]["dtypes"]:
        for model, n, need in (("bertforge/softmax", 128, 1.0), ("bertforge/shared_qkv", 128, 1.1),
                               ("bertforge/linformer", 2048, 3.0)):
            a, b = tps(model, n, dt), tps("hf_bert", n, dt)
            r = a / b if a and b else None
            verdict = "not measured" if r is None else ("PASS" if r >= need else "FAIL")
            extra = ""
            if model == "bertforge/linformer":
                src, where = (d, "this run") if _has_ceiling(d, dt) else (ceiling, f"`{CEILING_FILE}.json`")
                if _has_ceiling(src, dt):
                    c = ceiling_figures(src, dt)
                    extra = (f"; ceiling here (no attention at all, {where}): {_f(c['ceiling'], '{:.2f}')}x HF, "
                             f"linformer {_f(c['linformer'], '{:.2f}')}x there = "
                             f"{_f(100 * c['share'] if c['share'] else None, '{:.0f}')}% of it"
                             + (" (3x is above the ceiling)" if c["ceiling"] and c["ceiling"] < need else ""))
            out.append(f"| {model} tokens/s >= {need}x HF BertForMaskedLM (softmax) at n={n} | {dt} | {_f(r, '{:.2f}')} | "
                       f"{verdict} | {_f(a, '{:.0f}')} vs {_f(b, '{:.0f}')} tok/s{extra} |")
        for model in ("bertforge/linformer+paper_form", "bertforge/yoso", "bertforge/bert_lsh"):
            a, b = tps(model, 2048, dt), tps("hf_bert", 2048, dt)
            if a is None and model.endswith("+paper_form"):
                continue  # runs from before the A/B row existed
            r = a / b if a and b else None
            what = " (E K, F V: the paper's form, A/B)" if model.endswith("+paper_form") else ""
            out.append(f"| {model} at n=2048{what} (reported) | {dt} | {_f(r, '{:.2f}')} | reported | "
                       f"{_f(a, '{:.0f}')} vs {_f(b, '{:.0f}')} tok/s |")
    return out


def train_section(d: dict, out_dir: str) -> list[str]:
    s = d["settings"]
    peaks = ", ".join(f"{k}: {v / 1e9:.1f} GFLOP/s" for k, v in s["peak_flops"].items())
    lines = ["## Training step (`bench/train_step.py`)", "", _machine(d["machine"]), "",
             f"{s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, FFN {s['ffn']}, vocab {s['vocab']}; "
             f"{s['tokens_per_step']} tokens per step (batch = tokens / n); forward + backward + AdamW step; "
             f"{s['timing']}, {s['repeats']} rounds. Precision: fp32, or bf16 = {s['bf16']}. "
             f"Peak FLOP/s for MFU ({s['peak_source']}): {peaks}.", ""]
    lines += ["| model | n | dtype | precision | batch | params | step s | tokens/s | x HF | GFLOP/step | GFLOP/s | MFU | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['model']} | {r['n']} | {r['dtype']} | {r.get('precision', '')} | {r.get('batch', '')} | "
                     f"{_f(r.get('params'), '{:,}')} | {_f(r.get('step_s'), '{:.3f}')} | {_f(r.get('tokens_per_s'), '{:.0f}')} | "
                     f"{_f(r.get('tokens_per_s_vs_hf'), '{:.2f}')} | {_f((r.get('flops_per_step') or 0) / 1e9 or None, '{:.1f}')} | "
                     f"{_f(r.get('achieved_gflops'))} | {_f(100 * r['mfu'] if r.get('mfu') else None, '{:.1f}%')} | "
                     f"{r.get('reason', r.get('flops_note', ''))} |")
    lines.append("")
    png = _plot_train(d, out_dir)
    lines += [f"![train_step]({os.path.relpath(png, common.REPO)})", ""]
    return lines


def _adamw(d: dict) -> str:
    a = d.get("settings", {}).get("adamw", "default")
    if a == "fused":
        return "`fused=True` (what pretrain/trainer.py and HF's Trainer build)"
    if a == "loop":
        return "the for-loop AdamW (`--adamw loop`)"
    return "the for-loop AdamW the trainer built before it switched to `fused=True`"


def ceiling_section(d: dict) -> list[str]:
    """"Attention-free ceiling": the focused run with the no-attention rows (and, when present, the
    same rows with fused AdamW, measured in the same rounds)."""
    s = d["settings"]
    n = _ceiling_n(d)
    lines = [f"## Attention-free ceiling (`bench/train_step.py`, n={n}, `{CEILING_FILE}.json`)", "",
             "Ceiling: no attention at all. `bertforge/noattn` and `hf_bert_noattn` are the two models with the "
             "core attention replaced by a stand-in that returns V (no scores; bench-only, registered at run time "
             "by bench/train_step.py): embeddings, Q/K/V and output projections, FFN, LayerNorms, MLM head, loss "
             "and AdamW are all kept. No attention variant can make a step faster than that, so "
             "`bertforge/noattn` tokens/s over HF softmax tokens/s is the most any bertforge attention can reach "
             "against HF here. Every row below was measured in the same interleaved rounds.", "",
             _machine(d["machine"]), "",
             f"{s['repeats']} interleaved rounds; x HF = median tokens/s over HF softmax's median (`hf_bert`, the "
             "trainer's AdamW); best-of = fastest round of each row over HF's fastest (other jobs slowed most "
             "rounds; a single lucky round can move it, so the medians are the figures). MFU uses a GEMM probe "
             "taken at the start under the same load, so it is only a rough scale. "
             f"AdamW of every row: {_adamw(d)}. "
             f"Rows ending in `{FUSED}` use `torch.optim.AdamW(fused=True)`; `x HF` of those is against `hf_bert` "
             "with the run's AdamW.", "",
             "| model | dtype | step s (median) | tokens/s | x HF | step s (best) | x HF best-of | MFU | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        if r.get("n") != n:
            continue
        note = r.get("reason", "") or ("ceiling: no attention at all" if r.get("ceiling") else "")
        lines.append(f"| {r['model']} | {r['dtype']} | {_f(r.get('step_s'), '{:.3f}')} | "
                     f"{_f(r.get('tokens_per_s'), '{:.0f}')} | {_f(r.get('tokens_per_s_vs_hf'), '{:.2f}')} | "
                     f"{_f(r.get('step_s_min'), '{:.3f}')} | {_f(r.get('tokens_per_s_vs_hf_best'), '{:.2f}')} | "
                     f"{_f(100 * r['mfu'] if r.get('mfu') else None, '{:.1f}%')} | {note} |")
    lines.append("")
    for dt in s["dtypes"]:
        if not _has_ceiling(d, dt, n):
            continue
        med, best = ceiling_figures(d, dt, n), ceiling_figures(d, dt, n, key="tokens_per_s_best")

        def pair(k, pct=False, med=med, best=best):
            if pct:
                return (f"{_f(100 * med[k] if med[k] else None, '{:.0f}')}% "
                        f"(best-of {_f(100 * best[k] if best[k] else None, '{:.0f}')}%)")
            return f"{_f(med[k], '{:.2f}')}x (best-of {_f(best[k], '{:.2f}')}x)"

        hi = max((x for x in (med["ceiling"], best["ceiling"]) if x is not None), default=0.0)
        verdict = ("3x HF is above this ceiling: no attention variant can reach it on this machine and model"
                   if hi < 3.0 else "3x HF is below this ceiling: reachable in principle, if attention adds at most "
                   f"{_f(100 * (med['ceiling'] / 3.0 - 1) if med['ceiling'] else None, '{:.0f}')}% to the "
                   "attention-free step (median figures)")
        lines.append(f"- **{dt}**: bertforge without attention {pair('ceiling')} HF softmax; HF without attention "
                     f"{pair('hf_ceiling')}; linformer {pair('linformer')} = {pair('share', True)} of "
                     f"bertforge's ceiling. {verdict}.")
        fused = []
        for model in ("bertforge/linformer", "bertforge/noattn"):
            a, b = _row(d["rows"], model=model, n=n, dtype=dt), _row(d["rows"], model=model + FUSED, n=n, dtype=dt)
            if a and b and a.get("status") == b.get("status") == "ok":
                fused.append(f"{model} {a['step_s']:.3f} -> {b['step_s']:.3f} s "
                             f"({100 * (b['step_s'] / a['step_s'] - 1):+.0f}%, "
                             f"{_f(a.get('tokens_per_s_vs_hf'), '{:.2f}')}x -> "
                             f"{_f(b.get('tokens_per_s_vs_hf'), '{:.2f}')}x HF)")
        if fused:
            lines.append(f"  Fused AdamW (same rounds, median step, against HF with the trainer's AdamW): "
                         f"{', '.join(fused)}.")
    lines.append("")
    prof = [r for r in d["rows"] if r.get("profile_top")]
    if prof:
        lines += ["Profiles (torch.profiler, one more step after the timed rounds; top ops by self CPU time, calls):",
                  ""]
        for r in prof:
            top = ", ".join(f"`{e['op'].replace('aten::', '')}` {e['self_pct']}% ({e['calls']})"
                            for e in r["profile_top"][:8])
            lines.append(f"- {r['model']} {r['dtype']}: {top}")
        lines.append("")
    return lines


def _plot_train(d: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in d["rows"] if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(11, 5))
    labels = [f"{r['model'].replace('bertforge/', 'bf/')}\nn={r['n']} {r['dtype']}" for r in ok]
    colors = ["tab:orange" if r["model"].startswith("hf_") else "tab:blue" for r in ok]
    ax.bar(range(len(ok)), [r["tokens_per_s"] for r in ok], color=colors)
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels(labels, rotation=70, fontsize=7)
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.set_title("Training step tokens/s (blue: bertforge, orange: HF BertForMaskedLM)")
    fig.tight_layout()
    path = os.path.join(out_dir, "train_step.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# loader
# ------------------------------------------------------------------------------------------------


def loader_section(d: dict, out_dir: str) -> list[str]:
    s = d["settings"]
    lines = ["## Data loader (`bench/loader.py`)", "", _machine(d["machine"]), "",
             f"Corpus {s['corpus']} -> {s['train_shards']} train shards, {s['train_samples']} samples of {s['seq_len']} "
             f"tokens (vocab {s['vocab_size']}), shuffle buffer {s['shuffle_buffer']}; {s['timing']}, {s['rounds']} rounds.",
             "", "| pipeline | workers | samples/s | x wds_plain | note |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['pipeline']} | {r['workers']} | {_f(r.get('samples_per_s'), '{:.0f}')} | "
                     f"{_f(r.get('vs_wds_plain'), '{:.2f}')} | {r.get('reason', '')} |")
    lines.append("")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in d["rows"] if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(ok)), [r["samples_per_s"] for r in ok])
    ax.set_xticks(range(len(ok)))
    ax.set_xticklabels([f"{r['pipeline']}\nworkers={r['workers']}" for r in ok], fontsize=7)
    ax.set_ylabel("samples/s")
    ax.set_title("Loader throughput")
    fig.tight_layout()
    path = os.path.join(out_dir, "loader.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    lines += [f"![loader]({os.path.relpath(path, common.REPO)})", ""]
    return lines


def refresh(results: str = common.RESULTS, md: str = MD, notes: str | None = None) -> str:
    """Rewrite ``md`` from the JSON files in ``results`` (PNGs go next to the JSON)."""
    os.makedirs(results, exist_ok=True)
    lines = ["# Benchmarks", "",
             "Generated by `bench/report.py` from `bench/results/*.json` (`make bench` runs all three benchmarks "
             "and refreshes this file). Ratios are measured side by side in one run (interleaved repetitions, "
             "medians), because the CPU is shared; absolute numbers move with the machine's load.", ""]
    notes_path = os.path.join(results, "NOTES.md")
    if notes is None and os.path.exists(notes_path):
        with open(notes_path) as f:
            notes = f.read()
    loaded = {name: _load(results, name) for name in ("attention", "train_step", "loader")}
    ceiling = _load(results, CEILING_FILE)
    if loaded["attention"] is not None or loaded["train_step"] is not None:
        lines += ["## The figures the issues ask for", "",
                  "Verdicts from the tables below (see the notes at the end for the noise level and profiles).", ""]
        if loaded["attention"] is not None:
            lines += attention_checks(loaded["attention"]) + [""]
        if loaded["train_step"] is not None:
            lines += train_checks(loaded["train_step"], ceiling) + [""]
    for name, fn in (("attention", attention_section), ("train_step", train_section), ("loader", loader_section)):
        if loaded[name] is not None:
            lines += fn(loaded[name], results)
        if name == "train_step" and ceiling is not None:
            lines += ceiling_section(ceiling)
    if notes:
        lines += ["# Notes", "", notes.strip().replace("\n## ", "\n### ").replace("## ", "### ", 1), ""]
    text = "\n".join(lines) + "\n"
    with open(md, "w") as f:
        f.write(text)
    common.log(f"wrote {md}")
    return md


def merge(paths: list[str], out: str) -> str:
    """Concatenate the rows of several runs of one benchmark (e.g. attention fp32 and bf16 run as two
    processes) into ``out``; settings and machine blocks are kept per part under ``parts``."""
    parts = []
    for p in paths:
        with open(p) as f:
            parts.append(json.load(f))
    first = parts[0]
    merged = dict(first)
    merged["rows"] = [r for d in parts for r in d["rows"]]
    merged["settings"] = dict(first["settings"])
    if "dtypes" in merged["settings"]:
        merged["settings"]["dtypes"] = [x for d in parts for x in d["settings"].get("dtypes", [])]
    merged["machine"] = dict(first["machine"], load_avg_end=parts[-1]["machine"].get("load_avg_end"))
    merged["parts"] = [{"file": os.path.basename(p), "machine": d["machine"], "settings": d["settings"]}
                       for p, d in zip(paths, parts)]
    return common.write_json(out, merged)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=common.RESULTS)
    ap.add_argument("--md", default=MD)
    ap.add_argument("--merge", nargs="+", default=None, help="JSON files of one benchmark to concatenate ...")
    ap.add_argument("--into", default=None, help="... into this JSON (then the report is refreshed)")
    a = ap.parse_args(argv)
    if a.merge:
        merge(a.merge, a.into or os.path.join(a.results, "attention.json"))
    refresh(a.results, a.md)


if __name__ == "__main__":
    main()
