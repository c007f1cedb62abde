"""Stacks of a hung worker without py-spy: ironpod.train's faulthandler on SIGUSR1."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from ironpod.agent import stacks
from ironpod.agent.progress import ProgressUpdate, RankProgress
from tests.conftest import clean_env

WORKER = """
import time, ironpod.train as it
from ironpod.train import beacon
ctx = it.init(device="cpu")
def stuck_in_a_collective():
    # Announced from in here: the test's SIGUSR1 may land before the sleep, but in this frame.
    print("announced", beacon._announce, flush=True)
    time.sleep(60)
stuck_in_a_collective()
"""


def test_sigusr1_fallback_writes_the_stacks_into_the_workers_log(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stacks, "find_py_spy", lambda: None)
    assert stacks.capture_stacks([123]) == stacks.NO_PY_SPY  # unannounced: no signal sent
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None

    def read() -> None:
        for line in proc.stderr or ():
            err.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert "'stacks_sigusr1': 1" in proc.stdout.readline()
        note = stacks.capture_stacks([proc.pid], sigusr1_pid=proc.pid)
        assert "sent SIGUSR1" in note
        # On a busy machine the dump may take a while to be scheduled: wait for it (a fixed
        # sleep raced it), then check that the worker lives on.
        deadline = time.monotonic() + 60
        while not any("stuck_in_a_collective" in line for line in err):
            assert time.monotonic() < deadline, f"no stacks in 60 s: {''.join(err)}"
            assert proc.poll() is None, f"the worker died of SIGUSR1: {''.join(err)}"
            time.sleep(0.05)
        assert proc.poll() is None  # the handler dumped stacks; the worker lives on
    finally:
        proc.kill()
        proc.wait(timeout=10)
        reader.join(timeout=10)


def test_checkpoint_stall_is_counted_once_per_step() -> None:
    rank = RankProgress()
    for t, step, stall in ((1.0, 10, 0.25), (1.01, 10, 0.25), (2.0, 11, None), (3.0, 20, 0.5)):
        metrics = {"ckpt_block_s": stall} if stall is not None else {}
        rank.record(ProgressUpdate(t=t, step=step, metrics=metrics))  # type: ignore[arg-type]
    assert rank.metrics["ckpt_block_total_s"] == pytest.approx(0.75)
