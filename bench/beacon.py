"""Cost of progress beacons on the training thread, against their ~50 microsecond budget.

    python bench/beacon.py                  # ~1-2 minutes
    python bench/beacon.py --interval-ms 0  # progress() back to back
    python bench/beacon.py --quick          # tiny sizes: seconds (the smoke test)

Three measurements, all with an agent process reading the socket, as in production (Linux
queues only ``net.unix.max_dgram_qlen``, default 10, unread datagrams per socket; beyond that a
sender gets EAGAIN, counted as a drop):

1. :func:`ironpod.train.progress`'s sender in three set-ups, side by side: the datagram alone,
   the log line alone (to /dev/null), and both (what a worker under an agent does); and the
   step hook's call alone (:mod:`ironpod.agent.stephook`, what an unmodified script pays per
   optimizer step). Median and 99th percentile per call: the tail is what a step would feel.
2. The step hook in a training loop: a tiny model (Linear 64 -> 64, SGD) stepped ``--steps``
   times with the hook registered and then without it, alternating, ``--runs`` times each, in an
   interpreter that armed the hook the way a worker does (its directory on PYTHONPATH). The
   median per-step time of each and their difference is the hook's cost per step.
3. Interpreter start-up with and without the hook: ``python -c pass`` and ``python -c 'import
   torch'``, alternating, ``--startup-runs`` each, the median wall time. The hook's module is
   byte-compiled first, as pip does when it installs the wheel.

Timings on a shared machine are noisy; compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.synchronize
import os
import py_compile
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ironpod import env
from ironpod.agent import stephook
from ironpod.train.beacon import BeaconSender

BUDGET_US = 50.0

#: Runs in a fresh interpreter started with the hook on PYTHONPATH: it must not import
#: ironpod.train (the hook stands down for scripts that report their own steps).
_LOOP = r"""
import json, statistics, sys, time
import torch
from torch.optim import optimizer as optimizer_module

steps, runs, calls, interval_s = (float(a) for a in sys.argv[1:5])
site = sys.modules["sitecustomize"]
assert site._armed, "the step hook did not arm"
beacon = site._armed[0]
hooks = optimizer_module._global_optimizer_post_hooks
armed = dict(hooks)
torch.manual_seed(0)
torch.set_num_threads(1)
model = torch.nn.Linear(64, 64)
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(8, 64)

def block(n):
    began = time.perf_counter()
    for _ in range(n):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - began) / n * 1e6

block(200)  # warm-up
on, off = [], []
for run in range(int(runs)):
    for hooked in ((True, False) if run % 2 == 0 else (False, True)):
        hooks.clear()
        if hooked:
            hooks.update(armed)
        (on if hooked else off).append(block(int(steps)))
hooks.clear()
hooks.update(armed)
alone = []
for _ in range(int(calls)):
    t0 = time.perf_counter_ns()
    beacon(opt, (), {})
    alone.append((time.perf_counter_ns() - t0) / 1000)
    time.sleep(interval_s)
print(json.dumps({"on": on, "off": off, "alone": alone, "sent": beacon.sent,
                  "dropped": beacon.dropped}))
"""


def measure(sender: BeaconSender, n: int, interval_s: float) -> list[float]:
    """Time ``n`` sends, one every ``interval_s`` (a step rate faster than any real training)."""
    samples = []
    metrics = {"loss": 2.345678, "tok_s": 17500.0, "lr": 3e-4, "grad_norm": 0.91}
    for step in range(n):
        t0 = time.perf_counter_ns()
        sender.send(step, metrics)
        samples.append((time.perf_counter_ns() - t0) / 1000)
        time.sleep(interval_s)
    return samples


def _agent(path: str, ready: multiprocessing.synchronize.Event) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    ready.set()
    while True:
        sock.recv(65536)


def _hooked_env(socket_path: str | None) -> dict[str, str]:
    """The environment of a worker with the hook (socket given) or without it (None)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("IRONPOD_")}
    out.setdefault("OMP_NUM_THREADS", "1")
    if socket_path is None:
        return out
    out["PYTHONPATH"] = stephook.pythonpath(out.get("PYTHONPATH"))
    out[env.BEACON_SOCKET] = socket_path
    out["RANK"] = "0"
    return out


def _row(table: Table, name: str, samples: list[float], dropped: int) -> None:
    p99 = statistics.quantiles(samples, n=100)[98]
    table.add_row(
        name,
        f"{statistics.median(samples):.1f}",
        f"{p99:.1f}",
        f"{max(samples):.0f}",
        str(dropped),
        "yes" if p99 <= BUDGET_US else "NO",
    )


def sender_table(path: str, args: argparse.Namespace, loop: dict[str, object]) -> Table:
    title = f"Beacon cost per call: {args.n} calls, one per {args.interval_ms} ms"
    table = Table(title=f"{title} (budget {BUDGET_US} us)")
    for col in ("set-up", "median us", "p99 us", "max us", "dropped", "within budget (p99)"):
        table.add_column(col, justify="left" if col == "set-up" else "right")
    with open(os.devnull, "w") as devnull:
        setups = {
            "progress(): datagram only": BeaconSender(socket_path=path, rank=0, log=False),
            "progress(): log line only": BeaconSender(socket_path=None, rank=0, stream=devnull),
            "progress(): datagram + log line": BeaconSender(
                socket_path=path, rank=0, stream=devnull
            ),
        }
        for name, sender in setups.items():
            _row(table, name, measure(sender, args.n, args.interval_ms / 1000), sender.dropped)
            sender.close()
    alone = loop["alone"]
    assert isinstance(alone, list)
    _row(table, "step hook: the post-step call", alone, int(str(loop["dropped"])))
    return table


def loop_table(loop: dict[str, object], args: argparse.Namespace) -> Table:
    on, off = loop["on"], loop["off"]
    assert isinstance(on, list) and isinstance(off, list)
    cost = statistics.median(on) - statistics.median(off)
    table = Table(
        title=f"Step hook in a training loop: {args.steps} steps x {args.runs} runs each, "
        f"alternating (tiny model)"
    )
    for col in ("hook", "median us/step", "min us/step", "max us/step"):
        table.add_column(col, justify="left" if col == "hook" else "right")
    table.add_row("off", f"{statistics.median(off):.1f}", f"{min(off):.1f}", f"{max(off):.1f}")
    table.add_row("on", f"{statistics.median(on):.1f}", f"{min(on):.1f}", f"{max(on):.1f}")
    verdict = "within" if cost <= BUDGET_US else "OVER"
    table.caption = (
        f"hook cost: {cost:+.1f} us a step ({verdict} the {BUDGET_US:g} us budget); "
        f"beacons sent {loop['sent']}, dropped {loop['dropped']}"
    )
    return table


def _time_run(argv: list[str], environ: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(argv, env=environ, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - began) * 1000


def startup_table(path: str, runs: int) -> Table:
    py_compile.compile(str(Path(stephook.DIRECTORY) / "sitecustomize.py"), doraise=True)
    table = Table(title=f"Interpreter start-up, median of {runs} alternating runs")
    for col in ("command", "without hook ms", "with hook ms", "difference ms"):
        table.add_column(col, justify="left" if col == "command" else "right")
    for code in ("pass", "import torch"):
        argv = [sys.executable, "-c", code]
        times: dict[bool, list[float]] = {True: [], False: []}
        for run in range(runs):
            for hooked in (True, False) if run % 2 == 0 else (False, True):
                times[hooked].append(_time_run(argv, _hooked_env(path if hooked else None)))
        without, with_ = statistics.median(times[False]), statistics.median(times[True])
        table.add_row(
            f"python -c {code!r}", f"{without:.1f}", f"{with_:.1f}", f"{with_ - without:+.1f}"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5_000, help="beacons per set-up")
    parser.add_argument(
        "--interval-ms", type=float, default=0.5, help="pause between beacons (a 'step')"
    )
    parser.add_argument("--steps", type=int, default=3_000, help="training steps per run")
    parser.add_argument("--runs", type=int, default=7, help="runs with and without the hook")
    parser.add_argument("--startup-runs", type=int, default=15, help="start-ups per set-up")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps, args.runs, args.startup_runs = 200, 100, 2, 2
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "agent.sock")
        ready = multiprocessing.Event()
        agent = multiprocessing.Process(target=_agent, args=(path, ready), daemon=True)
        agent.start()
        ready.wait(10)
        sizes = (args.steps, args.runs, args.n, args.interval_ms / 1000)
        child = subprocess.run(
            [sys.executable, "-c", _LOOP, *map(str, sizes)],
            env=_hooked_env(path),
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode != 0:
            sys.exit(f"error: the training loop failed:\n{child.stderr[-2000:]}")
        loop = json.loads(child.stdout.splitlines()[-1])
        console = Console()
        console.print(sender_table(path, args, loop))
        console.print(loop_table(loop, args))
        console.print(startup_table(path, args.startup_runs))
        agent.terminate()
        agent.join()


if __name__ == "__main__":
    main()
