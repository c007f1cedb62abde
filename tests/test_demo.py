"""The README's main command, shortened: a local cluster trains through a crash and a hang."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import clean_env, python

pytestmark = pytest.mark.slow


def test_demo_survives_its_faults(tmp_path: Path) -> None:
    proc = python(
        [
            "-m",
            "ironpod.cli",
            "demo",
            "--steps",
            "40",
            "--faults",
            "crash@12,hang@25",
            "--every",
            "5",
            "--workdir",
            str(tmp_path / "demo"),
            "--set",
            "data.max_bytes=400000",
            "--set",
            "data.seq_len=64",
            "--set",
            "model.n_layers=2",
            "--set",
            "train.global_batch=8",
            "--set",
            "train.eval_every=20",
        ],
        env=clean_env(IRONPOD_CACHE_DIR=str(tmp_path / "cache"), COLUMNS="200"),
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "crash: rank 1" in out and "killed by signal 9" in out
    assert "hang: rank" in out
    assert "job succeeded" in out
    assert "goodput: ETTR" in out
    assert not (tmp_path / "demo" / "cluster" / "cluster.json").exists()  # the cluster is down
