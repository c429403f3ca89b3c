"""How far each variant's core attention is from exact softmax on the same random Q, K, V.

    python -m model.attention.compare [--lengths 128 512 2048] [--heads 4] [--head-dim 64] [--json out.json]

For every registered variant (default config, plus YOSO-E) and length n, draws Q, K, V ~ N(0, 1)
[1, heads, n, head_dim] and reports the relative error ||O - O_softmax||_F / ||O_softmax||_F and
the mean cosine between output rows (scale-free; YOSO's rows are unit-norm by design, so its
relative error mostly reflects scale). Parameterized variants use their freshly initialized
parameters (Linformer's E, F); shared_qkv's core is exact softmax (the variant is its projection),
so it shows 0. These numbers describe untrained approximations, not trained models.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from model.attention import available, base, build, get
from model.attention.softmax import softmax_attention

EXTRA = {"yoso-E": {"name": "yoso", "expectation": True}}


def variant_configs() -> dict[str, dict]:
    cfgs = {name: {"name": name} for name in available() if name != "softmax"}
    cfgs.update(EXTRA)
    return cfgs


def compare(lengths: list[int], heads: int = 4, head_dim: int = 64, seed: int = 0) -> list[dict]:
    """Rows {variant, n, rel_err, cosine, seconds} for every variant config and length."""
    base.set_seed(seed)
    base.set_step(0)
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(seed + n)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
        exact = softmax_attention(q, k, v, None)
        for label, cfg in variant_configs().items():
            cfg = dict(cfg)
            if cfg["name"] == "linformer":
                cfg["k"] = min(get("linformer").config_cls().k, n)
            torch.manual_seed(seed)
            core = build(cfg, num_heads=heads, head_dim=head_dim, max_seq_len=n).eval()
            t0 = time.perf_counter()
            with torch.no_grad():
                out = core(q, k, v, None)
            secs = time.perf_counter() - t0
            rel = float((out - exact).norm() / exact.norm())
            cos = float(F.cosine_similarity(out, exact, dim=-1).mean())
            rows.append(dict(variant=label, n=n, rel_err=rel, cosine=cos, seconds=secs))
    return rows


def format_table(rows: list[dict]) -> str:
    lengths = sorted({r["n"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["n"]): r for r in rows}
    head = f"{'variant':<12}" + "".join(f"{'n=' + str(n) + ' rel.err / cos':>26}" for n in lengths)
    lines = [head, "-" * len(head)]
    for var in variants:
        cells = "".join(f"{by[var, n]['rel_err']:>17.4f} / {by[var, n]['cosine']:>6.3f}" for n in lengths)
        lines.append(f"{var:<12}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    rows = compare(args.lengths, args.heads, args.head_dim, args.seed)
    sys.stdout.write(format_table(rows) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
