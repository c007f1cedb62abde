"""A CPU limit for tests: a cgroup that holds some processes to a fraction of one CPU.

A CPU hog slows a process only as much as the scheduler lets it, and on a small machine that
already runs other work the scheduler spreads everyone thin: the process meant to be slow and
its peers slow alike. A CFS bandwidth limit holds its processes to their quota whatever else
runs, so it is how a test makes one node reliably slower than the others. cgroup v2
(``cpu.max``) and the v1 ``cpu`` controller (``cpu.cfs_quota_us``, e.g. a hybrid host) both
work; making a cgroup needs root. The period is short so that even a step of a few
milliseconds is throttled every time, not only when a period's quota happens to run out in it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")
#: The shortest CFS period and quota the kernel takes, microseconds.
MIN_US = 1000
PERIOD_US = 10_000


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """Where CPU-limited cgroups can be made: a cgroup v2 mount or the v1 ``cpu`` one."""

    root: Path
    version: int

    def own_cgroup(self, pid: int) -> Path:
        """The cgroup ``pid`` is in, in this hierarchy (where it goes back to)."""
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if (self.version == 2 and controllers == "") or (
                self.version == 1 and "cpu" in controllers.split(",")
            ):
                return self.root / rel.lstrip("/")
        return self.root


def find_hierarchy() -> Hierarchy | str:
    """The hierarchy to use, or why there is none (a reason to skip)."""
    if os.geteuid() != 0:
        return "needs root to make a cgroup with a CPU limit"
    controllers = CGROUP / "cgroup.controllers"
    if controllers.exists():  # cgroup v2 only
        if "cpu" not in controllers.read_text().split():
            return f"the cgroup v2 root {CGROUP} has no cpu controller"
        subtree = CGROUP / "cgroup.subtree_control"
        if "cpu" not in subtree.read_text().split():
            try:
                subtree.write_text("+cpu")
            except OSError as exc:
                return f"cannot enable the cpu controller in {subtree}: {exc}"
        return Hierarchy(CGROUP, 2)
    v1 = CGROUP / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists():
        return Hierarchy(v1, 1)
    return f"no cgroup v2 with a cpu controller and no v1 cpu controller under {CGROUP}"


@dataclass(kw_only=True)
class CpuLimit:
    """A cgroup with a CPU quota; ``add`` moves processes (all their threads) into it."""

    hierarchy: Hierarchy
    path: Path
    #: pid -> the cgroup it came from.
    origins: dict[int, Path] = field(default_factory=dict)

    def add(self, pid: int) -> bool:
        """Move ``pid`` in; False if it has ended."""
        try:
            origin = self.hierarchy.own_cgroup(pid)
            (self.path / "cgroup.procs").write_text(str(pid))
        except (FileNotFoundError, ProcessLookupError):
            return False
        self.origins.setdefault(pid, origin)
        return True

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def _set(self, fraction: float | None) -> None:
        period = PERIOD_US if fraction is None else max(PERIOD_US, math.ceil(MIN_US / fraction))
        quota = None if fraction is None else round(period * fraction)
        if self.hierarchy.version == 2:
            (self.path / "cpu.max").write_text(f"{quota if quota else 'max'} {period}")
            return
        (self.path / "cpu.cfs_quota_us").write_text("-1")  # a new period must fit the old quota
        (self.path / "cpu.cfs_period_us").write_text(str(period))
        if quota:
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def release(self, timeout_s: float = 30.0) -> None:
        """Lift the limit, move every process back where it came from, remove the cgroup."""
        self._set(None)
        deadline = time.monotonic() + timeout_s
        while True:
            for pid in self.pids():
                back = self.origins.get(pid, self.hierarchy.own_cgroup(os.getpid()))
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    (back / "cgroup.procs").write_text(str(pid))
            try:
                self.path.rmdir()
                return
            except OSError as exc:  # EBUSY while an exiting process is still a member
                if time.monotonic() > deadline:
                    raise AssertionError(f"cannot remove {self.path}: {exc}") from exc
            time.sleep(0.1)


@contextlib.contextmanager
def cpu_limit(
    hierarchy: Hierarchy, fraction: float, name: str = "ironpod-test"
) -> Iterator[CpuLimit]:
    """A cgroup holding its processes to ``fraction`` of one CPU, removed on exit (also on
    failure); processes still in it then go back to the cgroups they came from."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    path = hierarchy.root / f"{name}-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    limit = CpuLimit(hierarchy=hierarchy, path=path)
    try:
        limit._set(fraction)
        yield limit
    finally:
        limit.release()
