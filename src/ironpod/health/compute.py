"""Compute checks: matmul throughput against the node class's baseline, GPU memory patterns.

torch is imported inside the checks, so importing :mod:`ironpod.health` stays cheap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from ironpod.health.core import GIB, CheckResult, HealthContext, Level, Status, result

CPU_BASELINE_KEY = "matmul_gflops"  # float32 on the CPU, GFLOP/s
GPU_BASELINE_KEY = "matmul_tflops_bf16"  # bfloat16 per GPU, TFLOP/s


def measure_matmul(torch: Any, device: str, n: int, dtype: Any, seconds: float) -> float:
    """FLOP/s of ``n``x``n`` matmuls on ``device``, run back to back for about ``seconds``.

    Time-bounded rather than a fixed count, so the check costs the same on any machine; the
    rate is the sustained one over the whole window, so a contended CPU shows up in it.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda *_: None)
    torch.matmul(a, b)  # warm-up: kernel selection, thread pool start
    sync(device)
    batch = 1 if device == "cpu" else 10
    count = 0
    start = time.perf_counter()
    while True:
        for _ in range(batch):
            torch.matmul(a, b)
        sync(device)
        count += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * count / elapsed


@dataclass(slots=True)
class MatmulCheck:
    """Matmul throughput: float32 on the CPU without CUDA, else bfloat16 on every GPU.

    Compared with ``ctx.baselines[CPU_BASELINE_KEY]`` / ``[GPU_BASELINE_KEY]``: below
    ``matmul_warn_fraction`` of it warns, below ``matmul_fail_fraction`` fails. Without a
    baseline the row passes and carries the value (and ``details["baseline_key"]``) for the
    caller to store as the node class's first good measurement.
    """

    name: ClassVar[str] = "compute.matmul"
    level: ClassVar[Level] = Level.LIGHT
    cpu_n: int = 1024  # ~20 ms per multiply on 2 cores, ~2 ms on 32
    gpu_n: int = 8192  # ~1.1 TFLOP per multiply: a few ms on a data center GPU

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        import torch

        seconds = ctx.thresholds.matmul_seconds
        if not torch.cuda.is_available():
            flops = measure_matmul(torch, "cpu", self.cpu_n, torch.float32, seconds)
            return [self._judge(ctx, "cpu", flops / 1e9, "GFLOP/s", CPU_BASELINE_KEY)]
        rows = []
        for index in range(torch.cuda.device_count()):
            device = f"cuda:{index}"
            flops = measure_matmul(torch, device, self.gpu_n, torch.bfloat16, seconds)
            rows.append(self._judge(ctx, f"gpu{index}", flops / 1e12, "TFLOP/s", GPU_BASELINE_KEY))
        return rows

    def _judge(
        self, ctx: HealthContext, target: str, value: float, unit: str, key: str
    ) -> CheckResult:
        limits = ctx.thresholds
        baseline = ctx.baselines.get(key)
        if not baseline:
            return result(
                self.name,
                Status.PASS,
                f"{value:.4g} {unit} (no baseline {key!r} yet)",
                target=target,
                value=value,
                unit=unit,
                baseline_key=key,
            )
        ratio = value / baseline
        if ratio < limits.matmul_fail_fraction:
            status = Status.FAIL
        elif ratio < limits.matmul_warn_fraction:
            status = Status.WARN
        else:
            status = Status.PASS
        return result(
            self.name,
            status,
            f"{value:.4g} {unit} = {ratio:.0%} of baseline {baseline:.4g}",
            target=target,
            value=value,
            threshold=baseline * limits.matmul_fail_fraction,
            unit=unit,
            baseline_key=key,
            baseline=baseline,
            ratio=ratio,
        )


# 32-bit words: all zeros, all ones, and the two checkerboards 0x55.. / 0xAA.. (as int32).
_PATTERNS = (0, -1, 0x55555555, -0x55555556)


@dataclass(slots=True)
class GpuMemoryCheck:
    """Write-then-read patterns over a share of each GPU's free memory.

    A smoke test through the normal allocator, not a full memory test: ECC corrects what it can,
    so NVML's ECC and remapping counters (``gpu.ecc``, ``gpu.remapped_rows``) are the primary
    signal; this catches what escapes them and CUDA errors on access. ``dcgmi diag -r 3`` runs
    NVIDIA's thorough memory test.
    """

    name: ClassVar[str] = "compute.gpu_memory"
    level: ClassVar[Level] = Level.DEEP
    chunk_words: int = 64 << 20  # verify 256 MiB at a time to bound the scratch memory

    def run(self, ctx: HealthContext) -> list[CheckResult]:
        import torch

        if not torch.cuda.is_available():
            return [result(self.name, Status.SKIP, "no CUDA")]
        return [
            self._test(torch, index, ctx.thresholds.gpu_memtest_fraction)
            for index in range(torch.cuda.device_count())
        ]

    def _test(self, torch: Any, index: int, fraction: float) -> CheckResult:
        target, device = f"gpu{index}", f"cuda:{index}"
        free, _total = torch.cuda.mem_get_info(index)
        words = int(free * fraction) // 4
        try:
            buf = torch.empty(words, dtype=torch.int32, device=device)
        except torch.cuda.OutOfMemoryError:
            return result(self.name, Status.WARN, "could not allocate test memory", target=target)
        try:
            bad = self._bad_words(torch, buf, device)
        except RuntimeError as exc:  # "CUDA error: uncorrectable ECC error encountered", ...
            return result(self.name, Status.FAIL, f"CUDA error: {exc}", target=target)
        finally:
            del buf
            torch.cuda.empty_cache()
        tested = words * 4
        return result(
            self.name,
            Status.FAIL if bad else Status.PASS,
            f"{bad} bad words in {tested / GIB:.3g} GiB x {len(_PATTERNS) + 1} patterns",
            target=target,
            value=bad,
            threshold=0,
            unit="words",
            tested_bytes=tested,
        )

    def _bad_words(self, torch: Any, buf: Any, device: str) -> int:
        bad = 0
        chunks = buf.split(self.chunk_words)
        for pattern in _PATTERNS:
            buf.fill_(pattern)
            bad += sum(int(torch.count_nonzero(chunk != pattern)) for chunk in chunks)
        # Address-dependent pattern: a word written to the wrong place shows up here.
        for i, chunk in enumerate(chunks):
            chunk.copy_(self._ramp(torch, chunk.numel(), i, device))
        for i, chunk in enumerate(chunks):
            bad += int(torch.count_nonzero(chunk != self._ramp(torch, chunk.numel(), i, device)))
        torch.cuda.synchronize(device)
        return bad

    @staticmethod
    def _ramp(torch: Any, n: int, chunk: int, device: str) -> Any:
        return torch.arange(n, dtype=torch.int32, device=device) ^ (chunk * 0x9E3779B1 & 0x7FFFFFFF)
