"""The controller's decisions: one code path for every change of cluster state.

Requests from agents and people, and the reconciler loop, all go through :class:`Controller`,
which holds one lock: decisions are serialised, so no two of them ever act on a stale view (a
single controller process makes this cheap; its state is in SQL so it can restart any time).
"""

from __future__ import annotations

import logging
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ironpod import env
from ironpod.controller import health
from ironpod.controller.db import Attempt, Event, Job, Node, make_engine, migrate, now
from ironpod.controller.db import session_factory as make_sessions
from ironpod.controller.memory import NodeInfo, place_replicas, plan_restore, young_daly
from ironpod.controller.stragglers import slow_ranks
from ironpod.errors import EXIT_PREEMPTED
from ironpod.spec import JobSpec
from ironpod.states import (
    ATTEMPT_TRANSITIONS,
    JOB_TRANSITIONS,
    NODE_TRANSITIONS,
    TERMINAL_ATTEMPT_STATES,
    TERMINAL_JOB_STATES,
    AttemptState,
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
LIVE_NODE_STATES = {NodeState.JOINING, NodeState.READY, NodeState.BUSY, NodeState.DRAINING}


@dataclass(kw_only=True, slots=True)
class ControllerConfig:
    heartbeat_interval_s: float = 1.0
    node_lost_after_s: float = 6.0
    reserve_spares: int = 0
    stop_grace_s: float = 10.0
    failed_stop_grace_s: float = 1.0
    port_min: int = 20000
    port_max: int = 40000
    #: What a failed health check does (ironpod.controller.health): "quarantine" the node and
    #: restart its job elsewhere, or only "label" it (record and event).
    health_action: health.HealthAction = "quarantine"
    #: A node found unhealthy this many times within the window stays quarantined until undrain.
    health_repeat_limit: int = 3
    health_repeat_window_s: float = 3600.0
    #: A health-quarantined node returns on a passing run no sooner than this after quarantine.
    health_recheck_after_s: float = 0.0


class NotFoundError(LookupError):
    pass


class Controller:
    def __init__(self, db_url: str, state_dir: Path, config: ControllerConfig) -> None:
        self.config = config
        self.state_dir = state_dir
        migrate(db_url)
        self.engine = make_engine(db_url)
        self.sessions = make_sessions(self.engine)
        self.lock = threading.RLock()
        #: Node silence counts from here at the earliest: no agent could reach a controller
        #: that was down, so a restart must not find every node lost.
        self.started_unix = now()

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
                time_unix=now(),
            )
        )
        log.info("event %s: %s %s", kind, cause, data or "")

    def _set_node(self, s: Session, node: Node, target: NodeState, cause: str) -> None:
        current = NodeState(node.state)
        if current == target:
            return
        check_transition(NODE_TRANSITIONS, current, target)
        node.state = target
        node.reason = cause
        self._event(s, f"node_{target}", cause, node=node, previous=str(current))

    def _set_job(self, s: Session, job: Job, target: JobState, cause: str) -> None:
        current = JobState(job.state)
        if current == target:
            return
        check_transition(JOB_TRANSITIONS, current, target)
        job.state = target
        job.reason = cause
        if target in TERMINAL_JOB_STATES:
            job.ended_unix = now()
        self._event(s, f"job_{target}", cause, job=job, previous=str(current))

    def _set_attempt(self, s: Session, attempt: Attempt, target: AttemptState, cause: str) -> None:
        current = AttemptState(attempt.state)
        if current == target:
            return
        check_transition(ATTEMPT_TRANSITIONS, current, target)
        attempt.state = target
        if target in TERMINAL_ATTEMPT_STATES:
            attempt.ended_unix = now()
            attempt.end_cause = cause
        self._event(s, f"attempt_{target}", cause, attempt=attempt, number=attempt.number)

    # -- agents

    def register(self, reg: NodeRegistration) -> RegistrationReply:
        with self.lock, self.sessions.begin() as s:
            node = s.scalar(select(Node).where(Node.name == reg.name))
            fields = {
                "hostname": reg.hostname,
                "address": reg.address,
                "agent_url": reg.agent_url,
                "cpus": reg.cpus,
                "memory_bytes": reg.memory_bytes,
                "gpus": [g.model_dump() for g in reg.gpus],
                "labels": dict(reg.labels),
                "last_heartbeat_unix": now(),
                "clock_skew_s": now() - reg.time_unix,
            }
            if node is None:
                node = Node(
                    name=reg.name,
                    agent_instance=reg.agent_instance,
                    state=NodeState.JOINING,
                    reason="",
                    failures=[],
                    **fields,
                )
                s.add(node)
                s.flush()
                self._event(s, "node_registered", "new node", node=node, cpus=reg.cpus)
                self._set_node(s, node, NodeState.READY, "joined")
                if reg.health is not None:
                    health.apply_health(self, s, node, reg.health)
            else:
                restarted = node.agent_instance != reg.agent_instance
                for key, value in fields.items():
                    setattr(node, key, value)
                node.agent_instance = reg.agent_instance
                if restarted:
                    self._fail_node_attempt(
                        s, node, f"agent restarted on node {node.name}", "agent_restart"
                    )
                    self._event(s, "agent_restarted", f"node {node.name}", node=node)
                if NodeState(node.state) in {NodeState.LOST, NodeState.JOINING}:
                    self._set_node(s, node, NodeState.READY, "agent registered again")
                if reg.health is not None:
                    health.apply_health(self, s, node, reg.health)
            return RegistrationReply(
                node_id=node.id, heartbeat_interval_s=self.config.heartbeat_interval_s
            )

    def heartbeat(self, node_id: int, hb: Heartbeat) -> HeartbeatReply:
        with self.lock, self.sessions.begin() as s:
            node = s.get(Node, node_id)
            if node is None or node.agent_instance != hb.agent_instance:
                return HeartbeatReply(reregister=True)
            node.last_heartbeat_unix = now()
            node.clock_skew_s = now() - hb.time_unix
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
                self._set_node(s, node, NodeState.READY, "heartbeats resumed")
            if hb.health is not None:
                health.apply_health(self, s, node, hb.health)
            touched: dict[int, Attempt] = {}
            for status in hb.workers:
                attempt = s.get(Attempt, status.attempt_id)
                if attempt is None:
                    continue
                touched[attempt.id] = attempt
                ranks = dict(attempt.ranks)
                ranks[str(status.rank)] = {**ranks.get(str(status.rank), {}), **status.model_dump()}
                attempt.ranks = ranks
                if status.state == "running" and attempt.state == AttemptState.STARTING:
                    self._set_attempt(s, attempt, AttemptState.RUNNING, "workers running")
                    attempt.running_unix = now()
                    job = s.get(Job, attempt.job_id)
                    if job is not None and job.state == JobState.STARTING:
                        self._set_job(s, job, JobState.RUNNING, f"attempt {attempt.number} running")
            for attempt in touched.values():  # once per attempt, however many ranks reported
                self._update_progress(s, attempt)
                if attempt.state == AttemptState.RUNNING:
                    self._check_stragglers(s, attempt)
            # A node out for a failed check is rechecked with the deep suite, not the light one.
            recheck = NodeState(node.state) == NodeState.QUARANTINED and node.reason.startswith(
                health.REASON_PREFIX
            )
            return self._reply(s, node).model_copy(
                update={"time_unix": now(), "health_recheck": recheck}
            )

    def _preflight_failed(
        self, s: Session, node: Node, message: str, data: dict[str, Any], detected: float
    ) -> None:
        """A node's pre-flight all-reduce failed: the attempt ends before training. Which node
        is at fault an all-reduce cannot say, so none is blamed; the restart policy applies."""
        attempt = s.get(Attempt, int(data.get("attempt_id", -1)))
        if attempt is None or attempt.state in TERMINAL_ATTEMPT_STATES:
            return
        cause = f"preflight: {node.name}: {message}"
        self._fail_attempt(s, attempt, cause, "preflight", blamed=[], detected=detected)

    def _check_stragglers(self, s: Session, attempt: Attempt) -> None:
        """Mark ranks slower than their peers; report one that stays slow for the policy's
        steps (once per attempt), and with ``action: replace`` take its node out."""
        job = s.get(Job, attempt.job_id)
        if job is None:
            return
        spec = JobSpec.model_validate(job.spec)
        policy = spec.stragglers
        medians = {
            int(r): float(v["median_compute_s"])
            for r, v in attempt.ranks.items()
            if v.get("median_compute_s")
        }
        slow = slow_ranks(medians, policy.factor)
        ranks = {r: dict(v) for r, v in attempt.ranks.items()}
        for key, info in ranks.items():
            rank, step = int(key), info.get("last_step")
            if rank not in slow:
                info.pop("slow_since_step", None)
                continue
            since = info.setdefault("slow_since_step", step)
            if info.get("straggler") or step is None or since is None:
                continue
            if step - since >= policy.steps:
                info["straggler"] = True
                node = s.get(Node, attempt.node_ids[rank // spec.nproc_per_node])
                self._straggler(s, job, attempt, node, rank, slow[rank], medians, policy.action)
        if ranks != attempt.ranks:
            attempt.ranks = ranks

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
        self._fail_attempt(s, attempt, cause, "straggler", blamed=[], detected=now())

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
            runtime = now() - (job.started_unix or now())
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
                assignment=None, stop_grace_s=self._grace(s, node), keep_jobs=self._live_jobs(s)
            )
        attempt = s.get(Attempt, node.attempt_id)
        job = s.get(Job, attempt.job_id) if attempt else None
        if attempt is None or job is None or attempt.state in TERMINAL_ATTEMPT_STATES:
            return HeartbeatReply(
                assignment=None, stop_grace_s=self._grace(s, node), keep_jobs=self._live_jobs(s)
            )
        spec = JobSpec.model_validate(job.spec)
        node_rank = attempt.node_ids.index(node.id)
        per = spec.nproc_per_node
        policy = spec.restart
        job_env = {
            **spec.env,
            env.JOB_ID: str(job.id),
            env.ATTEMPT_ID: str(attempt.number),
        }
        if spec.checkpoint_dir:
            job_env[env.CHECKPOINT_DIR] = spec.checkpoint_dir
        peers = [n for n in (s.get(Node, i) for i in attempt.node_ids) if n is not None]
        infos = [NodeInfo(n.id, n.agent_url, dict(n.labels)) for n in peers]
        placement = place_replicas(infos, spec.memory.replicas, spec.memory.failure_domain_label)
        urls = {n.id: n.agent_url for n in peers}
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
                peers=[n.agent_url for n in peers if n.id != node.id],
                restore=attempt.restore,
                preflight=self._preflight(spec, attempt),
                durable_interval_s=durable_interval,
                restart_count=attempt.number,
                max_restarts=policy.max_restarts,
                run_id=f"{job.name}-{job.id}-{int(job.created_unix)}",
            ),
            stop_grace_s=self.config.stop_grace_s,
            keep_jobs=self._live_jobs(s),
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

    def _grace(self, s: Session, node: Node) -> float:
        """Workers of a failed attempt are killed fast: their state is in the checkpoints."""
        recent = s.scalars(select(Attempt).order_by(Attempt.id.desc()).limit(50))
        last = next((a for a in recent if node.id in a.node_ids), None)
        if last is not None and last.state == AttemptState.FAILED:
            return self.config.failed_stop_grace_s
        return self.config.stop_grace_s

    def worker_event(self, node_id: int, ev: WorkerEvent) -> None:
        with self.lock, self.sessions.begin() as s:
            node = s.get(Node, node_id)
            attempt = s.get(Attempt, ev.attempt_id)
            if node is None or attempt is None:
                raise NotFoundError(f"unknown node {node_id} or attempt {ev.attempt_id}")
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
                    "hang",
                    blamed=self._hang_suspects(s, attempt),
                    detected=ev.time_unix,
                )
            elif ev.kind == "exited":
                self._exited(s, node, attempt, ev)

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

    def _exited(self, s: Session, node: Node, attempt: Attempt, ev: WorkerEvent) -> None:
        job = s.get(Job, attempt.job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
        if ev.exit_code == 0:
            done = [
                r for r in attempt.ranks.values() if (r.get("event") or {}).get("exit_code") == 0
            ]
            if len(done) >= spec.world_size:
                self._set_attempt(s, attempt, AttemptState.SUCCEEDED, "all ranks exited 0")
                self._release(s, attempt)
                self._set_job(s, job, JobState.SUCCEEDED, f"attempt {attempt.number} succeeded")
            return
        what = f"killed by signal {ev.signal}" if ev.signal else f"exited with code {ev.exit_code}"
        cause = f"crash: rank {ev.rank} on {node.name} {what}"
        if ev.exit_code in spec.restart.no_restart_exit_codes:
            self._fail_attempt(
                s, attempt, cause, "crash", blamed=[], detected=ev.time_unix, restart=False
            )
            self._set_job(s, job, JobState.FAILED, f"{cause} (a no-restart exit code)")
            return
        if ev.exit_code == EXIT_PREEMPTED:
            self._fail_attempt(
                s,
                attempt,
                f"rank {ev.rank} stopped on request",
                "preempted",
                blamed=[],
                detected=ev.time_unix,
            )
            return
        # Blame needs evidence. A rank killed by a signal (OOM killer, SIGBUS on a bad page, a
        # node going down) points at its node; a non-zero exit is a Python error, most often
        # the peers of a failed rank seeing their collective break, so it blames no node.
        blamed = [node] if ev.signal else []
        self._fail_attempt(s, attempt, cause, "crash", blamed=blamed, detected=ev.time_unix)

    def _hang_suspects(self, s: Session, attempt: Attempt) -> list[Node]:
        """In a hang every rank stops, waiting for the one that really stopped: the ranks
        furthest behind are the suspects; if all stopped at the same step, nobody is blamed."""
        job = s.get(Job, attempt.job_id)
        assert job is not None
        per = JobSpec.model_validate(job.spec).nproc_per_node
        steps = {
            int(r): info.get("last_step") or 0
            for r, info in attempt.ranks.items()
            if isinstance(info, dict)
        }
        if not steps or min(steps.values()) == max(steps.values()):
            return []
        behind = {r // per for r, step in steps.items() if step == min(steps.values())}
        nodes = [s.get(Node, attempt.node_ids[i]) for i in sorted(behind)]
        return [n for n in nodes if n is not None]

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
        kind: str,
        *,
        blamed: list[Node],
        detected: float,
        restart: bool = True,
    ) -> None:
        target = AttemptState.FAILED
        self._set_attempt(s, attempt, target, cause)
        self._event(
            s,
            "fault_detected",
            cause,
            attempt=attempt,
            fault=kind,
            detected_unix=detected,
            decided_unix=now(),
            nodes=[n.name for n in blamed],
        )
        self._release(s, attempt)
        job = s.get(Job, attempt.job_id)
        assert job is not None
        spec = JobSpec.model_validate(job.spec)
        window = spec.restart.window_s
        for node in blamed:
            node.failures = [t for t in node.failures if t > now() - window] + [now()]
            if len(node.failures) >= spec.restart.node_failures_to_quarantine:
                self._set_node(
                    s,
                    node,
                    NodeState.QUARANTINED,
                    f"{len(node.failures)} failures within {window:.0f} s, last: {cause}",
                )
        if restart and JobState(job.state) not in TERMINAL_JOB_STATES:
            self._set_job(s, job, JobState.RECOVERING, cause)

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
                created_unix=now(),
            )
            s.add(job)
            s.flush()
            self._event(s, "job_submitted", f"{spec.nodes}x{spec.nproc_per_node}", job=job)
            return job.id

    def cancel(self, job_id: int) -> None:
        with self.lock, self.sessions.begin() as s:
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
            self._set_job(s, job, JobState.CANCELLED, "cancelled by a user")

    def drain(self, node_id: int, drain: bool) -> None:
        with self.lock, self.sessions.begin() as s:
            node = s.get(Node, node_id)
            if node is None:
                raise NotFoundError(f"no node {node_id}")
            if drain:
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
        with self.lock, self.sessions.begin() as s:
            self._check_liveness(s)
            for job in s.scalars(
                select(Job).where(Job.state == JobState.RECOVERING).order_by(Job.id)
            ):
                self._recover(s, job)
            for job in s.scalars(
                select(Job)
                .where(Job.state == JobState.QUEUED)
                .order_by(Job.priority.desc(), Job.id)
            ):
                if not self._schedule(s, job):
                    break  # strict priority order: nothing jumps the queue's head

    def _check_liveness(self, s: Session) -> None:
        deadline = now() - self.config.node_lost_after_s
        for node in s.scalars(select(Node)):
            state = NodeState(node.state)
            if state == NodeState.DRAINING and node.attempt_id is None:
                self._set_node(s, node, NodeState.DRAINED, "no work left")
            heard = max(node.last_heartbeat_unix, self.started_unix)
            if state not in LIVE_NODE_STATES or heard >= deadline:
                continue
            silent = now() - node.last_heartbeat_unix
            self._set_node(s, node, NodeState.LOST, f"no heartbeat for {silent:.1f} s")
            self._fail_node_attempt(
                s, node, f"node lost: {node.name} silent for {silent:.1f} s", "node_lost"
            )

    def _fail_node_attempt(self, s: Session, node: Node, cause: str, kind: str) -> None:
        """The node is at fault: fail the attempt it runs (blaming it) and detach it."""
        attempt = s.get(Attempt, node.attempt_id) if node.attempt_id is not None else None
        if attempt is not None and attempt.state not in TERMINAL_ATTEMPT_STATES:
            self._fail_attempt(s, attempt, cause, kind, blamed=[node], detected=now())
        node.attempt_id = None

    def _free_nodes(self, s: Session) -> list[Node]:
        nodes = s.scalars(
            select(Node).where(Node.state == NodeState.READY, Node.attempt_id.is_(None))
        )
        return sorted(nodes, key=lambda n: (len(n.failures), n.id))

    def _schedule(self, s: Session, job: Job) -> bool:
        spec = JobSpec.model_validate(job.spec)
        free = self._free_nodes(s)
        if len(free) - self.config.reserve_spares < spec.nodes:
            return False
        self._start_attempt(s, job, free[: spec.nodes], "scheduled")
        return True

    def _recover(self, s: Session, job: Job) -> None:
        spec = JobSpec.model_validate(job.spec)
        window = spec.restart.window_s
        recent = [t for t in job.restarts if t > now() - window]
        if len(recent) >= spec.restart.max_restarts:
            self._set_job(
                s,
                job,
                JobState.FAILED,
                f"restart limit: {len(recent)} restarts within {window:.0f} s",
            )
            return
        last = s.scalar(
            select(Attempt).where(Attempt.job_id == job.id).order_by(Attempt.number.desc())
        )
        free = {n.id: n for n in self._free_nodes(s)}
        if last is not None and last.ended_unix is not None:
            # A failure is often the first sign of a dead node: its peers' collectives fail at
            # once, but it is declared lost only node_lost_after_s later. So a node of the failed
            # attempt is trusted again only once it heartbeated after the failure (other nodes:
            # within two heartbeats); wait that long for it, then go on without the silent ones.
            ended, recent_s = last.ended_unix, 2 * self.config.heartbeat_interval_s
            previous = set(last.node_ids)

            def proven(n: Node) -> bool:
                since = ended if n.id in previous else now() - recent_s
                return n.last_heartbeat_unix >= since

            waiting = [n for i, n in free.items() if i in previous and not proven(n)]
            if waiting and now() < ended + recent_s:
                return
            free = {i: n for i, n in free.items() if proven(n)}
        chosen: list[Node] = []
        if last is not None and spec.restart.in_place_first:
            chosen = [free.pop(i) for i in last.node_ids if i in free]
        replacements = sorted(free.values(), key=lambda n: (len(n.failures), n.id))
        chosen += replacements[: spec.nodes - len(chosen)]
        if len(chosen) < spec.nodes:
            if job.reason.startswith("waiting") is False:
                job.reason = f"waiting for {spec.nodes - len(chosen)} healthy node(s)"
                self._event(s, "job_waiting", job.reason, job=job)
            return
        replaced = [n.name for n in chosen if last is None or n.id not in last.node_ids]
        job.restarts = [*recent, now()]
        cause = "restart in place" if not replaced else f"restart with {', '.join(replaced)}"
        self._start_attempt(s, job, chosen, cause)

    def _plan_restore(self, s: Session, job: Job, nodes: list[Node]) -> dict[str, Any] | None:
        """Where each rank of the new attempt finds the newest step held in memory, if any."""
        spec = JobSpec.model_validate(job.spec)
        alive_since = now() - self.config.node_lost_after_s
        holdings: dict[int, list[dict[str, Any]]] = {}
        urls: dict[int, str] = {}
        for node in s.scalars(select(Node).where(Node.last_heartbeat_unix >= alive_since)):
            if NodeState(node.state) == NodeState.LOST:
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
            created_unix=now(),
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
            job.started_unix = now()
        self._set_job(s, job, JobState.STARTING, f"attempt {number}: {cause}")
        self._event(
            s,
            "attempt_created",
            cause,
            attempt=attempt,
            nodes=[n.name for n in nodes],
            port=attempt.master_port,
        )
