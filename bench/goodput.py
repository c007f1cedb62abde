"""Goodput under faults: ironpod against bare torchrun, with each system's defaults.

    python bench/goodput.py                  # both workloads, every system: about 20 minutes
    python bench/goodput.py --quick          # short runs, 1 crash each: the smoke test
    python bench/goodput.py --workloads script --seed 3 --json goodput.json

Two workloads, each run under every system through the same seeded fault schedule (one fault
per equal slice of the run, kinds shuffled and ranks drawn by ``--seed``; a fault fires once
rank 0 reports its step, and only after the previous one was recovered from), and each system
once more without faults, in the same invocation:

* ``script``: an unmodified DDP script (bench/scripts/ddp_torch_save.py: no ironpod import,
  gloo with a 60 s timeout, its own ``torch.save`` checkpoint every 25 steps), 300 steps on one
  node x 2 ranks, 3 crashes and 1 hang. Systems: ``ironpod-launch`` (``ironpod launch
  --nproc-per-node 2 --max-restarts 20 script.py``, nothing else) and ``torchrun``
  (``torchrun --standalone --nproc-per-node 2 --max-restarts 20 script.py``), and
  ``torchrun-fresh``, the same with a fresh worker store per restart (see below).
* ``recipe``: the GPT recipe (``ironpod.train``: beacons, its checkpointer), tiny preset, DDP
  over gloo, 2 nodes x 1 rank, a checkpoint every 20 steps, 240 steps, 2 crashes, 1 hang and 1
  node loss. Systems: ``ironpod`` (a standing local cluster, ``ironpod up``, with a spare per
  node loss; the job submitted with the product's defaults, among them the recipe's memory
  tier: a snapshot in node memory, copied to a peer, as often as 1% of the step time allows),
  ``ironpod-durable`` (the same without the memory tier: durable checkpoints only),
  ``torchrun`` (two c10d agents on one endpoint, as on two hosts) and ``torchrun-fresh`` (the
  same with
  ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default torchrun's workers share the agent's
  store across restarts and may read the previous round's addresses, pytorch#135712, which
  fails or stalls restarts on torch 2.13 CPU).

Nothing is tuned: the product's hang rule, quarantine policy and thread defaults apply, and
every launcher sets ``OMP_NUM_THREADS`` its own way (the bench's environment has none).

Faults, real signals to real processes. crash: SIGKILL a rank's worker. hang: SIGSTOP a rank's
worker; ironpod sees its progress stop (beacons of ``ironpod.train``, or of the optimizer-step
hook in an unmodified script), torchrun learns of it when the peer's collective times out (the
script's 60 s; the recipe's ``IRONPOD_DIST_TIMEOUT_S`` = ``--dist-timeout``, 60 s) and then
waits 30 s for the stopped worker to obey SIGTERM. node loss (recipe): ironpod: ``kill_agent``
(agent and workers SIGKILLed), the controller moves the job to the spare; torchrun: SIGKILL an
agent and its workers and start a replacement agent ``--replace-delay`` s later (0: the best
case). The node lost is node rank 1, whose agent does not host torchrun's c10d store.

Measured the same way for every system from rank 0's lines in the files each system writes
(goodput_kit/measure.py), stamped when read every 25 ms:

* wall: launch to the end (job succeeded, launcher exited).
* median step: of windows of 8 consecutive steps of a run (saves and evals included).
* ETTR: steps kept x the *yardstick* / wall, where the yardstick is bare torchrun's fault-free
  median step on the workload in this invocation: a system whose steps run slower shows a lower
  ETTR. The fault-free ceiling is the ETTR of the system's own fault-free run (start-up and
  checkpoint saves keep it below 1); ETTR / ceiling is the share of that ceiling kept under
  faults; wall / fault-free wall says what the faults cost in time.
* per fault, seconds after the injection: detected (ironpod's ``fault_detected`` event,
  torchrun's ``Worker group FAILED``), first step (of a new run), recovered (a step of a new
  run beyond the failed run's last: recomputation included); MTTR per fault kind: the mean
  of recovered.
* steps lost: steps run more than once. restarts: ironpod's attempts minus one; torchrun's
  rendezvous rounds of its longest-lived agent minus one.
* final loss: every workload's resumes are exact, so every finished run ends on the same loss.

A run not done after ``--cap`` s, or without a new step for ``--stall-limit`` s, is stopped and
reported as not finished, with the reason. A 2-core machine runs every node, shared with
whatever else runs there: compare the ratios of one invocation, not absolute seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from goodput_kit.measure import Fault, Limits, RunResult, describe, make_schedule, run
from goodput_kit.report import LABEL, report
from goodput_kit.systems import ROOT, SYSTEMS, Settings, System, Workload
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from recipes.gpt.config import load_config
from recipes.gpt.data import prepare
from recipes.gpt.model import Transformer

WORKLOADS = ("script", "recipe")
#: Defaults of the flags that ``--quick`` changes.
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        steps=240,
        checkpoint_every=20,
        seq_len=128,
        crashes=2,
        hangs=1,
        node_losses=1,
        script_steps=300,
        script_every=25,
        script_crashes=3,
        script_hangs=1,
        recipe_systems="ironpod,ironpod-durable,torchrun,torchrun-fresh",
        script_systems="ironpod-launch,torchrun,torchrun-fresh",
        cap=600.0,
        stall_limit=180.0,
    ),
    "quick": dict(
        steps=30,
        checkpoint_every=5,
        seq_len=64,
        crashes=1,
        hangs=0,
        node_losses=0,
        script_steps=30,
        script_every=5,
        script_crashes=1,
        script_hangs=0,
        recipe_systems="ironpod",
        script_systems="ironpod-launch,torchrun-fresh",
        cap=240.0,  # generous: on a loaded 2-core machine a start-up alone took over 60 s
        stall_limit=150.0,
    ),
}


def recipe_workload(args: argparse.Namespace) -> Workload:
    sets = [
        f"train.steps={args.steps}",
        "train.parallel=ddp",
        "train.num_threads=1",
        "train.deterministic=true",
        "train.log_every=1000000",
        f"checkpoint.every={args.checkpoint_every}",
        "checkpoint.keep_last=2",
        f"data.seq_len={args.seq_len}",
        f"data.max_bytes={args.max_bytes}",
    ]
    argv = ["-m", "recipes.gpt.train", "--config", "tiny"]
    argv += [a for item in [*sets, "checkpoint.dir={ckpt}"] for a in ("--set", item)]
    return Workload(name="recipe", argv=argv, steps=args.steps, nodes=2, nproc_per_node=1, env={})


def script_workload(args: argparse.Namespace) -> Workload:
    script = str(ROOT / "bench" / "scripts" / "ddp_torch_save.py")
    argv = [script, "--dir", "{ckpt}", "--steps", str(args.script_steps)]
    argv += ["--every", str(args.script_every), "--width", str(args.script_width)]
    return Workload(
        name="script", argv=argv, steps=args.script_steps, nodes=1, nproc_per_node=2, env={}
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Goodput under faults: ironpod vs bare torchrun.")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="script,recipe (both)")
    p.add_argument("--seed", type=int, default=0, help="fault schedule seed (default 0)")
    p.add_argument("--max-restarts", type=int, default=20, help="every system (default 20)")
    p.add_argument("--no-fault-free", action="store_true", help="skip the fault-free runs")
    g = p.add_argument_group("script workload")
    g.add_argument("--script-steps", type=int, help="steps (default 300)")
    g.add_argument("--script-every", type=int, help="its checkpoint every N steps (25)")
    g.add_argument(
        "--script-width", type=int, default=512, help="its layers' width: the step's cost (512)"
    )
    g.add_argument("--script-crashes", type=int, help="worker SIGKILLs (default 3)")
    g.add_argument("--script-hangs", type=int, help="worker SIGSTOPs (default 1)")
    g.add_argument("--script-systems", help="from ironpod-launch, torchrun(-fresh) (all)")
    g = p.add_argument_group("recipe workload")
    g.add_argument("--steps", type=int, help="training steps (default 240)")
    g.add_argument("--checkpoint-every", type=int, help="K: save every K steps (default 20)")
    g.add_argument("--crashes", type=int, help="worker SIGKILLs (default 2)")
    g.add_argument("--hangs", type=int, help="worker SIGSTOPs (default 1)")
    g.add_argument("--node-losses", type=int, help="agent + workers SIGKILLed (default 1)")
    g.add_argument("--recipe-systems", help="from ironpod, ironpod-durable, torchrun(-fresh)")
    g.add_argument("--dist-timeout", type=float, default=60.0, help="collective timeout, s")
    g.add_argument("--replace-delay", type=float, default=0.0, help="torchrun: s to a new node")
    g.add_argument("--pin-cpus", action="store_true", help="keep the local cluster's CPU shares")
    g.add_argument("--seq-len", type=int, help="tokens per sequence (default 128, quick 64)")
    g.add_argument("--max-bytes", type=int, default=2_000_000, help="corpus cap (default 2 MB)")
    p.add_argument("--cap", type=float, help="seconds per run before giving up (default 600)")
    p.add_argument("--stall-limit", type=float, help="seconds without a new step (default 180)")
    p.add_argument("--quick", action="store_true", help="smoke test: short runs, 1 crash each")
    p.add_argument("--dir", type=Path, help="where the temporary folder goes (default $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep logs and checkpoints, print where")
    p.add_argument("--json", type=Path, help="write the raw numbers here")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads: choose from {', '.join(WORKLOADS)}")
    for key, allowed in (
        ("recipe_systems", {"ironpod", "ironpod-durable", "torchrun", "torchrun-fresh"}),
        ("script_systems", {"ironpod-launch", "torchrun", "torchrun-fresh"}),
    ):
        chosen = [s.strip() for s in getattr(args, key).split(",") if s.strip()]
        if not chosen or set(chosen) - allowed:
            p.error(f"--{key.replace('_', '-')}: choose from {', '.join(sorted(allowed))}")
        setattr(args, key, chosen)
    counts = (args.crashes, args.hangs, args.node_losses, args.script_crashes, args.script_hangs)
    if min(counts) < 0:
        p.error("fault counts must not be negative")
    for steps, every in (
        (args.steps, args.checkpoint_every),
        (args.script_steps, args.script_every),
    ):
        if every < 1 or steps < 2 * every + 2:
            p.error("steps must leave room for faults: at least 2 x the checkpoint interval + 2")
    return args


@contextlib.contextmanager
def workspace(args: argparse.Namespace, console: Console) -> Iterator[Path]:
    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="ironpod-goodput-", dir=args.dir))
    try:
        yield root
    finally:
        if args.keep:
            console.print(f"logs and checkpoints kept in {root}", style="dim")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_json(r: RunResult) -> dict[str, Any]:
    final = r.final()
    return {
        "workload": r.workload,
        "system": r.system,
        "fault_free": r.fault_free,
        "finished": r.finished,
        "reason": r.reason,
        "wall_s": r.wall,
        "median_step_s": r.median_step,
        "yardstick_s": r.yardstick_s,
        "steps_kept": r.kept,
        "steps_executed": len(r.executed),
        "steps_recomputed": r.recomputed,
        "restarts": r.restarts,
        "ettr": r.ettr,
        "mttr_s": r.mean_after("recovered_t"),
        "faults": [
            {
                **asdict(f),
                "detected_s": f.after(f.detected_t),
                "first_step_s": f.after(f.first_step_t),
                "recovered_s": f.after(f.recovered_t),
            }
            for f in r.faults
        ],
        "final_loss": final.loss if final else None,
        "extra": r.extra,
        "progress": [[ln.t - r.started_t, ln.step, ln.loss] for ln in r.executed],
    }


def plan(args: argparse.Namespace) -> list[tuple[Workload, type[System], list[Fault]]]:
    """Every run of this invocation: per workload its faulted runs, then its fault-free ones
    (torchrun-fresh has none of its own: without a restart it is torchrun)."""
    out: list[tuple[Workload, type[System], list[Fault]]] = []
    for name in args.workloads:
        if name == "script":
            work, systems = script_workload(args), args.script_systems
            counts = {"crash": args.script_crashes, "hang": args.script_hangs}
            every, ranks = args.script_every, 2
        else:
            work, systems = recipe_workload(args), args.recipe_systems
            counts = {"crash": args.crashes, "hang": args.hangs, "node loss": args.node_losses}
            every, ranks = args.checkpoint_every, 2
        faults = make_schedule(work.steps, every, counts, args.seed, ranks=ranks, lose_rank=1)
        out += [(work, SYSTEMS[s], faults) for s in systems]
        if not args.no_fault_free:
            free = list(dict.fromkeys("torchrun" if s == "torchrun-fresh" else s for s in systems))
            out += [(work, SYSTEMS[s], []) for s in free]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    settings = Settings(
        max_restarts=args.max_restarts,
        dist_timeout_s=args.dist_timeout,
        node_losses=args.node_losses,
        replace_delay_s=args.replace_delay,
        pin_cpus=args.pin_cpus,
    )
    runs = plan(args)
    if "recipe" in args.workloads:
        cfg = load_config(
            "tiny", [f"data.seq_len={args.seq_len}", f"data.max_bytes={args.max_bytes}"]
        )
        prepare(cfg.data)  # tokenize once, here, so no worker pays for it
        params = Transformer(cfg.model, seed=0).num_params()
        console.print(
            f"recipe: GPT tiny preset, {params / 1e6:.2f}M params, {cfg.data.seq_len} tokens x "
            f"{cfg.train.global_batch} sequences a step, DDP over gloo, 2 nodes x 1 rank, "
            f"{args.steps} steps, checkpoint every {args.checkpoint_every}",
            highlight=False,
        )
    if "script" in args.workloads:
        console.print(
            f"script: bench/scripts/ddp_torch_save.py, 1 node x 2 ranks, {args.script_steps} "
            f"steps, its torch.save checkpoint every {args.script_every}",
            highlight=False,
        )
    for work in args.workloads:
        faults = next(f for w, _, f in runs if w.name == work)
        what = ", ".join(f"{describe(f.kind, f.rank)} at step {f.step}" for f in faults)
        console.print(f"{work} faults (seed {args.seed}): {what or 'none'}", highlight=False)
    console.print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; every system: --max-restarts "
        f"{args.max_restarts}, its own defaults otherwise",
        highlight=False,
    )
    limits = Limits(cap_s=args.cap, stall_s=args.stall_limit)
    started = time.time()
    results: list[RunResult] = []
    columns = (
        TextColumn("{task.description:<36}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with workspace(args, console) as root, Progress(*columns, console=Console(stderr=True)) as bar:
        for i, (work, cls, faults) in enumerate(runs):
            name = f"{work.name}: {LABEL[cls.name]}" + ("" if faults else " (fault-free)")
            system = cls(root, work, settings, index=i, faulted=bool(faults))
            results.append(run(system, faults, limits, bar, name))
    notes = report(console, results)
    wall = time.time() - started
    console.print(
        f"wall time {wall:.0f} s. A 2-core shared machine: compare the ratios.", style="dim"
    )
    if args.json:
        raw = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "schedule": {w.name: [asdict(f) for f in fs] for w, _, fs in runs if fs},
            "wall_s": wall,
            "notes": notes,
            "runs": [run_json(r) for r in results],
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
