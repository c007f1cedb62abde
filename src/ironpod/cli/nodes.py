"""``ironpod nodes``, ``drain``, ``undrain``: the operator's view of the machines."""

from __future__ import annotations

from typing import Annotated

import typer

from ironpod.cli import render
from ironpod.cli.common import client, console, print_json

JsonFlag = Annotated[bool, typer.Option("--json", help="print the API's JSON instead")]


def nodes(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """List the nodes: state and why, capacity, the attempt each runs, heartbeat age."""
    with client(ctx) as api:
        found = api.nodes()
    if as_json:
        print_json(found)
    elif not found:
        console.print("no nodes have joined (start agents with `ironpod agent`, or `ironpod up`)")
    else:
        console.print(render.nodes_table(found))


def drain(ctx: typer.Context, node: Annotated[str, typer.Argument(help="node name or id")]) -> None:
    """Take a node out of scheduling; its running attempt finishes first (then: drained)."""
    with client(ctx) as api:
        view = api.drain(node)
    console.print(f"{view['name']}: {view['state']} ({view['reason']})")


def undrain(
    ctx: typer.Context, node: Annotated[str, typer.Argument(help="node name or id")]
) -> None:
    """Return a drained or quarantined node to service (its failure count starts afresh)."""
    with client(ctx) as api:
        view = api.undrain(node)
    console.print(f"{view['name']}: {view['state']} ({view['reason']})")


def register(app: typer.Typer) -> None:
    app.command()(nodes)
    app.command()(drain)
    app.command()(undrain)
