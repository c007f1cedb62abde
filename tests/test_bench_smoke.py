"""bench/checkpoint.py still runs end to end. A smoke test: its timings are never asserted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, python


@pytest.mark.timeout(120)
def test_checkpoint_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "stall.json"
    proc = python(
        [
            str(ROOT / "bench" / "checkpoint.py"),
            "--quick",
            "--dir",
            str(tmp_path / "ckpt"),
            "--json",
            str(out),
        ],
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Checkpoint stall per save" in proc.stdout
    assert re.search(
        r"^tiny: torch\.save stalls [\d.]+x as long as ironpod async", proc.stdout, re.M
    )
    raw = json.loads(out.read_text())
    assert [size["name"] for size in raw["sizes"]] == ["tiny"]
    assert not list((tmp_path / "ckpt").iterdir()), "the bench left checkpoints behind"
