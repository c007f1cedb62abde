"""Two checkpoint tiers behind the :class:`Checkpointer` interface: memory often, durable rarely.

Every ``memory_every`` steps each rank snapshots into the node's memory (:mod:`.memory`, a
stall of milliseconds), or with ``memory_every="auto"`` as often as 1% of the training time
allows (:class:`AutoInterval`); every ``durable_every`` steps, or every ``durable_interval_s``
seconds, the durable :class:`Checkpointer` writes a DCP checkpoint that survives anything and
loads at another world size. The agent may tune the durable interval while the job runs (the
controller's Young/Daly choice) through ``IRONPOD_CONTROL_FILE``. Restoring takes the newest
step that every rank holds intact in memory, unless the durable tier holds a newer one.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ironpod import env
from ironpod.errors import ConfigError
from ironpod.train.checkpoint.checkpointer import Checkpointer, SaveRecord
from ironpod.train.checkpoint.memory import GoodCopy, MemorySnapshots
from ironpod.train.checkpoint.state import TrainState
from ironpod.train.context import TrainContext


def _report(message: str) -> None:
    print(f"[ironpod] checkpoint: {message}", file=sys.stderr, flush=True)


class ControlFile:
    """The agent's advice file, re-read only when its modification time changes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._mtime: int | None = None
        self._advice: dict[str, Any] = {}

    def _number(self, key: str) -> float | None:
        """A positive number the file advises under ``key``, or None (no file, no advice,
        unreadable)."""
        if not self.path:
            return None
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            self._mtime, self._advice = None, {}
            return None
        if mtime != self._mtime:
            self._mtime = mtime
            try:
                advice = json.loads(Path(self.path).read_text())
                self._advice = advice if isinstance(advice, dict) else {}
            except (OSError, ValueError) as exc:
                _report(f"ignoring control file {self.path}: {exc}")
                self._advice = {}
        value = self._advice.get(key)
        if isinstance(value, int | float) and math.isfinite(value) and value > 0:
            return float(value)
        return None

    def durable_interval_s(self) -> float | None:
        """The controller's advised durable interval."""
        return self._number("durable_interval_s")

    def snapshot_agent_cpu_s(self) -> float | None:
        """The agent's CPU seconds per memory snapshot of one rank (replication to the peer,
        the peer's copy it receives, pinning), measured on this node."""
        return self._number("snapshot_agent_cpu_s")


#: ``memory_every`` value that lets the checkpointer choose the interval.
AUTO = "auto"
#: Share of training time the memory tier may cost under ``memory_every="auto"``.
AUTO_BUDGET = 0.01
#: Steps measured (each snapshotted) before the automatic interval is first agreed.
AUTO_PROBE_STEPS = 6
#: Steps after the first agreement to the second: by then the agent has replicated snapshots
#: and measured what that costs the node (the probe's agreement cannot know it yet).
AUTO_RECHECK_STEPS = 30
#: Steps between later re-agreements (step and snapshot times drift: evaluation, new data).
AUTO_REVIEW_STEPS = 200
#: The longest automatic interval: a restore from memory never replays more than this.
AUTO_MAX_EVERY = 500


class AutoInterval:
    """How often to snapshot so that snapshots cost at most ``budget`` of the training time.

    Fed each step's time outside the checkpointer and each committed snapshot's cost, it
    proposes ``ceil(cost / (budget x step))``, and never less than the steps one snapshot's
    background work takes (at most one is in flight, so a shorter interval would make the next
    one wait). A snapshot's cost is its copy (what the step waited for) plus, when the state
    lives on the CPU, its background commit (checksums and metadata on the training's own
    cores) and the agent's work for it (sending it to the peer, receiving the peer's copy,
    pinning: measured by the agent, see ``observe_agent``), which on a CPU node runs on the
    training's cores too; on a GPU both run on host cores the step does not use.
    """

    def __init__(
        self,
        budget: float = AUTO_BUDGET,
        *,
        window: int = 64,
        max_every: int = AUTO_MAX_EVERY,
    ) -> None:
        if not 0 < budget < 1:
            raise ConfigError(f"memory tier budget must be between 0 and 1, got {budget}")
        self.budget = budget
        self.max_every = max_every
        self.step_s: deque[float] = deque(maxlen=window)
        self.costs: deque[tuple[float, float]] = deque(maxlen=window)  # (copy, background) s
        self.agent_s = 0.0

    def observe_agent(self, seconds: float) -> None:
        """The agent's CPU seconds per snapshot of this rank, as it last measured them."""
        self.agent_s = seconds

    def observe_step(self, seconds: float) -> None:
        self.step_s.append(seconds)

    def observe_snapshot(self, copy_s: float, background_s: float) -> None:
        self.costs.append((copy_s, background_s))

    def propose(self, *, on_cpu: bool) -> int | None:
        """The interval in steps, or None before both a step and a snapshot were measured."""
        if not self.step_s or not self.costs:
            return None
        step = max(statistics.median(self.step_s), 1e-6)
        copy = statistics.median(c for c, _ in self.costs)
        background = statistics.median(b for _, b in self.costs)
        cost = copy + background + self.agent_s if on_cpu else copy
        every = max(math.ceil(cost / (self.budget * step)), math.ceil(background / step), 1)
        return min(every, self.max_every)


class TieredCheckpointer:
    """Memory snapshots plus durable checkpoints, with the :class:`Checkpointer` interface.

    Collective like :class:`Checkpointer`: every rank constructs it and calls ``save`` for every
    step (it decides itself which steps to snapshot) and ``load_latest`` once.
    """

    def __init__(
        self,
        location: str | None = None,
        *,
        ctx: TrainContext | None = None,
        area: str | Path | None = None,
        slots: int = 3,
        memory_every: int | str = 1,
        memory_budget: float = AUTO_BUDGET,
        durable_every: int | None = None,
        durable_interval_s: float | None = None,
        keep_last: int = 3,
        keep_every: int | None = None,
        asynchronous: bool = True,
        overlap_copy: bool = True,
    ) -> None:
        self._auto: AutoInterval | None = None
        if memory_every == AUTO:
            self._auto = AutoInterval(memory_budget)
            memory_every = 1  # the probe snapshots every step until the first agreement
        elif not isinstance(memory_every, int) or memory_every < 0:
            raise ConfigError(
                f"checkpoint memory_every must be 0 or more, or {AUTO!r}, got {memory_every!r}"
            )
        if durable_every is not None and durable_every < 1:
            raise ConfigError(f"checkpoint durable_every must be at least 1, got {durable_every}")
        if durable_interval_s is not None and durable_interval_s <= 0:
            raise ConfigError(
                f"checkpoint durable_interval_s must be positive, got {durable_interval_s}"
            )
        self.memory_every = memory_every
        self.durable_every = durable_every
        self.durable_interval_s = durable_interval_s
        self.durable = Checkpointer(
            location,
            ctx=ctx,
            keep_last=keep_last,
            keep_every=keep_every,
            asynchronous=asynchronous,
        )
        self.memory = (
            MemorySnapshots(area, ctx=ctx, slots=slots, overlap=overlap_copy)
            if memory_every > 0
            else None
        )
        self.control = ControlFile(os.environ.get(env.CONTROL_FILE))
        # Every rank must agree on whether a time rule exists (it costs a broadcast per save):
        # the environment is the same on every rank, a node's control file may lag.
        self._timed = durable_interval_s is not None or bool(self.control.path)
        # The decision has a group of its own: the durable checkpointer's group is busy with
        # the background write of the previous checkpoint, from another thread, and two
        # threads' collectives on one group interleave differently on each rank.
        decides = self._timed or self._auto is not None
        self._decide_pg = (
            dist.new_group(backend="gloo") if decides and self.durable._distributed else None
        )
        self._rank = self.durable._rank
        self._last_durable_t = time.monotonic()
        self._first_step: int | None = None
        self._left_save_t: float | None = None  # when the previous save returned
        self._fed_step = -1  # the newest snapshot whose cost the automatic interval has seen
        self.history: list[SaveRecord] = []
        self.last_restore: dict[str, Any] | None = None
        self._metrics: dict[str, float | int] = {}

    # -- saving

    def _interval_s(self) -> float | None:
        advised = self.control.durable_interval_s()
        return advised if advised is not None else self.durable_interval_s

    def _durable_due(self, step: int) -> bool:
        """Whether this step gets a durable checkpoint, the same answer on every rank."""
        due = self.durable_every is not None and step % self.durable_every == 0
        if not self._timed:
            return due
        if self._rank == 0 and not due:
            interval = self._interval_s()
            elapsed = time.monotonic() - self._last_durable_t
            due = interval is not None and elapsed >= interval
        if not self.durable._distributed:
            return due
        flag = torch.tensor([1 if due else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self._decide_pg)
        return bool(flag.item())

    def save(self, step: int, state: TrainState, *, durable: bool | None = None) -> float:
        """Snapshot and/or checkpoint ``step`` as the rules say; returns the seconds blocked.

        Call it after every optimizer step. ``durable=True`` forces a durable checkpoint (a
        requested stop), ``False`` forbids one; either must be the same on every rank.
        """
        start = time.perf_counter()
        if self._first_step is None:
            self._first_step = step
        if self._auto is not None and self._left_save_t is not None:
            self._auto.observe_step(start - self._left_save_t)
            self._maybe_agree(step)
        mem_s = 0.0
        if self.memory is not None and step % self.memory_every == 0:
            mem_s = self.memory.snapshot(step, state)
        durable_now = self._durable_due(step) if durable is None else durable
        if durable_now:
            self._last_durable_t = time.monotonic()
            self.durable.save(step, state)
        self._left_save_t = time.perf_counter()
        blocked = self._left_save_t - start
        self.history.append(SaveRecord(step=step, blocked_s=blocked))
        self._metrics = {"ckpt_block_s": blocked, "ckpt_mem_block_s": mem_s}
        return blocked

    def _maybe_agree(self, step: int) -> None:
        """At the steps every rank knows (the probe's end, the recheck, then every review),
        agree on the automatic interval: each rank proposes from its own measurements, the
        longest wins."""
        assert self._auto is not None and self._first_step is not None
        since = step - self._first_step
        second = AUTO_PROBE_STEPS + AUTO_RECHECK_STEPS
        if since != AUTO_PROBE_STEPS and (since < second or (since - second) % AUTO_REVIEW_STEPS):
            return
        assert self.memory is not None  # memory_every="auto" makes one
        for record in self.memory.history:
            if record.step > self._fed_step and record.committed and record.write_s is not None:
                self._auto.observe_snapshot(record.blocked_s - record.waited_s, record.write_s)
                self._fed_step = record.step
        agent_s = self.control.snapshot_agent_cpu_s()
        if agent_s is not None:
            self._auto.observe_agent(agent_s)
        # A rank whose tier is off (refused room) still takes part: the others wait for it.
        proposal = self._auto.propose(on_cpu=not self.memory.on_cuda) or self.memory_every
        if self._decide_pg is not None:
            box = torch.tensor([proposal], dtype=torch.int64)
            dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self._decide_pg)
            proposal = int(box.item())
        if proposal != self.memory_every and self._rank == 0:
            _report(
                f"memory snapshots every {proposal} step(s) (was {self.memory_every}): "
                f"{self._auto.budget:.0%} of the step time"
            )
        self.memory_every = proposal

    def metrics(self) -> dict[str, float | int]:
        """This step's checkpoint figures for the progress beacon (the agent forwards them)."""
        out = dict(self._metrics)
        durable = [r for r in self.durable.history if r.committed]
        if durable:
            out["ckpt_durable_step"] = durable[-1].step
            out["ckpt_durable_write_s"] = durable[-1].write_s or 0.0
        if self.memory is not None and self.memory.last_nbytes:
            out["ckpt_snapshot_bytes"] = self.memory.last_nbytes
        return out

    def wait(self) -> None:
        """Block until the in-flight snapshot and durable write are done (raises like
        :meth:`Checkpointer.wait` if the durable one failed)."""
        if self.memory is not None:
            self.memory.wait()
        self.durable.wait()

    def close(self) -> None:
        try:
            if self.memory is not None:
                self.memory.close()
        finally:
            self.durable.close()

    # -- loading

    def load_latest(self, state: TrainState) -> int | None:
        """Restore the newest step every rank can: from memory if it is at least as new as the
        newest durable checkpoint, else from the durable tier. Collective; returns the step."""
        start = time.perf_counter()
        durable = self.durable
        local = self.memory.local_steps() if self.memory is not None else []
        everyone = durable._all_gather(local)
        common: list[int] = sorted(
            set.intersection(*(set(steps) for steps in everyone)), reverse=True
        )
        newest_durable = None
        if self._rank == 0:
            committed = durable.committed_steps()
            newest_durable = committed[-1] if committed else None
        newest_durable = durable._broadcast(newest_durable)
        for step in common:
            if newest_durable is not None and step < newest_durable:
                break
            restored = self._load_memory(step, state)
            if restored is not None:
                self._restored(restored, step, start)
                return step
        step_or_none = durable.load_latest(state)
        if step_or_none is not None:
            self._restored("durable", step_or_none, start)
        elif self.memory is not None:
            self.memory.discard_newer(None)
        return step_or_none

    def _load_memory(self, step: int, state: TrainState) -> str | None:
        """Load ``step`` from memory if every rank holds an intact copy; its tier, or None.

        Every rank checks its copy first and they agree by all-gather before any rank loads,
        so no rank moves to a step that another rank cannot reach.
        """
        assert self.memory is not None
        copy: GoodCopy | None = self.memory.find_good(step)
        kinds = self.durable._all_gather(copy.kind if copy is not None else None)
        if copy is None or any(kind is None for kind in kinds):
            if self._rank == 0:
                missing = [rank for rank, kind in enumerate(kinds) if kind is None]
                _report(f"memory step {step} unusable: no intact copy on ranks {missing}")
            return None
        self.memory.load_copy(copy, state)
        where = "local" if copy.kind == "slot" else "replica"
        planned = os.environ.get(env.RESTORE_STEP)
        note = f" (controller planned {planned})" if planned and planned != str(step) else ""
        _report(f"restored step {step} from memory ({where}){note}")
        return "memory" if all(kind == "slot" for kind in kinds) else "replica"

    def _restored(self, tier: str, step: int, start: float) -> None:
        if self.memory is not None:
            self.memory.discard_newer(step)
        self.last_restore = {"tier": tier, "step": step, "seconds": time.perf_counter() - start}

    # -- reporting

    def summary(self) -> dict[str, Any]:
        """The durable tier's totals, the memory tier's, the whole stall and the last restore."""
        blocked = [r.blocked_s for r in self.history]
        out: dict[str, Any] = {
            **self.durable.summary(),
            "saves": len(self.history),
            "blocked_total_s": sum(blocked),
            "blocked_mean_s": sum(blocked) / len(blocked) if blocked else 0.0,
            "blocked_max_s": max(blocked, default=0.0),
            "durable_saves": len(self.durable.history),
        }
        if self.memory is not None:
            out.update(self.memory.summary())
            out["memory_tier"] = "on" if self.memory.enabled else "off"
        if self.last_restore is not None:
            out["last_restore"] = dict(self.last_restore)
        return out
