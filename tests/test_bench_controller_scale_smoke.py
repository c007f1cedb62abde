"""bench/controller_scale.py still runs end to end against a real controller. A smoke test: its
timings are never asserted, only what must hold at 50 nodes on any machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, python


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_controller_scale_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    # --quick: 50 nodes joining within 2 s, 1 s beats, lost after 10 s (a busy machine's late
    # beat is not a loss), 6 s measured, one 8-node job. The bench bounds itself (~3 minutes
    # at worst); the timeout here is for a bench that hangs.
    proc = python(
        [str(ROOT / "bench" / "controller_scale.py"), "--quick", "--json", str(out)], timeout=280
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "The controller under simulated nodes" in proc.stdout
    (point,) = json.loads(out.read_text())["points"]
    assert "error" not in point, point["error"]
    nodes = point["point"]["nodes"]
    assert point["registered"] == nodes == point["nodes_known"]
    assert point["events"]["node_registered"] == nodes
    assert point["generators_reported"] == point["point"]["generators"]
    assert point["generator_crashes"] == []
    assert not point["capped"]
    assert point["requests"]["heartbeat_ok_window"] > 0 and point["achieved_hb_s"] > 0
    # no server error; a 503 with Retry-After (back-pressure on a busy machine) may happen
    assert point["errors_5xx_not_busy"] == 0, point["errors"]
    assert point["node_lost_events"] == 0 and point["nodes_lost"] == 0, point["lost_causes"]
    assert point["nodes_unheard_at_stop"] == 0  # nor had it stopped hearing from any
    (job,) = point["jobs"]
    assert job["nodes"] == 8 and job["state"] == "running", job
    assert job["submit_to_running_s"] >= 0
    assert job["nodes_assigned"] == 8  # the simulator saw the assignment on all 8 nodes
    assert point["controller_alive"]  # it stayed up until the bench stopped it
    assert point["cpu"]["controller_s"] > 0
