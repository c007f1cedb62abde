"""The per-point line and the table at the end."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def _errors(out: dict[str, Any]) -> str:
    errs = out.get("errors", {})
    return ", ".join(f"{k} {n}" for k, n in sorted(errs.items())) if errs else "0"


def _jobs(out: dict[str, Any]) -> str:
    parts = []
    for job in out.get("jobs", []):
        if "submit_to_running_s" in job:
            parts.append(f"{job['nodes']}: {job['submit_to_running_s']:.1f} s")
        else:
            parts.append(f"{job['nodes']}: {job.get('state', '?')}")
    return ", ".join(parts) or "-"


def line(out: dict[str, Any]) -> str:
    p, cpu = out["point"], out.get("cpu", {})
    lat = out.get("latency_ms", {})
    return (
        f"{p['nodes']} nodes, {p['db']}, jobs [{_jobs(out)}]: "
        f"{out.get('achieved_hb_s', 0):.0f}/{out.get('offered_hb_s', 0):.0f} beats/s answered/"
        f"offered (target {out.get('target_hb_s', 0):.0f}), p50 {_fmt(lat.get('p50'), '.1f')} "
        f"p99 {_fmt(lat.get('p99'), '.1f')} max {_fmt(lat.get('max'), '.1f')} ms, errors "
        f"{_errors(out)}, false losses {out.get('nodes_lost', '?')}, controller "
        f"{_fmt(cpu.get('controller_pct'))}% of a core, generators "
        f"{_fmt(cpu.get('generators_pct'))}%"
    )


def report(raw: dict[str, Any], console: Console) -> None:
    table = Table(
        title="The controller under simulated nodes (a measured window after the join); "
        f"controller {raw['controller']}",
        caption=f"{raw['cores']} cores shared by the controller, the load generators and the "
        "database server: their CPU is in the table. % = of one core over the window. "
        "Latency from the beat's due time to the whole reply. False losses: node_lost events "
        "while every node was kept alive; unheard: nodes the controller had not heard from for "
        "over lost-after when they stopped; silent: nodes whose answered beats came further "
        "apart than that, as the simulator saw them.",
    )
    columns = (
        "nodes", "db", "jobs: submit->running", "target/s", "offered/s", "answered/s",
        "p50 ms", "p99 ms", "max ms", "errors", "false losses", "join s", "controller CPU",
        "generators", "db server", "other", "RSS MiB",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("db", "errors") else "right")
    for out in raw["points"]:
        p, cpu, lat = out["point"], out.get("cpu", {}), out.get("latency_ms", {})
        rss = out.get("controller_peak_rss_bytes")
        lost = out.get("nodes_lost")
        more = [
            f"{out[key]} {word}"
            for key, word in (("nodes_unheard_at_stop", "unheard"), ("silent_nodes", "silent"))
            if out.get(key)
        ]
        table.add_row(
            str(p["nodes"]),
            p["db"],
            _jobs(out) if p["jobs"] else "none",
            _fmt(out.get("target_hb_s")),
            _fmt(out.get("offered_hb_s")),
            _fmt(out.get("achieved_hb_s")),
            _fmt(lat.get("p50"), ".1f"),
            _fmt(lat.get("p99"), ".1f"),
            _fmt(lat.get("max"), ".0f"),
            _errors(out),
            ("?" if lost is None else f"[red]{lost}[/]" if lost else "0")
            + (f" ({', '.join(more)})" if more else ""),
            _fmt(out.get("join_s"), ".1f"),
            f"{_fmt(cpu.get('controller_s'), '.1f')} s, {_fmt(cpu.get('controller_pct'))}%",
            f"{_fmt(cpu.get('generators_pct'))}%",
            "-"
            if cpu.get("postgres_s") is None
            else f"{100 * cpu['postgres_s'] / cpu['wall_s']:.0f}%",
            f"{_fmt(cpu.get('other_pct'))}%",
            _fmt(None if rss is None else rss / 2**20),
        )
    console.print(table)
    for out in raw["points"]:
        notes = [f"[red]did not run: {out['error']}[/]"] if "error" in out else []
        if out.get("capped"):
            notes.append("the request cap was reached (nodes stopped sending)")
        if "registered" in out and out["registered"] < out["point"]["nodes"]:
            notes.append(f"only {out.get('registered')} of {out['point']['nodes']} registered")
        if out.get("lost_causes"):
            notes.append(f"lost: {out['lost_causes'][0]}")
        if out.get("end_query_error"):
            notes.append(f"end-of-point query failed: {out['end_query_error']}")
        if out.get("generator_crashes"):
            notes.append(f"generator errors: {out['generator_crashes'][:2]}")
        for note in notes:
            console.print(f"[dim]{out['point']['nodes']} nodes, {out['point']['db']}: {note}[/]")
