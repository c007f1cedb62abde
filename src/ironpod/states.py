"""Lifecycles of nodes, jobs and attempts as state machines (STYLE.md lesson 7).

Each is an Enum of states and a transition table. :func:`transition` is the only way to
change a state: an illegal transition raises, and every legal one is returned with its cause
so the caller records it as an event.
"""

from __future__ import annotations

from enum import StrEnum


class NodeState(StrEnum):
    JOINING = "joining"
    READY = "ready"
    BUSY = "busy"
    LOST = "lost"
    QUARANTINED = "quarantined"
    DRAINING = "draining"
    DRAINED = "drained"


class JobState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    RECOVERING = "recovering"
    PREEMPTING = "preempting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AttemptState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.JOINING: frozenset({NodeState.READY, NodeState.QUARANTINED, NodeState.LOST}),
    NodeState.READY: frozenset(
        {NodeState.BUSY, NodeState.LOST, NodeState.QUARANTINED, NodeState.DRAINING}
    ),
    NodeState.BUSY: frozenset(
        {NodeState.READY, NodeState.LOST, NodeState.QUARANTINED, NodeState.DRAINING}
    ),
    NodeState.LOST: frozenset({NodeState.READY, NodeState.QUARANTINED, NodeState.DRAINING}),
    NodeState.QUARANTINED: frozenset({NodeState.READY, NodeState.LOST, NodeState.DRAINING}),
    NodeState.DRAINING: frozenset({NodeState.DRAINED, NodeState.LOST, NodeState.READY}),
    NodeState.DRAINED: frozenset({NodeState.READY, NodeState.LOST}),
}

JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.CANCELLED, JobState.FAILED}),
    JobState.STARTING: frozenset(
        {
            JobState.RUNNING,
            JobState.RECOVERING,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
        }
    ),
    JobState.RUNNING: frozenset(
        {
            JobState.RECOVERING,
            JobState.PREEMPTING,
            JobState.SUCCEEDED,
            JobState.FAILED,
            JobState.CANCELLED,
        }
    ),
    JobState.RECOVERING: frozenset({JobState.STARTING, JobState.FAILED, JobState.CANCELLED}),
    JobState.PREEMPTING: frozenset({JobState.QUEUED, JobState.CANCELLED, JobState.FAILED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

ATTEMPT_TRANSITIONS: dict[AttemptState, frozenset[AttemptState]] = {
    AttemptState.STARTING: frozenset(
        {AttemptState.RUNNING, AttemptState.STOPPING, AttemptState.SUCCEEDED, AttemptState.FAILED}
    ),
    AttemptState.RUNNING: frozenset(
        {AttemptState.STOPPING, AttemptState.SUCCEEDED, AttemptState.FAILED}
    ),
    AttemptState.STOPPING: frozenset(
        {AttemptState.STOPPED, AttemptState.FAILED, AttemptState.SUCCEEDED}
    ),
    AttemptState.SUCCEEDED: frozenset(),
    AttemptState.FAILED: frozenset(),
    AttemptState.STOPPED: frozenset(),
}

TERMINAL_JOB_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
TERMINAL_ATTEMPT_STATES = frozenset(
    {AttemptState.SUCCEEDED, AttemptState.FAILED, AttemptState.STOPPED}
)


class IllegalTransitionError(RuntimeError):
    """A bug: some code tried a move the lifecycle does not allow."""


def check_transition(
    table: dict[NodeState, frozenset[NodeState]]
    | dict[JobState, frozenset[JobState]]
    | dict[AttemptState, frozenset[AttemptState]],
    current: StrEnum,
    target: StrEnum,
) -> None:
    if current == target:
        return
    allowed: frozenset[StrEnum] = table[current]  # type: ignore[index]
    if target not in allowed:
        raise IllegalTransitionError(
            f"{type(current).__name__}: {current} -> {target} is not allowed"
        )
