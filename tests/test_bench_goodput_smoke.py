"""bench/goodput.py still runs end to end. A smoke test: its timings are never asserted.

``--quick`` runs both workloads briefly, each system once with one crash and once without:
the unmodified script under ``ironpod launch`` and ``torchrun --standalone`` with a fresh
store (30 steps), the GPT recipe under a local cluster (30 short steps; torchrun's recipe
path is the same class as its script path). About two minutes on an idle 2-core machine; the
timeouts leave room for a loaded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env, python

pytestmark = pytest.mark.slow


@pytest.mark.timeout(900)
def test_goodput_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "goodput.json"
    work = tmp_path / "work"
    proc = python(
        [str(ROOT / "bench" / "goodput.py"), "--quick", "--dir", str(work), "--json", str(out)],
        env=clean_env(IRONPOD_CACHE_DIR=str(tmp_path / "cache")),
        timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for title in ("Goodput under faults, script", "Goodput under faults, recipe", "Per fault"):
        assert title in proc.stdout
    assert "Fault-free runs: the overhead of each system against bare torchrun" in proc.stdout
    raw = json.loads(out.read_text())
    runs = [(r["workload"], r["system"], r["fault_free"]) for r in raw["runs"]]
    assert runs == [
        ("script", "ironpod-launch", False),
        ("script", "torchrun-fresh", False),
        ("script", "ironpod-launch", True),
        ("script", "torchrun", True),
        ("recipe", "ironpod", False),
        ("recipe", "ironpod", True),
    ]
    assert all(r["finished"] for r in raw["runs"]), [r["reason"] for r in raw["runs"]]
    assert {w: [f["kind"] for f in fs] for w, fs in raw["schedule"].items()} == {
        "script": ["crash"],
        "recipe": ["crash"],
    }
    # every finished run of a workload ends on the same loss: the resumes are exact
    for workload in ("script", "recipe"):
        losses = {r["final_loss"] for r in raw["runs"] if r["workload"] == workload}
        assert len(losses) == 1, (workload, losses)
    assert not list(work.iterdir()), "the bench left its cluster, logs or checkpoints behind"
