"""Check the collectives tensor parallelism needs on this machine, one process per GPU, in seconds.

Runs what LLMEngine's TP ranks run, outside the engine: NCCL (gloo on CPU) all-reduce and gather to rank 0,
eagerly and captured in a CUDA graph, and prints one line per check with its time. A hang here (rather than in
the engine) points at the machine: NCCL transport, P2P, or the graph capture of collectives.

    python scripts/check_tp.py --world-size 2            # cuda:0 and cuda:1
    python scripts/check_tp.py --world-size 2 --device cpu
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def check(rank: int, world_size: int, port: int, device_type: str, timeout: float) -> None:
    """One rank: join the group, then all-reduce and gather eagerly and inside a CUDA graph."""
    faulthandler.dump_traceback_later(timeout, exit=True)  # a hang prints each rank's stack, then exits
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0,
                          timeout=datetime.timedelta(seconds=timeout))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout))

    def say(what: str, start: float, ok: bool) -> None:
        if rank == 0:
            print(f"{what}: {'ok' if ok else 'WRONG'} ({(time.perf_counter() - start) * 1e3:.1f} ms)", flush=True)

    def collectives(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        dist.all_reduce(x)
        parts = [torch.empty_like(x) for _ in range(world_size)] if rank == 0 else None
        dist.gather(x * (rank + 1), parts, dst=0)
        return x, parts

    total = sum(range(1, world_size + 1))

    def right(x: torch.Tensor, parts: list[torch.Tensor] | None) -> bool:
        """The all-reduced sum on every rank, and rank r's share times r + 1 gathered on rank 0."""
        return bool((x == total).all()) and (rank != 0 or all(bool((p == total * (r + 1)).all())
                                                              for r, p in enumerate(parts)))

    def eager() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        return collectives(torch.full((4096,), float(rank + 1), device=device))

    for label in ("first all-reduce + gather (creates the communicator)", "eager all-reduce + gather"):
        start = time.perf_counter()
        say(label, start, right(*eager()))
    if device.type == "cuda":
        static = torch.zeros(4096, device=device)
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, captured_parts = collectives(static.clone())
        torch.cuda.synchronize()
        say("capture all-reduce + gather in a CUDA graph", start, True)
        static.fill_(float(rank + 1))
        start = time.perf_counter()
        graph.replay()
        say("replay the graph", start, right(out, captured_parts))
        start = time.perf_counter()
        say("eager all-reduce + gather after the graph", start, right(*eager()))
        start = time.perf_counter()
        graph.replay()
        say("replay, then eager at once", start, right(*eager()))
        graph.reset()  # NCCL cannot destroy a communicator that a live graph holds: destroy_process_group hangs
    start = time.perf_counter()
    dist.destroy_process_group()
    say("destroy the process group", start, True)


def main() -> int:
    """Spawn one process per rank and wait for them (non-zero exit when one fails or the timeout passes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for rendezvous and each collective")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.world_size:
        print(f"needs {args.world_size} GPUs, {torch.cuda.device_count()} visible", file=sys.stderr)
        return 2
    from torch.distributed.elastic.utils.distributed import get_free_port

    port = get_free_port()
    context = mp.start_processes(check, args=(args.world_size, port, args.device, args.timeout),
                                 nprocs=args.world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + 4 * args.timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            print(f"ranks did not finish within {4 * args.timeout:.0f} s", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
