"""Faults and recoveries, applied: gather the facts, let :mod:`ironpod.controller.policy`
decide, write the decision back (the health policy's :mod:`ironpod.controller.health` has the
same shape).

Every function runs inside the controller's lock, on its session, with its clock; the
:class:`~ironpod.controller.service.Controller` calls them from its request handlers and its
reconciler. The escalation ladder they apply is in docs/architecture.md ("Recovery").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from ironpod.controller import health, policy
from ironpod.controller.db import Attempt, Job, Node
from ironpod.health import CheckResult
from ironpod.spec import JobSpec
from ironpod.states import (
    TERMINAL_JOB_STATES,
    AttemptState,
    EndKind,
    JobState,
    NodeState,
)
from ironpod.wire import WorkerEvent

if TYPE_CHECKING:
    from ironpod.controller.service import Controller


#: States of a blamed node that escalation moves (an attempt's nodes are released first).
_ESCALATES = {NodeState.READY, NodeState.BUSY, NodeState.LOST}


def _progressed(attempt: Attempt) -> bool:
    """An attempt made progress once any rank reported a step or a progress line."""
    return attempt.first_step_unix is not None or attempt.last_step is not None


def _cannot_start(spec: JobSpec, ev: WorkerEvent) -> str:
    """One line naming the command that cannot start, where, and its exit code."""
    code = ev.exit_code
    if ev.detail:  # the agent's own account: a failed exec, a missing workdir
        said = ev.detail.removeprefix("cannot start").lstrip(": ")
        return f"cannot start: {said} (exit {code})"
    command = " ".join(spec.command) if spec.shell else spec.command[0]
    what = "not found" if code == 127 else "not executable"
    where = spec.workdir or "the agent's workdir"
    return f"cannot start: {command!r} {what} (exit {code}) in {where}"


def exited(ctl: Controller, s: Session, node: Node, attempt: Attempt, ev: WorkerEvent) -> None:
    job = s.get(Job, attempt.job_id)
    assert job is not None
    spec = JobSpec.model_validate(job.spec)
    action, fault, why = policy.exit_decision(
        exit_code=ev.exit_code,
        signal=ev.signal,
        no_restart_exit_codes=spec.restart.no_restart_exit_codes,
        progressed=_progressed(attempt),
    )
    if action == policy.ExitAction.SUCCEEDED:
        done = [r for r in attempt.ranks.values() if (r.get("event") or {}).get("exit_code") == 0]
        if len(done) >= spec.world_size:
            ctl._set_attempt(s, attempt, AttemptState.SUCCEEDED, "all ranks exited 0")
            ctl._release(s, attempt)
            ctl._set_job(
                s,
                job,
                JobState.SUCCEEDED,
                f"attempt {attempt.number} succeeded",
                EndKind.SUCCEEDED,
                0,
            )
        return
    if action == policy.ExitAction.PREEMPTED:
        cause = f"rank {ev.rank} stopped on request"
        fail_attempt(ctl, s, attempt, cause, fault, node=node, detected=ev.time_unix)
        return
    if fault == policy.Fault.CANNOT_START:
        cause = _cannot_start(spec, ev)
    else:
        what = f"killed by signal {ev.signal}" if ev.signal else f"exited with code {ev.exit_code}"
        cause = f"crash: rank {ev.rank} on {node.name} {what}"
        if ev.error:
            cause += f": {ev.error}"
    restart = action == policy.ExitAction.RESTART
    fail_attempt(
        ctl,
        s,
        attempt,
        cause,
        fault,
        node=node,
        detected=ev.time_unix,
        restart=restart,
        exit_code=ev.exit_code,
        signal=ev.signal,
        error=ev.error,
    )
    if not restart:
        reason = cause if fault == policy.Fault.CANNOT_START else f"{cause} ({why})"
        ctl._set_job(s, job, JobState.FAILED, reason, EndKind.NO_RESTART, ev.exit_code)


def fail_attempt(
    ctl: Controller,
    s: Session,
    attempt: Attempt,
    cause: str,
    kind: policy.Fault,
    *,
    detected: float,
    node: Node | None = None,
    restart: bool = True,
    exit_code: int | None = None,
    signal: int | None = None,
    error: str | None = None,
) -> None:
    """End ``attempt`` for a fault seen on ``node``: blame by evidence (policy.blame), count
    the blamed nodes' failures and escalate, and leave the job to recover."""
    job = s.get(Job, attempt.job_id)
    assert job is not None
    spec = JobSpec.model_validate(job.spec)
    names = {n.id: n for n in s.scalars(select(Node).where(Node.id.in_(attempt.node_ids)))}
    if node is not None:
        names.setdefault(node.id, node)
    steps = {
        int(r): int(info.get("last_step") or 0)
        for r, info in attempt.ranks.items()
        if isinstance(info, dict)
    }
    blamed_names, why = policy.blame(
        policy.FaultFacts(
            kind=kind,
            node=node.name if node else None,
            rank_steps=steps,
            nproc_per_node=spec.nproc_per_node,
            nodes=[names[i].name if i in names else "?" for i in attempt.node_ids],
        )
    )
    by_name = {n.name: n for n in names.values()}
    blamed = [by_name[name] for name in blamed_names if name in by_name]
    attempt.signature = policy.signature(kind, exit_code=exit_code, signal=signal, error=error)
    ctl._set_attempt(s, attempt, AttemptState.FAILED, cause)
    ctl._event(
        s,
        "fault_detected",
        cause,
        attempt=attempt,
        fault=str(kind),
        detected_unix=detected,
        decided_unix=ctl.clock(),
        nodes=[n.name for n in blamed],
        blame=why,
    )
    ctl._release(s, attempt)
    window = spec.restart.window_s
    spares = [n for n in ctl._free_nodes(s) if n.id not in attempt.node_ids]
    for bad in blamed:
        t = ctl.clock()
        bad.failures = [f for f in bad.failures if f > t - window] + [t]
        if NodeState(bad.state) not in _ESCALATES:
            continue  # already out: quarantined by the health policy, or by an operator
        spare = (
            spares.pop(0)
            if len(bad.failures) >= spec.restart.node_failures_to_quarantine and spares
            else None
        )
        action, reason = policy.escalate(
            node=bad.name,
            failures=len(bad.failures),
            limit=spec.restart.node_failures_to_quarantine,
            window_s=window,
            spare=spare.name if spare else None,
            last=cause,
        )
        if action == policy.NodeAction.COUNT:
            continue
        bad.recheck_unix = t
        if action == policy.NodeAction.QUARANTINE:
            ctl._set_node(s, bad, NodeState.QUARANTINED, reason)
        elif NodeState(bad.state) != NodeState.LOST:  # a lost one turns suspect on return
            ctl._set_node(s, bad, NodeState.SUSPECT, reason)
        ctl._event(s, "node_recheck_requested", reason, node=bad, job=job)
    if restart and JobState(job.state) not in TERMINAL_JOB_STATES:
        ctl._set_job(s, job, JobState.RECOVERING, cause)


def return_node(ctl: Controller, s: Session, node: Node, cause: str) -> None:
    """A lost node is heard again: back to work, or to its pending deep recheck."""
    if node.recheck_unix is None:
        ctl._set_node(s, node, NodeState.READY, cause)
        return
    node.recheck_unix = ctl.clock()  # the recheck starts over from its return
    ctl._set_node(s, node, NodeState.SUSPECT, f"{cause}; deep recheck pending")


def settle_recheck(ctl: Controller, s: Session, node: Node) -> None:
    """Act on the deep recheck's verdict (policy.health_verdict) for a node blamed too
    often: passed, it returns to work; failed, it is out for the health policy to recheck
    (a health quarantine); no verdict possible, a suspect is trusted (restarting in place is
    bounded by the restart budget) and a quarantined node stays out until undrain."""
    if node.recheck_unix is None:
        return
    state = NodeState(node.state)
    if state not in {NodeState.SUSPECT, NodeState.QUARANTINED}:
        return  # lost (waits for its return) or taken out by an operator
    run = (node.health or {}).get("_run") or {}
    rows = [
        row
        for name, found in (node.health or {}).items()
        if name != "_run"
        for row in found
        if row.get("status") == "fail"
    ]
    failed = [health.describe(CheckResult.model_validate(row)) for row in rows]
    verdict, reason = policy.health_verdict(
        policy.RecheckFacts(
            node=node.name,
            requested_unix=node.recheck_unix,
            last_run_unix=run.get("time_unix"),
            failed=failed,
            now=ctl.clock(),
            timeout_s=ctl.config.deep_recheck_timeout_s,
        )
    )
    if verdict == policy.Verdict.PENDING:
        return
    ctl._event(s, "node_recheck", reason, node=node, verdict=str(verdict))
    if verdict == policy.Verdict.PASS or (
        verdict == policy.Verdict.NONE and state == NodeState.SUSPECT
    ):
        ctl._set_node(s, node, NodeState.READY, reason)
        return
    node.recheck_unix = None
    if verdict == policy.Verdict.NONE:
        node.reason = f"{node.reason}; {reason}: stays quarantined until `ironpod undrain`"
        return
    cause = health.REASON_PREFIX + "; ".join(failed)
    ctl._event(s, "node_unhealthy", cause, node=node, action="quarantine", results=rows)
    if state == NodeState.QUARANTINED:
        node.reason = cause
    else:
        ctl._set_node(s, node, NodeState.QUARANTINED, cause)


def recover(ctl: Controller, s: Session, job: Job) -> None:
    """Gather the facts, let policy.choose_nodes decide, apply its choice."""
    spec = JobSpec.model_validate(job.spec)
    window = spec.restart.window_s
    t = ctl.clock()
    recent = [r for r in job.restarts if r > t - window]
    attempts = list(
        s.scalars(
            select(Attempt)
            .where(Attempt.job_id == job.id)
            .order_by(Attempt.number.desc())
            .limit(spec.restart.max_failures_without_progress + 1)
        )
    )
    last = attempts[0] if attempts else None
    streak, sig = policy.failure_streak(
        [
            policy.Outcome(signature=a.signature, progressed=_progressed(a))
            for a in attempts
            if a.state == AttemptState.FAILED
        ]
    )
    nodes = [
        policy.NodeFacts(
            id=n.id,
            name=n.name,
            state=NodeState(n.state),
            free=n.attempt_id is None,
            last_heartbeat_unix=n.last_heartbeat_unix,
            failures=len(n.failures),
        )
        for n in s.scalars(select(Node).order_by(Node.id))
    ]
    choice, reason = policy.choose_nodes(
        policy.RecoveryFacts(
            needed=spec.nodes,
            in_place_first=spec.restart.in_place_first,
            nodes=nodes,
            last_node_ids=list(last.node_ids) if last else [],
            last_ended_unix=last.ended_unix if last else None,
            restarts_in_window=len(recent),
            max_restarts=spec.restart.max_restarts,
            window_s=window,
            streak=streak,
            streak_signature=sig,
            max_failures_without_progress=spec.restart.max_failures_without_progress,
            now=t,
            heartbeat_interval_s=ctl.config.heartbeat_interval_s,
        )
    )
    if choice.action == policy.Action.FAIL:
        if choice.end_kind == EndKind.RESTART_LIMIT and last is not None and last.end_cause:
            reason = f"{reason}; last: {last.end_cause}"  # what a user acts on
        ctl._set_job(s, job, JobState.FAILED, reason, choice.end_kind)
        return
    if choice.action == policy.Action.WAIT:
        if job.reason != reason:
            job.reason = reason
            ctl._event(s, "job_waiting", reason, job=job)
        return
    chosen = [n for n in (s.get(Node, i) for i in choice.node_ids) if n is not None]
    job.restarts = [*recent, t]
    ctl._start_attempt(s, job, chosen, reason)
