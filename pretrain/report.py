"""Compare pretraining runs from their TensorBoard event files: a markdown table and PNG plots.

    python -m pretrain.report runs/demo runs/demo_shared_qkv --out runs/report

Each RUN_DIR is a run directory (its ``tb/`` is read) or a directory of event files. The event files
are read with TensorBoard's own ``EventAccumulator``; nothing else of the run is needed. Written to
``--out``:

* ``report.md``: one row per run: variant (from the hparams plugin), steps, final validation loss,
  tokens/s (median over the logging windows), total training FLOPs (compute/cumulative_pflops), compute
  saved against softmax (whole model over the run, and the attention blocks), saved PFLOPs, peak
  memory (max of memory/peak_gb) and MFU (median of perf/mfu);
* ``report.json``: the same numbers;
* ``val_loss_vs_tokens.png``, ``val_loss_vs_flops.png`` (training loss dashed behind), and
  ``compute_saved.png`` (saved % and cumulative saved PFLOPs over steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

Series = list[tuple[int, float]]

COLUMNS = [  # (key, header, format)
    ("run", "run", "{}"),
    ("variant", "variant", "{}"),
    ("steps", "steps", "{}"),
    ("final_val_loss", "final val loss", "{:.4f}"),
    ("tokens_per_sec", "tokens/s", "{:.0f}"),
    ("total_flops", "total FLOPs", "{:.3e}"),
    ("model_saved_pct", "saved % (model)", "{:.2f}"),
    ("attention_saved_pct", "saved % (attention)", "{:.2f}"),
    ("saved_pflops", "saved PFLOPs", "{:.4g}"),
    ("peak_memory_gb", "peak memory (GB)", "{:.2f}"),
    ("mfu_pct", "MFU %", "{:.2f}"),
]


def event_dir(path: str) -> str:
    """``<run>/tb`` when it exists, else ``path`` itself (a directory of event files)."""
    tb = os.path.join(path, "tb")
    return tb if os.path.isdir(tb) else path


def _accumulator(path: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(event_dir(path), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _series(acc, tag: str) -> Series:
    """Values by step; a step written twice (a resumed run re-logs steps after its checkpoint) keeps
    the last one written."""
    by_step: dict[int, float] = {}
    for e in acc.Scalars(tag):
        by_step[int(e.step)] = float(e.value)
    return sorted(by_step.items())


def read_scalars(path: str, tags: Iterable[str] | None = None) -> dict[str, Series]:
    """All (or the named) scalar series of a run, ``{tag: [(step, value), ...]}`` sorted by step.

    Raises:
        FileNotFoundError: ``path`` does not exist.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    acc = _accumulator(path)
    have = acc.Tags().get("scalars", [])
    return {t: _series(acc, t) for t in (have if tags is None else [t for t in tags if t in have])}


def read_hparams(acc) -> dict:
    """The hparams plugin's session start values of a run (empty when it has none)."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    try:
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:
        return {}
    raw = content.get(metadata.SESSION_START_INFO_TAG)
    if raw is None:
        return {}
    data = plugin_data_pb2.HParamsPluginData.FromString(raw)
    out = {}
    for k, v in data.session_start_info.hparams.items():
        kind = v.WhichOneof("kind")
        out[k] = getattr(v, kind) if kind else None
    return out


@dataclass
class Run:
    path: str
    name: str
    scalars: dict[str, Series]
    hparams: dict = field(default_factory=dict)

    def values(self, tag: str) -> list[float]:
        return [v for _, v in self.scalars.get(tag, [])]

    def last(self, tag: str) -> float | None:
        s = self.scalars.get(tag)
        return s[-1][1] if s else None


def load_run(path: str, name: str | None = None) -> Run:
    """Read one run's event files.

    Raises:
        FileNotFoundError: no directory, or no scalars in its event files.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"run directory {path} does not exist")
    acc = _accumulator(path)
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise FileNotFoundError(f"no TensorBoard scalars under {event_dir(path)}; is {path} a run directory?")
    return Run(path=path, name=name or os.path.basename(os.path.normpath(path)),
               scalars={t: _series(acc, t) for t in tags}, hparams=read_hparams(acc))


def _median(values: Sequence[float]) -> float | None:
    vals = [v for v in values if math.isfinite(v)]
    return statistics.median(vals) if vals else None


def summarize(run: Run) -> dict:
    """The table row of one run (None where the run lacks the tag)."""
    total_pf, saved_pf = run.last("compute/cumulative_pflops"), run.last("compute/cumulative_saved_pflops")
    if total_pf is not None and saved_pf is not None and total_pf + saved_pf > 0:
        model_saved = 100.0 * saved_pf / (total_pf + saved_pf)
    else:
        model_saved = _median(run.values("compute/model_saved_pct"))
    mems = run.values("memory/peak_gb")
    mfu = _median(run.values("perf/mfu"))
    steps = max((s[-1][0] for t, s in run.scalars.items() if t.split("/")[0] in ("train", "val") and s), default=None)
    return {
        "run": run.name,
        "variant": run.hparams.get("variant", "?"),
        "steps": steps,
        "final_val_loss": run.last("val/loss"),
        "tokens_per_sec": _median(run.values("perf/tokens_per_sec")),
        "total_flops": total_pf * 1e15 if total_pf is not None else None,
        "model_saved_pct": model_saved,
        "attention_saved_pct": _median(run.values("compute/attention_saved_pct")),
        "saved_pflops": saved_pf,
        "peak_memory_gb": max(mems) if mems else None,
        "mfu_pct": 100.0 * mfu if mfu is not None else None,
    }


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    sep = "| " + " | ".join("---" for _ in COLUMNS) + " |"
    lines = [head, sep]
    for r in rows:
        cells = [("n/a" if r.get(k) is None else fmt.format(r[k])) for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _at_steps(series: Series, steps: Sequence[int]) -> list[float] | None:
    """A cumulative series (tokens, PFLOPs) read at ``steps``, linear between its points, from 0 at step 0."""
    import numpy as np

    if not series:
        return None
    xs = [0] + [s for s, _ in series] if series[0][0] > 0 else [s for s, _ in series]
    ys = [0.0] + [v for _, v in series] if series[0][0] > 0 else [v for _, v in series]
    return [float(v) for v in np.interp(list(steps), xs, ys)]


def _plot_loss(runs: list[Run], x_tag: str, scale: float, xlabel: str, title: str, path: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, run in enumerate(runs):
        color = f"C{i}"
        label = f"{run.name} ({run.hparams.get('variant', '?')})"
        xs_src = run.scalars.get(x_tag, [])
        train = run.scalars.get("train/loss", [])
        if train and xs_src:
            x = _at_steps(xs_src, [s for s, _ in train])
            ax.plot([v * scale for v in x], [v for _, v in train], color=color, alpha=0.35, linestyle="--",
                    linewidth=1, label=f"{label} train")
        val = run.scalars.get("val/loss", [])
        if val and xs_src:
            x = _at_steps(xs_src, [s for s, _ in val])
            ax.plot([v * scale for v in x], [v for _, v in val], color=color, marker="o", label=f"{label} val")
        elif not xs_src:
            logger.warning("%s has no %s: left out of %s", run.name, x_tag, os.path.basename(path))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("MLM loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_saved(runs: list[Run], path: str) -> str:
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, run in enumerate(runs):
        color, label = f"C{i}", f"{run.name} ({run.hparams.get('variant', '?')})"
        for tag, style, what in (("compute/model_saved_pct", "-", "model"),
                                 ("compute/attention_saved_pct", ":", "attention")):
            s = run.scalars.get(tag, [])
            if s:
                a1.plot([x for x, _ in s], [v for _, v in s], color=color, linestyle=style, label=f"{label} {what}")
        s = run.scalars.get("compute/cumulative_saved_pflops", [])
        if s:
            a2.plot([x for x, _ in s], [v for _, v in s], color=color, label=label)
    a1.set_title("compute saved vs softmax attention (%)")
    a1.set_xlabel("step")
    a1.set_ylabel("% of the softmax-equivalent FLOPs")
    a2.set_title("cumulative compute saved")
    a2.set_xlabel("step")
    a2.set_ylabel("PFLOPs")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dirs: Sequence[str], out_dir: str) -> dict:
    """Read the runs, write report.md, report.json and the PNG plots into ``out_dir``.

    Returns:
        {"rows": [...], "table": markdown, "files": {name: path}}.

    Raises:
        FileNotFoundError: a run directory is missing or holds no scalars.
    """
    import matplotlib

    matplotlib.use("Agg")
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) < len(names):  # two runs of one basename: name them by their path
        names = [os.path.normpath(d) for d in run_dirs]
    runs = [load_run(d, n) for d, n in zip(run_dirs, names)]
    rows = [summarize(r) for r in runs]
    table = markdown_table(rows)
    os.makedirs(out_dir, exist_ok=True)
    files = {
        "val_loss_vs_tokens": _plot_loss(runs, "data/tokens", 1.0, "training tokens (real, all ranks)",
                                         "validation loss vs tokens", os.path.join(out_dir, "val_loss_vs_tokens.png")),
        "val_loss_vs_flops": _plot_loss(runs, "compute/cumulative_pflops", 1.0, "training compute (PFLOPs, fwd+bwd)",
                                        "validation loss vs training FLOPs",
                                        os.path.join(out_dir, "val_loss_vs_flops.png")),
        "compute_saved": _plot_saved(runs, os.path.join(out_dir, "compute_saved.png")),
    }
    notes = ("tokens/s and MFU: medians over the logging windows; total FLOPs: analytic forward + backward FLOPs "
             "of the batches trained on (model/flops.py); saved % (model): compute saved against the same model "
             "with softmax attention over the whole run; saved % (attention): the attention blocks only; "
             "peak memory: the maximum over ranks and logging windows.")
    md = ["# Run comparison", "", table, "", notes, ""]
    md += [f"![{k}]({os.path.basename(v)})" for k, v in files.items()]
    files["report_md"] = os.path.join(out_dir, "report.md")
    with open(files["report_md"], "w") as f:
        f.write("\n".join(md) + "\n")
    files["report_json"] = os.path.join(out_dir, "report.json")
    with open(files["report_json"], "w") as f:
        json.dump({"runs": rows, "run_dirs": list(run_dirs)}, f, indent=2)
    return {"rows": rows, "table": table, "files": files}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or directories of event files)")
    p.add_argument("--out", required=True, help="output directory for report.md, report.json and the PNGs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = write_report(args.runs, args.out)
    except FileNotFoundError as e:
        from launch.cli import error_exit

        return error_exit(e)
    sys.stdout.write(result["table"] + "\n\n")
    for key, path in result["files"].items():
        sys.stdout.write(f"{key + ':':<20} {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
