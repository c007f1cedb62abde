"""``ironpod launch``: a drop-in for ``torchrun`` that adds ironpod's detection and recovery.

    srun ironpod launch --nnodes 2 --nproc-per-node 8 \\
        --rdzv-endpoint $MASTER:29400 train.py --config big.yaml

Flags keep torchrun's names (and its underscore spellings). Without ``--node-rank`` the node
rank comes from ``SLURM_NODEID`` or ``NODE_RANK``; without ``--nnodes`` from ``SLURM_NNODES``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from ironpod.cli.common import cli_errors
from ironpod.errors import ConfigError


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return None


def launch(
    script: Annotated[str, typer.Argument(help="training script (or module with -m)")],
    args: Annotated[list[str] | None, typer.Argument(help="the script's own arguments")] = None,
    nnodes: Annotated[int | None, typer.Option("--nnodes", help="nodes in the job")] = None,
    nproc_per_node: Annotated[int, typer.Option("--nproc-per-node", "--nproc_per_node", min=1)] = 1,
    node_rank: Annotated[int | None, typer.Option("--node-rank", "--node_rank", min=0)] = None,
    master_addr: Annotated[
        str, typer.Option("--master-addr", "--master_addr", help="node rank 0's address")
    ] = "127.0.0.1",
    master_port: Annotated[
        int, typer.Option("--master-port", "--master_port", help="port of the job's controller")
    ] = 29400,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option("--rdzv-endpoint", "--rdzv_endpoint", help="HOST:PORT (wins over master-*)"),
    ] = None,
    max_restarts: Annotated[int, typer.Option("--max-restarts", "--max_restarts", min=0)] = 3,
    module: Annotated[bool, typer.Option("-m", "--module", help="run SCRIPT as a module")] = False,
    no_python: Annotated[
        bool, typer.Option("--no-python", "--no_python", help="run SCRIPT as it is")
    ] = False,
    job_dir: Annotated[
        Path | None, typer.Option(help="controller state and logs (shared by the nodes)")
    ] = None,
    job_name: Annotated[str, typer.Option(help="job name in the controller")] = "launch",
    hang_timeout: Annotated[float | None, typer.Option(help="seconds without progress")] = None,
    address: Annotated[
        str | None, typer.Option(help="this node's address (default: route to master)")
    ] = None,
    health_level: Annotated[
        str, typer.Option(help="node health suite before joining: none, light or deep")
    ] = "none",
) -> None:
    """torchrun's flags; node rank 0 runs an embedded controller, every node an agent."""
    from ironpod.launch import EXIT_REQUEUE, LaunchConfig, parse_endpoint
    from ironpod.launch import launch as run_launch

    with cli_errors():
        from ironpod.agent.health import parse_level

        parse_level(health_level)  # a bad level fails here, not in the agent's log
        if rdzv_endpoint:
            master_addr, master_port = parse_endpoint(rdzv_endpoint)
        nodes = nnodes or _env_int("SLURM_NNODES", "NNODES") or 1
        rank = node_rank if node_rank is not None else (_env_int("SLURM_NODEID", "NODE_RANK") or 0)
        if not 0 <= rank < nodes:
            raise ConfigError(f"--node-rank {rank} is not within --nnodes {nodes}")
        if no_python:
            command = [script, *(args or [])]
        elif module:
            command = [sys.executable, "-m", script, *(args or [])]
        else:
            command = [sys.executable, script, *(args or [])]
        slurm_job = os.environ.get("SLURM_JOB_ID", "local")
        cfg = LaunchConfig(
            nnodes=nodes,
            nproc_per_node=nproc_per_node,
            node_rank=rank,
            master_addr=master_addr,
            master_port=master_port,
            command=command,
            max_restarts=max_restarts,
            job_dir=(job_dir or Path(f"ironpod-launch-{slurm_job}")).resolve(),
            job_name=job_name,
            hang_timeout_s=hang_timeout,
            node_address=address,
            token=os.environ.get("IRONPOD_PRESET_TOKEN") or None,
            health_level=health_level,
        )
        code = run_launch(cfg)
    if code == EXIT_REQUEUE:
        print("ironpod launch: exiting with the requeue code", file=sys.stderr)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command(
        context_settings={"allow_interspersed_args": False},
    )(launch)
