"""init(): the job context from the environment, and graceful stop on SIGTERM."""

from __future__ import annotations

import pytest

import ironpod.train as it
from ironpod import env
from ironpod.errors import ConfigError
from tests.conftest import clean_env, python


def test_context_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.JOB_ID, "job-7")
    monkeypatch.setenv(env.ATTEMPT_ID, "2")
    monkeypatch.setenv(env.CHECKPOINT_DIR, "s3://bucket/run")
    monkeypatch.setenv(env.RANK, "0")
    monkeypatch.setenv(env.WORLD_SIZE, "1")
    ctx = it.init(device="cpu")
    assert (ctx.job_id, ctx.attempt_id, ctx.checkpoint_dir) == ("job-7", 2, "s3://bucket/run")
    assert ctx.is_main and not ctx.is_distributed and ctx.device.type == "cpu"


def test_bad_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(env.WORLD_SIZE, "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        it.init(device="cpu")
    monkeypatch.setenv(env.WORLD_SIZE, "2")
    monkeypatch.setenv(env.RANK, "5")
    with pytest.raises(ConfigError, match="RANK=5 is not within"):
        it.init(device="cpu")


STOP_SCRIPT = """
import os, signal, sys
import ironpod.train as it
ctx = it.init(device="cpu")
assert not ctx.should_stop()
os.kill(os.getpid(), signal.SIGTERM)
assert ctx.should_stop() and ctx.should_stop_all()
print("stopping cleanly")
sys.exit(it.EXIT_PREEMPTED)
"""


def test_sigterm_requests_a_graceful_stop() -> None:
    proc = python(["-c", STOP_SCRIPT], env=clean_env())
    assert proc.returncode == it.EXIT_PREEMPTED, proc.stderr
    assert "stopping cleanly" in proc.stdout
