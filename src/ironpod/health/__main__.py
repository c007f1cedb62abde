"""``python -m ironpod.health``: run the standard suite on this node and print the results.

    python -m ironpod.health --level deep --work-dir /tmp/ironpod-health
    python -m ironpod.health --json --baseline matmul_gflops=110 --skip gpu.dcgm_diag

Exits 1 when a check fails, else 0 (warnings and skips included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ironpod.health.core import (
    CheckResult,
    HealthContext,
    Level,
    Status,
    default_checks,
    run_checks,
    worst,
)

_STYLE = {Status.PASS: "green", Status.WARN: "yellow", Status.FAIL: "bold red", Status.SKIP: "dim"}


def _baseline(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, float(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ironpod.health", description=__doc__)
    parser.add_argument("--level", choices=[lv.value for lv in Level], default=Level.LIGHT.value)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/ironpod-health"))
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--expected-gpus", type=int)
    parser.add_argument(
        "--baseline",
        type=_baseline,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a node-class baseline, e.g. matmul_gflops=110 (repeatable)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="CHECK",
        help="leave out a check by name, e.g. gpu.dcgm_diag (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument("--json-out", type=Path, help="also write the JSON rows to this file")
    return parser


def render(results: list[CheckResult], console: Console) -> None:
    table = Table(title="ironpod health")
    table.add_column("status", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("target", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("limit", justify="right", no_wrap=True)
    table.add_column("message")
    table.add_column("s", justify="right", no_wrap=True)
    for r in results:
        table.add_row(
            f"[{_STYLE[r.status]}]{r.status.value}[/]",
            r.check,
            r.target,
            "" if r.value is None else f"{r.value:.4g} {r.unit}",
            "" if r.threshold is None else f"{r.threshold:.4g}",
            r.message,
            f"{r.duration_s:.2f}",
        )
    console.print(table)
    console.print(f"overall: [{_STYLE[worst(results)]}]{worst(results).value}[/]")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    ctx = HealthContext(
        work_dir=args.work_dir,
        checkpoint_dir=args.checkpoint_dir,
        expected_gpus=args.expected_gpus,
        baselines=dict(args.baseline),
    )
    checks = [c for c in default_checks(args.level) if c.name not in args.skip]
    results = run_checks(checks, ctx, args.level)
    rows = json.dumps([r.model_dump(mode="json") for r in results], indent=1)
    if args.json_out:
        args.json_out.write_text(rows + "\n")
    if args.json:
        print(rows)
    else:
        render(results, Console())
    return 1 if worst(results) is Status.FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
