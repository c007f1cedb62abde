"""``ironpod launch`` as torchrun's replacement: two nodes, an embedded controller, a restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SCRIPTS, clean_env, free_port

pytestmark = pytest.mark.slow


def test_two_node_launch_recovers_a_crash(tmp_path: Path) -> None:
    port = free_port()
    job_dir = tmp_path / "job"

    def node(rank: int) -> subprocess.Popen[str]:
        argv = [
            sys.executable, "-m", "ironpod.cli", "launch",
            "--nnodes", "2", "--nproc_per_node", "2", "--node-rank", str(rank),
            f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts", "2",
            "--job-dir", str(job_dir), str(SCRIPTS / "launch_worker.py"),
        ]  # fmt: skip
        return subprocess.Popen(
            argv, env=clean_env(), cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    follower, leader = node(1), node(0)
    lead_out, _ = leader.communicate(timeout=180)
    follow_out, _ = follower.communicate(timeout=60)
    assert leader.returncode == 0, lead_out
    assert follower.returncode == 0, follow_out
    assert "job succeeded" in lead_out
    logs = sorted(job_dir.glob("nodes/*/logs/*/rank-3.log"))
    assert len(logs) == 2  # attempt 0 crashed, attempt 1 finished
    text = "".join(p.read_text() for p in logs)
    assert "crashing on purpose" in text
    assert "world 4 sum 10.0 attempt 1" in text


def test_bad_flags_are_one_line_errors(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ironpod.cli", "launch", "--nnodes", "2", "--node-rank", "5",
         "train.py"],
        env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --node-rank 5 is not within --nnodes 2"
