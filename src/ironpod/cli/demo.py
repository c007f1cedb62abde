"""``ironpod demo``: pretrain the GPT recipe on this machine through an injected crash.

Until the local cluster exists (the controller and agents of DESIGN.md), the demo plays the
supervisor itself, in the smallest honest form: it starts the recipe as a worker process,
follows its progress beacons in the log, SIGKILLs it part-way (a crashed rank loses
everything in its memory), starts it again, and the worker resumes from its newest verified
checkpoint. The summary shows what the crash cost and the run's goodput.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ironpod import env
from ironpod.train.beacon import Metric, parse_progress_line

console = Console()


@dataclass
class Attempt:
    """One worker process: when it started, the steps it reported, how it ended."""

    number: int
    started: float
    steps: list[tuple[int, float, dict[str, Metric]]] = field(default_factory=list)
    resumed_from: int = 0
    exit_code: int | None = None
    killed_at: float | None = None


def _worker_cmd(config: str, steps: int, ckpt: Path, every: int, overrides: list[str]) -> list[str]:
    sets = [
        f"train.steps={steps}",
        f"checkpoint.dir={ckpt}",
        f"checkpoint.every={every}",
        "checkpoint.keep_last=3",
        "train.log_every=1000000",  # the demo draws its own progress from the beacons
        *overrides,
    ]
    cmd = [sys.executable, "-m", "recipes.gpt.train", "--config", config]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def _prepare_data(config: str, overrides: list[str]) -> str:
    """Build (or find cached) the tokenizer and token stream before any worker starts."""
    from recipes.gpt.config import load_config
    from recipes.gpt.data import prepare

    cfg = load_config(config, overrides)
    data = prepare(cfg.data)
    return f"{len(data.train):,} training tokens, tokenizer {data.tokenizer.name}"


def _follow(proc: subprocess.Popen[str], attempt: Attempt, lines: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        fields = parse_progress_line(line)
        if fields is not None and fields.get("rank", 0) == 0:
            step = int(fields["step"])
            if not attempt.steps:
                attempt.resumed_from = step - 1
            attempt.steps.append((step, time.monotonic(), fields))


def run_demo(
    *,
    config: str = "tiny",
    steps: int = 300,
    crash_at: int | None = 170,
    every: int = 10,
    workdir: Path = Path("runs/demo"),
    overrides: list[str] | None = None,
) -> int:
    overrides = list(overrides or [])
    if crash_at is not None and not 0 < crash_at < steps:
        console.print(f"[red]error:[/] --crash-at must be between 1 and {steps - 1}")
        return 2
    from recipes.gpt.config import load_config

    load_config(config, overrides)  # a bad setting fails here, before anything is written
    shutil.rmtree(workdir, ignore_errors=True)
    ckpt = workdir / "checkpoints"
    ckpt.mkdir(parents=True)
    console.rule("[bold]ironpod demo: GPT pretraining on the Python standard library")
    with console.status("preparing data (first run trains and caches the tokenizer)"):
        described = _prepare_data(config, overrides)
    console.print(f"data: {described}")
    console.print(
        f"plan: {steps} steps, checkpoint every {every} steps to {ckpt}"
        + (f", worker SIGKILLed after step {crash_at}" if crash_at else "")
    )

    cmd = _worker_cmd(config, steps, ckpt, every, overrides)
    attempts: list[Attempt] = []
    log_lines: list[str] = []
    began = time.monotonic()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("training", total=steps, info="starting")
        pending_crash = crash_at
        while True:
            attempt = Attempt(number=len(attempts), started=time.monotonic())
            attempts.append(attempt)
            worker_env = dict(os.environ)
            worker_env.update({env.JOB_ID: "demo", env.ATTEMPT_ID: str(attempt.number)})
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=worker_env,
                start_new_session=True,
            )
            reader = threading.Thread(target=_follow, args=(proc, attempt, log_lines), daemon=True)
            reader.start()
            while proc.poll() is None:
                if attempt.steps:
                    step, _, fields = attempt.steps[-1]
                    info = f"loss {float(fields['loss']):.3f}  {float(fields['tok_s']):,.0f} tok/s"
                    bar.update(task, completed=step, info=info)
                    if pending_crash is not None and step >= pending_crash:
                        os.killpg(proc.pid, signal.SIGKILL)
                        attempt.killed_at = time.monotonic()
                        bar.console.print(
                            f"[red]crash injected:[/] worker SIGKILLed after step {step}"
                        )
                        pending_crash = None
                time.sleep(0.02)
            reader.join()
            attempt.exit_code = proc.returncode
            if attempt.killed_at is not None:
                continue  # the supervisor's whole job: start it again
            break
        if attempts[-1].steps:
            bar.update(task, completed=attempts[-1].steps[-1][0])

    wall = time.monotonic() - began
    final = attempts[-1]
    if final.exit_code != 0:
        console.print(f"[red]worker failed with exit code {final.exit_code}; last log lines:[/]")
        for line in log_lines[-20:]:
            console.print(f"  {line}", markup=False, highlight=False)
        return 1
    _summary(attempts, wall, steps, ckpt)
    return 0


def _summary(attempts: list[Attempt], wall: float, steps: int, ckpt: Path) -> None:
    durations = [b[1] - a[1] for at in attempts for a, b in itertools.pairwise(at.steps)]
    step_time = statistics.median(durations) if durations else 0.0
    executed = sum(len(a.steps) for a in attempts)
    recomputed = executed - steps
    last = attempts[-1].steps[-1][2]
    stall = sum(float(f.get("ckpt_block_s", 0.0)) for a in attempts for _, _, f in a.steps)
    productive = steps * step_time

    table = Table(title="demo summary", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("steps kept / executed", f"{steps} / {executed}")
    table.add_row("final train loss", f"{float(last['loss']):.4f}")
    if "val_loss" in last:
        table.add_row("held-out loss", f"{float(last['val_loss']):.4f}")
    table.add_row("median step time", f"{step_time * 1000:.1f} ms")
    table.add_row("wall time", f"{wall:.1f} s")
    for prev, nxt in itertools.pairwise(attempts):
        if prev.killed_at is None or not nxt.steps:
            continue
        first_new = next((t for s, t, _ in nxt.steps if s > prev.steps[-1][0]), None)
        table.add_row(
            f"crash after step {prev.steps[-1][0]}",
            f"resumed from step {nxt.resumed_from}, "
            f"{prev.steps[-1][0] - nxt.resumed_from} steps recomputed",
        )
        restart = nxt.steps[0][1] - prev.killed_at
        table.add_row("  restart to first step", f"{restart:.1f} s")
        if first_new is not None:
            table.add_row("  crash to first new step", f"{first_new - prev.killed_at:.1f} s")
    table.add_row("recomputed steps", str(recomputed))
    table.add_row("checkpoint stall (total)", f"{stall * 1000:.0f} ms")
    table.add_row("goodput (ETTR)", f"{productive / wall:.1%} of wall time was kept progress")
    kept = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step-"))
    table.add_row("checkpoints on disk", ", ".join(kept))
    console.print(table)
    console.print(
        "ETTR = kept steps x median step time / wall time; the rest went to process start-up, "
        "data loading, the crash and recomputation."
    )
