"""The recovery policy's pure functions, row by row of the escalation ladder
(ironpod.controller.policy; docs/architecture.md, "Recovery"). No controller, no SQL, no
sleeping: time is a number in the facts."""

from __future__ import annotations

from typing import Any

import pytest

from ironpod.controller.policy import (
    Action,
    ExitAction,
    Fault,
    FaultFacts,
    NodeAction,
    NodeFacts,
    Outcome,
    RecheckFacts,
    RecoveryFacts,
    Verdict,
    blame,
    choose_nodes,
    escalate,
    exit_decision,
    failure_streak,
    health_verdict,
    signature,
)
from ironpod.errors import EXIT_DO_NOT_REQUEUE
from ironpod.states import EndKind, NodeState, launch_exit_code

NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("facts", "nodes", "why"),
    [
        (FaultFacts(kind=Fault.CRASH, node="a"), [], "evidence about the process"),
        (FaultFacts(kind=Fault.CANNOT_START, node="a"), [], "about the command"),
        (FaultFacts(kind=Fault.NODE_LOST, node="a"), ["a"], "evidence about node a"),
        (FaultFacts(kind=Fault.AGENT_RESTART, node="a"), ["a"], "evidence about node a"),
        (FaultFacts(kind=Fault.UNHEALTHY, node="a"), ["a"], "evidence about node a"),
        (FaultFacts(kind=Fault.STRAGGLER, node="a"), [], "already took the node out"),
        (FaultFacts(kind=Fault.PREFLIGHT, node="a"), [], "cannot say whose link"),
        (FaultFacts(kind=Fault.PREEMPTED, node="a"), [], "on request"),
        (
            FaultFacts(kind=Fault.HANG, node="b", rank_steps={0: 40, 1: 41}, nodes=["a", "b"]),
            ["a"],
            "furthest behind run on a",
        ),
        (
            FaultFacts(
                kind=Fault.HANG,
                node="a",
                rank_steps={0: 9, 1: 9, 2: 7, 3: 9},
                nproc_per_node=2,
                nodes=["a", "b"],
            ),
            ["b"],
            "furthest behind run on b",
        ),
        (
            FaultFacts(kind=Fault.HANG, node="a", rank_steps={0: 5, 1: 5}, nodes=["a", "b"]),
            [],
            "same step",
        ),
    ],
)
def test_blame(facts: FaultFacts, nodes: list[str], why: str) -> None:
    got, reason = blame(facts)
    assert got == nodes and why in reason


@pytest.mark.parametrize(
    ("failures", "spare", "action", "why"),
    [
        (1, None, NodeAction.COUNT, "1 of 2 failures"),
        (1, "b", NodeAction.COUNT, "1 of 2 failures"),
        (2, "b", NodeAction.QUARANTINE, "b takes its place, deep recheck pending"),
        (3, "b", NodeAction.QUARANTINE, "3 failures within 3600 s"),
        (2, None, NodeAction.SUSPECT, "no spare: deep recheck pending"),
    ],
)
def test_escalate(failures: int, spare: str | None, action: NodeAction, why: str) -> None:
    got, reason = escalate(
        node="a", failures=failures, limit=2, window_s=3600, spare=spare, last="node lost: a"
    )
    assert got == action and why in reason


@pytest.mark.parametrize(
    ("last_run", "failed", "now", "verdict", "why"),
    [
        (NOW + 5, [], NOW + 5, Verdict.PASS, "passed"),
        (NOW + 5, ["compute.matmul gpu0: slow"], NOW + 5, Verdict.FAIL, "compute.matmul"),
        (NOW, [], NOW + 5, Verdict.PENDING, "waiting for the deep health recheck of a"),
        (NOW - 50, ["old failure"], NOW + 5, Verdict.PENDING, "waiting"),  # before the ask
        (NOW - 50, [], NOW + 120, Verdict.NONE, "no health run from a within 120 s"),
        (None, [], NOW, Verdict.NONE, "runs no health checks"),
    ],
)
def test_health_verdict(
    last_run: float | None, failed: list[str], now: float, verdict: Verdict, why: str
) -> None:
    got, reason = health_verdict(
        RecheckFacts(
            node="a",
            requested_unix=NOW,
            last_run_unix=last_run,
            failed=failed,
            now=now,
            timeout_s=120,
        )
    )
    assert got == verdict and why in reason


@pytest.mark.parametrize(
    ("code", "sig", "progressed", "action", "fault"),
    [
        (0, None, False, ExitAction.SUCCEEDED, Fault.CRASH),
        (1, None, False, ExitAction.RESTART, Fault.CRASH),
        (-9, 9, True, ExitAction.RESTART, Fault.CRASH),
        (127, None, False, ExitAction.NO_RESTART, Fault.CANNOT_START),
        (126, None, False, ExitAction.NO_RESTART, Fault.CANNOT_START),
        (127, None, True, ExitAction.RESTART, Fault.CRASH),  # it ran steps: it did start
        (2, None, True, ExitAction.NO_RESTART, Fault.CRASH),
        (75, None, True, ExitAction.PREEMPTED, Fault.PREEMPTED),
    ],
)
def test_exit_decision(
    code: int, sig: int | None, progressed: bool, action: ExitAction, fault: Fault
) -> None:
    got, kind, _ = exit_decision(
        exit_code=code, signal=sig, no_restart_exit_codes=[2], progressed=progressed
    )
    assert (got, kind) == (action, fault)


def test_signature_leaves_out_times_ranks_and_attempts() -> None:
    assert signature(Fault.CRASH, exit_code=1, error="ValueError: x") == (
        "crash | exit 1 | ValueError: x"
    )
    assert signature(Fault.CRASH, exit_code=-9, signal=9) == "crash | signal 9"
    assert signature(Fault.HANG) == "hang"
    for kind in (Fault.NODE_LOST, Fault.AGENT_RESTART, Fault.PREFLIGHT, Fault.PREEMPTED):
        assert signature(kind) == ""


def o(sig: str, progressed: bool = False) -> Outcome:
    return Outcome(signature=sig, progressed=progressed)


@pytest.mark.parametrize(
    ("newest_first", "count"),
    [
        ([], 0),
        ([o("x")], 1),
        ([o("x"), o("x"), o("x")], 3),
        ([o("x"), o("x"), o("y"), o("x")], 2),
        ([o("x"), o("x", progressed=True), o("x")], 1),  # progress resets the count
        ([o("x", progressed=True)], 0),
        ([o(""), o(""), o("")], 0),  # node faults never repeat "the same way"
        ([o("x"), o(""), o("x")], 1),
    ],
)
def test_failure_streak(newest_first: list[Outcome], count: int) -> None:
    assert failure_streak(newest_first)[0] == count


def node(i: int, state: NodeState = NodeState.READY, **kw: Any) -> NodeFacts:
    fields: dict[str, Any] = {"free": True, "last_heartbeat_unix": NOW, **kw}
    return NodeFacts(id=i, name=f"n{i}", state=state, **fields)


def facts(nodes: list[NodeFacts], **kw: Any) -> RecoveryFacts:
    fields: dict[str, Any] = {
        "needed": 1,
        "in_place_first": True,
        "last_node_ids": [1],
        "last_ended_unix": NOW - 10,
        "now": NOW,
        **kw,
    }
    return RecoveryFacts(nodes=nodes, **fields)


@pytest.mark.parametrize(
    ("f", "action", "ids", "end_kind", "why"),
    [
        # restart in place while the node is usable: the users' SIGKILL case
        (facts([node(1), node(2)]), Action.IN_PLACE, (1,), EndKind.LIVE, "restart in place"),
        # the budget ends the job, nothing else
        (
            facts([node(1)], restarts_in_window=10),
            Action.FAIL,
            (),
            EndKind.RESTART_LIMIT,
            "restart limit: 10 restarts within 3600 s",
        ),
        (
            facts([node(1)], streak=3, streak_signature="crash | exit 1"),
            Action.FAIL,
            (),
            EndKind.NO_PROGRESS,
            "3 attempts in a row failed the same way",
        ),
        (
            facts([node(1)], streak=2, streak_signature="crash | exit 1"),
            Action.IN_PLACE,
            (1,),
            EndKind.LIVE,
            "restart in place",
        ),
        # a node of the failed attempt gets two heartbeats to prove it is alive...
        (
            facts([node(1, last_heartbeat_unix=NOW - 11)], last_ended_unix=NOW - 1),
            Action.WAIT,
            (),
            EndKind.LIVE,
            "waiting for n1 to heartbeat after the failure",
        ),
        # ...then the job goes on without it
        (
            facts([node(1, last_heartbeat_unix=NOW - 11), node(2)], last_ended_unix=NOW - 5),
            Action.REPLACE,
            (2,),
            EndKind.LIVE,
            "restart with n2",
        ),
        # a quarantined or lost node is replaced by a free one, fewest failures first
        (
            facts(
                [
                    node(1, NodeState.QUARANTINED, free=True),
                    node(2, failures=1),
                    node(3),
                ]
            ),
            Action.REPLACE,
            (3,),
            EndKind.LIVE,
            "restart with n3",
        ),
        # a spare that stopped heartbeating is not taken
        (
            facts([node(1, NodeState.LOST), node(2, last_heartbeat_unix=NOW - 5)]),
            Action.WAIT,
            (),
            EndKind.LIVE,
            "waiting for 1 healthy node(s)",
        ),
        # a suspect node with no spare: wait for its deep recheck, not for "healthy nodes"
        (
            facts([node(1, NodeState.SUSPECT)]),
            Action.WAIT,
            (),
            EndKind.LIVE,
            "waiting for the deep health recheck of n1",
        ),
        # a suspect node, a spare appeared since: move
        (
            facts([node(1, NodeState.SUSPECT), node(2)]),
            Action.REPLACE,
            (2,),
            EndKind.LIVE,
            "restart with n2",
        ),
        # two nodes, one lost: keep the good one in place, replace the other
        (
            facts([node(1), node(2, NodeState.LOST), node(3)], needed=2, last_node_ids=[1, 2]),
            Action.REPLACE,
            (1, 3),
            EndKind.LIVE,
            "restart with n3",
        ),
        # in_place_first off: the freest nodes, whoever ran before
        (
            facts([node(1, failures=1), node(2)], in_place_first=False),
            Action.REPLACE,
            (2,),
            EndKind.LIVE,
            "restart with n2",
        ),
        # a node busy with another job is not free
        (
            facts([node(1, NodeState.BUSY, free=False)]),
            Action.WAIT,
            (),
            EndKind.LIVE,
            "waiting for 1 healthy node(s)",
        ),
    ],
)
def test_choose_nodes(
    f: RecoveryFacts, action: Action, ids: tuple[int, ...], end_kind: EndKind, why: str
) -> None:
    choice, reason = choose_nodes(f)
    assert choice.action == action and choice.node_ids == ids
    assert choice.end_kind == end_kind and why in reason


@pytest.mark.parametrize(
    ("kind", "code", "exit_code"),
    [
        (EndKind.SUCCEEDED, 0, 0),
        (EndKind.CANCELLED, None, 1),
        (EndKind.RESTART_LIMIT, -9, 1),
        (EndKind.NO_RESTART, 2, 1),
        (EndKind.NO_RESTART, 127, EXIT_DO_NOT_REQUEUE),
        (EndKind.NO_RESTART, 126, EXIT_DO_NOT_REQUEUE),
        (EndKind.NO_PROGRESS, 1, EXIT_DO_NOT_REQUEUE),
    ],
)
def test_launch_exit_code(kind: EndKind, code: int | None, exit_code: int) -> None:
    assert launch_exit_code(kind, code) == exit_code
