"""The compat suite's one harness: a third-party script under ``ironpod launch``, a fault, a
resume, and the comparison with an uninterrupted run.

Every script prints ``compat <event> key=value ...`` lines (tests/compat/scripts/_common.py);
the harness reads them from the agent's per-rank logs, where an operator would read them:
``<job-dir>/nodes/<node>/logs/attempt-<id>/rank-<r>.log``, one folder per attempt. A fault is
a signal to a worker's process group: each worker leads its own (the agent starts it in a new
session), and the pid comes from the script's own ``start`` line, so nothing depends on how
the agent names or nests its processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from tests.conftest import clean_env, free_port
from tests.recovery_util import poll

SCRIPTS = Path(__file__).resolve().parent / "scripts"
_LINE = re.compile(r"^compat (\w+)((?: \S+=\S+)*)\s*$")
#: A faulted run's pacing: slow enough that a signal lands mid-run on a busy 2-core machine.
STEP_SLEEP_S = "0.1"
#: Extra ``ironpod launch`` flags, split on spaces (e.g. ``--hang-timeout 30`` to tell a stack's
#: problem from the hang rule's). CI leaves it unset: the suite tests the product's defaults.
LAUNCH_ARGS_ENV = "IRONPOD_COMPAT_LAUNCH_ARGS"
#: Generous: 2 busy cores, framework imports of several seconds, a controller and an agent.
RUN_TIMEOUT_S = 300.0


def stack_env(**extra: str) -> dict[str, str]:
    """The environment every stack runs in: offline, no trackers, one thread, CPU DeepSpeed."""
    return clean_env(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        DS_ACCELERATOR="cpu",
        PYTHONHASHSEED="0",
        **extra,
    )


def events(text: str, kind: str | None = None) -> list[dict[str, str]]:
    """The ``compat`` lines of a log, each as its fields plus ``event``."""
    out = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and (kind is None or match.group(1) == kind):
            fields = dict(item.split("=", 1) for item in match.group(2).split())
            out.append({"event": match.group(1), **fields})
    return out


def reference(
    script: str, out: Path, args: list[str], nproc: int = 2
) -> subprocess.CompletedProcess[str]:
    """The uninterrupted run, under plain torchrun: what ironpod must be a drop-in for."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        str(SCRIPTS / script), "--out", str(out), *args,
    ]  # fmt: skip
    done = subprocess.run(
        cmd, env=stack_env(), cwd=out.parent, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-8000:]
    return done


@dataclass
class Launch:
    """One ``ironpod launch`` of a compat script (one node, ``nproc`` ranks)."""

    proc: subprocess.Popen[str]
    job_dir: Path
    out: Path
    output: str = ""
    signalled: list[int] = field(default_factory=list)

    def attempt_logs(self, rank: int) -> list[Path]:
        """``rank``'s log of every attempt so far, oldest first."""
        found = self.job_dir.glob(f"nodes/*/logs/attempt-*/rank-{rank}.log")
        return sorted(found, key=lambda p: int(p.parent.name.split("-")[1]))

    def attempt_events(self, rank: int, kind: str | None = None) -> list[list[dict[str, str]]]:
        return [events(p.read_text(errors="replace"), kind) for p in self.attempt_logs(rank)]

    def wait_step(self, rank: int, step: int, attempt: int = 0, timeout: float = 180) -> int:
        """The pid of ``rank`` in attempt number ``attempt`` (0 = first) once it logged ``step``."""

        def reached() -> int | None:
            logs = self.attempt_events(rank)
            if len(logs) <= attempt:
                self._check_alive()
                return None
            seen = logs[attempt]
            steps = [int(e["step"]) for e in seen if e["event"] == "step"]
            pids = [int(e["pid"]) for e in seen if e["event"] == "start"]
            return pids[0] if pids and steps and max(steps) >= step else None

        return poll(reached, timeout, f"rank {rank} to log step {step} in attempt {attempt}")

    def signal(self, pid: int, sig: signal.Signals) -> None:
        """``sig`` to a worker's process group (the worker leads it)."""
        self.signalled.append(pid)
        os.killpg(pid, sig)

    def wait_restart(self, rank: int = 0, timeout: float = 180) -> None:
        poll(lambda: len(self.attempt_logs(rank)) >= 2, timeout, "a second attempt", every=0.2)

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> str:
        """Wait for launch to exit; its output (asserting it exited 0: the job succeeded)."""
        try:
            self.output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            late = f"ironpod launch still running after {timeout:.0f} s"
            raise AssertionError(f"{late}\n{self.tail()}") from None
        assert self.proc.returncode == 0, f"launch exited {self.proc.returncode}\n{self.tail()}"
        assert "job succeeded" in self.output, self.tail()
        return self.output

    def tail(self) -> str:
        """The launch output and the end of every rank log: what a failed assertion shows."""
        parts = [self.output[-3000:]]
        for path in sorted(self.job_dir.glob("nodes/*/logs/attempt-*/rank-*.log")):
            parts.append(
                f"--- {path.relative_to(self.job_dir)}\n{path.read_text(errors='replace')[-3000:]}"
            )
        return "\n".join(parts)

    def close(self) -> None:
        """Whatever is left of the launch tree goes (a stopped worker is continued first)."""
        with contextlib.suppress(psutil.Error):
            tree = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]
            for proc in tree:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
        for pid in self.signalled:
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.communicate(timeout=10)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            self.output, _ = self.proc.communicate()
            raise AssertionError(f"launch exited {self.proc.returncode} early\n{self.tail()}")


@contextlib.contextmanager
def launched(
    script: str, tmp_path: Path, args: list[str], *, nproc: int = 2, max_restarts: int = 2,
    **env: str,
) -> Iterator[Launch]:  # fmt: skip
    """``ironpod launch --nproc-per-node nproc SCRIPT --out tmp_path/run ARGS``, paced."""
    out = tmp_path / "run"
    job_dir = tmp_path / "job"
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "ironpod.cli", "launch", "--nnodes", "1",
        "--nproc-per-node", str(nproc), f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--max-restarts", str(max_restarts), "--job-dir", str(job_dir),
        *os.environ.get(LAUNCH_ARGS_ENV, "").split(),
        str(SCRIPTS / script), "--out", str(out), *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, env=stack_env(COMPAT_STEP_SLEEP=STEP_SLEEP_S, **env), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    run = Launch(proc=proc, job_dir=job_dir, out=out)
    try:
        yield run
    finally:
        run.close()


def assert_states_equal(got: Path, want: Path, *, atol: float = 0.0) -> None:
    """Two saved state dicts: the same keys, every tensor equal (bitwise when ``atol`` is 0)."""
    a = torch.load(got, weights_only=True)
    b = torch.load(want, weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), (
                f"{key} differs: max |diff| {(a[key] - b[key]).abs().max()}"
            )
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def crash_and_resume(
    launch: Launch, *, kill_rank: int = 1, kill_after: int, save_every: int, sig: signal.Signals
) -> dict[str, int]:
    """Fault ``kill_rank`` once it logged ``kill_after``; the job must finish in two attempts,
    the second resuming from the stack's newest checkpoint of the first. The numbers seen."""
    pid = launch.wait_step(kill_rank, kill_after)
    launch.signal(pid, sig)
    launch.finish()
    per_attempt = launch.attempt_events(0)
    assert len(per_attempt) == 2, (
        f"{len(per_attempt)} attempts, want 2 (one restart)\n{launch.tail()}"
    )
    first, second = per_attempt
    saved = [int(e["step"]) for e in first if e["event"] == "saved"]
    resumed = [int(e["step"]) for e in second if e["event"] == "resumed"]
    assert saved, f"no checkpoint in the first attempt\n{launch.tail()}"
    assert resumed, f"the second attempt did not resume\n{launch.tail()}"
    assert not any(e["event"] == "resumed" for e in first)
    assert resumed[0] % save_every == 0 and resumed[0] >= save_every
    # The newest complete checkpoint, or (for a stack that logs "saved" after another rank
    # may already have died) the one before it.
    assert resumed[0] in saved[-2:], (saved, resumed)
    steps = [int(e["step"]) for e in second if e["event"] == "step"]
    assert steps and steps[0] == resumed[0] + 1, steps[:3]
    return {"resumed": resumed[0], "last_saved": saved[-1], "killed_after": kill_after}
