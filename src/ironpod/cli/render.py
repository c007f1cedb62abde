"""How the CLI shows the controller's replies: Rich tables, times and durations.

Kept apart from the commands so every view of a job (``jobs``, ``describe``, the live view of
``run --follow``) formats a state, a step or a goodput figure the same way. Ages are computed
against this machine's clock: the API sends absolute Unix times, not the controller's "now".
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ironpod.client import AttemptView, EventView, Goodput, JobView, NodeView

STATE_STYLES = {
    "ready": "green",
    "busy": "cyan",
    "joining": "yellow",
    "lost": "bold red",
    "quarantined": "red",
    "draining": "yellow",
    "drained": "dim",
    "queued": "yellow",
    "starting": "cyan",
    "running": "green",
    "recovering": "bold yellow",
    "preempting": "yellow",
    "stopping": "yellow",
    "succeeded": "bold green",
    "failed": "bold red",
    "cancelled": "dim",
    "stopped": "dim",
}


def state(text: str) -> Text:
    return Text(text, style=STATE_STYLES.get(text, ""))


def table(*columns: str, title: str | None = None) -> Table:
    out = Table(*columns, title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    out.title_style = "bold"
    return out


def age(since_unix: float | None, now: float | None = None) -> str:
    if since_unix is None:
        return "-"
    return duration((now or time.time()) - since_unix)


def duration(seconds: float | None) -> str:
    """Short and sortable by eye: 850ms, 12.3s, 4m05s, 2h07m."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def clock(unix: float | None) -> str:
    """Wall-clock time with milliseconds: recovery is measured in fractions of a second."""
    if unix is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(unix)) + f".{int(unix % 1 * 1000):03d}"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def metric(metrics: dict[str, Any], *keys: str, fmt: str = "{:.4g}") -> str:
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, int | float):
            return fmt.format(value)
    return "-"


def ettr(job: JobView) -> str:
    good = job.get("goodput")
    return percent(good["ettr"]) if good else "-"


def job_size(job: JobView) -> str:
    spec = job["spec"]
    return f"{spec.get('nodes', 1)}x{spec.get('nproc_per_node', 1)}"


# -- tables


def nodes_table(nodes: list[NodeView]) -> Table:
    out = table("NAME", "STATE", "REASON", "CPUS", "MEMORY", "GPUS", "ATTEMPT", "HEARTBEAT")
    now = time.time()
    for node in nodes:
        out.add_row(
            node["name"],
            state(node["state"]),
            node["reason"],
            str(node["cpus"]),
            size(node["memory_bytes"]),
            str(len(node["gpus"])),
            "-" if node["attempt_id"] is None else str(node["attempt_id"]),
            age(node["last_heartbeat_unix"], now) + " ago",
        )
    return out


def jobs_table(jobs: list[JobView]) -> Table:
    out = table("ID", "NAME", "TEAM", "STATE", "SIZE", "RESTARTS", "STEP", "WALL", "ETTR", "REASON")
    now = time.time()
    for job in jobs:
        end = job["ended_unix"] or now
        out.add_row(
            str(job["id"]),
            job["name"],
            job["team"],
            state(job["state"]),
            job_size(job),
            str(job["restarts"]),
            "-" if job.get("last_step") is None else str(job.get("last_step")),
            duration(end - job["created_unix"]),
            ettr(job),
            job["reason"],
        )
    return out


def job_summary(job: JobView) -> Table:
    spec = job["spec"]
    restart = spec.get("restart", {})
    out = Table(box=None, show_header=False, pad_edge=False)
    out.add_column(style="bold")
    out.add_column()
    hang = restart.get("hang_timeout_s")
    rows: list[tuple[str, str | Text]] = [
        ("job", f"{job['name']} (id {job['id']}), team {job['team']}, priority {job['priority']}"),
        ("state", state(job["state"]).append(f"  {job['reason']}", style="")),
        ("size", f"{job_size(job)} (nodes x processes per node)"),
        ("command", " ".join(spec.get("command", []))),
        ("workdir", spec.get("workdir") or "(the agent's)"),
        ("checkpoints", spec.get("checkpoint_dir") or "-"),
        (
            "restart policy",
            f"at most {restart.get('max_restarts')} restarts in {restart.get('window_s')} s; "
            f"hang after {f'{hang} s' if hang else 'a derived timeout'} without progress; "
            f"{restart.get('max_failures_without_progress', 3)} identical failures before any "
            "step end it",
        ),
        ("submitted", clock(job["created_unix"])),
        ("started", clock(job["started_unix"])),
        ("ended", clock(job["ended_unix"])),
    ]
    if job.get("end_kind"):
        code = job.get("end_exit_code")
        rows.append(("end", job["end_kind"] + ("" if code is None else f" (exit code {code})")))
    for key, value in rows:
        out.add_row(key, value)
    return out


def attempts_table(attempts: list[AttemptView], node_names: dict[int, str]) -> Table:
    out = table(
        "#", "STATE", "NODES", "STEPS", "START", "FIRST STEP", "END", "CAUSE", title="attempts"
    )
    for a in attempts:
        steps = "-" if a["first_step"] is None else f"{a['first_step']}..{a['last_step']}"
        first = a["first_step_unix"]
        out.add_row(
            str(a["number"]),
            state(a["state"]),
            ",".join(node_names.get(i, str(i)) for i in a["node_ids"]),
            steps,
            clock(a["created_unix"]),
            "-" if first is None else f"{clock(first)} (+{duration(first - a['created_unix'])})",
            clock(a["ended_unix"]),
            a["end_cause"],
        )
    return out


def events_table(events: list[EventView], node_names: dict[int, str], hidden: int = 0) -> Table:
    title = "events" + (f" (latest {len(events)}; {hidden} earlier not shown)" if hidden else "")
    out = table("TIME", "KIND", "NODE", "CAUSE", title=title)
    for ev in events:
        node = "" if ev["node_id"] is None else node_names.get(ev["node_id"], str(ev["node_id"]))
        out.add_row(clock(ev["time_unix"]), ev["kind"], node, ev["cause"])
    return out


def goodput_table(good: Goodput) -> Table:
    """Where the wall time went (controller/ledger.py), each part as a share of the wall."""
    wall = good["wall_s"] or 1e-9
    out = table("PART", "TIME", "SHARE", title=f"goodput: ETTR {percent(good['ettr'])}")
    parts = [
        ("productive (kept steps)", good["productive_s"]),
        ("  of which checkpoint stall", good.get("checkpoint_stall_s", 0.0)),
        ("queued", good["queued_s"]),
        ("startup and restore", good["startup_restore_s"]),
        (f"recomputed ({good['recomputed_steps']} steps)", good["recomputed_s"]),
        (f"recovery gaps ({good['restarts']} restarts)", good["recovery_gap_s"]),
        ("other (lost progress, evaluation)", good["other_s"]),
    ]
    for name, seconds in parts:
        out.add_row(name, duration(seconds), percent(seconds / wall))
    out.add_row(Text("wall", style="bold"), duration(good["wall_s"]), "100%")
    return out


def checkpointing_table(job: JobView, attempts: list[AttemptView]) -> Table | None:
    """The durable interval the controller chose and why; where each restart restored from."""
    info = job.get("checkpointing") or {}
    rows = []
    if info.get("interval_s") is not None:
        rows.append(
            (
                "durable interval (Young/Daly)",
                f"{duration(info['interval_s'])} = sqrt(2 x cost {duration(info['cost_s'])}"
                f" x MTBF {duration(info['mtbf_s'])}), Daly-corrected; {info['failures']} "
                f"failures in {duration(info['runtime_s'])}, prior MTBF "
                f"{duration(info['prior_mtbf_s'])}",
            )
        )
    if info.get("durable_step") is not None:
        rows.append(("newest durable step", str(info["durable_step"])))
    for attempt in attempts:
        plan = attempt.get("restore")
        if attempt["number"] == 0:
            continue
        where = f"memory, step {plan['step']}" if plan else "durable tier"
        rows.append((f"attempt {attempt['number']} restored from", where))
    if not rows:
        return None
    out = table("CHECKPOINTS", "", title="checkpointing")
    for name, value in rows:
        out.add_row(name, value)
    return out


def recovery_table(events: Iterable[EventView], attempts: list[AttemptView]) -> Table | None:
    """Each fault and the recovery that followed: detect, decide, first step, first new step.

    The first step of the next attempt is measured (its first progress); the first *new* step
    (past the failed attempt's last step) is estimated from the steps redone at the new
    attempt's median step time, marked with ``~``.
    """
    by_id = {a["id"]: a for a in attempts}
    by_number = {a["number"]: a for a in attempts}
    rows = []
    for ev in events:
        if ev["kind"] != "fault_detected":
            continue
        data = ev["data"]
        failed = by_id.get(ev["attempt_id"] or -1)
        after = by_number.get(failed["number"] + 1) if failed else None
        detected = float(data.get("detected_unix") or ev["time_unix"])
        decided = float(data.get("decided_unix") or ev["time_unix"])
        first_s = new_s = "-"
        resumed = redone = "-"
        if after is not None and after["first_step_unix"] is not None:
            first = after["first_step_unix"] - detected
            first_s = duration(first)
            if after["first_step"] is not None and failed and failed["last_step"] is not None:
                n_redone = max(0, failed["last_step"] - after["first_step"] + 1)
                resumed, redone = str(after["first_step"]), str(n_redone)
                step_s = after["median_step_s"]
                last = after["last_step"]
                if step_s and last is not None and last > failed["last_step"]:
                    new_s = "~" + duration(first + (n_redone + 1) * step_s)
        rows.append(
            (
                str(data.get("fault", "?")),
                ev["cause"],
                clock(detected),
                duration(decided - detected),
                first_s,
                resumed,
                redone,
                new_s,
            )
        )
    if not rows:
        return None
    out = table(
        "FAULT",
        "CAUSE",
        "DETECTED",
        "DECIDED IN",
        "FIRST STEP",
        "RESUMED AT",
        "REDONE",
        "FIRST NEW STEP",
        title="recovery (times after detection)",
    )
    for row in rows:
        out.add_row(*row)
    return out


def live_view(job: JobView) -> RenderableType:
    """One refreshing row for ``run --follow`` and ``describe --watch`` (fits 80 columns)."""
    attempts = job.get("attempts") or []
    metrics = job.get("metrics") or {}
    out = table(
        "STATE",
        "ATTEMPT",
        "STEP",
        "LOSS",
        "TOK/S",
        "ETTR",
        "RESTARTS",
        "ELAPSED",
        title=f"job {job['name']} (id {job['id']})",
    )
    end = job["ended_unix"] or time.time()
    out.add_row(
        state(job["state"]),
        str(attempts[-1]["number"]) if attempts else "-",
        "-" if job.get("last_step") is None else str(job.get("last_step")),
        metric(metrics, "loss"),
        metric(metrics, "tok_s", "tokens_per_s", fmt="{:,.0f}"),
        ettr(job),
        str(job["restarts"]),
        duration(end - job["created_unix"]),
    )
    return Group(out, Text(job["reason"], style="dim"))
