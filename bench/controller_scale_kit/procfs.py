"""CPU and memory of processes and of the whole machine, from /proc (Linux)."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (all its threads), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss_bytes(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores; idle and iowait excluded)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK


def postgres_cpu() -> dict[int, float]:
    """CPU seconds of each local process named ``postgres`` we may read (the server's share)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if stat[stat.index("(") + 1 : stat.rindex(")")] == "postgres":
                    fields = stat[stat.rindex(")") + 2 :].split()
                    out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


@dataclass
class CpuSample:
    at: float
    controller: float
    generators: list[float]
    machine: float
    postgres: dict[int, float]

    @classmethod
    def take(cls, controller: int, generators: list[int], db: str) -> CpuSample:
        return cls(
            time.monotonic(),
            cpu_s(controller) or 0.0,
            [cpu_s(pid) or 0.0 for pid in generators],
            machine_busy_s(),
            postgres_cpu() if db == "postgres" else {},
        )


def cpu_used(a: CpuSample, b: CpuSample) -> dict[str, Any]:
    """CPU seconds from ``a`` to ``b`` and as % of one core; "other" is the rest of the machine
    (the bench's own main process, the database server, other people's work)."""
    wall = b.at - a.at
    gens = sum(b.generators) - sum(a.generators)
    ctl = b.controller - a.controller
    pg = sum(v - a.postgres.get(pid, 0.0) for pid, v in b.postgres.items())
    machine = b.machine - a.machine
    return {
        "wall_s": wall,
        "controller_s": ctl,
        "controller_pct": 100 * ctl / wall,
        "generators_s": gens,
        "generators_pct": 100 * gens / wall,
        "per_generator_pct": [
            100 * (y - x) / wall for x, y in zip(a.generators, b.generators, strict=True)
        ],
        "postgres_s": pg if b.postgres else None,
        "machine_pct": 100 * machine / wall,
        "other_pct": 100 * max(0.0, machine - ctl - gens - pg) / wall,
        "cores": os.cpu_count(),
    }
