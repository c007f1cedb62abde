"""Rows as the JSON the API returns (the same shapes the CLI prints)."""

from __future__ import annotations

from typing import Any

from ironpod.controller.db import Attempt, Event, Job, Node


def node_view(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name,
        "state": node.state,
        "reason": node.reason,
        "address": node.address,
        "cpus": node.cpus,
        "memory_bytes": node.memory_bytes,
        "gpus": node.gpus,
        "labels": node.labels,
        "attempt_id": node.attempt_id,
        "last_heartbeat_unix": node.last_heartbeat_unix,
        "clock_skew_s": node.clock_skew_s,
        "recent_failures": len(node.failures),
        "recheck_unix": node.recheck_unix,
        "snapshots": node.snapshots or [],
        "memory": node.memory or {},
        "health": node.health or {},
    }


def attempt_view(attempt: Attempt) -> dict[str, Any]:
    return {
        "id": attempt.id,
        "number": attempt.number,
        "state": attempt.state,
        "node_ids": attempt.node_ids,
        "master": f"{attempt.master_addr}:{attempt.master_port}",
        "created_unix": attempt.created_unix,
        "running_unix": attempt.running_unix,
        "first_step_unix": attempt.first_step_unix,
        "ended_unix": attempt.ended_unix,
        "first_step": attempt.first_step,
        "last_step": attempt.last_step,
        "median_step_s": attempt.median_step_s,
        "end_cause": attempt.end_cause,
        "metrics": attempt.metrics,
        "ranks": attempt.ranks,
        "restore": attempt.restore,
    }


def job_view(job: Job, attempts: list[Attempt] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "team": job.team,
        "priority": job.priority,
        "state": job.state,
        "reason": job.reason,
        "end_kind": job.end_kind or "",
        "end_exit_code": job.end_exit_code,
        "created_unix": job.created_unix,
        "started_unix": job.started_unix,
        "ended_unix": job.ended_unix,
        "restarts": len(job.restarts),
        "spec": job.spec,
        "checkpointing": job.checkpointing or {},
    }
    if attempts is not None:
        out["attempts"] = [attempt_view(a) for a in sorted(attempts, key=lambda a: a.number)]
        last = max(attempts, key=lambda a: a.number) if attempts else None
        out["last_step"] = last.last_step if last else None
        out["metrics"] = last.metrics if last else {}
    return out


def event_view(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "time_unix": event.time_unix,
        "kind": event.kind,
        "cause": event.cause,
        "job_id": event.job_id,
        "node_id": event.node_id,
        "attempt_id": event.attempt_id,
        "data": event.data,
    }
