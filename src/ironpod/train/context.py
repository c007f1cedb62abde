"""The job context a training script runs in, read once from the environment.

Whoever starts the worker (the ironpod agent, ``ironpod launch``, torchrun, or a person) sets
the environment; :func:`init` reads it, joins torch.distributed when the job spans more than
one process, and installs the graceful-stop handler. Scripts never read env vars themselves.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from ironpod import env
from ironpod.errors import EXIT_PREEMPTED, ConfigError
from ironpod.train import beacon

log = logging.getLogger(__name__)

__all__ = ["EXIT_PREEMPTED", "TrainContext", "init", "shutdown"]


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


@dataclass(kw_only=True, slots=True)
class TrainContext:
    """Who this process is within the job, and the job's shared settings."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    job_id: str
    attempt_id: int
    checkpoint_dir: str | None
    device: torch.device
    is_distributed: bool
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0 does the job-wide chores: logging summaries, committing checkpoints."""
        return self.rank == 0

    def should_stop(self) -> bool:
        """True once a stop was requested (SIGTERM): save, then exit with EXIT_PREEMPTED.

        In a distributed job every rank gets the signal from its supervisor, but not at the
        same instant; :meth:`should_stop_all` agrees on it across ranks.
        """
        return self._stop.is_set()

    def should_stop_all(self) -> bool:
        """Collective form of :meth:`should_stop`: true on every rank if it is true on any.

        Costs one tiny all-reduce; call it at most every few steps.
        """
        if not self.is_distributed:
            return self.should_stop()
        flag = torch.tensor([1 if self._stop.is_set() else 0], device=self._collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def request_stop(self) -> None:
        """Ask the training loop to stop at its next check (what SIGTERM does)."""
        self._stop.set()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _install_stack_dumper() -> None:
    """SIGUSR1 prints every thread's Python stack to stderr (the rank's log).

    The agent uses it to show where a hung worker is stuck when py-spy is not installed; it
    sends SIGUSR1 only to ranks whose beacons announce the handler (an unprepared process
    would die of it).
    """
    stream = sys.__stderr__  # fd 2: the rank's log, even where sys.stderr was replaced
    try:
        if stream is None:
            return
        faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True, chain=False)
    except (OSError, ValueError, RuntimeError):  # no usable fd 2: no fallback stacks, no harm
        return
    beacon.announce_stack_signal()


def _install_stop_handler(ctx: TrainContext) -> None:
    if threading.current_thread() is not threading.main_thread():
        log.warning("init() called off the main thread: SIGTERM will not request a stop")
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        ctx.request_stop()

    signal.signal(signal.SIGTERM, on_term)


def _wants_distributed(world_size: int) -> bool:
    forced = os.environ.get(env.DISTRIBUTED)
    if forced == "1":
        return True
    if forced == "0":
        return False
    return world_size > 1


def init(*, device: str | None = None, backend: str | None = None) -> TrainContext:
    """Read the job context, join torch.distributed if the job asks for it, return the context.

    Args:
        device: "cpu" or "cuda"; default: CUDA when available (one GPU per local rank).
        backend: torch.distributed backend; default from IRONPOD_DIST_BACKEND, else NCCL on
            CUDA and gloo on CPU.
    """
    rank = _env_int(env.RANK, 0)
    world_size = _env_int(env.WORLD_SIZE, 1)
    local_rank = _env_int(env.LOCAL_RANK, 0)
    local_world_size = _env_int(env.LOCAL_WORLD_SIZE, world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"{env.RANK}={rank} is not within {env.WORLD_SIZE}={world_size}")

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device(device)

    distributed = _wants_distributed(world_size)
    if distributed and not dist.is_initialized():
        chosen = (
            backend
            or os.environ.get(env.DIST_BACKEND)
            or ("nccl" if torch_device.type == "cuda" else "gloo")
        )
        kwargs: dict[str, Any] = {"backend": chosen, "rank": rank, "world_size": world_size}
        timeout_s = os.environ.get(env.DIST_TIMEOUT_S)
        if timeout_s:
            kwargs["timeout"] = timedelta(seconds=float(timeout_s))
        if torch_device.type == "cuda":
            kwargs["device_id"] = torch_device
        dist.init_process_group(**kwargs)

    ctx = TrainContext(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        job_id=os.environ.get(env.JOB_ID, "local"),
        attempt_id=_env_int(env.ATTEMPT_ID, 0),
        checkpoint_dir=os.environ.get(env.CHECKPOINT_DIR) or None,
        device=torch_device,
        is_distributed=distributed,
    )
    _install_stop_handler(ctx)
    if threading.current_thread() is threading.main_thread():
        _install_stack_dumper()
    return ctx


def shutdown(ctx: TrainContext) -> None:
    """Leave torch.distributed cleanly (avoids the warning and hang at interpreter exit)."""
    if ctx.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
