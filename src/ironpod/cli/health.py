"""``ironpod health [NODE]``: each node's latest health results, as its agent reported them."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.table import Table

from ironpod.cli import render
from ironpod.cli.common import client, console, fail, print_json
from ironpod.client import NodeView

_STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _number(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.4g} {unit}".strip() if isinstance(value, int | float) else str(value)


def health_table(nodes: list[NodeView], *, all_rows: bool) -> Table:
    out = render.table(
        "NODE", "STATE", "CHECK", "TARGET", "STATUS", "VALUE", "THRESHOLD", "MESSAGE"
    )
    now = time.time()
    for node in nodes:
        results = node.get("health") or {}
        run = results.get("_run") or {}
        when = f" (run {render.age(run['time_unix'], now)} ago)" if run.get("time_unix") else ""
        rows = [r for name, found in sorted(results.items()) if name != "_run" for r in found]
        shown = rows if all_rows else [r for r in rows if r.get("status") != "skip"]
        if not shown:
            out.add_row(
                node["name"], render.state(node["state"]), "-", "", "", "", "", "no results"
            )
        for i, row in enumerate(shown):
            status = str(row.get("status", ""))
            out.add_row(
                node["name"] if i == 0 else "",
                render.state(node["state"]) if i == 0 else "",
                row.get("check", ""),
                row.get("target", ""),
                f"[{_STATUS_STYLE.get(status, '')}]{status}[/]",
                _number(row.get("value"), row.get("unit", "")),
                _number(row.get("threshold"), row.get("unit", "")),
                (row.get("message", "") + when) if i == 0 else row.get("message", ""),
            )
    return out


def health(
    ctx: typer.Context,
    node: Annotated[str | None, typer.Argument(help="node name or id (default: all)")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="also the skipped checks")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the API's JSON instead")] = False,
) -> None:
    """The latest health check results per node: check, status, value, threshold, message."""
    with client(ctx) as api:
        found = api.nodes()
    if node is not None:
        found = [n for n in found if node in (n["name"], str(n["id"]))]
        if not found:
            fail(f"no node {node!r}", 1)
    if as_json:
        print_json({n["name"]: n.get("health") or {} for n in found})
    elif not found:
        console.print("no nodes have joined")
    else:
        console.print(health_table(found, all_rows=all_rows))


def register(app: typer.Typer) -> None:
    app.command()(health)
