"""``ironpod demo``: a local cluster trains the GPT recipe through a crash, a hang and a lost node.

The demo starts a cluster on this machine (a controller and three agents, each a simulated
node), submits a 2-node DDP pretraining job of the GPT recipe on the Python standard library,
and injects real faults at set steps: a worker SIGKILLed (crash), a worker SIGSTOPped (hang:
only the missing progress beacons give it away), and a node's agent and workers SIGKILLed
(node loss). Nobody intervenes: the agents detect, the controller decides, the job resumes
from its newest checkpoint each time. The summary shows each recovery and the goodput ledger.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ironpod.cli import render
from ironpod.client import IronpodClient, JobView, is_terminal
from ironpod.errors import ConfigError

console = Console()
FAULT_KINDS = ("crash", "hang", "node")
JOB = "demo-gpt"


@dataclass
class Fault:
    kind: str
    step: int
    injected_unix: float | None = None
    target: str = ""
    detected_unix: float | None = None
    cause: str = ""
    back_unix: float | None = None
    resumed_step: int | None = None


def parse_faults(text: str, steps: int) -> list[Fault]:
    """``crash@85,hang@155,node@226`` -> faults in step order (``none`` for no faults)."""
    if text.strip() in ("", "none"):
        return []
    faults = []
    for item in text.split(","):
        kind, sep, at = item.strip().partition("@")
        if kind not in FAULT_KINDS or not sep or not at.isdigit():
            raise ConfigError(f"--faults: {item!r} is not KIND@STEP with KIND in {FAULT_KINDS}")
        if not 0 < int(at) < steps:
            raise ConfigError(f"--faults: step {at} is not between 1 and {steps - 1}")
        faults.append(Fault(kind=kind, step=int(at)))
    return sorted(faults, key=lambda f: f.step)


def job_spec(
    steps: int, every: int, ckpt: Path, config: str, overrides: list[str]
) -> dict[str, Any]:
    sets = [
        f"train.steps={steps}",
        "train.parallel=ddp",
        "train.num_threads=1",
        "train.log_every=1000000",
        f"checkpoint.dir={ckpt}",
        f"checkpoint.every={every}",
        "checkpoint.keep_last=3",
        *overrides,
    ]
    command = [sys.executable, "-m", "recipes.gpt.train", "--config", config]
    for item in sets:
        command += ["--set", item]
    return {
        "apiVersion": "ironpod/v1",
        "name": JOB,
        "nodes": 2,
        "nproc_per_node": 1,
        "command": command,
        "workdir": os.getcwd(),
        # Derived hang timeout: 10 x the median step time, at least 4 s (steps here are ~0.1 s).
        "restart": {"max_restarts": 10, "hang_floor_s": 4.0, "hang_factor": 10.0},
    }


def _pid(job: JobView, rank: int) -> int | None:
    attempts = job.get("attempts") or []
    if not attempts or attempts[-1]["state"] != "running":
        return None
    pid = attempts[-1]["ranks"].get(str(rank), {}).get("pid")
    return pid if isinstance(pid, int) else None


def _inject(fault: Fault, job: JobView, api: IronpodClient, home: Path) -> bool:
    from ironpod.cluster import local

    rank = 0 if fault.kind == "hang" else 1
    pid = _pid(job, rank)
    if pid is None:
        return False
    if fault.kind == "crash":
        os.kill(pid, signal.SIGKILL)
        fault.target = f"SIGKILL rank {rank} (pid {pid})"
    elif fault.kind == "hang":
        os.kill(pid, signal.SIGSTOP)
        fault.target = f"SIGSTOP rank {rank} (pid {pid})"
    else:
        attempt = (job.get("attempts") or [])[-1]
        names = {n["id"]: n["name"] for n in api.nodes()}
        node = names[attempt["node_ids"][rank]]
        local.kill_agent(home, node, (pid,))
        fault.target = f"SIGKILL agent and workers of {node}"
    fault.injected_unix = time.time()
    return True


def _follow(
    api: IronpodClient, home: Path, steps: int, faults: list[Fault], timeout_s: float
) -> JobView:
    """Draw progress, inject the faults on schedule, narrate recoveries; until the job ends
    (or ``timeout_s`` passes: a job waiting for nodes it will never get must not hang a demo)."""
    deadline = time.monotonic() + timeout_s
    pending = list(faults)
    after = 0
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("training", total=steps, info="starting")
        while True:
            job = api.job(JOB)
            step = job.get("last_step") or 0
            metrics = job.get("metrics") or {}
            info = f"{job['state']}"
            if "loss" in metrics:
                rate = float(metrics.get("tok_s", 0))
                info += f"  loss {float(metrics['loss']):.3f}  {rate:,.0f} tok/s"
            bar.update(task, completed=step, info=info)
            if pending and step >= pending[0].step and _inject(pending[0], job, api, home):
                fault = pending.pop(0)
                bar.console.print(f"[red]fault[/] after step {step}: {fault.kind}: {fault.target}")
            for ev in api.events(job=JOB, after=after):
                after = ev["id"]
                _note(ev, faults, bar.console)
            if is_terminal(job):
                return job
            if time.monotonic() > deadline:
                bar.console.print(f"[red]gave up after {timeout_s:.0f} s:[/] {job['reason']}")
                return job
            time.sleep(0.2)


def _note(ev: Any, faults: list[Fault], out: Console) -> None:
    open_faults = [f for f in faults if f.injected_unix and f.detected_unix is None]
    if ev["kind"] == "fault_detected" and open_faults:
        fault = open_faults[0]
        fault.detected_unix = float(ev["data"].get("detected_unix") or ev["time_unix"])
        fault.cause = ev["cause"]
        lag = fault.detected_unix - (fault.injected_unix or 0)
        out.print(f"  [yellow]detected[/] in {lag:.1f} s: {ev['cause']}")
    elif ev["kind"] == "attempt_created" and ev["cause"] != "scheduled":
        out.print(f"  [cyan]decided[/]: {ev['cause']} on {', '.join(ev['data'].get('nodes', []))}")
    elif ev["kind"] == "first_step":
        waiting = [f for f in faults if f.detected_unix and f.back_unix is None]
        if waiting:
            fault = waiting[0]
            fault.back_unix = ev["time_unix"]
            fault.resumed_step = ev["data"].get("step")
            lag = fault.back_unix - (fault.injected_unix or 0)
            out.print(
                f"  [green]training again[/] at step {fault.resumed_step}, "
                f"{lag:.1f} s after the fault"
            )


def _summary(job: JobView, faults: list[Fault], api: IronpodClient) -> None:
    names = {n["id"]: n["name"] for n in api.nodes()}
    console.print(render.attempts_table(job.get("attempts") or [], names))
    if faults:
        table = render.table(
            "FAULT", "INJECTED", "DETECTED AFTER", "TRAINING AGAIN AFTER", "RESUMED AT", "CAUSE",
            title="faults and recoveries (seconds after injection)",
        )  # fmt: skip
        for f in faults:
            base = f.injected_unix or 0
            table.add_row(
                f"{f.kind}@{f.step}",
                f.target,
                render.duration(f.detected_unix - base) if f.detected_unix else "-",
                render.duration(f.back_unix - base) if f.back_unix else "-",
                str(f.resumed_step) if f.resumed_step is not None else "-",
                f.cause,
            )
        console.print(table)
    if "goodput" in job:
        console.print(render.goodput_table(job["goodput"]))
    metrics = job.get("metrics") or {}
    console.print(
        f"job {job['state']}: {job['reason']}; final loss {metrics.get('loss', '?')}, "
        f"held-out loss {metrics.get('val_loss', '?')}"
    )


def run_demo(
    *,
    config: str = "tiny",
    steps: int = 300,
    faults: str = "crash@85,hang@155,node@226",
    every: int = 10,
    workdir: Path = Path("runs/demo"),
    overrides: list[str] | None = None,
) -> int:
    from ironpod.cluster import local
    from recipes.gpt.config import load_config
    from recipes.gpt.data import prepare

    overrides = list(overrides or [])
    schedule = parse_faults(faults, steps)
    cfg = load_config(config, overrides)  # a bad setting fails here, before anything is written
    workdir = workdir.resolve()
    home = workdir / "cluster"
    if local.read_cluster(home) is not None:
        local.down(home)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    console.rule("[bold]ironpod demo: GPT pretraining on a cluster that fails")
    with console.status("preparing data (the first run trains and caches the tokenizer)"):
        data = prepare(cfg.data)
    console.print(f"data: {len(data.train):,} training tokens, tokenizer {data.tokenizer.name}")
    with console.status("starting a controller and 3 agents (simulated nodes)"):
        info = local.up(3, home, heartbeat_interval_s=0.5, node_lost_after_s=3.0)
    try:
        with info.admin_client() as api:
            api.submit(job_spec(steps, every, workdir / "checkpoints", config, overrides))
            plan = ", ".join(f"{f.kind} after step {f.step}" for f in schedule) or "no faults"
            console.print(f"job {JOB}: 2 nodes x 1 rank (DDP), {steps} steps; faults: {plan}")
            job = _follow(api, home, steps, schedule, timeout_s=120 + 2.0 * steps)
            _summary(api.job(JOB), schedule, api)
            return 0 if job["state"] == "succeeded" else 1
    finally:
        with console.status("stopping the cluster"):
            local.down(home)
