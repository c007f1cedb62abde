"""bench/goodput.py still runs end to end. A smoke test: its timings are never asserted.

``--quick`` trains 30 short steps under ironpod (a local cluster) and under torchrun, with one
crash each: about 35 s on an idle 2-core machine. The timeouts leave room for a loaded one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env, python

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
def test_goodput_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "goodput.json"
    work = tmp_path / "work"
    proc = python(
        [str(ROOT / "bench" / "goodput.py"), "--quick", "--dir", str(work), "--json", str(out)],
        env=clean_env(IRONPOD_CACHE_DIR=str(tmp_path / "cache")),
        timeout=220,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "Goodput under faults" in proc.stdout
    assert "Per fault: seconds after the injection" in proc.stdout
    raw = json.loads(out.read_text())
    assert [run["system"] for run in raw["runs"]] == ["ironpod", "torchrun-fresh"]
    assert [fault["kind"] for fault in raw["schedule"]] == ["crash"]
    assert not list(work.iterdir()), "the bench left its cluster, logs or checkpoints behind"
