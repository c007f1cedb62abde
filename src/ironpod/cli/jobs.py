"""Jobs: ``submit``, ``run``, ``jobs``, ``describe``, ``logs``, ``cancel``, ``wait``.

Exit codes scripts can rely on: ``wait`` (and ``run``/``submit`` with ``--follow``) end 0 when
the job succeeded and 1 when it failed or was cancelled, 124 when ``--timeout`` ran out; any
command ends 2 when its input was wrong (a spec field, an unknown job), 1 when the controller
could not be reached.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ironpod.cli import render
from ironpod.cli.common import (
    EXIT_TIMEOUT,
    client,
    console,
    err_console,
    fail,
    parse_pairs,
    print_json,
)
from ironpod.cli.follow import POLL_S, read_all, tail_logs, watch
from ironpod.client import IronpodClient, JobView, is_terminal
from ironpod.spec import API_VERSION, JobSpec, load_spec, parse_spec

JobRef = Annotated[str, typer.Argument(help="job name (newest of that name) or id")]
JsonFlag = Annotated[bool, typer.Option("--json", help="print the API's JSON instead")]
FollowFlag = Annotated[
    bool, typer.Option("--follow", "-f", help="show progress until the job ends; exit as `wait`")
]


def _submit(api: IronpodClient, spec: JobSpec) -> JobView:
    job = api.submit(spec.model_dump(mode="json", by_alias=True))
    console.print(f"submitted job {job['name']} (id {job['id']}): {job['state']}")
    return job


def _finish(job: JobView) -> None:
    """Print the final state; exit 0 only if the job succeeded (what scripts test)."""
    line = f"job {job['name']} (id {job['id']}) {job['state']}: {job['reason']}"
    if job["state"] == "succeeded":
        console.print(line)
        return
    err_console.print(line)
    raise typer.Exit(1)


def _follow(api: IronpodClient, ref: str) -> None:
    try:
        job = watch(api, ref)
    except KeyboardInterrupt:
        err_console.print(f"stopped following; the job runs on (`ironpod cancel {ref}` stops it)")
        raise typer.Exit(130) from None
    _finish(job)


def submit(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="job spec (YAML)")],
    follow: FollowFlag = False,
) -> None:
    """Submit a job spec file."""
    spec = load_spec(file)  # validated here: a bad field is named before anything is sent
    with client(ctx) as api:
        job = _submit(api, spec)
        if follow:
            _follow(api, str(job["id"]))


def run(
    ctx: typer.Context,
    command: Annotated[list[str], typer.Argument(help="the command to run, after `--`")],
    name: Annotated[str | None, typer.Option(help="job name [default: from the command]")] = None,
    nodes: Annotated[int, typer.Option(min=1, help="nodes")] = 1,
    nproc_per_node: Annotated[int, typer.Option(min=1, help="worker processes per node")] = 1,
    team: Annotated[str, typer.Option(help="team, for fair sharing")] = "default",
    priority: Annotated[int, typer.Option(help="-1000..1000, higher first")] = 0,
    checkpoint_dir: Annotated[
        str | None, typer.Option(help="durable checkpoints (path or fsspec URL)")
    ] = None,
    max_restarts: Annotated[
        int | None, typer.Option(min=0, help="restarts allowed within the window")
    ] = None,
    hang_timeout: Annotated[
        float | None, typer.Option(help="seconds without progress that make a hang")
    ] = None,
    progress_regex: Annotated[
        str | None, typer.Option(help="a log line matching this counts as progress")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="K=V (repeatable)")] = None,
    workdir: Annotated[
        str | None, typer.Option(help="workers' directory [default: this one, as srun does]")
    ] = None,
    shell: Annotated[bool, typer.Option(help="run the command through /bin/sh -c")] = False,
    follow: FollowFlag = False,
) -> None:
    """Run a command as a job: ironpod run --nodes 2 --nproc-per-node 2 -- python train.py"""
    restart: dict[str, Any] = {}
    if max_restarts is not None:
        restart["max_restarts"] = max_restarts
    if hang_timeout is not None:
        restart["hang_timeout_s"] = hang_timeout
    if progress_regex is not None:
        restart["progress_regex"] = progress_regex
    data: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "name": name or job_name_for(command),
        "team": team,
        "priority": priority,
        "nodes": nodes,
        "nproc_per_node": nproc_per_node,
        "command": [" ".join(command)] if shell else command,
        "shell": shell,
        "env": parse_pairs(env, "--env"),
        "workdir": workdir or os.getcwd(),
        "checkpoint_dir": checkpoint_dir,
        "restart": restart,
    }
    spec = parse_spec(data, source="run")
    with client(ctx) as api:
        job = _submit(api, spec)
        if follow:
            _follow(api, str(job["id"]))


def job_name_for(command: list[str]) -> str:
    """A DNS-style name from the command: the script or module it runs, else the program."""
    words = list(command)
    pick = Path(words[0]).name if words else "job"
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words):
            pick = words[i + 1].rsplit(".", 1)[-1]
            break
        if word.endswith((".py", ".sh")):
            pick = Path(word).stem
            break
    name = re.sub(r"[^a-z0-9-]+", "-", pick.lower()).strip("-")[:63].strip("-")
    return name or "job"


def jobs(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List jobs with their state, restarts, progress and goodput (ETTR)."""
    with client(ctx) as api:
        found = api.jobs(state)
    if as_json:
        print_json(found)
    elif not found:
        console.print("no jobs" + (f" in state {state}" if state else ""))
    else:
        console.print(render.jobs_table(found))


def describe(
    ctx: typer.Context,
    job: JobRef,
    watch_: Annotated[
        bool, typer.Option("--watch", "-w", help="live view until the job ends, then describe")
    ] = False,
    events: Annotated[int, typer.Option(min=0, help="latest events to show (0: all)")] = 40,
    as_json: JsonFlag = False,
) -> None:
    """A job in full: spec, attempts, events with causes, goodput, recovery timings."""
    with client(ctx) as api:
        if watch_:
            try:
                watch(api, job, rank=None)
            except KeyboardInterrupt:
                raise typer.Exit(130) from None
        view = api.job(job)
        found = api.all_events(job=view["id"])
        node_names = {n["id"]: n["name"] for n in api.nodes()}
    if as_json:
        print_json({"job": view, "events": found})
        return
    attempts = view.get("attempts") or []
    console.print(render.job_summary(view))
    if attempts:
        console.print(render.attempts_table(attempts, node_names))
    if "goodput" in view:
        console.print(render.goodput_table(view["goodput"]))
    checkpointing = render.checkpointing_table(view, attempts)
    if checkpointing is not None:
        console.print(checkpointing)
    recovery = render.recovery_table(found, attempts)
    if recovery is not None:
        console.print(recovery)
    shown = found[-events:] if events else found
    console.print(render.events_table(shown, node_names, hidden=len(found) - len(shown)))


def logs(
    ctx: typer.Context,
    job: JobRef,
    rank: Annotated[int, typer.Option(min=0, help="global rank")] = 0,
    attempt: Annotated[int | None, typer.Option(min=0, help="attempt [default: newest]")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="until the job ends")] = False,
) -> None:
    """Print a rank's log (stdout and stderr) from the node that ran it."""
    with client(ctx) as api:
        view = api.job(job)
        if not follow:
            if not view.get("attempts"):
                fail(f"job {view['name']} (id {view['id']}) has not started yet: {view['state']}")
            read_all(api, str(view["id"]), rank, attempt)
            return
        try:
            tail_logs(api, str(view["id"]), rank, attempt)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def cancel(ctx: typer.Context, job: JobRef) -> None:
    """Cancel a job: its workers get SIGTERM (then SIGKILL after the grace period)."""
    with client(ctx) as api:
        view = api.cancel(job)
    console.print(f"job {view['name']} (id {view['id']}): {view['state']}")


def wait(
    ctx: typer.Context,
    job: JobRef,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="give up after this many seconds (exit 124)")
    ] = None,
) -> None:
    """Block until the job ends: exit 0 if it succeeded, 1 if it failed or was cancelled."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with client(ctx) as api:
        view = api.job(job)
        ref = str(view["id"])  # a newer job of the same name must not switch what we wait for
        while not is_terminal(view):
            if deadline is not None and time.monotonic() >= deadline:
                fail(
                    f"job {view['name']} (id {view['id']}) still {view['state']} "
                    f"after {timeout:g} s",
                    EXIT_TIMEOUT,
                )
            time.sleep(POLL_S)
            view = api.job(ref)
    _finish(view)


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command(context_settings={"allow_interspersed_args": False})(run)
    for command in (jobs, describe, logs, cancel, wait):
        app.command()(command)
