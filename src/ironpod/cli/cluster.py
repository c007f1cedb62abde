"""The processes: ``controller`` and ``agent`` (bare metal), ``up``/``down`` (this machine),
and ``status``, the one-screen summary of whichever cluster the CLI points at."""

from __future__ import annotations

import collections
import logging
import os
import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from ironpod import env
from ironpod.cli import render
from ironpod.cli.common import client, console, fail, home, parse_pairs, print_json

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
#: Libraries whose INFO lines (one per HTTP request, per migration plugin) would drown ours.
QUIET_LOGGERS = ("httpx", "httpcore", "alembic")


def up(
    nodes: Annotated[int, typer.Option(min=1, help="simulated nodes (agents)")] = 4,
    spares: Annotated[int, typer.Option(min=0, help="nodes held back for recovery")] = 0,
    port: Annotated[int | None, typer.Option(help="controller port (default: a free one)")] = None,
    heartbeat_interval: Annotated[float, typer.Option(min=0.05, help="seconds")] = 1.0,
    node_lost_after: Annotated[
        float, typer.Option(min=0.1, help="seconds without a heartbeat before a node is lost")
    ] = 6.0,
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for the nodes")] = 60.0,
    health_level: Annotated[
        str, typer.Option(help="agents' health suite at start: none, light or deep")
    ] = "none",
    health_interval: Annotated[
        float, typer.Option(min=0.1, help="seconds between the agents' light health runs")
    ] = 30.0,
) -> None:
    """Start a local cluster in the background: a controller and N agents ($IRONPOD_HOME)."""
    from ironpod.cluster import local

    where = home()
    with console.status(f"starting a controller and {nodes} agents in {where}"):
        info = local.up(
            nodes,
            where,
            port,
            spares,
            heartbeat_interval,
            node_lost_after,
            timeout_s=timeout,
            health_level=health_level,
            health_interval_s=health_interval,
        )
    console.print(
        f"local cluster up: {len(info.agents)} nodes, controller at {info.url} "
        f"(pid {info.controller.pid}); logs in {where / 'logs'}"
    )
    console.print("try: ironpod run --follow -- python -c \"print('hello from ironpod')\"")
    pointed = os.environ.get(env.URL)
    if pointed and pointed.rstrip("/") != info.url:
        console.print(f"[yellow]note:[/] {env.URL}={pointed} still points the CLI elsewhere")


def down() -> None:
    """Stop the local cluster: agents (and their workers) first, then the controller."""
    from ironpod.cluster import local

    where = home()
    info = local.down(where)
    if info is None:
        console.print(f"no local cluster recorded in {where}")
        return
    console.print(f"local cluster stopped: controller and {len(info.agents)} agents ({where})")


def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead")] = False,
) -> None:
    """Where the controller is, and how many nodes and jobs are in each state."""
    from ironpod.cluster import local

    info = local.read_cluster(home())
    out: dict[str, Any] = {}
    if info is not None:
        out["local"] = {
            "home": info.home,
            "controller_pid": info.controller.pid if info.controller.alive() else None,
            "agents_alive": sorted(n for n, a in info.agents.items() if a.alive()),
            "agents_dead": sorted(n for n, a in info.agents.items() if not a.alive()),
        }
    with client(ctx) as api:
        out["url"] = api.url
        out["version"] = api.healthz().get("version")
        out["nodes"] = dict(collections.Counter(n["state"] for n in api.nodes()))
        out["jobs"] = dict(collections.Counter(j["state"] for j in api.jobs()))
    if as_json:
        print_json(out)
        return
    summary = render.table("", "")
    summary.show_header = False
    summary.add_row("controller", f"{out['url']} (ironpod {out['version']})")
    if "local" in out:
        loc = out["local"]
        dead = f", not running: {', '.join(loc['agents_dead'])}" if loc["agents_dead"] else ""
        summary.add_row(
            "local cluster", f"{loc['home']}: {len(loc['agents_alive'])} agents running{dead}"
        )
    for key in ("nodes", "jobs"):
        counts = out[key]
        summary.add_row(
            key, ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else "none"
        )
    console.print(summary)


def controller(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8700,
    state_dir: Annotated[
        Path | None, typer.Option(help="database and tokens [default: $IRONPOD_HOME/controller]")
    ] = None,
    db: Annotated[
        str | None, typer.Option(help="SQLAlchemy URL, e.g. postgresql+psycopg://...")
    ] = None,
    node_lost_after: Annotated[float, typer.Option(min=0.1, help="seconds")] = 6.0,
    heartbeat_interval: Annotated[float, typer.Option(min=0.05, help="seconds")] = 1.0,
    spares: Annotated[int, typer.Option(min=0, help="ready nodes kept back for recovery")] = 0,
    health_action: Annotated[
        str,
        typer.Option(help="on a failed health check: quarantine (and restart its job) or label"),
    ] = "quarantine",
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            help="HTTPS only, with a cluster CA made at first start [default: on unless the "
            "host is loopback]",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="your own server certificate (PEM) instead")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="its private key (PEM)")] = None,
    tls_name: Annotated[
        list[str] | None,
        typer.Option(help="another name the controller is reached by (repeatable)"),
    ] = None,
) -> None:
    """Run the controller (API server and reconciler) in the foreground."""
    from ironpod.controller.health import parse_action
    from ironpod.controller.server import TlsOptions, serve
    from ironpod.controller.service import ControllerConfig
    from ironpod.tls import is_loopback

    _check_listen(host, port)
    _setup_logging(log_level)
    config = ControllerConfig(
        heartbeat_interval_s=heartbeat_interval,
        node_lost_after_s=node_lost_after,
        reserve_spares=spares,
        health_action=parse_action(health_action),
    )
    serve(
        host=host,
        port=port,
        state_dir=(state_dir or home() / "controller").expanduser().resolve(),
        db_url=db,
        config=config,
        tls=TlsOptions(tls_cert, tls_key, tuple(tls_name or ()))
        if (tls if tls is not None else not is_loopback(host))
        else None,
    )


def agent(
    join: Annotated[str, typer.Option(help="controller URL, e.g. http://10.0.0.1:8700")],
    token_file: Annotated[
        Path | None,
        typer.Option(help="file holding the node join token (or set IRONPOD_JOIN_TOKEN)"),
    ] = None,
    token: Annotated[
        str | None, typer.Option(help="the join token itself: visible to every local user")
    ] = None,
    name: Annotated[str | None, typer.Option(help="node name [default: hostname]")] = None,
    workdir: Annotated[
        Path | None, typer.Option(help="logs and sockets [default: $IRONPOD_HOME/nodes/NAME]")
    ] = None,
    address: Annotated[str, typer.Option(help="address other nodes reach this one at")] = (
        "127.0.0.1"
    ),
    cpus: Annotated[str | None, typer.Option(help="pin workers to CPUs, e.g. 0,1 or 0-3")] = None,
    label: Annotated[list[str] | None, typer.Option(help="node label K=V (repeatable)")] = None,
    http_port: Annotated[int, typer.Option(min=0, max=65535, help="log server port")] = 0,
    heartbeat_interval: Annotated[float, typer.Option(min=0.05, help="seconds")] = 1.0,
    shm_dir: Annotated[
        str | None, typer.Option(help="in-memory snapshots [default: /dev/shm/ironpod-NAME]")
    ] = None,
    memory_budget: Annotated[
        str, typer.Option(help="snapshot memory: share of RAM (25%) or size (8GiB)")
    ] = "25%",
    replication_mb_s: Annotated[
        float | None, typer.Option(min=0.001, help="cap on copying snapshots to peers, MB/s")
    ] = None,
    health_level: Annotated[
        str, typer.Option(help="health suite at start, before joining: none, light or deep")
    ] = "deep",
    health_interval: Annotated[
        float, typer.Option(min=0.1, help="seconds between light health runs")
    ] = 30.0,
    health_skip: Annotated[
        list[str] | None, typer.Option(help="never run this check, e.g. compute.matmul")
    ] = None,
    health_threshold: Annotated[
        list[str] | None,
        typer.Option(help="HealthThresholds field KEY=VALUE, e.g. min_free_disk_gib=1"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    ca_hash: Annotated[
        str | None,
        typer.Option(help="an https controller's CA, sha256:... (the controller prints it)"),
    ] = None,
    ca_file: Annotated[
        Path | None, typer.Option(help="or the CA file an https controller is verified with")
    ] = None,
) -> None:
    """Run this node's agent in the foreground until SIGTERM or SIGINT."""
    from ironpod.agent.health import HealthConfig, parse_level, parse_thresholds
    from ironpod.agent.main import join_token, parse_cpus, run_agent

    node = name or socket.gethostname()
    _setup_logging(log_level)
    run_agent(
        join,
        join_token(token, str(token_file) if token_file else None),
        name=node,
        workdir=str((workdir or home() / "nodes" / node).expanduser().resolve()),
        address=address,
        cpus=parse_cpus(cpus) if cpus else None,
        labels=parse_pairs(label, "--label"),
        heartbeat_interval_s=heartbeat_interval,
        http_port=http_port,
        shm_dir=shm_dir,
        memory_budget=memory_budget,
        replication_mb_s=replication_mb_s,
        health=HealthConfig(
            join_level=parse_level(health_level),
            interval_s=health_interval,
            skip=frozenset(health_skip or []),
            thresholds=parse_thresholds(health_threshold or []),
        ),
        ca_hash=ca_hash,
        ca_file=str(ca_file) if ca_file else None,
    )


def _setup_logging(name: str) -> None:
    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        fail(f"--log-level {name!r}: expected DEBUG, INFO, WARNING or ERROR", 2)
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for quiet in QUIET_LOGGERS:
        logging.getLogger(quiet).setLevel(max(level, logging.WARNING))


def _check_listen(host: str, port: int) -> None:
    """A clear line now rather than uvicorn's log lines after the database migrated."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def register(app: typer.Typer) -> None:
    for command in (up, down, status, controller, agent):
        app.command()(command)
