"""``ironpod chaos``: real faults on the local cluster, to watch ironpod recover from them.

Every fault is a real signal to real processes; nothing is simulated inside ironpod. Worker
pids come from the controller (each rank's last heartbeat), agent pids from ``cluster.json``,
and every pid is checked to be a process of that node's agent before it is signalled, so a
stale pid or a remote cluster can never get a stranger killed.

- ``kill-rank JOB RANK``   SIGKILL one worker: a crash (detected at once by its agent).
- ``stop-rank JOB RANK``   SIGSTOP one worker: a hang (detected by the progress timeout).
- ``kill-agent NODE``      SIGKILL the agent and its workers: a node loss (missed heartbeats).
- ``cut-network NODE``     SIGSTOP the agent and its workers; ``heal NODE`` sends SIGCONT.
  A simulated node on one machine has no network of its own, so freezing its processes is
  the closest real equivalent: heartbeats stop and its ranks stop answering collectives. On
  hosts in network namespaces, the test fixture instead takes the link down
  (``ip link set <veth> down``), which also leaves the processes running.
- ``restart-agent NODE``   start a node's agent again (after ``kill-agent``).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Annotated, Any

import typer

from ironpod.cli.common import client, console, fail, home
from ironpod.cli.render import clock
from ironpod.client import AttemptView, IronpodClient, is_terminal
from ironpod.cluster import local

app = typer.Typer(
    no_args_is_help=True,
    help="Inject real faults into the local cluster (`ironpod up`) to watch recovery.",
)

JobRef = Annotated[str, typer.Argument(help="job name or id")]
Rank = Annotated[int, typer.Argument(min=0, help="global rank")]
NodeName = Annotated[str, typer.Argument(help="node name, e.g. node-1")]


def _local_api(ctx: typer.Context) -> tuple[IronpodClient, local.ClusterInfo]:
    where = home()
    info = local.require_cluster(where)
    api = client(ctx)
    if api.url != info.url.rstrip("/"):
        api.close()
        fail(
            f"chaos acts on the local cluster in {where} ({info.url}), but the CLI points at "
            f"{api.url}",
            2,
        )
    return api, info


def _current_attempt(api: IronpodClient, ref: str) -> tuple[dict[str, Any], AttemptView]:
    job = api.job(ref)
    attempts = job.get("attempts") or []
    if is_terminal(job) or not attempts or attempts[-1]["state"] not in {"starting", "running"}:
        fail(f"job {job['name']} (id {job['id']}) has no running attempt ({job['state']})")
    return dict(job), attempts[-1]


def _rank_target(api: IronpodClient, ref: str, rank: int) -> tuple[str, int, str]:
    """(node name, pid, description) of a rank of the job's running attempt."""
    job, attempt = _current_attempt(api, ref)
    spec = job["spec"]
    per = int(spec.get("nproc_per_node", 1))
    world = int(spec.get("nodes", 1)) * per
    if rank >= world:
        fail(f"rank {rank} is not within world size {world}", 2)
    status = attempt["ranks"].get(str(rank)) or {}
    pid = status.get("pid")
    if not isinstance(pid, int):
        fail(f"rank {rank} of attempt {attempt['number']} has not reported a pid yet; try again")
    if status.get("state") == "exited":
        fail(f"rank {rank} of attempt {attempt['number']} has already exited")
    names = {n["id"]: n["name"] for n in api.nodes()}
    node = names.get(attempt["node_ids"][rank // per], "?")
    if not local.is_worker_of(home(), node, pid):
        fail(f"pid {pid} (rank {rank}) is not a worker of the local agent of {node}")
    what = f"rank {rank} of job {job['name']} (attempt {attempt['number']}, pid {pid} on {node})"
    return node, pid, what


def _signal_worker(pid: int, sig: signal.Signals) -> None:
    """Workers lead their own process group: signal it all (their own children too)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        fail(f"pid {pid} is gone already")


@app.command("kill-rank")
def kill_rank(ctx: typer.Context, job: JobRef, rank: Rank) -> None:
    """SIGKILL one worker (a crash)."""
    api, _ = _local_api(ctx)
    with api:
        _, pid, what = _rank_target(api, job, rank)
    _signal_worker(pid, signal.SIGKILL)
    console.print(f"{clock(time.time())} SIGKILL {what}")


@app.command("stop-rank")
def stop_rank(ctx: typer.Context, job: JobRef, rank: Rank) -> None:
    """SIGSTOP one worker (a hang: alive, silent)."""
    api, _ = _local_api(ctx)
    with api:
        _, pid, what = _rank_target(api, job, rank)
    _signal_worker(pid, signal.SIGSTOP)
    console.print(f"{clock(time.time())} SIGSTOP {what}")


def _node_worker_pids(api: IronpodClient, node: str) -> tuple[int, ...]:
    """Pids the controller last heard of for the ranks this node runs."""
    found = {n["name"]: n for n in api.nodes()}
    view = found.get(node)
    if view is None or view["attempt_id"] is None:
        return ()
    for job in api.jobs():
        if is_terminal(job):
            continue
        for attempt in api.job(job["id"]).get("attempts") or []:
            if attempt["id"] != view["attempt_id"]:
                continue
            per = int(job["spec"].get("nproc_per_node", 1))
            slot = attempt["node_ids"].index(view["id"])
            ranks = range(slot * per, (slot + 1) * per)
            pids = (attempt["ranks"].get(str(r), {}).get("pid") for r in ranks)
            return tuple(p for p in pids if isinstance(p, int))
    return ()


@app.command("kill-agent")
def kill_agent(ctx: typer.Context, node: NodeName) -> None:
    """SIGKILL a node's agent and all its workers (a node loss)."""
    api, _ = _local_api(ctx)
    with api:
        extra = _node_worker_pids(api, node)
    killed = local.kill_agent(home(), node, extra)
    console.print(f"{clock(time.time())} SIGKILL {node}: agent and {len(killed) - 1} worker(s)")


@app.command("cut-network")
def cut_network(ctx: typer.Context, node: NodeName) -> None:
    """Freeze a node's agent and workers (SIGSTOP): no heartbeats, no collectives.

    A simulated node has no network of its own; on hosts in network namespaces the tests
    take the node's link down instead (`ip link set <veth> down`).
    """
    _local_api(ctx)[0].close()
    frozen = local.signal_node(home(), node, signal.SIGSTOP)
    console.print(f"{clock(time.time())} SIGSTOP {node}: {len(frozen)} process(es) frozen")


@app.command()
def heal(ctx: typer.Context, node: NodeName) -> None:
    """Undo cut-network (SIGCONT)."""
    _local_api(ctx)[0].close()
    woken = local.signal_node(home(), node, signal.SIGCONT)
    console.print(f"{clock(time.time())} SIGCONT {node}: {len(woken)} process(es) resumed")


@app.command("restart-agent")
def restart_agent(ctx: typer.Context, node: NodeName) -> None:
    """Start a node's agent again (stopping it first if it runs) and wait until it joins."""
    _local_api(ctx)[0].close()
    agent = local.restart_agent(home(), node)
    console.print(f"{clock(time.time())} {node}: agent running again (pid {agent.pid})")


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="chaos")
