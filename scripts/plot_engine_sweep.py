#!/usr/bin/env python3
"""Plot sweep JSONs of bench_engine (engine alone) or `builder bench` (through Triton): output tok/s, TTFT p50 and
inter-token p50 against concurrency, one line per series.

  python scripts/plot_engine_sweep.py --out docs/results/h100-2026-11-21/engine-sweep.png \\
      LABEL=FILE.json[,FILE.json ...] ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_points(files: list[Path]) -> list[dict]:
    """Every concurrency point of the given JSONs (bench_engine's "engine" or builder bench's "results")."""
    data = [json.loads(f.read_text()) for f in files]
    points = [p for d in data for p in d.get("engine", d.get("results", [])) if p.get("concurrency")]
    return sorted(points, key=lambda p: p["concurrency"])


def main() -> int:
    """Write the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("series", nargs="+", help="LABEL=FILE[,FILE...]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    metrics = (("output_tok_s", None, "output tok/s"), ("ttft_ms", "p50", "TTFT p50 (ms)"),
               ("itl_ms", "p50", "inter-token p50 (ms)"))
    for series in args.series:
        label, files = series.split("=", 1)
        points = load_points([Path(f) for f in files.split(",")])
        xs = [p["concurrency"] for p in points]
        for ax, (key, stat, name) in zip(axes, metrics):
            ax.plot(xs, [p[key][stat] if stat else p[key] for p in points], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel(name)
            ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.suptitle(args.title)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
