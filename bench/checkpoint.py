"""How long a checkpoint stops training: ironpod's async save against DCP and torch.save.

    python bench/checkpoint.py                        # tiny, small, base: a few minutes
    python bench/checkpoint.py --quick                # tiny only, 2 checkpoints: the smoke test
    python bench/checkpoint.py --sizes small,medium --dir /mnt/nvme --json stall.json

What training loses to a checkpoint is the *stall*: the seconds the training loop is blocked
before it can take its next step. A synchronous save stalls for the whole write; an asynchronous
one only for copying the state out of the live tensors (later steps mutate them in place), while
the write overlaps training. This script measures that stall for the GPT recipe's model
(``recipes/gpt/model.py``) at several sizes, for four ways to save the same model and AdamW state:

* ``ironpod async``: ``ironpod.train.Checkpointer(dir, keep_last=2).save(step, state)``, its
  return value. The background half (DCP write, fsync, crc32 of every file, manifest, atomic
  rename, retention) is not stall, but it runs on the same CPUs as training.
* ``dcp.async_save``: ``torch.distributed.checkpoint.async_save``, the time until it returns.
* ``dcp.save``: ``torch.distributed.checkpoint.save``, synchronous (files fsynced).
* ``torch.save``: of ``{"model": model.state_dict(), "optim": optimizer.state_dict()}`` to one
  file, synchronous and not fsynced (the usual idiom; a durable one would stall longer).

The DCP methods take their state dicts with ``get_state_dict``, as ironpod does, inside the timing.

How the loop stays fair. Per size, one model and optimizer serve every method. A round saves once
with each method, the method order rotating each round; each save is followed by K real training
steps (forward, backward, AdamW on random tokens of the model's vocabulary at the config's
sequence length, batch 8/2/1 for tiny/small/base), which an asynchronous write overlaps. An async
save first waits for its previous write (at most one in flight), so with a checkpoint every K
steps the next save would block on whatever of the write is left after those K steps: the script
waits for it there and counts that wait in the stall, so no method's background write ever lands
inside another method's timing. Round 0 warms up and is not counted. The step time is that of the
steps after synchronous saves (nothing in flight); a second table gives each async write's
background time and how much slower the steps it overlapped ran, its cost beyond the stall.

Each figure is the minimum over the checkpoints by default, the cost with the least interference
(``--stat median`` or ``--stat mean``; the JSON has all three and every sample). On a shared
machine other processes come and go in phases that last longer than a round: in two default runs
the medians at ``base`` put the four methods in different orders, one run's half-contended rounds
landing on one method and the next run's on another, while the minima kept their order. A mean
(what a long run loses in total) is the right figure on a machine of one's own.

Threads: ``torch.set_num_threads(2)`` by default (``--threads``), both cores of the 2-core box
this was written on, as a real job would use; the background writer then competes with training
for CPU, which the second table reports rather than hides.

Caveat: on a shared, noisy 2-core machine absolute timings move a lot from run to run (steps of
the same model have been seen to take anywhere from 0.7 to 12 s); only the side-by-side ratios of
one interleaved run are meaningful. This is CPU training: on a GPU node the stall also includes
the device-to-host copy, so measure there before quoting numbers for one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean, median
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.state_dict_saver import async_save, save

import ironpod.train as it
from ironpod.agent.logs import LogServer
from ironpod.agent.snapshots import SnapshotStore
from ironpod.train.checkpoint.manifest import step_dir_name
from ironpod.train.checkpoint.memory import MemorySnapshots
from recipes.gpt.config import load_config
from recipes.gpt.model import Transformer, cross_entropy


@dataclass(frozen=True, slots=True)
class Size:
    """A model size: a recipe preset, overrides to fit it on 2 CPU cores, and a batch."""

    preset: str
    overrides: tuple[str, ...]
    batch: int
    about: str


SIZES: dict[str, Size] = {
    "tiny": Size("tiny", (), 8, "configs/tiny.yaml: ~0.9M, byte vocab, 128 tokens"),
    "small": Size("small", (), 2, "configs/small.yaml: ~10M, 8k vocab, 256 tokens"),
    # medium.yaml's 32k vocabulary and heads, narrowed so a step takes seconds, not tens of them.
    "base": Size(
        "medium",
        ("model.dim=512", "model.n_heads=8", "model.n_layers=8", "data.seq_len=256"),
        1,
        "configs/medium.yaml at dim 512, 8 layers, 256 tokens: ~59M",
    ),
    "medium": Size(
        "medium", (), 1, "configs/medium.yaml: ~126M, 1024 tokens (opt-in: 10-30 s a step here)"
    ),
}
DEFAULT_SIZES = "tiny,small,base"
#: How the checkpoints' samples are summarised (``--stat``); the module docstring says why the
#: minimum is the default.
AVERAGES: dict[str, Callable[[list[float]], float]] = {"min": min, "median": median, "mean": fmean}
ASYNC_METHODS = ("ironpod memory", "ironpod async", "dcp.async_save")
STYLE = {
    "ironpod memory": "bright_green",
    "ironpod async": "green",
    "dcp.async_save": "cyan",
    "dcp.save": "yellow",
    "torch.save": "red",
}


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Method:
    """One way to checkpoint. ``save`` times the stall, ``_save`` does the saving; ``drain``
    waits for a background write.

    Earlier checkpoints are deleted in :meth:`prune`, outside any timing, so disk use stays at
    about two checkpoints per method and deleting never counts as stall.
    """

    name = ""

    def __init__(self, root: Path, state: it.TrainState) -> None:
        self.root = root
        self.state = state
        root.mkdir(parents=True)
        self.last: Path | None = None
        self._old: list[Path] = []

    def _target(self, step: int, suffix: str = "") -> Path:
        if self.last is not None:
            self._old.append(self.last)
        self.last = self.root / f"step-{step:08d}{suffix}"
        return self.last

    def save(self, step: int) -> float:
        """Seconds the training loop was blocked: the method's own account where it keeps one."""
        start = time.perf_counter()
        own = self._save(step)
        return own if own is not None else time.perf_counter() - start

    def _save(self, step: int) -> float | None:
        raise NotImplementedError

    def drain(self) -> float:
        """Seconds waited for a write still running; its background time where there is one."""
        return 0.0

    def write_s(self) -> float | None:
        return None

    def disk_bytes(self) -> int:
        return dir_bytes(self.last) if self.last else 0

    def prune(self) -> None:
        for path in self._old:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self._old.clear()

    def close(self) -> None:
        self.drain()


class IronpodAsync(Method):
    name = "ironpod async"

    def __init__(self, root: Path, state: it.TrainState) -> None:
        super().__init__(root, state)
        self.ckpt = it.Checkpointer(str(root), keep_last=2)

    def _save(self, step: int) -> float | None:
        self.last = self.root / step_dir_name(step)
        return float(self.ckpt.save(step, self.state))  # its stall, what ironpod reports

    def drain(self) -> float:
        start = time.perf_counter()
        self.ckpt.wait()
        return time.perf_counter() - start

    def write_s(self) -> float | None:
        return self.ckpt.history[-1].write_s if self.ckpt.history else None

    def prune(self) -> None:  # keep_last=2 retention is part of ironpod's background write
        pass

    def close(self) -> None:
        self.ckpt.close()


def shm_dir(tag: str) -> Path:
    """A scratch directory in shared memory (where the agent keeps snapshots), else /tmp."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=f"ironpod-bench-{tag}-", dir=base))


class IronpodMemory(Method):
    """Tier 1: a snapshot into node memory (tmpfs), what ``memory_every=1`` does each step."""

    name = "ironpod memory"

    def __init__(self, root: Path, state: it.TrainState) -> None:
        super().__init__(root, state)
        self.area = shm_dir("mem")
        self.mem = MemorySnapshots(self.area / "job-1", slots=3)

    def _save(self, step: int) -> float | None:
        return float(self.mem.snapshot(step, self.state))

    def drain(self) -> float:
        start = time.perf_counter()
        self.mem.wait()
        return time.perf_counter() - start

    def write_s(self) -> float | None:
        last = self.mem.history[-1] if self.mem.history else None
        return last.write_s if last else None

    def disk_bytes(self) -> int:
        return int(self.mem.last_nbytes)

    def prune(self) -> None:
        pass

    def close(self) -> None:
        self.mem.close()
        shutil.rmtree(self.area, ignore_errors=True)


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_page_cache() -> bool:
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def drop_page_cache() -> None:
    """Empty the kernel's page cache (root): a replacement node reads its checkpoint cold."""
    os.sync()
    DROP_CACHES.write_text("1\n")


def restore_times(state: it.TrainState, root: Path) -> dict[str, float]:
    """Seconds to restore one rank's state from node memory, from a peer's memory (fetched
    over the agents' HTTP, as a replacement node does) and from disk (DCP + manifest checks)."""
    area = shm_dir("restore")
    peer_root = shm_dir("peer")
    store = SnapshotStore(area, budget_bytes=1 << 40, peer_tokens={1: "bench"})
    mine = SnapshotStore(peer_root, budget_bytes=1 << 40, peer_tokens={1: "bench"})
    server = LogServer("127.0.0.1", 0, root / "logs", "bench", {"name": "bench"})
    server.serve_snapshots(store)
    server.start()
    mem = MemorySnapshots(store.area(1), slots=2)
    durable = it.Checkpointer(str(root / "durable"), keep_last=1, asynchronous=False)
    try:
        mem.snapshot(1, state)
        mem.wait()
        durable.save(1, state)
        out: dict[str, float] = {}

        def from_peer() -> None:
            shutil.rmtree(mine.area(1), ignore_errors=True)
            note = mine.fetch(1, 0, 1, [server.url])
            assert "fetched" in note, note
            assert MemorySnapshots(mine.area(1), slots=2).load(1, state)

        def from_cold_disk() -> None:
            drop_page_cache()
            durable.load_latest(state)

        tiers: dict[str, Callable[[], object]] = {
            "memory": lambda: mem.load(1, state),
            "peer": from_peer,
            "disk": lambda: durable.load_latest(state),
        }
        if can_drop_page_cache():
            tiers["disk, cold"] = from_cold_disk
        for _ in range(3):  # min of 3, each tier in turn: the first calls pay for warm-ups
            for tier, load in tiers.items():
                start = time.perf_counter()
                load()
                took = time.perf_counter() - start
                out[tier] = min(out.get(tier, took), took)
        return out
    finally:
        mem.close()
        durable.close()
        server.close()
        shutil.rmtree(area, ignore_errors=True)
        shutil.rmtree(peer_root, ignore_errors=True)


class DcpAsync(Method):
    name = "dcp.async_save"

    def __init__(self, root: Path, state: it.TrainState) -> None:
        super().__init__(root, state)
        self._future: Future[Any] | None = None
        self._submitted = self._finished = 0.0
        # result() can return before done-callbacks have run: drain waits for the stamp too.
        self._stamped = threading.Event()

    def _stamp(self, _: Future[Any]) -> None:
        self._finished = time.perf_counter()
        self._stamped.set()

    def _save(self, step: int) -> float | None:
        self.drain()  # at most one write in flight, as ironpod does
        model_sd, optim_sd = get_state_dict(self.state.model, self.state.optimizer)
        future = async_save(
            {"model": model_sd, "optim": optim_sd}, checkpoint_id=self._target(step), no_dist=True
        )
        self._submitted = time.perf_counter()
        if not isinstance(future, Future):  # only with a stager that stages in the background
            raise TypeError(f"dcp.async_save returned {type(future).__name__}, not a Future")
        self._stamped.clear()
        future.add_done_callback(self._stamp)
        self._future = future
        return None

    def drain(self) -> float:
        start = time.perf_counter()
        if self._future is not None:
            future, self._future = self._future, None
            future.result()
            self._stamped.wait()
        return time.perf_counter() - start

    def write_s(self) -> float | None:
        return self._finished - self._submitted if self._finished else None


class DcpSave(Method):
    name = "dcp.save"

    def _save(self, step: int) -> float | None:
        model_sd, optim_sd = get_state_dict(self.state.model, self.state.optimizer)
        save({"model": model_sd, "optim": optim_sd}, checkpoint_id=self._target(step), no_dist=True)
        return None


class TorchSave(Method):
    name = "torch.save"

    def _save(self, step: int) -> float | None:
        assert self.state.optimizer is not None
        sd = {"model": self.state.model.state_dict(), "optim": self.state.optimizer.state_dict()}
        torch.save(sd, self._target(step, ".pt"))
        return None


def probe_async_save(root: Path) -> str | None:
    """Why ``dcp.async_save`` cannot run here (single process, CPU), or None if it can."""
    model = torch.nn.Linear(4, 4)
    try:
        future = async_save({"model": model.state_dict()}, checkpoint_id=root, no_dist=True)
        if not isinstance(future, Future):
            return f"it returned {type(future).__name__}, not a Future"
        future.result()
    except Exception as exc:  # any failure means "not available here"; the reason is printed
        return f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return None


@dataclass(slots=True)
class MethodResult:
    """One method's samples at one size, kept raw for the JSON so any average can be redone."""

    stall_s: list[float] = field(default_factory=list)
    save_return_s: list[float] = field(default_factory=list)
    wait_left_s: list[float] = field(default_factory=list)
    write_s: list[float] = field(default_factory=list)
    steps_after_s: list[list[float]] = field(default_factory=list)
    ckpt_bytes: int = 0


@dataclass(slots=True)
class SizeResult:
    """Everything measured at one size; ``stat`` picks the average every figure uses."""

    name: str
    about: str
    params: int
    seq_len: int
    batch: int
    stat: str
    clean_steps_s: list[float] = field(default_factory=list)
    methods: dict[str, MethodResult] = field(default_factory=dict)
    restore_s: dict[str, float] = field(default_factory=dict)

    def avg(self, values: list[float]) -> float:
        return AVERAGES[self.stat](values)

    @property
    def step_s(self) -> float:
        return self.avg(self.clean_steps_s)

    def stall(self, method: str) -> float:
        return self.avg(self.methods[method].stall_s)

    def ckpt_mb(self) -> float:
        return self.methods["ironpod async"].ckpt_bytes / 1e6

    def overlap_cost(self, method: str) -> float:
        """Extra seconds the K steps after an async save took, against steps with nothing in
        flight: the part of an async checkpoint's price that the stall does not show."""
        runs = self.methods[method].steps_after_s
        return self.avg([sum(steps) - len(steps) * self.step_s for steps in runs])


def run_size(
    name: str, methods: list[type[Method]], args: argparse.Namespace, root: Path, progress: Progress
) -> SizeResult:
    size = SIZES[name]
    cfg = load_config(size.preset, size.overrides)
    model = Transformer(cfg.model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    state = it.TrainState(model=model, optimizer=optimizer)
    vocab, seq = cfg.model.vocab_size, cfg.data.seq_len
    gen = torch.Generator().manual_seed(0)
    result = SizeResult(name, size.about, model.num_params(), seq, size.batch, args.stat)
    result.methods = {m.name: MethodResult() for m in methods}

    def step() -> float:
        start = time.perf_counter()
        tokens = torch.randint(vocab, (size.batch, seq + 1), generator=gen)
        cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    task = progress.add_task(name, total=(args.checkpoints + 1) * len(methods))
    progress.update(task, description=f"{name}: warm-up steps")
    for _ in range(2):  # the first steps allocate AdamW state and warm the allocator
        step()
    savers = [m(root / name / m.name.replace(" ", "-"), state) for m in methods]
    number = 0
    try:
        for round_ in range(args.checkpoints + 1):
            shift = round_ % len(savers)
            for saver in savers[shift:] + savers[:shift]:
                progress.update(task, description=f"{name}: round {round_} {saver.name}")
                number += 1
                blocked = saver.save(number)
                after = [step() for _ in range(args.steps_between)]
                left = saver.drain()
                write = saver.write_s()
                if round_ > 0:
                    rec = result.methods[saver.name]
                    rec.stall_s.append(blocked + left)
                    rec.save_return_s.append(blocked)
                    rec.wait_left_s.append(left)
                    if write is not None:
                        rec.write_s.append(write)
                    rec.steps_after_s.append(after)
                    rec.ckpt_bytes = saver.disk_bytes()
                    if saver.name not in ASYNC_METHODS:
                        result.clean_steps_s += after
                saver.prune()
                progress.advance(task)
        progress.update(task, description=f"{name}: restore times")
        result.restore_s = restore_times(state, root / name / "restore")
    finally:
        for saver in savers:
            saver.close()
        shutil.rmtree(root / name, ignore_errors=True)
    progress.update(task, description=f"{name}: done")
    return result


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


def fmt_pct(part: float, whole: float) -> str:
    pct = 100 * part / whole
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.1f}%"


def report(
    console: Console, results: list[SizeResult], methods: list[str], skipped: str | None
) -> list[str]:
    stat = results[0].stat
    title = f"Checkpoint stall per save (training blocked), {stat} over the checkpoints"
    table = Table(title=title)
    for col in ("size", "params", "ckpt MB", "step"):
        table.add_column(col, justify="right" if col != "size" else "left")
    for method in methods:
        table.add_column(f"{method}\nstall (% step)", justify="right", style=STYLE[method])
    for r in results:
        cells = [fmt_s(r.stall(m)) for m in methods]
        cells = [
            f"{c} ({fmt_pct(r.stall(m), r.step_s)})" for c, m in zip(cells, methods, strict=True)
        ]
        table.add_row(
            r.name, f"{r.params / 1e6:.1f}M", f"{r.ckpt_mb():.0f}", fmt_s(r.step_s), *cells
        )
    console.print(table)

    lines = []
    for r in results:
        ours = max(r.stall("ironpod async"), 1e-6)  # a zero would divide by zero
        first, *rest = [m for m in ("torch.save", "dcp.save", "dcp.async_save") if m in methods]
        line = f"{r.name}: {first} stalls {r.stall(first) / ours:.1f}x as long as "
        line += "ironpod async" + "".join(f"; {m} {r.stall(m) / ours:.1f}x" for m in rest)
        lines.append(line)
        console.print(line, highlight=False)
    if skipped:
        console.print(f"dcp.async_save: not measured, it fails here: {skipped}", highlight=False)

    console.print()
    restore = Table(title="Restore one rank's state: node memory, a peer's memory, disk")
    cold = any("disk, cold" in r.restore_s for r in results)
    columns = ["size", "memory", "peer (fetch + load)", "disk (DCP, page cache)"]
    columns += ["disk, cold cache"] if cold else []
    for col in [*columns, "disk / memory"]:
        restore.add_column(col, justify="left" if col == "size" else "right")
    for r in results:
        t = r.restore_s
        if t:
            cells = [fmt_s(t["memory"]), fmt_s(t["peer"]), fmt_s(t["disk"])]
            cells += [fmt_s(t["disk, cold"]) if "disk, cold" in t else "-"] if cold else []
            restore.add_row(r.name, *cells, f"{t['disk'] / max(t['memory'], 1e-9):.1f}x")
            line = f"{r.name}: restore from disk takes {t['disk'] / t['memory']:.1f}x as long as "
            line += f"from node memory (warm cache), from a peer {t['peer'] / t['memory']:.1f}x"
            if "disk, cold" in t:
                line += f", from disk with a cold cache {t['disk, cold'] / t['memory']:.1f}x"
            lines.append(line)
    console.print(restore)
    for line in lines[len(results) :]:
        console.print(line, highlight=False)

    console.print()
    overlap = Table(title=f"Async saves: the write that overlaps training, {stat} per checkpoint")
    for col in ("size", "method", "write (background)", "left after K steps", "K steps slower by"):
        overlap.add_column(col, justify="left" if col in ("size", "method") else "right")
    for r in results:
        for m in [m for m in ASYNC_METHODS if m in methods]:
            rec = r.methods[m]
            write = fmt_s(r.avg(rec.write_s)) if rec.write_s else "?"
            left, cost = r.avg(rec.wait_left_s), r.overlap_cost(m)
            overlap.add_row(r.name, m, write, fmt_s(left), f"{cost:+.3f} s", style=STYLE[m])
    console.print(overlap)
    console.print(
        "'left after K steps' is counted in the stall (the next save would wait for it); 'K "
        "steps slower by' compares them with steps after a synchronous save (nothing in flight).",
        highlight=False,
    )
    outlasted = [  # any sample, whatever --stat: a minimum would hide the ones that waited
        f"{r.name} {m} {sum(w > 0.01 for w in waits)} of {len(waits)} times"
        for r in results
        for m in ASYNC_METHODS
        if m in methods and max(waits := r.methods[m].wait_left_s) > 0.01
    ]
    if outlasted:
        console.print(
            f"Writes outlasted the K steps after them ({', '.join(outlasted)}): those stalls "
            "include the wait, as saving that often would; a larger --steps-between shows the "
            "overlap alone.",
            style="bold",
            highlight=False,
        )
    console.print(
        "Timings on a shared, noisy machine move between runs; compare the ratios from one run.",
        style="dim",
    )
    plot(console, results, methods)
    return lines


def bar(value: float, top: float, width: int = 40) -> str:
    """Unicode block bar, eighth-character resolution, at least a sliver for any nonzero value."""
    eighths = max(1, round(8 * width * value / top)) if value > 0 and top > 0 else 0
    full, rest = divmod(eighths, 8)
    return "█" * full + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[rest]


def plot(console: Console, results: list[SizeResult], methods: list[str]) -> None:
    console.print()
    console.print("Stall per checkpoint (bars scaled to the longest stall of each size)")
    label = max(len(m) for m in methods)
    for r in results:
        top = max(r.stall(m) for m in methods)
        for i, m in enumerate(methods):
            line = Text(f"{r.name if i == 0 else '':<7}{m:<{label}} ")
            line.append(bar(r.stall(m), top), style=STYLE[m])
            line.append(f" {fmt_s(r.stall(m))}")
            console.print(line)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Training-step stall per checkpoint: ironpod async vs DCP vs torch.save.",
        epilog="Sizes: " + "; ".join(f"{k}: {v.about}" for k, v in SIZES.items()),
    )
    parser.add_argument(
        "--sizes", help=f"comma-separated, from {', '.join(SIZES)} (default {DEFAULT_SIZES})"
    )
    parser.add_argument("--checkpoints", type=int, help="measured saves per method (default 5)")
    parser.add_argument(
        "--steps-between", type=int, help="training steps after each save, K (default 2)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny, 2 checkpoints, 1 step between (flags still win)",
    )
    parser.add_argument("--dir", type=Path, help="where to write checkpoints (default: $TMPDIR)")
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument(
        "--stat",
        choices=sorted(AVERAGES),
        default="min",
        help="summary of the checkpoints' samples (default min: least interference)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    args = parser.parse_args(argv)
    quick = {"sizes": "tiny", "checkpoints": 2, "steps_between": 1}
    normal = {"sizes": DEFAULT_SIZES, "checkpoints": 5, "steps_between": 2}
    for key, value in (quick if args.quick else normal).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown or not args.sizes:
        parser.error(f"--sizes: unknown {unknown}; choose from {', '.join(SIZES)}")
    if args.checkpoints < 1 or args.steps_between < 1 or args.threads < 1:
        parser.error("--checkpoints, --steps-between and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 132)
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ironpod-bench-", dir=args.dir))
    started = time.perf_counter()
    try:
        skipped = probe_async_save(root / "probe")
        classes: list[type[Method]] = [IronpodMemory, IronpodAsync, DcpSave, TorchSave]
        if skipped is None:
            classes.insert(1, DcpAsync)
        results = []
        columns = (
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=Console(stderr=True)) as progress:
            for name in args.sizes:
                results.append(run_size(name, classes, args, root, progress))
                gc.collect()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    methods = [c.name for c in classes]
    console.print(
        f"torch {torch.__version__}, {args.threads} threads, {args.checkpoints} checkpoints per "
        f"method after a warm-up one, K={args.steps_between} training steps after each, "
        f"written under {args.dir or tempfile.gettempdir()}",
        highlight=False,
    )
    ratios = report(console, results, methods, skipped)
    wall = time.perf_counter() - started
    console.print(f"wall time {wall:.0f} s", style="dim")
    if args.json:
        raw = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "checkpoints": args.checkpoints,
            "steps_between": args.steps_between,
            "dir": str(args.dir or tempfile.gettempdir()),
            "dcp_async_save_skipped": skipped,
            "wall_s": wall,
            "ratios": ratios,
            "sizes": [
                {
                    **asdict(r),
                    "ckpt_mb": r.ckpt_mb(),
                    "step_s": r.step_s,
                    "stall_s": {m: r.stall(m) for m in methods},
                    "stall_min_s": {m: min(r.methods[m].stall_s) for m in methods},
                    "stall_mean_s": {m: fmean(r.methods[m].stall_s) for m in methods},
                    "stall_median_s": {m: median(r.methods[m].stall_s) for m in methods},
                    "overlap_cost_s": {m: r.overlap_cost(m) for m in ASYNC_METHODS if m in methods},
                    "restore_s": r.restore_s,
                }
                for r in results
            ],
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
