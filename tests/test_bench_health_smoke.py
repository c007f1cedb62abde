"""bench/health.py still runs end to end. A smoke test: its timings are never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, python


@pytest.mark.timeout(90)
def test_health_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "health.json"
    proc = python([str(ROOT / "bench" / "health.py"), "--quick", "--json", str(out)], timeout=80)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Detection time per check kind" in proc.stdout
    raw = json.loads(out.read_text())
    kinds = {k["check"]: k for k in raw["kinds"]}
    assert {"system.clock_skew", "gpu.ecc", "gpu.count", "gpu.thermal", "gpu.xid_events"} <= {
        c for c, k in kinds.items() if not k["skipped"]
    }
    for check, kind in kinds.items():
        if kind["skipped"]:
            assert kind["detections"] == [], check
            continue
        (found,) = kind["detections"]  # --quick: one fault per kind, and it was detected
        assert found["detect_s"] > 0 and found["runs"] >= 1, (check, found)
        assert check in proc.stdout
