"""All-reduce bus bandwidth with torch.distributed: inside a node, and between two nodes.

Bus bandwidth follows nccl-tests' convention (doc/PERFORMANCE.md in NVIDIA/nccl-tests): for an
all-reduce of S bytes over n ranks taking t seconds, algbw = S / t and
busbw = algbw * 2(n-1)/n, the rate each rank's link must sustain; it can be compared with the
hardware's link speed whatever n is. Every run also checks the sum, so a link that corrupts data
fails even when it is fast.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

from ironpod.health.core import CheckResult, HealthContext, Level, Status, result

GB = 1e9  # bandwidths in GB/s (10**9 bytes), as nccl-tests reports them


def bus_bandwidth(size_bytes: int, seconds: float, world: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s for one all-reduce of ``size_bytes`` over ``world`` ranks."""
    algbw = size_bytes / seconds / GB
    return algbw, algbw * 2 * (world - 1) / world


def _tcp_store(host: str, port: int, world: int, **kwargs: Any) -> Any:
    """torch's rendezvous key-value store (re-exported from ``torch._C``, untyped for mypy)."""
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    return TCPStore(host, port, world, **kwargs)


def _measure(dist: Any, torch: Any, device: str, size_bytes: int, iters: int) -> dict[str, Any]:
    """Time ``iters`` all-reduces after a checked warm-up one; every rank returns the same."""
    rank, world = dist.get_rank(), dist.get_world_size()
    numel = max(1, size_bytes // 4)
    data = torch.full((numel,), float(rank + 1), dtype=torch.float32, device=device)
    dist.all_reduce(data)  # warm-up: connections, buffers
    expected = world * (world + 1) / 2
    wrong = int(torch.count_nonzero(data != expected))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    dist.barrier()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(data)
    sync()
    # The slowest rank sets the pace of a collective; agree on its time and the error count.
    stats = torch.tensor([time.perf_counter() - start, float(wrong)], device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    seconds = float(stats[0]) / iters
    algbw, busbw = bus_bandwidth(numel * 4, seconds, world)
    return {
        "seconds": seconds,
        "algbw_gbps": algbw,
        "busbw_gbps": busbw,
        "wrong": int(stats[1]),
        "bytes": numel * 4,
        "world": world,
    }


def _judge(
    check: str, backend: str, stats: dict[str, Any], minimum: float | None, target: str = ""
) -> CheckResult:
    busbw = float(stats["busbw_gbps"])
    text = f"{backend} busbw {busbw:.3g} GB/s over {stats['world']} ranks"
    if stats["wrong"]:
        status, text = Status.FAIL, f"{text}: {stats['wrong']} wrong sums"
    elif minimum is not None and busbw < minimum:
        status, text = Status.FAIL, f"{text} < {minimum:g} GB/s"
    else:
        status = Status.PASS
    return result(
        check,
        status,
        text,
        target=target,
        value=busbw,
        threshold=minimum,
        unit="GB/s",
        backend=backend,
        **stats,
    )


def _rank_main(
    rank: int,
    world: int,
    port: int,
    backend: str,
    size_bytes: int,
    iters: int,
    timeout_s: float,
    results: Any,
) -> None:
    """One local rank of the intra-node check (a spawned process)."""
    try:
        import torch
        import torch.distributed as dist

        if backend == "gloo":
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # every rank is on this host
        device = "cpu"
        if backend == "nccl":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        timeout = timedelta(seconds=timeout_s)
        store = _tcp_store("127.0.0.1", port, world, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            results.put((rank, _measure(dist, torch, device, size_bytes, iters)))
        finally:
            dist.destroy_process_group()
    except Exception as exc:
        results.put((rank, {"error": f"{type(exc).__name__}: {exc}"}))


@dataclass(slots=True)
class AllReduceCheck:
    """All-reduce across this node: one process per GPU with NCCL, or ``cpu_ranks`` with gloo.

    Each rank is a fresh (spawned) process, as a training job's would be; the parent hosts the
    rendezvous store on a port the OS picks, so there is no free-port race.
    """

    name: ClassVar[str] = "collective.allreduce"
    level: ClassVar[Level] = Level.DEEP
    cpu_ranks: int = 2

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        import torch
        import torch.distributed as dist

        limits = ctx.thresholds
        if torch.cuda.is_available():
            backend, world = "nccl", torch.cuda.device_count()
            size = limits.allreduce_gpu_bytes
            if world < 2:
                return [result(self.name, Status.SKIP, "one GPU: nothing to all-reduce between")]
        else:
            backend, world, size = "gloo", self.cpu_ranks, limits.allreduce_cpu_bytes
        if not dist.is_available() or not dist.is_backend_available(backend):
            return [result(self.name, Status.SKIP, f"torch.distributed {backend} unavailable")]
        timeout = limits.allreduce_timeout_s
        store = _tcp_store(
            "127.0.0.1",
            0,
            world,
            is_master=True,
            wait_for_workers=False,
            timeout=timedelta(seconds=timeout),
        )
        spawn = multiprocessing.get_context("spawn")
        results = spawn.Queue()
        procs = [
            spawn.Process(
                target=_rank_main,
                args=(
                    rank,
                    world,
                    store.port,
                    backend,
                    size,
                    limits.allreduce_iters,
                    timeout,
                    results,
                ),
                daemon=True,
            )
            for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        try:
            by_rank = self._collect(results, procs, world, timeout)
        finally:
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
            del store
        errors = {rank: r["error"] for rank, r in by_rank.items() if "error" in r}
        if errors or len(by_rank) < world:
            missing = sorted(set(range(world)) - set(by_rank))
            detail = "; ".join(f"rank {k}: {v}" for k, v in sorted(errors.items()))
            if missing:
                detail = f"no result from ranks {missing} " + detail
            return [result(self.name, Status.FAIL, f"{backend} all-reduce failed: {detail}")]
        minimum = limits.min_allreduce_busbw_gbps.get(backend)
        return [_judge(self.name, backend, by_rank[0], minimum)]

    @staticmethod
    def _collect(
        results: Any, procs: list[Any], world: int, timeout: float
    ) -> dict[int, dict[str, Any]]:
        by_rank: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(by_rank) < world and time.monotonic() < deadline:
            try:
                rank, stats = results.get(timeout=0.2)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break  # every rank exited; the missing ones died without a word
                continue
            by_rank[rank] = stats
        return by_rank


def pair_allreduce(
    rank: int,
    world: int,
    master_addr: str,
    master_port: int,
    backend: str,
    size_bytes: int,
    iters: int,
    timeout_s: float,
    *,
    min_busbw_gbps: float | None = None,
    device: str | None = None,
) -> CheckResult:
    """All-reduce bus bandwidth between nodes; every participant calls it with its ``rank``.

    Rank 0 hosts the rendezvous store on ``master_addr:master_port``. Runs in the calling
    process, which must not already be in a process group (the agent is not; a worker is).
    ``device`` defaults to ``cuda:0`` for NCCL and ``cpu`` otherwise. Never raises: a peer
    that does not show up within ``timeout_s`` gives a ``fail`` row.
    """
    check, target = "collective.pair_allreduce", f"{master_addr}:{master_port}"
    start = time.perf_counter()
    try:
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return result(check, Status.FAIL, "a process group already exists here", target=target)
        device = device or ("cuda:0" if backend == "nccl" else "cpu")
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=timeout_s)
        store = _tcp_store(master_addr, master_port, world, is_master=rank == 0, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        try:
            stats = _measure(dist, torch, device, size_bytes, iters)
        finally:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
    except Exception as exc:
        return result(
            check,
            Status.FAIL,
            f"{backend} all-reduce failed: {type(exc).__name__}: {exc}",
            target=target,
            duration_s=time.perf_counter() - start,
        )
    row = _judge(check, backend, stats, min_busbw_gbps, target)
    return row.model_copy(update={"duration_s": time.perf_counter() - start})
