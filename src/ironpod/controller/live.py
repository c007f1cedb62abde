"""The heartbeat path in memory: a fast lane for heartbeats that decide nothing, and the
write-behind that persists what they carried.

At 10,000 nodes a controller answers 2,000 heartbeats a second at a 5 s interval. Nearly all
of them say only "alive, as before": no notices, no health results, workers in the states the
controller last saw, the node in a state a heartbeat cannot change. Such a heartbeat is
answered here, on the event loop, with no decision lock and no SQL: the node's part of the
reply (its assignment, its stop grace) was serialised by the last heartbeat that took the
decision path and is reused until a decision changes the node, its attempt or its job (the
session hooks in :class:`~ironpod.controller.service.Controller` drop it then). What the
heartbeat carried (its time, the clock skew, snapshot holdings, memory, per-rank progress)
waits in :class:`Live` and reaches the database at the start of the next decision, so every
decision sees it, and at least once per reconciler period otherwise.

A controller restart loses at most that period of heartbeat times and progress: agents send
the same facts again on their next heartbeat, and silence counts from the restart
(``Controller.started_unix``), so nothing a decision needs is lost. State changes, events and
anything else a decision writes are never deferred.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from ironpod.controller.db import Attempt, Job, Node
from ironpod.states import TERMINAL_ATTEMPT_STATES, TERMINAL_JOB_STATES, JobState, NodeState
from ironpod.wire import Heartbeat

if TYPE_CHECKING:
    from ironpod.controller.service import Controller

#: States in which a heartbeat that reports nothing new changes nothing: it is answered fast.
#: (``lost`` returns the node, ``joining`` and the rechecked states wait on the heartbeat.)
FAST_STATES = frozenset({NodeState.READY, NodeState.BUSY, NodeState.DRAINING, NodeState.DRAINED})


#: A node's columns whose change a decision makes, and which the fast lane must know of.
_NODE_FIELDS = ("state", "attempt_id", "recheck_unix", "agent_instance", "credential_sha256")
#: The durable interval an assignment advises changes with the run time; a change smaller
#: than this share does not re-send assignments.
_ADVICE_CHANGE = 0.05


@dataclass(slots=True)
class LiveNode:
    """What the fast lane must know of one node; decisions keep it current (session hooks)."""

    id: int
    agent_instance: str
    credential_sha256: str
    state: str
    attempt_id: int | None
    recheck: bool
    last_heartbeat_unix: float
    #: The reply's node-specific members as JSON (``"assignment":...,"stop_grace_s":...``),
    #: from the last heartbeat on the decision path; None until then, and after a change.
    part: bytes | None = None
    #: The job of the assignment in ``part`` (its peer token goes in every reply).
    job_id: int | None = None
    #: rank -> the worker state the decision path last saw, for the node's attempt.
    ranks: dict[int, str] = field(default_factory=dict)
    #: The least (controller clock - the heartbeat's own time) seen: clock skew plus the
    #: quickest delivery. A heartbeat later than this by LATE_S waited for the controller.
    delay_floor: float = math.inf
    #: Late heartbeats in a row: a node late on every beat had its clock stepped back.
    late: int = 0

    @classmethod
    def of(cls, node: Node, part: bytes | None = None) -> LiveNode:
        """What the fast lane keeps of the row ``node`` (its decision-made columns)."""
        return cls(
            id=node.id,
            agent_instance=node.agent_instance,
            credential_sha256=node.credential_sha256,
            state=node.state,
            attempt_id=node.attempt_id,
            recheck=node.recheck_unix is not None,
            last_heartbeat_unix=node.last_heartbeat_unix,
            part=part,
        )


@dataclass(slots=True)
class Beat:
    """What one fast heartbeat left for the database (the newest per node wins)."""

    time_unix: float
    clock_skew_s: float
    snapshots: list[dict[str, Any]]
    memory: dict[str, Any] | None


class Live:
    """The fast lane's state. ``lock`` guards only these dicts (held for microseconds);
    decisions hold the controller's lock and change nodes here through the session hooks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.nodes: dict[int, LiveNode] = {}
        #: node id -> its newest fast heartbeat not yet in the database.
        self.beats: dict[int, Beat] = {}
        #: attempt id -> rank -> the rank's newest status (wire.WorkerStatus) not yet applied.
        self.ranks: dict[int, dict[int, dict[str, Any]]] = {}
        #: Ids of the jobs not yet ended (every reply's ``keep_jobs``), and that list as JSON.
        self.live_jobs: frozenset[int] = frozenset()
        self.live_jobs_json = b"[]"
        #: The last time the controller was behind (it shed or dropped requests, or its event
        #: loop stalled): silence counts from then, since those nodes' heartbeats may be ours.
        self.behind_unix = -math.inf
        #: Fast answers given, and heartbeats sent down the decision path (for the bench).
        self.fast = 0
        self.slow = 0

    def set_live_jobs(self, jobs: set[int]) -> None:
        self.live_jobs = frozenset(jobs)
        self.live_jobs_json = json.dumps(sorted(jobs)).encode()

    def take(
        self, *, ranks: bool = True
    ) -> tuple[dict[int, Beat], dict[int, dict[int, dict[str, Any]]]]:
        """What waits for the database, handed over once (the ranks' too unless not asked)."""
        with self.lock:
            beats, self.beats = self.beats, {}
            taken: dict[int, dict[int, dict[str, Any]]] = {}
            if ranks:
                taken, self.ranks = self.ranks, {}
        return beats, taken

    def pend_rank(self, attempt_id: int, rank: int, status: dict[str, Any]) -> None:
        with self.lock:
            self.ranks.setdefault(attempt_id, {})[rank] = status

    def remember(
        self, node_id: int, part: bytes, job_id: int | None, ranks: dict[int, str], heard: float
    ) -> None:
        """The decision path's reply for ``node_id``, for its next heartbeats (called after
        the commit and under the decision lock, so no later decision is overwritten)."""
        with self.lock:
            node = self.nodes.get(node_id)
            if node is not None:
                node.part, node.job_id, node.ranks = part, job_id, ranks
                node.last_heartbeat_unix = max(node.last_heartbeat_unix, heard)

    def fell_behind(self, now: float) -> None:
        self.behind_unix = max(self.behind_unix, now)


#: A heartbeat that took this much longer than the node's quickest waited in the controller's
#: queues: the controller is behind and holds its lost verdicts (Controller._check_liveness).
LATE_S = 2.0
#: A node whose heartbeats are late this many times in a row is a node whose clock was
#: stepped back, not a controller behind: its baseline moves (one node's clock must not hold
#: every lost verdict of the cluster).
LATE_IN_A_ROW = 3


def note_delay(ctl: Controller, node: LiveNode, now: float, sent_unix: float) -> None:
    """Compare the heartbeat's delay with the node's quickest: a late one marks the
    controller behind (silence while it was behind may be its own doing, not the node's)."""
    delay = now - sent_unix
    if delay < node.delay_floor:
        node.delay_floor, node.late = delay, 0
    elif delay - node.delay_floor > LATE_S:
        node.late += 1
        if node.late >= LATE_IN_A_ROW:  # not us: its clock moved (NTP stepped it back)
            node.delay_floor, node.late = delay, 0
        else:
            ctl.live.fell_behind(now)
    else:
        node.late = 0


def reply_part(assignment_json: bytes, stop_grace_s: float) -> bytes:
    """The members of a reply that only decisions change, ready to splice (see :func:`reply`)."""
    return b'"assignment":%s,"stop_grace_s":%s,"reregister":false,"health_recheck":false' % (
        assignment_json,
        repr(float(stop_grace_s)).encode(),
    )


def reply(part: bytes, time_unix: float, live_jobs_json: bytes, tokens: dict[str, str]) -> bytes:
    """A whole wire.HeartbeatReply as JSON: the cached part and what changes every time."""
    return b'{"time_unix":%s,"keep_jobs":%s,"peer_tokens":%s,%s}' % (
        repr(float(time_unix)).encode(),
        live_jobs_json,
        json.dumps(tokens, separators=(",", ":")).encode(),
        part,
    )


def fast_heartbeat(
    ctl: Controller, node_id: int, hb: Heartbeat, credential: str | None
) -> bytes | None:
    """The reply to a heartbeat that decides nothing, or None: take the decision path.

    Its work is the node's own: one dict lookup, a hash of the credential, a look at each of
    the node's own workers, and the reply assembled from bytes cached per node; nothing in it
    grows with the job or the cluster."""
    live = ctl.live
    node = live.nodes.get(node_id)
    if (
        node is None
        or node.part is None
        or node.recheck
        or node.state not in FAST_STATES
        or node.agent_instance != hb.agent_instance
        or hb.notices
        or hb.health is not None
        or not credential
    ):
        return None
    given = hashlib.sha256(credential.encode()).hexdigest()
    if not hmac.compare_digest(given, node.credential_sha256):
        return None  # the decision path answers an old credential (re-register)
    for status in hb.workers:
        if status.attempt_id != node.attempt_id or node.ranks.get(status.rank) != status.state:
            return None  # a worker started, ended or is not the node's: a decision
    now = ctl.clock()
    note_delay(ctl, node, now, hb.time_unix)
    beat = Beat(
        time_unix=now,
        clock_skew_s=now - hb.time_unix,
        snapshots=[h.model_dump() for h in hb.snapshots],
        memory=(
            {"budget_bytes": hb.memory_budget_bytes, "used_bytes": hb.memory_used_bytes}
            if hb.memory_budget_bytes is not None
            else None
        ),
    )
    with live.lock:
        live.beats[node_id] = beat
        if hb.workers and node.attempt_id is not None:
            pending = live.ranks.setdefault(node.attempt_id, {})
            for status in hb.workers:
                pending[status.rank] = status.model_dump()
        node.last_heartbeat_unix = now
        live.fast += 1
    if ctl._waiting:  # a job may wait for this node to prove itself alive
        ctl.wake.set()
    jobs = {h.job_id for h in hb.snapshots}
    if node.job_id is not None:
        jobs.add(node.job_id)
    tokens = {str(j): ctl.peer_token(j) for j in sorted(jobs & live.live_jobs)}
    return reply(node.part, now, live.live_jobs_json, tokens)


@dataclass(slots=True)
class Changes:
    """What a transaction's flushes changed that the fast lane must know (applied at commit)."""

    nodes: dict[int, LiveNode] = field(default_factory=dict)
    attempt_nodes: set[int] = field(default_factory=set)
    ended_attempts: set[int] = field(default_factory=set)
    jobs: dict[int, str] = field(default_factory=dict)
    advice: set[int] = field(default_factory=set)


def _changed(obj: Any, names: tuple[str, ...]) -> bool:
    attrs = inspect(obj).attrs
    return any(bool(attrs[name].history.has_changes()) for name in names)


def _advice_moved(history: Any, now: dict[str, Any] | None) -> bool:
    """Whether a job's advised durable interval moved enough to re-send its assignments."""
    before = (history.deleted[0] if history.deleted else None) or {}
    old, new = before.get("interval_s"), (now or {}).get("interval_s")
    if old is None or new is None:
        return bool(old != new)
    return bool(abs(new - old) > _ADVICE_CHANGE * max(abs(old), 1e-9))


def collect_changes(session: Session, _context: Any) -> None:
    """``after_flush``: note the changes of nodes, attempts and jobs the fast lane caches
    replies from (the session still shows what the flush wrote)."""
    changes: Changes = session.info.setdefault("live", Changes())
    for obj in [*session.new, *session.dirty]:
        fresh = obj in session.new
        if isinstance(obj, Node):
            if fresh or _changed(obj, _NODE_FIELDS):
                changes.nodes[obj.id] = LiveNode.of(obj)
        elif isinstance(obj, Attempt):
            if fresh or _changed(obj, ("state", "restore")):
                changes.attempt_nodes.update(obj.node_ids)
                if obj.state in TERMINAL_ATTEMPT_STATES:
                    changes.ended_attempts.add(obj.id)
        elif isinstance(obj, Job):
            if fresh or _changed(obj, ("state",)):
                changes.jobs[obj.id] = obj.state
            history = inspect(obj).attrs.checkpointing.history
            if history.has_changes() and _advice_moved(history, obj.checkpointing):
                changes.advice.add(obj.id)


def forget_changes(session: Session) -> None:
    session.info.pop("live", None)


def apply_changes(live: Live, session: Session, idle_part: bytes) -> set[int]:
    """``after_commit``: what the transaction changed reaches the fast lane; the nodes it
    touched answer their next heartbeat on the decision path, with a fresh reply. Returns the
    attempts that ended (their cached plans go)."""
    changes: Changes | None = session.info.pop("live", None)
    if changes is None:
        return set()
    with live.lock:
        for values in changes.nodes.values():
            node = live.nodes.get(values.id)
            if node is None:  # a new node: idle, so its reply is known without asking
                if values.attempt_id is None and values.state in FAST_STATES:
                    values.part = idle_part
                live.nodes[values.id] = values
                continue
            node.agent_instance = values.agent_instance
            node.credential_sha256 = values.credential_sha256
            node.state = values.state
            node.attempt_id = values.attempt_id
            node.recheck = values.recheck
            node.last_heartbeat_unix = max(node.last_heartbeat_unix, values.last_heartbeat_unix)
            node.part = None
        for node_id in changes.attempt_nodes:
            if (node := live.nodes.get(node_id)) is not None:
                node.part = None
        if changes.advice:
            for node in live.nodes.values():
                if node.job_id in changes.advice:
                    node.part = None
        if changes.jobs:
            jobs = set(live.live_jobs)
            for job_id, state in changes.jobs.items():
                if JobState(state) in TERMINAL_JOB_STATES:
                    jobs.discard(job_id)
                else:
                    jobs.add(job_id)
            live.set_live_jobs(jobs)
    return changes.ended_attempts
