"""The recovery policy as pure functions: facts in, ``(decision, reason)`` out.

The controller (:mod:`ironpod.controller.service`) holds the lock and does gather -> decide ->
apply: it reads rows into the plain dataclasses here, calls one function, and writes the
decision back with the reason as the event's cause. Nothing here touches SQL or a clock: time
comes in as ``now``, so every row of the escalation ladder is a table-driven test.

The ladder (docs/architecture.md, "Recovery"):

1. Restart in place. A process fault (a crash, by exit code or by signal) is evidence about
   the process, not the node: :func:`blame` implicates a node only on evidence about it (lost
   heartbeats, a restarted agent, a failed health check, the rank furthest behind in a hang).
2. A node blamed ``node_failures_to_quarantine`` times within the window (:func:`escalate`) is
   quarantined when a spare can take its place, pending the deep recheck; with no spare it
   becomes ``suspect`` and the deep recheck (:func:`health_verdict`) decides: passed, the job
   restarts in place on it; failed, it is quarantined.
3. The job ends only on a budget (:func:`choose_nodes`): ``max_restarts`` within ``window_s``,
   ``max_failures_without_progress`` identical failures before any step, or a failure that
   running again cannot fix (:func:`exit_decision`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from ironpod.errors import EXIT_PREEMPTED
from ironpod.states import CANNOT_START_EXIT_CODES, EndKind, NodeState


class Fault(StrEnum):
    """What ended an attempt (``fault`` in the ``fault_detected`` event)."""

    CRASH = "crash"
    CANNOT_START = "cannot_start"
    HANG = "hang"
    NODE_LOST = "node_lost"
    AGENT_RESTART = "agent_restart"
    UNHEALTHY = "unhealthy"
    STRAGGLER = "straggler"
    PREFLIGHT = "preflight"
    PREEMPTED = "preempted"


#: Faults that are evidence about the node they happened on.
NODE_FAULTS = frozenset({Fault.NODE_LOST, Fault.AGENT_RESTART, Fault.UNHEALTHY})
#: Faults about the job's own processes: only these can repeat "the same way" (a lost node or
#: a failed pre-flight all-reduce says nothing about whether the job can get going).
PROCESS_FAULTS = frozenset({Fault.CRASH, Fault.HANG})


# -- blame


@dataclass(frozen=True, kw_only=True, slots=True)
class FaultFacts:
    kind: Fault
    #: The node the fault was seen on (a crashed rank's, the lost one, the unhealthy one).
    node: str | None = None
    #: Hang: each rank's last reported step (ranks that reported none count as step 0).
    rank_steps: Mapping[int, int] = field(default_factory=dict)
    nproc_per_node: int = 1
    #: The attempt's nodes in node-rank order (rank r runs on ``nodes[r // nproc_per_node]``).
    nodes: Sequence[str] = ()


def hang_suspects(rank_steps: Mapping[int, int], per: int, nodes: Sequence[str]) -> list[str]:
    """In a hang every rank stops, waiting for the one that really stopped: the nodes of the
    ranks furthest behind; if all stopped at the same step, nobody."""
    if not rank_steps or min(rank_steps.values()) == max(rank_steps.values()):
        return []
    low = min(rank_steps.values())
    behind = sorted({r // per for r, step in rank_steps.items() if step == low})
    return [nodes[i] for i in behind if i < len(nodes)]


#: Why each fault that is not about a node blames none.
_NO_BLAME = {
    Fault.CRASH: "crash: evidence about the process, not the node",
    Fault.CANNOT_START: "cannot start: evidence about the command, not the node",
    Fault.STRAGGLER: "straggler: the policy's action already took the node out",
    Fault.PREFLIGHT: "preflight: an all-reduce cannot say whose link failed",
    Fault.PREEMPTED: "preempted: the rank stopped on request",
}


def blame(f: FaultFacts) -> tuple[list[str], str]:
    """The nodes a fault implicates, and why.

    A crash, by exit code or by signal (the OOM killer, a kill -9, a SIGBUS), is evidence about
    the process: a node that is really bad shows it by its checks, heartbeats or hangs."""
    if f.kind in NODE_FAULTS:
        nodes = [f.node] if f.node else []
        return nodes, f"{f.kind} is evidence about node {f.node}"
    if f.kind == Fault.HANG:
        suspects = hang_suspects(f.rank_steps, f.nproc_per_node, f.nodes)
        if not suspects:
            return [], "hang: every rank stopped at the same step, no rank fell behind"
        return suspects, f"hang: the ranks furthest behind run on {', '.join(suspects)}"
    return [], _NO_BLAME[f.kind]


class NodeAction(StrEnum):
    COUNT = "count"  # one more failure on the node's record; it stays in service
    QUARANTINE = "quarantine"  # out, a spare takes its place; the deep recheck may return it
    SUSPECT = "suspect"  # out of work until the deep recheck decides (no spare to move to)


def escalate(
    *, node: str, failures: int, limit: int, window_s: float, spare: str | None, last: str
) -> tuple[NodeAction, str]:
    """A blamed node with ``failures`` blamed failures within ``window_s`` (this one counted)."""
    if failures < limit:
        return NodeAction.COUNT, f"{failures} of {limit} failures within {window_s:.0f} s"
    counted = f"{failures} failures within {window_s:.0f} s, last: {last}"
    if spare is not None:
        return NodeAction.QUARANTINE, f"{counted}; {spare} takes its place, deep recheck pending"
    return NodeAction.SUSPECT, f"{counted}; no spare: deep recheck pending"


# -- a suspect node's health verdict


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    PENDING = "pending"
    NONE = "none"  # no verdict can come: the node runs no checks, or none came in time


@dataclass(frozen=True, kw_only=True, slots=True)
class RecheckFacts:
    node: str
    requested_unix: float
    #: When the controller received the node's newest health run; None: it never sent one
    #: (its agent runs no checks).
    last_run_unix: float | None
    #: That run's failed checks, described (empty: it passed).
    failed: Sequence[str] = ()
    now: float
    timeout_s: float


def health_verdict(f: RecheckFacts) -> tuple[Verdict, str]:
    """What the deep recheck asked of a node at ``requested_unix`` says: the first run the
    controller received after asking decides (the agent runs its next suite deep)."""
    if f.last_run_unix is not None and f.last_run_unix > f.requested_unix:
        if f.failed:
            return Verdict.FAIL, f"deep recheck of {f.node} failed: {'; '.join(f.failed)}"
        return Verdict.PASS, f"deep recheck of {f.node} passed"
    if f.last_run_unix is None:
        return Verdict.NONE, f"{f.node} runs no health checks: no recheck can implicate it"
    waited = f.now - f.requested_unix
    if waited >= f.timeout_s:
        return Verdict.NONE, f"no health run from {f.node} within {f.timeout_s:.0f} s"
    return Verdict.PENDING, f"waiting for the deep health recheck of {f.node}"


# -- how a rank's exit ends an attempt


class ExitAction(StrEnum):
    SUCCEEDED = "succeeded"
    NO_RESTART = "no_restart"  # the job fails at once (end_kind no_restart)
    PREEMPTED = "preempted"  # stopped on request: restart, no failure counted against it
    RESTART = "restart"


def exit_decision(
    *,
    exit_code: int | None,
    signal: int | None,
    no_restart_exit_codes: Sequence[int],
    progressed: bool,
) -> tuple[ExitAction, Fault, str]:
    """A rank's exit: what it does to the job, its fault kind, and why.

    126/127 is a command that cannot start (not found, not executable, no workdir) unless the
    attempt already made progress: a script that ran steps and then exits 127 crashed."""
    if signal is None and exit_code == 0:
        return ExitAction.SUCCEEDED, Fault.CRASH, "exited 0"
    if signal is None and exit_code in CANNOT_START_EXIT_CODES and not progressed:
        return ExitAction.NO_RESTART, Fault.CANNOT_START, "the command cannot start"
    if signal is None and exit_code in no_restart_exit_codes:
        return ExitAction.NO_RESTART, Fault.CRASH, "a no-restart exit code"
    if signal is None and exit_code == EXIT_PREEMPTED:
        return ExitAction.PREEMPTED, Fault.PREEMPTED, "stopped on request"
    return ExitAction.RESTART, Fault.CRASH, "a crash: restart within the budget"


# -- "failed the same way before any progress"


def signature(
    kind: Fault,
    *,
    exit_code: int | None = None,
    signal: int | None = None,
    error: str | None = None,
) -> str:
    """How an attempt failed, without times, steps, ranks or attempt numbers: the fault kind,
    the exit code or signal, and the rank's own error line. Empty for faults that are not
    about the job's processes (they never count as the same failure)."""
    if kind not in PROCESS_FAULTS:
        return ""
    how = f"signal {signal}" if signal is not None else f"exit {exit_code}"
    parts = [str(kind)] if kind == Fault.HANG else [str(kind), how]
    if error:
        parts.append(error.strip())
    return " | ".join(parts)


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """One failed attempt: how it failed and whether it made progress (any rank reported a
    step or a progress line: ``first_step_unix`` or ``last_step`` set)."""

    signature: str
    progressed: bool


def failure_streak(newest_first: Sequence[Outcome]) -> tuple[int, str]:
    """How many of the latest failed attempts in a row failed the same way with no progress.
    An attempt that made progress, or failed another way, ends the streak."""
    if not newest_first or not newest_first[0].signature or newest_first[0].progressed:
        return 0, ""
    first = newest_first[0].signature
    count = 0
    for outcome in newest_first:
        if outcome.progressed or outcome.signature != first:
            break
        count += 1
    return count, first


# -- where (and whether) a recovering job restarts


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeFacts:
    id: int
    name: str
    state: NodeState
    #: Runs no attempt (an attempt's nodes are released when it ends).
    free: bool
    last_heartbeat_unix: float
    failures: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class RecoveryFacts:
    needed: int
    in_place_first: bool
    nodes: Sequence[NodeFacts]
    #: The last attempt's nodes (node-rank order) and when it ended; empty/None: none yet.
    last_node_ids: Sequence[int] = ()
    last_ended_unix: float | None = None
    restarts_in_window: int = 0
    max_restarts: int = 10
    window_s: float = 3600.0
    streak: int = 0
    streak_signature: str = ""
    max_failures_without_progress: int = 3
    now: float
    heartbeat_interval_s: float = 1.0


class Action(StrEnum):
    IN_PLACE = "in_place"
    REPLACE = "replace"
    WAIT = "wait"
    FAIL = "fail"


@dataclass(frozen=True, kw_only=True, slots=True)
class Choice:
    action: Action
    node_ids: tuple[int, ...] = ()
    end_kind: EndKind = EndKind.LIVE


def _within(window_s: float) -> str:
    """``within 3600 s``; a window of a year or more is the run's whole life (launch's)."""
    return "in this run" if window_s >= 365 * 86400 else f"within {window_s:.0f} s"


def _budget_spent(f: RecoveryFacts) -> tuple[Choice, str] | None:
    if f.restarts_in_window >= f.max_restarts:
        return Choice(action=Action.FAIL, end_kind=EndKind.RESTART_LIMIT), (
            f"restart limit: {f.restarts_in_window} restarts {_within(f.window_s)}"
        )
    if f.streak >= f.max_failures_without_progress:
        return Choice(action=Action.FAIL, end_kind=EndKind.NO_PROGRESS), (
            f"no progress: {f.streak} attempts in a row failed the same way before any step "
            f"({f.streak_signature})"
        )
    return None


def choose_nodes(f: RecoveryFacts) -> tuple[Choice, str]:
    """Restart in place, replace, wait or fail.

    Budgets first: ``max_restarts`` within the window, then identical failures before any
    progress. A node of the failed attempt is trusted again once it heartbeated after the
    failure (a failure is often the first sign of a dead node, declared lost only later);
    others must have heartbeated within two intervals. Waiting is only for nodes: a node of the
    last attempt not proven alive yet (at most two heartbeats), a suspect awaiting its deep
    recheck, or too few usable nodes at all."""
    spent = _budget_spent(f)
    if spent is not None:
        return spent
    previous = list(f.last_node_ids)
    by_id = {n.id: n for n in f.nodes}
    free = [n for n in f.nodes if n.state == NodeState.READY and n.free]
    recent_s = 2 * f.heartbeat_interval_s
    if f.last_ended_unix is not None:
        ended = f.last_ended_unix

        def proven(n: NodeFacts) -> bool:
            since = ended if n.id in previous else f.now - recent_s
            return n.last_heartbeat_unix >= since

        waiting = [n.name for n in free if n.id in previous and not proven(n)]
        if waiting and f.now < ended + recent_s:
            return Choice(action=Action.WAIT), (
                f"waiting for {', '.join(waiting)} to heartbeat after the failure"
            )
        free = [n for n in free if proven(n)]
    free_ids = {n.id for n in free}
    chosen: list[int] = []
    if f.in_place_first:
        chosen = [i for i in previous if i in free_ids]
    others = sorted((n for n in free if n.id not in chosen), key=lambda n: (n.failures, n.id))
    chosen += [n.id for n in others[: f.needed - len(chosen)]]
    if len(chosen) < f.needed:
        suspects = [
            by_id[i].name for i in previous if i in by_id and by_id[i].state == NodeState.SUSPECT
        ]
        if suspects:
            return Choice(action=Action.WAIT), (
                f"waiting for the deep health recheck of {', '.join(suspects)}"
            )
        return Choice(action=Action.WAIT), (f"waiting for {f.needed - len(chosen)} healthy node(s)")
    replaced = [by_id[i].name for i in chosen if i not in previous]
    if not replaced or not previous:
        cause = "restart in place" if previous else "scheduled"
        return Choice(action=Action.IN_PLACE, node_ids=tuple(chosen)), cause
    return Choice(action=Action.REPLACE, node_ids=tuple(chosen)), (
        f"restart with {', '.join(replaced)}"
    )
