#!/usr/bin/env python3
"""Where a batch-1 decode step's time goes: GPU time of the captured graph vs the whole engine.step() (host included).

  python scripts/profile_decode.py --random-llama3-8b --device cuda [--quant none] [--steps 200]

Prints the graph's GPU time per replay (CUDA events around back-to-back replays), the engine's step time at batch 1
(schedule + prepare + copy + replay + sample + append), and their difference: the host time per step that the GPU
waits for.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

import bench_engine  # noqa: E402
from builder.runtime.sampling_params import SamplingParams  # noqa: E402


def main() -> int:
    """Profile batch-1 decode."""
    args = bench_engine.parse_args(sys.argv[1:])
    steps = 200
    with tempfile.TemporaryDirectory() as tmp:
        engine, _, info = bench_engine.load_engine(args, Path(tmp), 128, 128 + steps + 8, 1)
        engine.add_request("p", list(range(1, 129)), SamplingParams(max_tokens=steps + 4, min_tokens=steps + 4))
        engine.step()  # prefill
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t) / steps * 1e3
        graphs = engine.runner.graphs
        graph = graphs.graphs[graphs.sizes[0]]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        gpu_ms = start.elapsed_time(end) / steps
        print(f"{info['source']}: engine.step {step_ms:.3f} ms, graph replay (GPU) {gpu_ms:.3f} ms, "
              f"host gap {step_ms - gpu_ms:.3f} ms per step")
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
