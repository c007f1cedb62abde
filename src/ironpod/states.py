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
    #: Blamed ``restart.node_failures_to_quarantine`` times with no replacement to move to:
    #: out of work until the deep health recheck the controller asked for decides
    #: (``Node.recheck_unix`` holds when it was asked, so a controller restart keeps it).
    SUSPECT = "suspect"
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


_OUT = {NodeState.LOST, NodeState.SUSPECT, NodeState.QUARANTINED, NodeState.DRAINING}
NODE_TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.JOINING: frozenset({NodeState.READY, NodeState.QUARANTINED, NodeState.LOST}),
    NodeState.READY: frozenset({NodeState.BUSY, *_OUT}),
    NodeState.BUSY: frozenset({NodeState.READY, *_OUT}),
    NodeState.LOST: frozenset(
        {NodeState.READY, NodeState.SUSPECT, NodeState.QUARANTINED, NodeState.DRAINING}
    ),
    # The deep recheck decides: passed (or no verdict can come) -> ready, failed -> quarantined.
    NodeState.SUSPECT: frozenset(
        {NodeState.READY, NodeState.QUARANTINED, NodeState.LOST, NodeState.DRAINING}
    ),
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


class EndKind(StrEnum):
    """Which budget, if any, ended a job: a typed fact (``Job.end_kind``), never read from the
    words of ``Job.reason``.

    ``ironpod launch`` maps it to its exit code (:func:`launch_exit_code`):

    ==============  ==========================================================  =========
    end_kind        when                                                        exit code
    ==============  ==========================================================  =========
    ``""``          the job is live                                             -
    succeeded       every rank exited 0                                         0
    cancelled       a person cancelled it                                       1
    restart_limit   ``restart.max_restarts`` restarts within ``window_s`` spent   1
    no_restart      an exit code in ``restart.no_restart_exit_codes``           1
    no_restart      the command cannot start: exit 126/127, missing workdir     93
    no_progress     ``restart.max_failures_without_progress`` attempts in a     93
                    row failed the same way before any step
    ==============  ==========================================================  =========

    93 is ``ironpod.errors.EXIT_DO_NOT_REQUEUE``: running the job again cannot help.
    """

    LIVE = ""
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    RESTART_LIMIT = "restart_limit"
    NO_RESTART = "no_restart"
    NO_PROGRESS = "no_progress"


#: Exit codes of a command that cannot start (POSIX shells: 127 not found, 126 not executable;
#: the agent reports a failed exec, or a workdir that does not exist, the same way).
CANNOT_START_EXIT_CODES = frozenset({126, 127})


def launch_exit_code(kind: EndKind, exit_code: int | None = None) -> int:
    """``ironpod launch``'s exit code for a job that ended as ``kind`` (the table above);
    ``exit_code`` is the failed rank's (``Job.end_exit_code``), which splits ``no_restart``."""
    from ironpod.errors import EXIT_DO_NOT_REQUEUE

    if kind == EndKind.SUCCEEDED:
        return 0
    if kind == EndKind.NO_PROGRESS or (
        kind == EndKind.NO_RESTART and exit_code in CANNOT_START_EXIT_CODES
    ):
        return EXIT_DO_NOT_REQUEUE
    return 1


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
