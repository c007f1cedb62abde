"""One worker: a rank of an attempt, its process group, its output pump and its waiter.

Each worker starts in a session of its own (``start_new_session``), so its pid is also its
process group id and a signal to the group reaches everything it spawned (data-loader
workers, a shell's children). A waiter thread blocks in ``wait()`` and reports the exit the
instant it happens; a pump thread copies output into the rank's log and spots progress lines.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from ironpod import env
from ironpod.agent import stephook
from ironpod.agent.logs import RankLog
from ironpod.agent.progress import LineMatcher, ProgressUpdate, RankProgress
from ironpod.wire import Assignment, WorkerStatus

log = logging.getLogger(__name__)

#: A line longer than this reaches the log in pieces (keeps the pump's memory bounded).
_MAX_LINE = 64 * 1024
#: Exit codes for a command that could not be started, as a shell reports them.
_EXIT_NOT_FOUND = 127
_EXIT_NOT_EXECUTABLE = 126


def worker_env(
    assignment: Assignment,
    *,
    rank: int,
    local_rank: int,
    beacon_socket: str,
    base: Mapping[str, str] | None = None,
    error_file: str | None = None,
) -> dict[str, str]:
    """The agent's environment + the job's + the torch.distributed and ironpod variables.

    The worker sees what torchrun's agent would give it (torch/distributed/elastic/agent/
    server/local_elastic_agent.py), so code that detects a torchrun-style launcher by
    ``TORCHELASTIC_RUN_ID`` (PyTorch Lightning) sizes the world right. Inherited
    ``TORCHELASTIC_*`` variables are dropped (they would describe some other launcher's job;
    ours are set instead), and so are the cluster's secrets (``env.SECRETS``). Precedence,
    lowest first: the agent's environment, ironpod's defaults (``OMP_NUM_THREADS=1`` with
    several ranks a node, as torchrun; the NCCL error handling; one tracker run per job), the
    job's env, then the per-rank variables, which nobody overrides. ``IRONPOD_JOB_ID`` and
    ``IRONPOD_ATTEMPT_ID`` default to the assignment's ids; the job env may set them (the
    controller passes the attempt's number within the job there).
    """
    base = os.environ if base is None else base
    out = {
        k: v
        for k, v in base.items()
        if not k.startswith(env.TORCHELASTIC_PREFIX) and k not in env.SECRETS
    }
    job_env = assignment.env
    run_id = job_env.get(env.TORCHELASTIC_RUN_ID) or assignment.run_id
    run_id = run_id or f"{assignment.job_name}-{assignment.job_id}"
    defaults = {
        env.TORCH_NCCL_ASYNC_ERROR_HANDLING: "1",
        env.WANDB_RUN_ID: _tracker_id(run_id),
        env.WANDB_RESUME: "allow",
    }
    if len(assignment.ranks) > 1:  # torchrun's rule: several ranks share the node's cores
        defaults[env.OMP_NUM_THREADS] = "1"
    for key, value in defaults.items():
        if key not in out and key not in job_env:
            out[key] = value
    out[env.JOB_ID] = str(assignment.job_id)
    out[env.ATTEMPT_ID] = str(assignment.attempt_id)
    out[env.TORCHELASTIC_RUN_ID] = run_id
    out[env.ROLE_NAME] = "default"
    out.update(job_env)
    restarts = assignment.restart_count
    if restarts is None:  # an older controller: the attempt's number within the job
        number = job_env.get(env.ATTEMPT_ID, "0")
        restarts = int(number) if number.isdigit() else 0
    out.update(
        {
            env.RANK: str(rank),
            env.LOCAL_RANK: str(local_rank),
            env.WORLD_SIZE: str(assignment.world_size),
            env.LOCAL_WORLD_SIZE: str(len(assignment.ranks)),
            env.GROUP_RANK: str(assignment.node_rank),
            env.NODE_RANK: str(assignment.node_rank),
            env.ROLE_RANK: str(rank),  # one role per job: its ranks are the job's ranks
            env.ROLE_WORLD_SIZE: str(assignment.world_size),
            env.GROUP_WORLD_SIZE: str(assignment.nnodes),
            env.MASTER_ADDR: assignment.master_addr,
            env.MASTER_PORT: str(assignment.master_port),
            env.TORCHELASTIC_RESTART_COUNT: str(restarts),
            env.TORCHELASTIC_USE_AGENT_STORE: "False",  # workers make their own store
            env.BEACON_SOCKET: beacon_socket,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if stephook.enabled(out):  # a beacon per optimizer step from scripts without ironpod
        out[stephook.PYTHONPATH] = stephook.pythonpath(out.get(stephook.PYTHONPATH))
    if assignment.max_restarts is not None:
        out[env.TORCHELASTIC_MAX_RESTARTS] = str(assignment.max_restarts)
    if error_file:
        out[env.TORCHELASTIC_ERROR_FILE] = error_file
    return out


def _tracker_id(run_id: str) -> str:
    """A W&B run id from the job's identity: W&B allows letters, digits, '-' and '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_id)[:128]


class Worker:
    """A rank's process. Fields other than the process are guarded by the supervisor's lock."""

    def __init__(
        self,
        *,
        assignment: Assignment,
        rank: int,
        local_rank: int,
        log: RankLog,
        matcher: LineMatcher,
        on_progress: Callable[[Worker, ProgressUpdate], None],
        on_exit: Callable[[Worker], None],
    ) -> None:
        self.assignment = assignment
        self.attempt_id = assignment.attempt_id
        self.rank = rank
        self.local_rank = local_rank
        self.log = log
        self.progress = RankProgress()
        self.pid = 0
        self.started_unix = time.time()
        self.ended_unix: float | None = None
        self.returncode: int | None = None
        self.start_error: str | None = None
        self.stopping = False  # the agent is stopping it: its exit is not a failure
        self.hang_reported = False
        # Cleared while the agent dumps its stacks after a hang: stopping it waits for the dump.
        self.stacks_done = threading.Event()
        self.stacks_done.set()
        self._matcher = matcher
        self._on_progress = on_progress
        self._on_exit = on_exit
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str], cwd: str, cpus: list[int] | None) -> None:
        """Start the process; a command that cannot start becomes an exit (127 or 126)."""
        a = self.assignment
        argv = ["/bin/sh", "-c", " ".join(a.command)] if a.shell else list(a.command)
        try:
            self._proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            code = _EXIT_NOT_FOUND if exc.errno == errno.ENOENT else _EXIT_NOT_EXECUTABLE
            self.not_started(f"cannot start {argv[0]!r} in {cwd}: {exc.strerror or exc}", code)
            return
        except (ValueError, TypeError, subprocess.SubprocessError) as exc:
            # A NUL byte in an argument or in the environment, say: the spec is refused at
            # submit, but an agent must never be wedged by one (running, with no process).
            self.not_started(f"cannot start {argv[0]!r}: {exc}", _EXIT_NOT_EXECUTABLE)
            return
        self.pid = self._proc.pid
        self.started_unix = time.time()
        if cpus:
            # Right after exec the interpreter has not made threads yet, and the threads and
            # children it makes later inherit the mask (preexec_fn is unsafe in a threaded agent).
            try:
                os.sched_setaffinity(self.pid, cpus)
            except OSError as exc:
                log.warning("rank %d: cannot pin to CPUs %s: %s", self.rank, cpus, exc)
        assert self._proc.stdout is not None
        name = f"a{self.attempt_id}-r{self.rank}"
        threading.Thread(
            target=self._pump, args=(self._proc.stdout,), name=f"pump-{name}", daemon=True
        ).start()
        threading.Thread(target=self._wait, name=f"wait-{name}", daemon=True).start()

    def not_started(self, why: str, returncode: int = _EXIT_NOT_FOUND) -> None:
        """End as a worker that never ran: ``why`` is the failure the controller reports."""
        self.start_error = why
        self.returncode = returncode
        self.ended_unix = time.time()
        self.log.note(why)
        self.log.close()

    @property
    def running(self) -> bool:
        return self.returncode is None and self.start_error is None

    def signal_group(self, sig: signal.Signals) -> None:
        """Signal the worker's whole process group (it may have outlived its leader)."""
        if self.pid <= 0:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def frozen(self) -> bool:
        """Whether the process is stopped (SIGSTOP, a debugger): it cannot act on SIGTERM."""
        if self.pid <= 0:
            return False
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        fields = stat.rsplit(")", 1)[-1].split()
        return bool(fields) and fields[0] in {"T", "t"}

    def wait(self, timeout: float) -> bool:
        """True once the process has exited (reaped by the waiter thread) within timeout."""
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def status(self) -> WorkerStatus:
        code, sig = split_returncode(self.returncode)
        p = self.progress
        return WorkerStatus(
            attempt_id=self.attempt_id,
            rank=self.rank,
            local_rank=self.local_rank,
            pid=self.pid,
            state="running" if self.running else "exited",
            exit_code=code,
            signal=sig,
            started_unix=self.started_unix,
            ended_unix=self.ended_unix,
            last_step=p.last_step,
            last_progress_unix=p.last_progress_unix,
            first_progress_unix=p.first_progress_unix,
            median_step_s=p.median_step_s(),
            median_compute_s=p.median_compute_s(),
            metrics=dict(p.metrics),
        )

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for line in iter(lambda: stream.readline(_MAX_LINE), b""):
                self.log.write(line)
                update = self._matcher.match(line.decode("utf-8", "replace"), time.time())
                if update is not None:
                    self._on_progress(self, update)
        self.log.close()

    def _wait(self) -> None:
        assert self._proc is not None
        returncode = self._proc.wait()
        self.ended_unix = time.time()
        self.returncode = returncode
        self._on_exit(self)


def split_returncode(returncode: int | None) -> tuple[int | None, int | None]:
    """(exit_code, signal): Popen gives ``-N`` for a death by signal N."""
    if returncode is None:
        return None, None
    return (None, -returncode) if returncode < 0 else (returncode, None)
