"""The controller's decisions: one code path for every change of cluster state.

Requests from agents and people, and the reconciler loop, all go through :class:`Controller`,
which holds one lock: decisions are serialised, so no two of them ever act on a stale view (a
single controller process makes this cheap; its state is in SQL so it can restart any time).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, load_only

from ironpod import env
from ironpod.controller import health, policy, recovery, stragglers
from ironpod.controller.db import Attempt, Event, Job, Node, make_engine, migrate
from ironpod.controller.db import session_factory as make_sessions
from ironpod.controller.live import (
    Live,
    LiveNode,
    apply_changes,
    collect_changes,
    forget_changes,
    note_delay,
    reply_part,
)
from ironpod.controller.memory import NodeInfo, place_replicas, plan_restore, young_daly
from ironpod.private import private_dir, read_or_create_secret
from ironpod.spec import JobSpec
from ironpod.states import (
    ATTEMPT_TRANSITIONS,
    JOB_TRANSITIONS,
    NODE_TRANSITIONS,
    TERMINAL_ATTEMPT_STATES,
    TERMINAL_JOB_STATES,
    AttemptState,
    EndKind,
    JobState,
    NodeState,
    check_transition,
)
from ironpod.wire import (
    Assignment,
    Heartbeat,
    HeartbeatReply,
    NodeRegistration,
    PreflightPlan,
    RegistrationReply,
    WorkerEvent,
)

log = logging.getLogger(__name__)
LIVE_NODE_STATES = {
    NodeState.JOINING,
    NodeState.READY,
    NodeState.BUSY,
    NodeState.SUSPECT,
    NodeState.DRAINING,
}

#: States in which a node's pending deep recheck (``Node.recheck_unix``) is asked for.
RECHECKED = {NodeState.SUSPECT, NodeState.QUARANTINED}


@dataclass(kw_only=True, slots=True)
class ControllerConfig:
    heartbeat_interval_s: float = 1.0
    node_lost_after_s: float = 6.0
    reserve_spares: int = 0
    stop_grace_s: float = 10.0
    failed_stop_grace_s: float = 1.0
    #: Master ports (and the pre-flight's, the next one) are drawn from here: below Linux's
    #: ephemeral range (32768-60999 by default), where an outgoing connection of any process
    #: on the node may hold the port and the rendezvous fails with EADDRINUSE.
    port_min: int = 20000
    port_max: int = 32000
    #: What a failed health check does (ironpod.controller.health): "quarantine" the node and
    #: restart its job elsewhere, or only "label" it (record and event).
    health_action: health.HealthAction = "quarantine"
    #: A node found unhealthy this many times within the window stays quarantined until undrain.
    health_repeat_limit: int = 3
    health_repeat_window_s: float = 3600.0
    #: A health-quarantined node returns on a passing run no sooner than this after quarantine.
    health_recheck_after_s: float = 0.0
    #: A node blamed too often waits this long for the deep recheck's verdict; with none (its
    #: agent runs checks too seldom, or not at all), a suspect node is trusted again.
    deep_recheck_timeout_s: float = 180.0


class NotFoundError(LookupError):
    pass


class NodeAuthError(PermissionError):
    """A node's call without its credential, or about what is not its business (403)."""


class NodeNameTakenError(Exception):
    """A registration for a name a live agent holds, without its credential (409)."""


def credential_hash(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


def _same_hash(given: str | None, stored: str) -> bool:
    if not given or not stored:
        return False
    return hmac.compare_digest(credential_hash(given), stored)


class Controller:
    def __init__(
        self,
        db_url: str,
        state_dir: Path,
        config: ControllerConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        #: Every decision's "now" (unix seconds): tests drive it instead of sleeping.
        self.clock = clock
        self.state_dir = state_dir
        migrate(db_url)
        self.engine = make_engine(db_url)
        self.sessions = make_sessions(self.engine)
        self.lock = threading.RLock()
        #: Set by every change a reconcile pass may act on (each state change and event goes
        #: through ``_event``) and by heartbeats while a pass left something waiting on nodes;
        #: the loop (ironpod.controller.server) runs a pass when it is set, else once a period.
        self.wake = threading.Event()
        self._waiting = False
        #: Node silence counts from here at the earliest: no agent could reach a controller
        #: that was down, so a restart must not find every node lost.
        self.started_unix = self.clock()
        #: What the tokens the controller hands out are derived from: each job's peer token
        #: (agent to agent), each node's log token (controller to agent).
        self._secret = read_or_create_secret(private_dir(state_dir) / "secret.key")
        self._peer_token_of: dict[int, str] = {}
        #: The heartbeat path in memory (ironpod.controller.live), kept current by the hooks.
        self.live = Live()
        #: Job specs, validated once (a job's spec never changes after submission).
        self._specs: dict[int, JobSpec] = {}
        #: Per running attempt: its nodes' URLs and the memory tier's placement, computed once.
        self._plans: dict[int, _AttemptPlan] = {}
        #: A new node's reply until a decision changes it: no assignment, the normal grace.
        self._idle_part = reply_part(b"null", config.stop_grace_s)
        sa_event.listen(self.sessions, "after_flush", collect_changes)
        sa_event.listen(self.sessions, "after_commit", self._apply_changes)
        sa_event.listen(self.sessions, "after_rollback", forget_changes)
        self._warm()

    def peer_token(self, job_id: int) -> str:
        """The token the nodes of job ``job_id`` call each other's snapshot routes with."""
        token = self._peer_token_of.get(job_id)
        if token is None:
            token = hmac.new(self._secret, f"peer:{job_id}".encode(), "sha256").hexdigest()
            self._peer_token_of[job_id] = token
        return token

    def spec_of(self, job: Job) -> JobSpec:
        spec = self._specs.get(job.id)
        if spec is None:
            spec = self._specs[job.id] = JobSpec.model_validate(job.spec)
        return spec

    # -- the heartbeat path in memory (ironpod.controller.live)

    def _warm(self) -> None:
        """Fill the fast lane from the database: after a restart, heartbeats of idle nodes are
        answered fast from the first one; a busy node's first takes the decision path."""
        with self.sessions() as s:
            last: dict[int, str] = {}  # node id -> the state of the newest attempt it was in
            recent = s.execute(
                select(Attempt.state, Attempt.node_ids).order_by(Attempt.id.desc()).limit(1000)
            )
            for state, node_ids in recent:
                for node_id in node_ids:
                    last.setdefault(node_id, state)
            for node in s.scalars(select(Node)):
                grace = (
                    self.config.failed_stop_grace_s
                    if last.get(node.id) == AttemptState.FAILED
                    else self.config.stop_grace_s
                )
                idle = reply_part(b"null", grace) if node.attempt_id is None else None
                self.live.nodes[node.id] = LiveNode.of(node, idle)
            self.live.set_live_jobs(set(self._live_jobs(s)))

    def _apply_changes(self, session: Session) -> None:
        """After a commit: what the decision changed reaches the fast lane."""
        for attempt_id in apply_changes(self.live, session, self._idle_part):
            self._plans.pop(attempt_id, None)

    def _flush(self, s: Session, *, ranks: bool = True) -> None:
        """Write what heartbeats left in memory; every decision starts with this, so it
        decides on the newest facts (and the reconciler's pass runs it once a period).
        ``ranks=False`` (heartbeats, registrations): the nodes' times only; the per-rank
        progress, a merge into each attempt's record, waits for the next pass or read."""
        beats, ranks_of = self.live.take(ranks=ranks)
        if beats:
            s.execute(
                update(Node),
                [
                    {
                        "id": node_id,
                        "last_heartbeat_unix": beat.time_unix,
                        "clock_skew_s": beat.clock_skew_s,
                        "snapshots": beat.snapshots,
                    }
                    for node_id, beat in beats.items()
                ],
            )
            memory = [
                {"id": node_id, "memory": beat.memory}
                for node_id, beat in beats.items()
                if beat.memory is not None
            ]
            if memory:
                s.execute(update(Node), memory)
        for attempt_id, statuses in ranks_of.items():
            attempt = s.get(Attempt, attempt_id)
            if attempt is None or attempt.state in TERMINAL_ATTEMPT_STATES:
                continue
            merged = dict(attempt.ranks)
            for rank, status in statuses.items():
                merged[str(rank)] = {**merged.get(str(rank), {}), **status}
            attempt.ranks = merged
            self._update_progress(s, attempt)
            if attempt.state == AttemptState.RUNNING:
                self._check_stragglers(s, attempt)

    def sync(self) -> None:
        """Persist the fast lane's facts now (before a read that must see them)."""
        with self.lock, self.sessions.begin() as s:
            self._flush(s)

    def log_token(self, node: Node) -> str:
        """The token the controller reads ``node``'s rank logs with (new per registration)."""
        message = f"logs:{node.id}:{node.credential_sha256}".encode()
        return hmac.new(self._secret, message, "sha256").hexdigest()

    def _peer_tokens(self, s: Session, node: Node, job_id: int | None) -> dict[str, str]:
        """Peer tokens for the node's job and the live jobs it holds copies of."""
        live = set(self._live_jobs(s))
        jobs = {int(h["job_id"]) for h in node.snapshots or [] if "job_id" in h}
        if job_id is not None:
            jobs.add(job_id)
        return {str(j): self.peer_token(j) for j in sorted(jobs & live)}

    # -- helpers

    def _event(
        self,
        s: Session,
        kind: str,
        cause: str = "",
        *,
        job: Job | None = None,
        node: Node | None = None,
        attempt: Attempt | None = None,
        **data: Any,
    ) -> None:
        s.add(
            Event(
                kind=kind,
                cause=cause,
                job_id=job.id if job else (attempt.job_id if attempt else None),
                node_id=node.id if node else None,
                attempt_id=attempt.id if attempt else None,
                data=data,
                time_unix=self.clock(),
            )
        )
        log.info("event %s: %s %s", kind, cause, data or "")
        self.wake.set()

    def _set_node(self, s: Session, node: Node, target: NodeState, cause: str) -> None:
        current = NodeState(node.state)
        if current == target:
            return
        check_transition(NODE_TRANSITIONS, current, target)
        node.state = target
        node.reason = cause
        if target == NodeState.READY:
            node.recheck_unix = None  # whatever returned it settled the recheck
        self._event(s, f"node_{target}", cause, node=node, previous=str(current))

    def _set_job(
        self,
        s: Session,
        job: Job,
        target: JobState,
        cause: str,
        end_kind: EndKind = EndKind.LIVE,
        exit_code: int | None = None,
    ) -> None:
        current = JobState(job.state)
        if current == target:
            return
        check_transition(JOB_TRANSITIONS, current, target)
        job.state = target
        job.reason = cause
        if target in TERMINAL_JOB_STATES:
            job.ended_unix = self.clock()
            job.end_kind = end_kind
            job.end_exit_code = exit_code
        self._event(
            s, f"job_{target}", cause, job=job, previous=str(current), end_kind=str(end_kind)
        )

    def _set_attempt(self, s: Session, attempt: Attempt, target: AttemptState, cause: str) -> None:
        current = AttemptState(attempt.state)
        if current == target:
            return
        check_transition(ATTEMPT_TRANSITIONS, current, target)
        attempt.state = target
        if target in TERMINAL_ATTEMPT_STATES:
            attempt.ended_unix = self.clock()
            attempt.end_cause = cause
        self._event(s, f"attempt_{target}", cause, attempt=attempt, number=attempt.number)

    # -- agents

    def register(self, reg: NodeRegistration) -> RegistrationReply:
        reply = self.register_many([reg])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def register_many(
        self, regs: list[NodeRegistration]
    ) -> list[RegistrationReply | NodeNameTakenError]:
        """Registrations in one transaction (one commit for a join storm's batch, see
        api.RegistrationBatcher); a name held by a live agent fails only its own."""
        out: list[RegistrationReply | NodeNameTakenError] = []
        with self.lock, self.sessions.begin() as s:
            self._flush(s, ranks=False)
            names = {reg.name for reg in regs}
            known = {n.name: n for n in s.scalars(select(Node).where(Node.name.in_(names)))}
            fresh = set()
            for reg in regs:  # the batch's new nodes, inserted together (their ids)
                if reg.name not in known:
                    known[reg.name] = self._new_node(reg)
                    s.add(known[reg.name])
                    fresh.add(reg.name)
            s.flush()
            with s.no_autoflush:  # the rest goes to the database once, at the commit
                for reg in regs:
                    try:
                        new = reg.name in fresh
                        fresh.discard(reg.name)
                        out.append(self._register(s, reg, known[reg.name], new))
                    except NodeNameTakenError as exc:  # raised before any change
                        out.append(exc)
        return out

    def _new_node(self, reg: NodeRegistration) -> Node:
        return Node(
            name=reg.name,
            registered_unix=self.clock(),
            agent_instance=reg.agent_instance,
            state=NodeState.JOINING,
            reason="",
            failures=[],
            **self._node_fields(reg),
        )

    def _node_fields(self, reg: NodeRegistration) -> dict[str, Any]:
        return {
            "hostname": reg.hostname,
            "address": reg.address,
            "agent_url": reg.agent_url,
            "cpus": reg.cpus,
            "memory_bytes": reg.memory_bytes,
            "gpus": [g.model_dump() for g in reg.gpus],
            "labels": dict(reg.labels),
            "last_heartbeat_unix": self.clock(),
            "clock_skew_s": self.clock() - reg.time_unix,
        }

    def _register(
        self, s: Session, reg: NodeRegistration, node: Node, new: bool
    ) -> RegistrationReply:
        """One registration of a batch: ``node`` is the row of its name (``new``: made for
        it by this batch, JOINING)."""
        credential = secrets.token_urlsafe(32)  # new at every registration
        if new:
            self._event(s, "node_registered", "new node", node=node, cpus=reg.cpus)
            self._set_node(s, node, NodeState.READY, "joined")
            if reg.health is not None:
                health.apply_health(self, s, node, reg.health)
        else:
            self._check_takeover(node, reg)
            restarted = node.agent_instance != reg.agent_instance
            for key, value in self._node_fields(reg).items():
                setattr(node, key, value)
            node.agent_instance = reg.agent_instance
            if restarted:
                self._fail_node_attempt(
                    s, node, f"agent restarted on node {node.name}", policy.Fault.AGENT_RESTART
                )
                self._event(s, "agent_restarted", f"node {node.name}", node=node)
            if NodeState(node.state) in {NodeState.LOST, NodeState.JOINING}:
                recovery.return_node(self, s, node, "agent registered again")
            if reg.health is not None:
                health.apply_health(self, s, node, reg.health)
            if node.recheck_unix is not None:
                recovery.settle_recheck(self, s, node)
        node.credential_sha256 = credential_hash(credential)
        return RegistrationReply(
            node_id=node.id,
            heartbeat_interval_s=self.config.heartbeat_interval_s,
            credential=credential,
            log_token=self.log_token(node),
        )

    def _check_takeover(self, node: Node, reg: NodeRegistration) -> None:
        """A name is taken over only by its own agent (it proves it with the credential it
        was given), or once the node is lost (no heartbeat for ``node_lost_after_s``)."""
        if not node.credential_sha256 or _same_hash(reg.credential, node.credential_sha256):
            return
        if reg.agent_instance == node.agent_instance:
            return  # the same agent process asking again: the reply to its first was lost
        quiet_s = self.clock() - node.last_heartbeat_unix
        if quiet_s >= self.config.node_lost_after_s:
            return
        raise NodeNameTakenError(
            f"node name {node.name!r} is held by a live agent (last heartbeat {quiet_s:.1f} s "
            "ago); a restarted agent proves it is that node with the credential in its work "
            f"directory, else it may join {self.config.node_lost_after_s:g} s after the last "
            "heartbeat"
        )

    def check_node(self, s: Session, node: Node, credential: str | None) -> None:
        """Raise NodeAuthError unless ``credential`` is ``node``'s."""
        if not _same_hash(credential, node.credential_sha256):
            raise NodeAuthError(f"not node {node.id}'s credential")

    def heartbeat(self, node_id: int, hb: Heartbeat, credential: str | None) -> HeartbeatReply:
        """A heartbeat on the decision path (the fast lane, ironpod.controller.live, answers
        those that decide nothing). Its reply's node part is cached for the fast lane."""
        with self.lock:
            with self.sessions.begin() as s:
                self._flush(s, ranks=False)
                reply, cached = self._heartbeat(s, node_id, hb, credential)
            if cached is not None:  # after the commit, before any other decision
                self.live.remember(node_id, *cached)
            self.live.slow += 1
            return reply

    def _heartbeat(
        self, s: Session, node_id: int, hb: Heartbeat, credential: str | None
    ) -> tuple[HeartbeatReply, tuple[bytes, int | None, dict[int, str], float] | None]:
        node = s.get(Node, node_id)
        if node is None or node.agent_instance != hb.agent_instance:
            return HeartbeatReply(reregister=True), None
        if not _same_hash(credential, node.credential_sha256):
            # an old credential (the controller's state was restored, say): join again;
            # nothing in this heartbeat is believed
            return HeartbeatReply(reregister=True), None
        node.last_heartbeat_unix = self.clock()
        node.clock_skew_s = self.clock() - hb.time_unix
        if (known := self.live.nodes.get(node.id)) is not None:
            note_delay(self, known, self.clock(), hb.time_unix)
        if self._waiting:  # a job may wait for this node to prove itself alive
            self.wake.set()
        node.snapshots = [h.model_dump() for h in hb.snapshots]
        if hb.memory_budget_bytes is not None:
            node.memory = {
                "budget_bytes": hb.memory_budget_bytes,
                "used_bytes": hb.memory_used_bytes,
            }
        for notice in hb.notices:
            job = s.get(Job, notice.job_id) if notice.job_id is not None else None
            data: dict[str, Any] = dict(notice.data)
            self._event(s, notice.kind, notice.message, node=node, job=job, **data)
            if notice.kind == "preflight_failed":
                self._preflight_failed(s, node, notice.message, data, notice.time_unix)
        if NodeState(node.state) == NodeState.LOST:
            recovery.return_node(self, s, node, "heartbeats resumed")
        if hb.health is not None:
            health.apply_health(self, s, node, hb.health)
        if node.recheck_unix is not None:
            recovery.settle_recheck(self, s, node)
        for status in hb.workers:
            attempt = s.get(Attempt, status.attempt_id)
            if attempt is None or not self._runs_rank(s, attempt, node, status.rank):
                continue  # a node reports only on its own ranks
            # the status itself waits for the write-behind (one merge per attempt per pass,
            # not one rewrite of a 1,000-rank record per heartbeat); a start is decided now
            self.live.pend_rank(attempt.id, status.rank, status.model_dump())
            if status.state == "running" and attempt.state == AttemptState.STARTING:
                self._set_attempt(s, attempt, AttemptState.RUNNING, "workers running")
                attempt.running_unix = self.clock()
                job = s.get(Job, attempt.job_id)
                if job is not None and job.state == JobState.STARTING:
                    self._set_job(s, job, JobState.RUNNING, f"attempt {attempt.number} running")
        # A node out for a failed check, or blamed too often, is rechecked with the deep
        # suite, not the light one.
        state = NodeState(node.state)
        recheck = (node.recheck_unix is not None and state in RECHECKED) or (
            state == NodeState.QUARANTINED and node.reason.startswith(health.REASON_PREFIX)
        )
        reply = self._reply(s, node).model_copy(
            update={"time_unix": self.clock(), "health_recheck": recheck}
        )
        assignment = reply.assignment
        part = reply_part(
            assignment.model_dump_json().encode() if assignment else b"null",
            reply.stop_grace_s,
        )
        seen: dict[int, str] = {
            w.rank: str(w.state)
            for w in hb.workers
            if assignment is not None and w.attempt_id == assignment.attempt_id
        }
        job_id = assignment.job_id if assignment else None
        return reply, (part, job_id, seen, node.last_heartbeat_unix)

    def _preflight_failed(
        self, s: Session, node: Node, message: str, data: dict[str, Any], detected: float
    ) -> None:
        """A node's pre-flight all-reduce failed: the attempt ends before training. Which node
        is at fault an all-reduce cannot say, so none is blamed; the restart policy applies."""
        attempt = s.get(Attempt, int(data.get("attempt_id", -1)))
        if attempt is None or attempt.state in TERMINAL_ATTEMPT_STATES:
            return
        cause = f"preflight: {node.name}: {message}"
        self._fail_attempt(s, attempt, cause, policy.Fault.PREFLIGHT, detected=detected)

    def _check_stragglers(self, s: Session, attempt: Attempt) -> None:
        """Mark ranks slower than their peers; report one that stays slow for the policy's
        steps (once per attempt), and with ``action: replace`` take its node out."""
        job = s.get(Job, attempt.job_id)
        if job is None:
            return
        spec = JobSpec.model_validate(job.spec)
        rule = spec.stragglers
        found = stragglers.check(attempt.ranks, factor=rule.factor, steps=rule.steps)
        for rank, ratio in found.found.items():
            node = s.get(Node, attempt.node_ids[rank // spec.nproc_per_node])
            self._straggler(s, job, attempt, node, rank, ratio, found.medians, rule.action)
        if found.ranks != attempt.ranks:
            attempt.ranks = found.ranks

    def _straggler(
        self,
        s: Session,
        job: Job,
        attempt: Attempt,
        node: Node | None,
        rank: int,
        ratio: float,
        medians: dict[int, float],
        action: str,
    ) -> None:
        where = node.name if node else "?"
        cause = (
            f"straggler: rank {rank} on {where} computes {ratio:.2f}x slower than the other "
            f"ranks' median ({medians[rank] * 1000:.1f} ms a step)"
        )
        self._event(
            s,
            "straggler_detected",
            cause,
            job=job,
            node=node,
            attempt=attempt,
            rank=rank,
            ratio=ratio,
            medians={str(k): v for k, v in medians.items()},
            action=action,
        )
        if action != "replace" or node is None:
            return
        self._set_node(s, node, NodeState.QUARANTINED, f"{health.REASON_PREFIX}{cause}")
        self._fail_attempt(s, attempt, cause, policy.Fault.STRAGGLER, detected=self.clock())

    def _update_progress(self, s: Session, attempt: Attempt) -> None:
        steps = [r["last_step"] for r in attempt.ranks.values() if r.get("last_step") is not None]
        times = [
            r["last_progress_unix"] for r in attempt.ranks.values() if r.get("last_progress_unix")
        ]
        medians = [r["median_step_s"] for r in attempt.ranks.values() if r.get("median_step_s")]
        if steps:
            attempt.last_step = min(steps)
        if times:
            attempt.last_progress_unix = max(times)
        if medians:
            attempt.median_step_s = max(medians)
        metrics: dict[str, Any] = {}
        for r in sorted(attempt.ranks.values(), key=lambda r: -int(r["rank"])):
            metrics.update(r.get("metrics") or {})
        attempt.metrics = metrics
        job = s.get(Job, attempt.job_id)
        if job is not None:
            self._update_checkpointing(s, job, metrics)

    def _update_checkpointing(self, s: Session, job: Job, metrics: dict[str, Any]) -> None:
        """The newest durable step the ranks reported, and the durable interval to advise."""
        info = dict(job.checkpointing or {})
        if isinstance(metrics.get("ckpt_durable_step"), int | float):
            info["durable_step"] = max(
                int(metrics["ckpt_durable_step"]), int(info.get("durable_step", -1))
            )
        cost = metrics.get("ckpt_durable_write_s")
        if isinstance(cost, int | float) and cost > 0:
            info["cost_s"] = float(cost)
        spec = JobSpec.model_validate(job.spec)
        if spec.memory.durable_interval == "auto":
            runtime = self.clock() - (job.started_unix or self.clock())
            failures = s.scalar(
                select(func.count(Attempt.id)).where(
                    Attempt.job_id == job.id, Attempt.state == AttemptState.FAILED
                )
            )
            choice = young_daly(
                info.get("cost_s"), runtime, int(failures or 0), spec.memory.mtbf_prior_s
            )
            info.update(choice)
        if info != job.checkpointing:
            job.checkpointing = info

    def _reply(self, s: Session, node: Node) -> HeartbeatReply:
        if node.attempt_id is None:
            return HeartbeatReply(
                assignment=None,
                stop_grace_s=self._grace(s, node),
                keep_jobs=self._live_jobs(s),
                peer_tokens=self._peer_tokens(s, node, None),
            )
        attempt = s.get(Attempt, node.attempt_id)
        job = s.get(Job, attempt.job_id) if attempt else None
        if attempt is None or job is None or attempt.state in TERMINAL_ATTEMPT_STATES:
            return HeartbeatReply(
                assignment=None,
                stop_grace_s=self._grace(s, node),
                keep_jobs=self._live_jobs(s),
                peer_tokens=self._peer_tokens(s, node, None),
            )
        spec = self.spec_of(job)
        plan = self._plan(s, attempt, spec)
        node_rank = plan.index[node.id]
        per = spec.nproc_per_node
        policy = spec.restart
        job_env = {
            **spec.env,
            env.JOB_ID: str(job.id),
            env.ATTEMPT_ID: str(attempt.number),
        }
        if spec.checkpoint_dir:
            job_env[env.CHECKPOINT_DIR] = spec.checkpoint_dir
        placement, urls = plan.placement, plan.urls
        durable_interval = spec.memory.durable_interval
        if durable_interval == "auto":
            durable_interval = (job.checkpointing or {}).get("interval_s")
        return HeartbeatReply(
            assignment=Assignment(
                attempt_id=attempt.id,
                job_id=job.id,
                job_name=job.name,
                command=spec.command,
                shell=spec.shell,
                env=job_env,
                workdir=spec.workdir,
                ranks=list(range(node_rank * per, (node_rank + 1) * per)),
                world_size=spec.world_size,
                node_rank=node_rank,
                nnodes=spec.nodes,
                master_addr=attempt.master_addr,
                master_port=attempt.master_port,
                hang_timeout_s=policy.hang_timeout_s,
                hang_floor_s=policy.hang_floor_s,
                hang_factor=policy.hang_factor,
                startup_timeout_s=policy.startup_timeout_s,
                progress_regex=policy.progress_regex,
                replicate_to=[urls[i] for i in placement.get(node.id, [])],
                peers=[url for i, url in urls.items() if i != node.id],
                restore=attempt.restore,
                preflight=self._preflight(spec, attempt),
                durable_interval_s=durable_interval,
                restart_count=attempt.number,
                max_restarts=policy.max_restarts,
                run_id=f"{job.name}-{job.id}-{int(job.created_unix)}",
            ),
            stop_grace_s=self.config.stop_grace_s,
            keep_jobs=self._live_jobs(s),
            peer_tokens=self._peer_tokens(s, node, job.id),
        )

    @staticmethod
    def _preflight(spec: JobSpec, attempt: Attempt) -> PreflightPlan | None:
        """The pre-flight all-reduce, on the port after the job's own (a new one per attempt)."""
        if not spec.preflight.enabled or spec.nodes < 2:
            return None
        return PreflightPlan(
            port=attempt.master_port + 1,
            size_bytes=int(spec.preflight.size_mb * 2**20),
            min_busbw_gbps=spec.preflight.min_busbw_gbps,
            timeout_s=spec.preflight.timeout_s,
        )

    def _live_jobs(self, s: Session) -> list[int]:
        ended = [str(state) for state in TERMINAL_JOB_STATES]
        return list(s.scalars(select(Job.id).where(Job.state.not_in(ended))))

    def _plan(self, s: Session, attempt: Attempt, spec: JobSpec) -> _AttemptPlan:
        """The attempt's nodes' URLs and the memory tier's placement: one load of the
        attempt's nodes per attempt, not one per heartbeat of each of them."""
        plan = self._plans.get(attempt.id)
        if plan is None:
            rows = s.execute(
                select(Node.id, Node.agent_url, Node.labels).where(Node.id.in_(attempt.node_ids))
            )
            found = {row.id: row for row in rows}
            peers = [found[i] for i in attempt.node_ids if i in found]
            infos = [NodeInfo(n.id, n.agent_url, dict(n.labels or {})) for n in peers]
            plan = _AttemptPlan(
                urls={n.id: n.agent_url for n in peers},
                index={node_id: i for i, node_id in enumerate(attempt.node_ids)},
                placement=place_replicas(
                    infos, spec.memory.replicas, spec.memory.failure_domain_label
                ),
            )
            self._plans[attempt.id] = plan
        return plan

    def _runs_rank(self, s: Session, attempt: Attempt, node: Node, rank: int) -> bool:
        """Whether ``node`` runs ``rank`` of ``attempt`` (ranks are laid out node by node)."""
        job = s.get(Job, attempt.job_id)
        if job is None:
            return False
        index = self._plan(s, attempt, self.spec_of(job)).index.get(node.id)
        return index is not None and rank >= 0 and rank // self.spec_of(job).nproc_per_node == index

    def _grace(self, s: Session, node: Node) -> float:
        """Workers of a failed attempt are killed fast: their state is in the checkpoints."""
        recent = s.scalars(
            select(Attempt)
            .options(load_only(Attempt.id, Attempt.state, Attempt.node_ids))
            .order_by(Attempt.id.desc())
            .limit(50)
        )
        last = next((a for a in recent if node.id in a.node_ids), None)
        if last is not None and last.state == AttemptState.FAILED:
            return self.config.failed_stop_grace_s
        return self.config.stop_grace_s

    def worker_event(self, node_id: int, ev: WorkerEvent, credential: str | None) -> None:
        with self.lock, self.sessions.begin() as s:
            self._flush(s)
            node = s.get(Node, node_id)
            attempt = s.get(Attempt, ev.attempt_id)
            if node is None or attempt is None:
                raise NotFoundError(f"unknown node {node_id} or attempt {ev.attempt_id}")
            self.check_node(s, node, credential)
            if not self._runs_rank(s, attempt, node, ev.rank):
                raise NodeAuthError(
                    f"node {node.name} does not run rank {ev.rank} of attempt {attempt.id}"
                )
            if attempt.state in TERMINAL_ATTEMPT_STATES:
                return  # workers of an attempt already ended (being stopped): nothing to decide
            rank = str(ev.rank)
            ranks = dict(attempt.ranks)
            ranks[rank] = {**ranks.get(rank, {"rank": ev.rank}), "event": ev.model_dump()}
            attempt.ranks = ranks
            if ev.kind == "first_progress":
                self._first_progress(s, attempt, ev)
            elif ev.kind == "hung":
                self._fail_attempt(
                    s,
                    attempt,
                    f"hang: rank {ev.rank} on {node.name}: {ev.detail}",
                    policy.Fault.HANG,
                    node=node,
                    detected=ev.time_unix,
                    error=ev.error,
                )
            elif ev.kind == "exited":
                recovery.exited(self, s, node, attempt, ev)

    def _first_progress(self, s: Session, attempt: Attempt, ev: WorkerEvent) -> None:
        match = re.search(r"step=(\d+)", ev.detail)
        step = int(match.group(1)) if match else None
        if attempt.first_step_unix is None or ev.time_unix < attempt.first_step_unix:
            attempt.first_step_unix = ev.time_unix
        if step is not None and (attempt.first_step is None or step < attempt.first_step):
            attempt.first_step = step
        if ev.rank != 0:
            return
        previous = s.scalar(
            select(Attempt).where(
                Attempt.job_id == attempt.job_id, Attempt.number == attempt.number - 1
            )
        )
        timings: dict[str, Any] = {"since_attempt_start_s": ev.time_unix - attempt.created_unix}
        if previous is not None and previous.ended_unix is not None:
            timings["since_failure_s"] = ev.time_unix - previous.ended_unix
            timings["previous_cause"] = previous.end_cause
        self._event(
            s,
            "first_step",
            f"attempt {attempt.number} step {step}",
            attempt=attempt,
            step=step,
            **timings,
        )

    def _release(self, s: Session, attempt: Attempt) -> None:
        for node_id in attempt.node_ids:
            node = s.get(Node, node_id)
            if node is None or node.attempt_id != attempt.id:
                continue
            node.attempt_id = None
            if NodeState(node.state) == NodeState.BUSY:
                self._set_node(s, node, NodeState.READY, f"attempt {attempt.id} ended")

    def _fail_attempt(
        self,
        s: Session,
        attempt: Attempt,
        cause: str,
        kind: policy.Fault,
        *,
        detected: float,
        node: Node | None = None,
        error: str | None = None,
    ) -> None:
        """End ``attempt`` for a fault seen on ``node`` (see recovery.fail_attempt)."""
        recovery.fail_attempt(
            self, s, attempt, cause, kind, detected=detected, node=node, error=error
        )

    # -- people

    def submit(self, spec: JobSpec) -> int:
        with self.lock, self.sessions.begin() as s:
            job = Job(
                name=spec.name,
                team=spec.team,
                priority=spec.priority,
                spec=spec.model_dump(by_alias=True),
                state=JobState.QUEUED,
                reason="submitted",
                restarts=[],
                created_unix=self.clock(),
            )
            s.add(job)
            s.flush()
            self._event(s, "job_submitted", f"{spec.nodes}x{spec.nproc_per_node}", job=job)
            return job.id

    def cancel(self, job_id: int) -> None:
        with self.lock, self.sessions.begin() as s:
            self._flush(s)
            job = s.get(Job, job_id)
            if job is None:
                raise NotFoundError(f"no job {job_id}")
            if JobState(job.state) in TERMINAL_JOB_STATES:
                return
            for attempt in s.scalars(select(Attempt).where(Attempt.job_id == job_id)):
                if attempt.state not in TERMINAL_ATTEMPT_STATES:
                    self._set_attempt(s, attempt, AttemptState.STOPPING, "job cancelled")
                    self._set_attempt(s, attempt, AttemptState.STOPPED, "job cancelled")
                    self._release(s, attempt)
            self._set_job(s, job, JobState.CANCELLED, "cancelled by a user", EndKind.CANCELLED)

    def drain(self, node_id: int, drain: bool) -> None:
        with self.lock, self.sessions.begin() as s:
            self._flush(s)
            node = s.get(Node, node_id)
            if node is None:
                raise NotFoundError(f"no node {node_id}")
            if drain:
                if NodeState(node.state) in {NodeState.DRAINING, NodeState.DRAINED}:
                    return  # drained twice: what was asked is already so
                self._set_node(s, node, NodeState.DRAINING, "drained by a user")
                if node.attempt_id is None:
                    self._set_node(s, node, NodeState.DRAINED, "no work left")
            elif NodeState(node.state) in {
                NodeState.DRAINING,
                NodeState.DRAINED,
                NodeState.QUARANTINED,
            }:
                node.failures = []
                self._set_node(s, node, NodeState.READY, "returned by a user")

    # -- the loop

    def reconcile(self) -> None:
        """One pass: lost nodes, rechecks that ran out of time, recoveries, the queue. It
        records whether anything is left waiting on nodes (a heartbeat then wakes the loop)."""
        with self.lock, self.sessions.begin() as s:
            self._flush(s)
            self._check_liveness(s)
            for node in s.scalars(select(Node).where(Node.recheck_unix.is_not(None))):
                recovery.settle_recheck(self, s, node)  # verdicts that come by time: none in time
            for job in s.scalars(
                select(Job).where(Job.state == JobState.RECOVERING).order_by(Job.id)
            ):
                recovery.recover(self, s, job)
            for job in s.scalars(
                select(Job)
                .where(Job.state == JobState.QUEUED)
                .order_by(Job.priority.desc(), Job.id)
            ):
                if not self._schedule(s, job):
                    break  # strict priority order: nothing jumps the queue's head
            # Only a recovery waits on heartbeats (its last nodes proving they are alive); a
            # queued job waits on nodes turning free, which are decisions and wake the loop.
            waiting = select(Job.id).where(Job.state == JobState.RECOVERING)
            self._waiting = s.scalar(waiting.limit(1)) is not None

    def _check_liveness(self, s: Session) -> None:
        """Silent nodes are found in memory (the fast lane's heartbeat times); only they are
        loaded. Silence counts from the controller's start and from the last time it was
        behind (shedding requests or stalled): a heartbeat it did not take is not silence."""
        drained = select(Node).where(Node.state == NodeState.DRAINING, Node.attempt_id.is_(None))
        for node in s.scalars(drained):
            self._set_node(s, node, NodeState.DRAINED, "no work left")
        deadline = self.clock() - self.config.node_lost_after_s
        floor = max(self.started_unix, self.live.behind_unix)
        heard_of = {
            n.id: n.last_heartbeat_unix
            for n in list(self.live.nodes.values())
            if n.state in LIVE_NODE_STATES and max(n.last_heartbeat_unix, floor) < deadline
        }
        if not heard_of:
            return
        for node in s.scalars(select(Node).where(Node.id.in_(heard_of)).order_by(Node.id)):
            state = NodeState(node.state)
            last = max(node.last_heartbeat_unix, heard_of[node.id])
            if state not in LIVE_NODE_STATES or max(last, floor) >= deadline:
                continue
            silent = self.clock() - last
            self._set_node(s, node, NodeState.LOST, f"no heartbeat for {silent:.1f} s")
            self._fail_node_attempt(
                s, node, f"node lost: {node.name} silent for {silent:.1f} s", policy.Fault.NODE_LOST
            )

    def _fail_node_attempt(self, s: Session, node: Node, cause: str, kind: policy.Fault) -> None:
        """The node is at fault: fail the attempt it runs (blaming it) and detach it."""
        attempt = s.get(Attempt, node.attempt_id) if node.attempt_id is not None else None
        if attempt is not None and attempt.state not in TERMINAL_ATTEMPT_STATES:
            self._fail_attempt(s, attempt, cause, kind, node=node, detected=self.clock())
        node.attempt_id = None

    def _free_nodes(self, s: Session) -> list[Node]:
        nodes = s.scalars(
            select(Node).where(Node.state == NodeState.READY, Node.attempt_id.is_(None))
        )
        return sorted(nodes, key=lambda n: (len(n.failures), n.id))

    def _schedule(self, s: Session, job: Job) -> bool:
        spec = self.spec_of(job)
        ready = select(func.count(Node.id)).where(
            Node.state == NodeState.READY, Node.attempt_id.is_(None)
        )
        if (s.scalar(ready) or 0) - self.config.reserve_spares < spec.nodes:
            return False  # counted, not loaded: a pass with a job that does not fit is cheap
        free = self._free_nodes(s)
        if len(free) - self.config.reserve_spares < spec.nodes:
            return False
        self._start_attempt(s, job, free[: spec.nodes], "scheduled")
        return True

    def _plan_restore(self, s: Session, job: Job, nodes: list[Node]) -> dict[str, Any] | None:
        """Where each rank of the new attempt finds the newest step held in memory, if any."""
        spec = JobSpec.model_validate(job.spec)
        alive_since = self.clock() - self.config.node_lost_after_s
        # A node of the failed attempt silent since the failure is not a source: the failure
        # is often the first sign of a dead node (choose_nodes does not trust it either), and
        # a plan naming it alone for a rank loses the step it was to restore.
        last = s.scalars(
            select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.id.desc()).limit(1)
        ).first()
        ended = last.ended_unix if last is not None else None
        failed_at = {n: ended for n in last.node_ids} if last and ended is not None else {}
        holdings: dict[int, list[dict[str, Any]]] = {}
        urls: dict[int, str] = {}
        for node in s.scalars(select(Node).where(Node.last_heartbeat_unix >= alive_since)):
            if NodeState(node.state) == NodeState.LOST:
                continue
            if node.last_heartbeat_unix < failed_at.get(node.id, -math.inf):
                continue
            mine = [h for h in node.snapshots or [] if h.get("job_id") == job.id]
            if mine:
                holdings[node.id] = mine
                urls[node.id] = node.agent_url
        durable = (job.checkpointing or {}).get("durable_step")
        plan, why = plan_restore(
            spec.world_size,
            spec.nproc_per_node,
            [n.id for n in nodes],
            holdings,
            urls,
            int(durable) if durable is not None else None,
        )
        self._event(
            s,
            "restore_planned",
            why,
            job=job,
            tier="memory" if plan else "durable",
            step=plan.step if plan else (durable if durable is not None else -1),
        )
        return plan.model_dump() if plan else None

    def _start_attempt(self, s: Session, job: Job, nodes: list[Node], cause: str) -> None:
        number = len(list(s.scalars(select(Attempt.id).where(Attempt.job_id == job.id))))
        attempt = Attempt(
            job_id=job.id,
            number=number,
            state=AttemptState.STARTING,
            node_ids=[n.id for n in nodes],
            master_addr=nodes[0].address,
            master_port=random.randint(self.config.port_min, self.config.port_max),
            created_unix=self.clock(),
            end_cause="",
            ranks={},
            metrics={},
        )
        if number > 0:
            attempt.restore = self._plan_restore(s, job, nodes)
        s.add(attempt)
        s.flush()
        for node in nodes:
            node.attempt_id = attempt.id
            self._set_node(s, node, NodeState.BUSY, f"attempt {attempt.id} of job {job.name}")
        if job.started_unix is None:
            job.started_unix = self.clock()
        self._set_job(s, job, JobState.STARTING, f"attempt {number}: {cause}")
        self._event(
            s,
            "attempt_created",
            cause,
            attempt=attempt,
            nodes=[n.name for n in nodes],
            port=attempt.master_port,
        )


@dataclass(frozen=True, slots=True)
class _AttemptPlan:
    urls: dict[int, str]  # node id -> agent URL, in the attempt's node order
    index: dict[int, int]  # node id -> its node rank in the attempt
    placement: dict[int, list[int]]  # node id -> the nodes it replicates its snapshots to
