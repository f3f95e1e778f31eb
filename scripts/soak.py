#!/usr/bin/env python3
"""Soak a running builder server (builder.soak): many streams, random lengths, random client cancellations, then
the checks (every non-cancelled request complete, a sample equal to its solo run, the KV pool full again).

  scripts/soak.py --url localhost:8001 --metrics-url http://localhost:8002/metrics --requests 1000 \
      --concurrency 256 --cancel 0.2 --out soak.json

Exit status 0 when every check passed, 1 otherwise (the failed checks are printed, one line each)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from builder.bench import parse_range
from builder.soak import SoakOptions, run_soak


def main() -> int:
    """Run one soak and print its summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    p.add_argument("--metrics-url", default=None, help="Prometheus URL of the server (enables the KV-pool check)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--cancel", type=float, default=0.2, help="share of requests their client cancels")
    p.add_argument("--max-tokens", type=parse_range, default=(1, 48), help="range of max_tokens, e.g. 1-48")
    p.add_argument("--sample", type=int, default=16, help="completed requests re-run alone and compared")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="ensemble", help="the client-facing model: ensemble or tensorrt_llm_bls")
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = p.parse_args()
    options = SoakOptions(requests=args.requests, concurrency=args.concurrency, cancel_fraction=args.cancel,
                          max_tokens=args.max_tokens, sample=args.sample, seed=args.seed, model=args.model)
    report = run_soak(args.url, args.metrics_url, options)
    print(report.summary())
    if args.out is not None:
        args.out.write_text(json.dumps({"options": asdict(options), "report": asdict(report),
                                        "problems": report.problems}, indent=1))
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
