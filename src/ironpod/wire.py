"""What the controller and the agents say to each other (JSON over HTTP, pydantic models).

The agent speaks first and often: it registers, then heartbeats every second with the state of
its workers; the reply carries the desired state (the assignment this node should run, if any),
which the agent converges to, as a kubelet does. A worker's exit or hang is also reported at
once in its own request, not at the next heartbeat, because detection time is goodput.

Routes (all under ``/api/v1``, bearer token = the node join token or the admin token):

- ``POST /nodes/register``            NodeRegistration -> RegistrationReply
- ``POST /nodes/{node_id}/heartbeat`` Heartbeat -> HeartbeatReply
- ``POST /nodes/{node_id}/events``    WorkerEvent -> {"ok": true}

Heartbeats also carry the in-memory snapshots the node holds and the agent's notices; the
reply's assignment says where to replicate snapshots and, after a failure, where each rank's
newest snapshot is (the restore plan).

The agent serves its workers' logs at ``GET {agent_url}/logs/{attempt_id}/{rank}?offset=N``
(same bearer token), which the controller proxies for ``ironpod logs``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ironpod.health.core import CheckResult


class _Wire(BaseModel):
    # Unknown fields are ignored, not refused: during a rolling upgrade agents and controller
    # run different versions, and a newer agent's extra field must not cut its node off (as
    # with protobuf). Wrong types and missing fields are still refused, naming the field.
    model_config = ConfigDict(extra="ignore")


class GpuInfo(_Wire):
    index: int
    name: str
    uuid: str
    memory_bytes: int


class NodeRegistration(_Wire):
    name: str = Field(min_length=1, max_length=128)
    hostname: str
    address: str = Field(description="address workers of other nodes reach this node at")
    agent_url: str = Field(description="base URL of the agent's own HTTP server (logs)")
    agent_instance: str = Field(description="new random id per agent process start")
    cpus: int = Field(ge=1)
    memory_bytes: int = Field(ge=0)
    gpus: list[GpuInfo] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    agent_version: str
    time_unix: float
    health: list[CheckResult] | None = Field(
        None, description="the agent's join-time health run (ironpod.health), if it ran one"
    )
    credential: str | None = Field(
        None,
        max_length=256,
        description="the node's credential from its last registration: proves that a restarted "
        "agent is this node's (a live node's name is not given to anyone else)",
    )


class RegistrationReply(_Wire):
    node_id: int
    heartbeat_interval_s: float
    credential: str = Field(
        "", description="this node's bearer token for its heartbeats and events from now on"
    )
    log_token: str = Field("", description="what the controller reads this node's logs with")


WorkerState = Literal["running", "exited"]


class WorkerStatus(_Wire):
    attempt_id: int
    rank: int
    local_rank: int
    pid: int
    state: WorkerState
    exit_code: int | None = None
    signal: int | None = None
    started_unix: float
    ended_unix: float | None = None
    last_step: int | None = None
    last_progress_unix: float | None = None
    first_progress_unix: float | None = None
    median_step_s: float | None = None
    median_compute_s: float | None = Field(
        None, description="median of the rank's own compute seconds per step (stragglers)"
    )
    metrics: dict[str, float | int | str] = Field(default_factory=dict)


class SnapshotHolding(_Wire):
    """A committed in-memory snapshot this node holds (its own rank's, or a peer's replica)."""

    job_id: int
    rank: int
    step: int
    kind: Literal["slot", "replica"]
    nbytes: int


class AgentNotice(_Wire):
    """Something the agent did on its own that people should see (an eviction, a refusal)."""

    kind: str
    message: str
    job_id: int | None = None
    time_unix: float
    data: dict[str, float | int | str] = Field(default_factory=dict)


class Heartbeat(_Wire):
    agent_instance: str
    time_unix: float
    workers: list[WorkerStatus] = Field(default_factory=list)
    snapshots: list[SnapshotHolding] = Field(default_factory=list)
    notices: list[AgentNotice] = Field(default_factory=list)
    memory_budget_bytes: int | None = None
    memory_used_bytes: int | None = None
    health: list[CheckResult] | None = Field(
        None, description="results of a health run finished since the last heartbeat"
    )


class RestorePlan(_Wire):
    """The newest step every rank has in some node's memory: where each rank fetches it."""

    step: int
    sources: dict[str, list[str]] = Field(
        description="rank -> agent URLs holding its snapshot of ``step``, best first"
    )


class PreflightPlan(_Wire):
    """The pre-flight all-reduce every node of the attempt runs before starting its workers."""

    port: int
    size_bytes: int
    min_busbw_gbps: float | None = None
    timeout_s: float = 60.0


class Assignment(_Wire):
    """What one node runs for one attempt: ``len(ranks)`` workers with these global ranks."""

    attempt_id: int
    job_id: int
    job_name: str
    command: list[str]
    shell: bool = False
    env: dict[str, str] = Field(
        default_factory=dict,
        description="job env plus IRONPOD_*; the agent adds RANK/LOCAL_RANK/... per worker",
    )
    workdir: str | None = None
    ranks: list[int]
    world_size: int
    node_rank: int
    nnodes: int
    master_addr: str
    master_port: int
    hang_timeout_s: float | None = None
    hang_floor_s: float = 1.0
    hang_factor: float = 3.0
    startup_timeout_s: float = 600.0
    progress_regex: str | None = None
    replicate_to: list[str] = Field(
        default_factory=list, description="agent URLs this node copies its snapshots to"
    )
    peers: list[str] = Field(
        default_factory=list, description="agent URLs of the attempt's other nodes"
    )
    restore: RestorePlan | None = None
    preflight: PreflightPlan | None = None
    durable_interval_s: float | None = Field(
        None, description="the controller's durable-checkpoint interval (Young/Daly)"
    )
    # What torchrun's agent tells its workers (TORCHELASTIC_*); None from an older controller,
    # and the agent then falls back (the attempt number in the job env, the job's name and id).
    restart_count: int | None = Field(None, description="restarts of the job before this attempt")
    max_restarts: int | None = Field(None, description="the job's restart limit")
    run_id: str | None = Field(None, description="the job's identity across its attempts")


class HeartbeatReply(_Wire):
    assignment: Assignment | None = None
    stop_grace_s: float = 10.0
    reregister: bool = Field(False, description="the controller does not know this agent")
    keep_jobs: list[int] | None = Field(
        None, description="jobs whose snapshots are still wanted; others may be deleted"
    )
    time_unix: float | None = Field(
        None, description="the controller's clock, for the agent's clock-skew check"
    )
    health_recheck: bool = Field(
        False, description="run the deep health suite next: the node is out for a failed check"
    )
    peer_tokens: dict[str, str] = Field(
        default_factory=dict,
        description="job id -> the token this node and its job's peers call each other's "
        "snapshot routes with (its own job, and jobs whose copies it holds)",
    )


WorkerEventKind = Literal["exited", "hung", "first_progress"]


class WorkerEvent(_Wire):
    attempt_id: int
    rank: int
    kind: WorkerEventKind
    time_unix: float
    exit_code: int | None = None
    signal: int | None = None
    detail: str = ""
    #: A failed rank's own account of its failure, one line: the error that
    #: ``torch.distributed.elastic``'s ``@record`` wrote to ``TORCHELASTIC_ERROR_FILE``.
    error: str | None = None


class CertificateRequest(_Wire):
    """An agent asks for its serving certificate (cluster TLS, see :mod:`ironpod.tls`)."""

    csr_pem: str = Field(max_length=16384, description="a PEM certificate request (EC key)")
    address: str = Field(
        max_length=253, description="the address the agent serves on: the certificate's name"
    )


class CertificateReply(_Wire):
    cert_pem: str = Field(description="the agent's certificate, signed by the cluster CA")
    ca_pem: str = Field(description="the cluster CA: what peers' certificates are signed by")
