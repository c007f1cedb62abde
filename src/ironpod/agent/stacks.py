"""Python stacks of a hung worker, taken from outside the process with py-spy.

py-spy reads the interpreter's memory (ptrace), so it works on a worker stuck in a collective,
in C code, or stopped, without any cooperation from the script. Without py-spy nothing is
sent to a worker unless its beacons announced that ``ironpod.train`` registered faulthandler
on SIGUSR1 (an unprepared process would die of it); such a worker writes its own stacks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

NO_PY_SPY = "(no py-spy installed: stacks unavailable)"


def find_py_spy() -> str | None:
    """py-spy on PATH, or next to this interpreter (a virtual environment not on PATH)."""
    found = shutil.which("py-spy")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return beside if os.access(beside, os.X_OK) else None


def capture_stacks(
    pids: list[int], *, timeout_s: float = 10.0, sigusr1_pid: int | None = None
) -> str:
    """``py-spy dump`` of each process in turn, all within ``timeout_s``; the text to log.

    Without py-spy, ``sigusr1_pid`` (a worker that announced its faulthandler) is sent
    SIGUSR1 and writes its stacks into its own log.
    """
    exe = find_py_spy()
    if exe is None:
        if sigusr1_pid is None:
            return NO_PY_SPY
        try:
            os.kill(sigusr1_pid, signal.SIGUSR1)
        except ProcessLookupError:
            return f"pid {sigusr1_pid}: gone before its stacks could be asked for"
        return f"(no py-spy: sent SIGUSR1; pid {sigusr1_pid} writes its stacks via faulthandler)"
    deadline = time.monotonic() + timeout_s
    return "\n".join(_dump_one(exe, pid, deadline) for pid in pids)


def _dump_one(exe: str, pid: int, deadline: float) -> str:
    error = "out of time"
    # Pausing the process gives consistent stacks but fails on a stopped one (SIGSTOP, a
    # debugger attached); reading its memory while it runs (--nonblocking) works on both.
    for flags in ([], ["--nonblocking"]):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            done = subprocess.run(
                [exe, "dump", *flags, "--pid", str(pid)],
                capture_output=True,
                text=True,
                timeout=left,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"pid {pid}: py-spy dump timed out"
        if done.returncode == 0:
            return done.stdout.rstrip()
        error = _why(done.stderr or done.stdout)
    return f"pid {pid}: py-spy dump failed: {error}"


def _why(output: str) -> str:
    """py-spy's error and its causes, without the backtrace: "Error: ...; 0: ...; 1: ..."."""
    lines = [line.strip() for line in output.strip().splitlines()]
    if "Stack backtrace:" in lines:
        lines = lines[: lines.index("Stack backtrace:")]
    return "; ".join(line for line in lines if line and line != "Caused by:") or "no output"
