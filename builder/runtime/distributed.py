"""Tensor-parallel ranks for LLMEngine: worker processes, the process group, and the per-step broadcast.

Rank 0 lives in the engine's process and owns the scheduler, block manager and sampler. Ranks 1..N-1 are
worker processes (torch.multiprocessing, spawn) that each load rank{r}.safetensors and run their shard of
every forward pass. Collectives (all-reduce after the row-parallel linears, logits gathered to rank 0) use
gloo on CPU and NCCL on CUDA, rendezvous through a TCPStore on a free localhost port. Each step's host-side
batch (a StepInput of small int lists) travels to the workers pickled over a pipe, as nano-vllm does over
shared memory. An empty message (or the pipe closing because rank 0 died) stops a worker.

One tensor-parallel engine per process at a time: rank 0 uses torch.distributed's default process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from builder.config import EngineConfig
from builder.errors import BuilderError, ConfigError

TIMEOUT_ENV = "BUILDER_TP_TIMEOUT_S"  # collectives, rendezvous and worker start-up (seconds)
DEFAULT_TIMEOUT_S = 300.0
LOAD_TIMEOUT_S = 1800.0  # weight loading per rank; a worker that dies is noticed at once
JOIN_TIMEOUT_S = 10.0  # how long close() waits for a worker to exit before terminating it
HOST = "127.0.0.1"


def timeout_s() -> float:
    """Collective/rendezvous timeout in seconds (BUILDER_TP_TIMEOUT_S, default 300)."""
    value = os.environ.get(TIMEOUT_ENV)
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None


def rank_device(device: torch.device, rank: int, world_size: int) -> torch.device:
    """The device of `rank`: cuda:(base index + rank) on CUDA, the same CPU device otherwise."""
    if device.type != "cuda":
        return device
    first = device.index or 0
    available = torch.cuda.device_count()
    if first + world_size > available:
        raise ConfigError(f"tensor parallelism {world_size} from {device} needs GPUs {first}..{first + world_size - 1}"
                          f" but {available} are visible; rebuild with a smaller --tp or expose more GPUs")
    return torch.device("cuda", first + rank)


class TensorParallel:
    """This process's place in the tensor-parallel group and the two collectives the model needs."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum tensor over all ranks in place and return it."""
        dist.all_reduce(tensor)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of tensor over all ranks, in place; returned."""
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `tensor` (same shape on all ranks) on rank 0, in rank order; None on the other ranks."""
        if self.rank == 0:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.gather(tensor, parts, dst=0)
            return parts
        dist.gather(tensor, None, dst=0)
        return None


def init_process_group(rank: int, world_size: int, device: torch.device, store: Any,
                       timeout: float) -> TensorParallel:
    """Join the default process group (gloo on CPU, nccl on CUDA) through `store`."""
    if dist.is_initialized():
        raise ConfigError("this process already has a torch.distributed process group (another tensor-parallel "
                          "engine?); close() it first: one tensor-parallel engine per process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    return TensorParallel(rank, world_size)


def destroy_process_group() -> None:
    """Leave the default process group if this process has one (errors ignored: used on shutdown)."""
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort while shutting down
        pass


@dataclass
class _Worker:
    rank: int
    process: Any
    conn: Any


@dataclass
class WorkerGroup:
    """Rank 0's handle on the worker ranks: start them, send each step, check them, stop them."""

    world_size: int
    device: torch.device
    timeout: float
    workers: list[_Worker] = field(default_factory=list)
    tp: TensorParallel | None = None
    store: Any = None
    closed: bool = False
    before_destroy: list[Callable[[], None]] = field(default_factory=list)  # rank 0's clean-up, e.g. its graphs

    @classmethod
    def start(cls, engine_dir: Path, device: torch.device, num_blocks: int, world_size: int,
              graph_batch_size: int = 0) -> "WorkerGroup":
        """Spawn ranks 1..world_size-1 and join the process group as rank 0 (weights load in the workers meanwhile).

        graph_batch_size: the ModelRunner option every rank must share (CUDA graphs of decode steps).

        Call wait_ready() after rank 0 has loaded its own shard.
        """
        group = cls(world_size, rank_device(device, 0, world_size), timeout_s())
        try:
            group._spawn(Path(engine_dir), device, num_blocks, graph_batch_size)
            group._wait_for("hello", group.timeout)
            group.tp = init_process_group(0, world_size, group.device, group.store, group.timeout)
        except BaseException:
            group.close()
            raise
        return group

    def _spawn(self, engine_dir: Path, device: torch.device, num_blocks: int, graph_batch_size: int) -> None:
        """Create the rendezvous store on a free port and start one process per worker rank."""
        import torch.multiprocessing as mp

        self.store = dist.TCPStore(HOST, 0, self.world_size, is_master=True,
                                   timeout=datetime.timedelta(seconds=self.timeout), wait_for_workers=False)
        ctx = mp.get_context("spawn")
        executable = _python_executable()
        if executable:
            ctx.set_executable(executable)
        for rank in range(1, self.world_size):
            parent, child = ctx.Pipe(duplex=True)
            process = ctx.Process(target=_worker_main, name=f"builder-tp-rank{rank}", daemon=True,
                                  args=(rank, self.world_size, self.store.port, str(engine_dir), str(device),
                                        num_blocks, child, self.timeout, graph_batch_size))
            with _main_module_hidden():
                process.start()
            child.close()
            self.workers.append(_Worker(rank, process, parent))

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard; ConfigError if one fails or dies."""
        self._wait_for("ready", LOAD_TIMEOUT_S)

    def _wait_for(self, tag: str, timeout: float) -> None:
        """Receive message `tag` from every worker, failing fast when one reports an error or exits."""
        deadline = time.monotonic() + timeout
        pending = list(self.workers)
        while pending:
            for worker in list(pending):
                if worker.conn.poll(0.05):
                    try:
                        message = worker.conn.recv()
                    except EOFError:
                        worker.process.join(1.0)
                        message = ("error", f"it exited (exit code {worker.process.exitcode}); see its output above")
                    if message[0] == "error":
                        raise ConfigError(f"tensor-parallel rank {worker.rank} failed to start: {message[1]}")
                    if message[0] == tag:
                        pending.remove(worker)
                elif not worker.process.is_alive():
                    raise ConfigError(f"tensor-parallel rank {worker.rank} exited during start-up (exit code "
                                      f"{worker.process.exitcode}); see its output above")
            if pending and time.monotonic() > deadline:
                raise ConfigError(f"tensor-parallel ranks {[w.rank for w in pending]} did not report {tag!r} within "
                                  f"{timeout:.0f} s; raise {TIMEOUT_ENV} or check the machine's load")

    def check_alive(self) -> None:
        """BuilderError when a worker has exited."""
        dead = self.dead_ranks()
        if dead:
            raise BuilderError(f"{dead}; the engine must be recreated")

    def dead_ranks(self, wait: float = 0.0) -> str:
        """'tensor-parallel rank r exited (exit code c), ...' for workers that have exited ('' if none).

        wait: seconds to give each worker to finish exiting (after a collective failed because a peer died).
        """
        dead = []
        for worker in self.workers:
            if wait and worker.process.is_alive():
                worker.process.join(wait)
            if not worker.process.is_alive():
                dead.append(f"tensor-parallel rank {worker.rank} exited (exit code {worker.process.exitcode})")
        return ", ".join(dead)

    def send_step(self, step: Any) -> None:
        """Send one step's inputs to every worker (pickled once)."""
        self.check_alive()
        data = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        for worker in self.workers:
            worker.conn.send_bytes(data)

    @property
    def pids(self) -> list[int]:
        """Process ids of the worker ranks."""
        return [w.process.pid for w in self.workers]

    def close(self) -> None:
        """Stop every worker (ask, then terminate, then kill), leave the process group. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for worker in self.workers:
            try:
                worker.conn.send_bytes(b"")
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for worker in self.workers:
            process = worker.process
            if process.pid is None:
                continue
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join(2.0)
            worker.conn.close()
        for release in self.before_destroy:
            try:
                release()
            except Exception:  # noqa: BLE001 - best effort while shutting down
                pass
        if self.tp is not None:
            destroy_process_group()
            self.tp = None
        self.store = None


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start spawn children without re-importing the parent's __main__ (workers need only builder's modules).

    Spawn normally re-runs the main script in each child, which breaks scripts without an
    `if __name__ == "__main__":` guard and embedded interpreters; the worker target lives in this module.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _python_executable() -> str | None:
    """A Python interpreter for spawn when sys.executable is not one (embedded interpreters, e.g. Triton's stub)."""
    name = os.path.basename(sys.executable or "")
    if name.startswith("python"):
        return None
    for candidate in (Path(sys.prefix) / "bin" / "python3", Path(sys.prefix) / "bin" / "python"):
        if candidate.is_file():
            return str(candidate)
    return None


def _worker_main(rank: int, world_size: int, port: int, engine_dir: str, device: str, num_blocks: int, conn: Any,
                 timeout: float, graph_batch_size: int = 0) -> None:
    """Worker rank: join the group, load rank{rank}.safetensors, then run every step rank 0 sends until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle; it stops us through the pipe
    from builder.runtime.model_runner import ModelRunner

    try:
        base = torch.device(device)
        if base.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        conn.send(("hello",))
        dev = rank_device(base, rank, world_size)
        store = dist.TCPStore(HOST, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout))
        tp = init_process_group(rank, world_size, dev, store, timeout)
        config = EngineConfig.load(Path(engine_dir))
        runner = ModelRunner(Path(engine_dir), config, dev, num_blocks, rank=rank, tp=tp,
                             graph_batch_size=graph_batch_size)
        conn.send(("ready",))
    except BaseException as exc:  # noqa: BLE001 - report to rank 0, which raises it
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        destroy_process_group()
        return
    status = 0
    try:
        while True:
            data = conn.recv_bytes()
            if not data:
                break
            runner.execute(pickle.loads(data))
    except EOFError:  # rank 0 went away
        pass
    except BaseException:  # noqa: BLE001 - the collective peers fail too; rank 0 reports it
        traceback.print_exc()
        status = 1
    finally:
        conn.close()
        runner.release_graphs()  # before the process group: NCCL cannot destroy a communicator live graphs hold
        destroy_process_group()
    sys.exit(status)
