"""``ironpod launch``: torchrun's command line, parsed as torchrun parses it.

    srun ironpod launch --nnodes 2 --nproc-per-node 8 \\
        --rdzv-endpoint $MASTER:29400 train.py --config big.yaml

The parser mirrors ``torchrun --help`` of the installed torch flag by flag (dash and underscore
spellings, the same defaults where they mean the same thing), with torchrun's precedence:
flag > ``PET_<FLAG>`` environment variable > default (torch/distributed/argparse_util.py).
A test parses torchrun's own ``--help`` and checks that every flag is accepted here, so a
new torch version with a new flag fails loudly. What each flag does under ironpod, and why
some are accepted and ignored, is in docs/launch.md (the only place the table lives).

The Typer app only registers the command and passes the raw arguments through: forty flags
with torchrun's exact spellings read better as one argparse parser than as a Typer signature.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import typer

from ironpod import env
from ironpod.cli.common import cli_errors
from ironpod.errors import ConfigError

DEFAULT_PORT = 29400  # torchrun's c10d rendezvous port; here the embedded controller's
DEFAULT_MAX_RESTARTS = 3  # torchrun: 0; recovery is what ironpod is for
DEFAULT_SHUTDOWN_TIMEOUT_S = 30  # torchrun's, when TORCH_ELASTIC_SHUTDOWN_TIMEOUT is unset
JOIN_TIMEOUT_S = 600.0  # torch's c10d rendezvous join_timeout default
LAST_CALL_TIMEOUT_S = 30.0  # torch's c10d rendezvous last_call_timeout default
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class _Env(argparse.Action):
    """torchrun's ``env`` action: the default comes from ``PET_<DEST>`` when that is set."""

    def __init__(self, dest: str, default: Any = None, **kwargs: Any) -> None:
        value = os.environ.get(env.PET_PREFIX + dest.upper())
        super().__init__(dest=dest, default=default if value is None else value, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, values)


class _EnvFlag(argparse.Action):
    """torchrun's ``check_env``: a switch that ``PET_<DEST>=1`` turns on (``=0`` leaves off)."""

    def __init__(self, dest: str, **kwargs: Any) -> None:
        value = os.environ.get(env.PET_PREFIX + dest.upper(), "0")
        on = value.strip().isdigit() and int(value) != 0
        super().__init__(dest=dest, const=True, default=on, nargs=0, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        setattr(namespace, self.dest, True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit 2, as every ironpod command
        raise ConfigError(message)


def _spellings(name: str) -> list[str]:
    dashed = f"--{name}"
    under = dashed[:2] + dashed[2:].replace("-", "_")
    return [dashed] if under == dashed else [dashed, under]


def build_parser() -> argparse.ArgumentParser:
    """torchrun's flags (``python -m torch.distributed.run --help``) plus ironpod's own."""
    p = _Parser(prog="ironpod launch", description=__doc__.split("\n")[0], allow_abbrev=False)

    def opt(name: str, **kwargs: Any) -> None:
        flags = kwargs.pop("short", []) + _spellings(name)
        if kwargs.pop("switch", False):
            p.add_argument(*flags, action=_EnvFlag, **kwargs)
        elif kwargs.pop("plain", False):  # torchrun reads no PET_ variable for these
            p.add_argument(*flags, **kwargs)
        else:
            p.add_argument(*flags, action=_Env, **kwargs)

    opt("nnodes", help="N or MIN:MAX nodes [default: SLURM_NNODES, else 1]")
    opt("nproc-per-node", default="1", help="workers per node: N, gpu, cpu, xpu or auto")
    opt("rdzv-backend", default="static", help="accepted; the controller is the rendezvous")
    opt("rdzv-endpoint", default="", help="HOST:PORT of node rank 0's embedded controller")
    opt("rdzv-id", default="none", help="the job's identity: keys its state (docs/launch.md)")
    opt("rdzv-conf", default="", help="K=V,...: join_timeout and last_call_timeout are used")
    opt("standalone", switch=True, help="one node, local controller on a free port, fresh id")
    opt("max-restarts", type=int, default=DEFAULT_MAX_RESTARTS, help="restarts of the job")
    opt("monitor-interval", type=float, default=0.1, help="accepted; exits are reported at once")
    opt("start-method", default="spawn", choices=["spawn", "fork", "forkserver"], help="ignored")
    opt("event-log-handler", default="null", help="accepted; events go to the controller")
    opt("role", default="default", help="ROLE_NAME of the workers")
    opt("module", short=["-m"], switch=True, help="run the script as `python -m`")
    opt("no-python", switch=True, help="run the script as it is, not with python")
    opt("run-path", switch=True, help="run the script with runpy in a python (absolute path)")
    opt("log-dir", help="where the ranks' logs go [default: the job directory]")
    opt("redirects", short=["-r"], default="0", help="local ranks kept off the console")
    opt("tee", short=["-t"], default="0", help="local ranks shown with a [role N]: prefix")
    opt("local-ranks-filter", default="", help="only these local ranks on the console")
    opt("duplicate-stdout-filters", default="", help="accepted and ignored (docs/launch.md)")
    opt("duplicate-stderr-filters", default="", help="accepted and ignored (docs/launch.md)")
    opt("node-rank", type=int, help="this node's rank [default: SLURM_NODEID, NODE_RANK, 0]")
    opt("master-addr", help="node rank 0's address [default: MASTER_ADDR, Slurm, 127.0.0.1]")
    opt("master-port", type=int, help="the embedded controller's port [default: 29400]")
    opt("local-addr", help="this node's address for the others [default: route to master]")
    opt("logs-specs", plain=True, help="accepted and ignored: ironpod's agent writes the logs")
    opt(
        "numa-binding",
        plain=True,
        choices=["node", "socket", "exclusive", "core-complex"],
        help="accepted and ignored (docs/launch.md)",
    )
    opt("signals-to-handle", default="SIGTERM,SIGINT,SIGHUP,SIGQUIT", help="forwarded signals")
    opt("shutdown-timeout", type=int, help="seconds from SIGTERM to SIGKILL [default: 30]")
    opt("virtual-local-rank", switch=True, help="accepted and ignored (docs/launch.md)")
    # -- ironpod's own
    opt("job-dir", plain=True, help="controller state and logs [default: docs/launch.md]")
    opt("job-name", plain=True, default="launch", help="prefix of the job's name")
    opt("hang-timeout", plain=True, type=float, help="seconds without progress is a hang")
    opt("health-level", plain=True, default="none", help="node checks: none, light or deep")
    p.add_argument("training_script", help="the script (or module with -m, or program)")
    p.add_argument("training_script_args", nargs=argparse.REMAINDER)
    return p


# -- the pieces of the resolution, each small enough to test on its own


def parse_nnodes(text: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` as torchrun: 0 < MIN <= MAX."""
    parts = text.split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (0, -1)
    except ValueError:
        lo, hi = 0, -1
    if not 0 < lo <= hi:
        raise ConfigError(f"--nnodes {text!r} is not N or MIN:MAX with 0 < MIN <= MAX")
    return lo, hi


def nproc_per_node(value: str) -> int:
    """torchrun's rules (torch/distributed/run.py ``determine_local_world_size``): an integer;
    ``cpu`` the CPUs this process may run on; ``gpu`` the CUDA devices (an error without);
    ``xpu`` likewise; ``auto`` the accelerator's devices if there is one, else ``cpu``.
    torch is imported only for the device names (it costs a second)."""
    if value.isdigit() and int(value) > 0:
        return int(value)
    if value == "cpu":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    if value not in ("gpu", "xpu", "auto"):
        raise ConfigError(f"--nproc-per-node {value!r}: use a positive integer, gpu, cpu or auto")
    import torch

    if value == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("--nproc-per-node gpu: CUDA is not available")
        return int(torch.cuda.device_count())
    if value == "xpu":
        if not torch.xpu.is_available():
            raise ConfigError("--nproc-per-node xpu: no XPU is available")
        return int(torch.xpu.device_count())
    if torch.accelerator.is_available():
        return int(torch.accelerator.device_count())
    return nproc_per_node("cpu")


def expand_nodelist(text: str) -> list[str]:
    """Slurm's compact host list: ``node[01-03,07],gpu5`` -> node01 node02 node03 node07 gpu5.

    Ranges keep their zero padding; several bracket groups in one name multiply
    (``r[1-2]n[1-2]``), as ``scontrol show hostnames`` does.
    """
    hosts: list[str] = []
    for item in _split_top(text.strip()):
        if item:
            hosts.extend(_expand_one(item))
    return hosts


def _split_top(text: str) -> list[str]:
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    names: list[str] = []
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ConfigError(f"SLURM_JOB_NODELIST {item!r}: {part!r} is not N or N-M")
        width = len(lo)
        names.extend(f"{head}{n:0{width}d}" for n in range(int(lo), int(hi or lo) + 1))
    return [f"{name}{rest}" for name in names for rest in _expand_one(tail)]


def slurm_master(environ: Mapping[str, str]) -> str | None:
    """The first host of the Slurm allocation (``scontrol`` if it is there, else our parser)."""
    nodelist = environ.get(env.SLURM_JOB_NODELIST)
    if not nodelist:
        return None
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    hosts = expand_nodelist(nodelist)
    return hosts[0] if hosts else None


def parse_rdzv_conf(text: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--rdzv-conf item {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def parse_std(text: str, flag: str) -> dict[int, int] | int:
    """torchrun's ``Std.from_str``: ``3`` for every local rank, or ``0:1,1:2`` per local rank
    (0 none, 1 stdout, 2 stderr, 3 both)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    out = {}
    for item in text.split(","):
        rank, sep, value = item.partition(":")
        if not sep or not rank.strip().isdigit() or not value.strip().isdigit():
            raise ConfigError(f"{flag} {text!r} is not N or LOCAL_RANK:N,...")
        out[int(rank)] = int(value)
    return out


def _std_for(spec: dict[int, int] | int, local_rank: int) -> int:
    return spec if isinstance(spec, int) else spec.get(local_rank, 0)


def console_ranks(ns: argparse.Namespace, nproc: int) -> tuple[list[int], bool]:
    """(local ranks whose output launch prints, whether with torchrun's ``[roleN]:`` prefix).

    As torchrun: every rank's output reaches the console unless redirected to a file only
    (``-r``); ``--tee`` and ``--local-ranks-filter`` add the prefix; the filter keeps only its
    ranks. The agent writes every rank's log file whatever the flags say.
    """
    redirects = parse_std(ns.redirects, "--redirects")
    tee = parse_std(ns.tee, "--tee")
    ranks = [r for r in range(nproc) if _std_for(tee, r) or not _std_for(redirects, r)]
    prefixed = bool(ns.local_ranks_filter.strip()) or any(_std_for(tee, r) for r in range(nproc))
    if ns.local_ranks_filter.strip():
        try:
            wanted = {int(x) for x in ns.local_ranks_filter.split(",")}
        except ValueError:
            raise ConfigError(
                f"--local-ranks-filter {ns.local_ranks_filter!r} is not a list like 0,1,2"
            ) from None
        ranks = [r for r in ranks if r in wanted]
    return ranks, prefixed


def _env_int(environ: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def job_identity(
    ns: argparse.Namespace, max_nodes: int, environ: Mapping[str, str]
) -> tuple[str, bool]:
    """(id, shared): ``--rdzv-id``, else the Slurm job (and step), else for one node a fresh
    id per invocation. ``shared`` means every invocation under that id is the same job (a
    requeue carries on); without one a multi-node launch uses torchrun's default ``none``,
    which never carries on a finished job."""
    if not ns.standalone and ns.rdzv_id and ns.rdzv_id != "none":
        return ns.rdzv_id, True
    slurm = environ.get(env.SLURM_JOB_ID)
    if slurm:
        step = environ.get(env.SLURM_STEP_ID)
        return f"slurm-{slurm}" + (f".{step}" if step and step.isdigit() else ""), True
    if max_nodes == 1:
        return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3), False
    return "none", False


def resolve(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Any:
    """Parse torchrun's arguments into a :class:`ironpod.launch.LaunchConfig`."""
    from ironpod.agent.health import parse_level
    from ironpod.launch import LaunchConfig, parse_endpoint

    environ = os.environ if environ is None else environ
    ns = build_parser().parse_args(list(argv))
    parse_level(ns.health_level)  # a bad level fails here, not in the agent's log
    if ns.max_restarts < 0:
        raise ConfigError(f"--max-restarts {ns.max_restarts} is negative")
    if ns.standalone:
        lo = hi = 1
    else:
        nnodes = ns.nnodes or str(_env_int(environ, env.SLURM_NNODES, "NNODES") or 1)
        lo, hi = parse_nnodes(nnodes)
    expected = _env_int(environ, env.SLURM_NNODES) or hi
    rank = ns.node_rank
    if rank is None:
        rank = _env_int(environ, env.SLURM_NODEID, env.NODE_RANK) or 0
    if ns.standalone:
        rank = 0
    if not 0 <= rank < max(hi, expected):
        raise ConfigError(f"--node-rank {rank} is not within --nnodes {max(hi, expected)}")
    if ns.standalone or (hi == 1 and not ns.rdzv_endpoint and ns.master_port is None):
        addr, port = "127.0.0.1", _free_port()  # as torchrun: localhost, any free port
    elif ns.rdzv_endpoint:
        addr, port = parse_endpoint(ns.rdzv_endpoint)
    else:
        found = ns.master_addr or environ.get(env.MASTER_ADDR) or slurm_master(environ)
        addr = str(found or "127.0.0.1")
        port = ns.master_port or _env_int(environ, env.MASTER_PORT) or DEFAULT_PORT
    nproc = nproc_per_node(ns.nproc_per_node)
    if ns.run_path:
        if not os.path.isabs(ns.training_script):
            raise ConfigError(f"--run-path needs an absolute path, not {ns.training_script!r}")
        run = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], "
        command = [sys.executable, "-u", "-c", run + "run_name='__main__')", ns.training_script]
    elif ns.no_python:
        if ns.module:
            raise ConfigError("--no-python and --module cannot be used together")
        command = [ns.training_script]
    else:
        command = [os.environ.get("PYTHON_EXEC", sys.executable), "-u"]
        command += ["-m"] if ns.module else []
        command.append(ns.training_script)
    command += ns.training_script_args
    ident, shared = job_identity(ns, hi, environ)
    conf = parse_rdzv_conf(ns.rdzv_conf)
    ranks, prefixed = console_ranks(ns, nproc)
    if ns.job_dir:
        job_dir = Path(ns.job_dir)
    elif shared or ident == "none":  # a requeue finds it; the nodes may share it
        job_dir = Path(f"ironpod-launch-{_SAFE.sub('-', ident)}")
    else:
        job_dir = Path(tempfile.gettempdir()) / f"ironpod-launch-{ident}"
    shutdown = ns.shutdown_timeout
    if shutdown is None:
        shutdown = _env_int(environ, env.TORCH_ELASTIC_SHUTDOWN_TIMEOUT)
    return LaunchConfig(
        min_nodes=lo,
        max_nodes=hi,
        expected_nodes=max(expected, lo),
        nproc_per_node=nproc,
        node_rank=rank,
        master_addr=addr,
        master_port=port,
        command=command,
        max_restarts=ns.max_restarts,
        job_dir=job_dir.resolve(),
        job_name=ns.job_name,
        run_id=ident,
        shared_id=shared,
        role=ns.role,
        hang_timeout_s=ns.hang_timeout,
        node_address=ns.local_addr,
        token=environ.get(env.PRESET_TOKEN) or None,
        health_level=ns.health_level,
        join_timeout_s=float(conf.get("join_timeout", JOIN_TIMEOUT_S)),
        last_call_s=float(conf.get("last_call_timeout", LAST_CALL_TIMEOUT_S)),
        shutdown_timeout_s=float(DEFAULT_SHUTDOWN_TIMEOUT_S if shutdown is None else shutdown),
        log_dir=Path(ns.log_dir).resolve() if ns.log_dir else None,
        console_ranks=ranks,
        console_prefix=prefixed,
    )


def main(argv: Sequence[str]) -> int:
    """Run a launch from torchrun's arguments; the exit code (docs/launch.md)."""
    from ironpod.launch import launch

    with cli_errors():
        cfg = resolve(argv)
        return launch(cfg)


def register(app: typer.Typer) -> None:
    settings = {
        "allow_extra_args": True,
        "ignore_unknown_options": True,
        "allow_interspersed_args": False,
        "help_option_names": [],
    }

    @app.command(
        "launch", context_settings=settings, add_help_option=False, help=__doc__.split("\n")[0]
    )
    def launch_command(ctx: typer.Context) -> None:
        """torchrun's flags; node rank 0 runs an embedded controller, every node an agent."""
        raise typer.Exit(main(ctx.args))
