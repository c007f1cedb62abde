"""Every environment variable ironpod reads or sets, as named constants, in one place.

Precedence everywhere is: command-line flag > ``IRONPOD_*`` environment variable > config
file > default (STYLE.md lesson 6). The agent sets these for each worker it starts; a
script started by hand or by ``torchrun`` may set them itself.
"""

from __future__ import annotations

# -- torch.distributed's own variables (set by torchrun, by ``ironpod launch`` and by the agent)
RANK = "RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
LOCAL_WORLD_SIZE = "LOCAL_WORLD_SIZE"
MASTER_ADDR = "MASTER_ADDR"
MASTER_PORT = "MASTER_PORT"
GROUP_RANK = "GROUP_RANK"
NODE_RANK = "NODE_RANK"

# -- what torchrun's elastic agent sets for each worker (ironpod's agent sets them too, so code
# that detects a torchrun-style launcher, PyTorch Lightning's TorchElasticEnvironment for one,
# sizes the world right); see ironpod.agent.worker.worker_env
ROLE_RANK = "ROLE_RANK"
ROLE_NAME = "ROLE_NAME"
ROLE_WORLD_SIZE = "ROLE_WORLD_SIZE"
GROUP_WORLD_SIZE = "GROUP_WORLD_SIZE"
TORCHELASTIC_RUN_ID = "TORCHELASTIC_RUN_ID"
TORCHELASTIC_RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"
TORCHELASTIC_MAX_RESTARTS = "TORCHELASTIC_MAX_RESTARTS"
TORCHELASTIC_USE_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"
#: Where ``torch.distributed.elastic``'s ``@record`` writes a failed rank's exception (JSON).
TORCHELASTIC_ERROR_FILE = "TORCHELASTIC_ERROR_FILE"
TORCHELASTIC_PREFIX = "TORCHELASTIC_"
TORCH_NCCL_ASYNC_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
#: Set to 1 for each worker when a node runs several and nobody chose a value (as torchrun).
OMP_NUM_THREADS = "OMP_NUM_THREADS"
#: One job stays one experiment-tracker run across its restarts (set unless already set).
WANDB_RUN_ID = "WANDB_RUN_ID"
WANDB_RESUME = "WANDB_RESUME"

# -- what ``ironpod launch`` reads besides its flags (torchrun's precedence: flag > PET_ > default)
#: torchrun's environment fallback for a flag: ``PET_`` + the flag's name in capitals with
#: underscores (``--nproc-per-node`` -> ``PET_NPROC_PER_NODE``).
PET_PREFIX = "PET_"
SLURM_JOB_ID = "SLURM_JOB_ID"
SLURM_STEP_ID = "SLURM_STEP_ID"
SLURM_NNODES = "SLURM_NNODES"
SLURM_NODEID = "SLURM_NODEID"
SLURM_JOB_NODELIST = "SLURM_JOB_NODELIST"
#: torchrun's default for ``--shutdown-timeout``.
TORCH_ELASTIC_SHUTDOWN_TIMEOUT = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"

# -- ironpod's own job context
#: Job identifier given by the controller (free text when run by hand).
JOB_ID = "IRONPOD_JOB_ID"
#: Attempt number of this (re)start of the job, 0 for the first.
ATTEMPT_ID = "IRONPOD_ATTEMPT_ID"
#: Where durable checkpoints go: a local path or an fsspec URL (``s3://...``, ``memory://...``).
CHECKPOINT_DIR = "IRONPOD_CHECKPOINT_DIR"
#: Path of the agent's Unix datagram socket that receives progress beacons.
BEACON_SOCKET = "IRONPOD_BEACON_SOCKET"
#: The job's in-memory snapshot area on this node (tmpfs, owned by the agent): see snapshot.py.
SNAPSHOT_DIR = "IRONPOD_SNAPSHOT_DIR"
#: The node agent's HTTP base URL and a per-agent token for its workers (snapshot reservations).
AGENT_URL = "IRONPOD_AGENT_URL"
AGENT_TOKEN = "IRONPOD_AGENT_TOKEN"
#: A JSON file the agent rewrites with the controller's advice to the workers (durable
#: checkpoint interval); read by ``ironpod.train`` when it changes.
CONTROL_FILE = "IRONPOD_CONTROL_FILE"
#: The step the controller planned to restore from the memory tiers (for logs; the ranks agree
#: on the step themselves from what they find).
RESTORE_STEP = "IRONPOD_RESTORE_STEP"
#: "1" forces torch.distributed initialisation even with WORLD_SIZE=1, "0" forbids it.
DISTRIBUTED = "IRONPOD_DISTRIBUTED"
#: torch.distributed backend override ("gloo", "nccl"); default: nccl on CUDA, else gloo.
DIST_BACKEND = "IRONPOD_DIST_BACKEND"
#: "0" silences the one-line progress log that :func:`ironpod.train.progress` prints.
PROGRESS_LOG = "IRONPOD_PROGRESS_LOG"
#: "0" turns off the step hook (ironpod.agent.stephook): no beacon per optimizer step from
#: scripts that do not import ironpod, and the agent leaves PYTHONPATH alone.
STEP_HOOK = "IRONPOD_STEP_HOOK"
#: Seconds torch.distributed waits in a collective before giving up (default: torch's own).
DIST_TIMEOUT_S = "IRONPOD_DIST_TIMEOUT_S"

# -- the CLI and the local cluster
#: Directory of the local cluster and the CLI's defaults (default ``~/.ironpod``).
HOME = "IRONPOD_HOME"
#: Controller URL for the CLI (default: the local cluster's, from ``$IRONPOD_HOME``).
URL = "IRONPOD_URL"
#: Bearer token for the CLI (default: the local cluster's admin token).
TOKEN = "IRONPOD_TOKEN"
#: The CA that an https:// controller's certificate is checked against (default: the local
#: cluster's, ``$IRONPOD_HOME/controller/tls/ca.pem``, else the system's trust store).
CA_FILE = "IRONPOD_CA_FILE"
#: For workers: the cluster CA their agent's https:// URL is verified with (set by the agent).
AGENT_CA_FILE = "IRONPOD_AGENT_CA_FILE"

#: The agent's node join token, read at its start and removed from its environment (a
#: command line is readable by every local user; this is not passed on to workers).
JOIN_TOKEN = "IRONPOD_JOIN_TOKEN"

#: A secret that a NEW controller state directory adopts as both its admin and join token
#: (``ironpod launch`` on nodes that share a secret but no file system). Separate from TOKEN so
#: that a person's CLI token never silently becomes a controller's join token.
PRESET_TOKEN = "IRONPOD_PRESET_TOKEN"

ALL = (
    RANK,
    LOCAL_RANK,
    WORLD_SIZE,
    LOCAL_WORLD_SIZE,
    MASTER_ADDR,
    MASTER_PORT,
    GROUP_RANK,
    NODE_RANK,
    ROLE_RANK,
    ROLE_NAME,
    ROLE_WORLD_SIZE,
    GROUP_WORLD_SIZE,
    TORCHELASTIC_RUN_ID,
    TORCHELASTIC_RESTART_COUNT,
    TORCHELASTIC_MAX_RESTARTS,
    TORCHELASTIC_USE_AGENT_STORE,
    TORCHELASTIC_ERROR_FILE,
    TORCH_NCCL_ASYNC_ERROR_HANDLING,
    OMP_NUM_THREADS,
    WANDB_RUN_ID,
    WANDB_RESUME,
    SLURM_JOB_ID,
    SLURM_STEP_ID,
    SLURM_NNODES,
    SLURM_NODEID,
    SLURM_JOB_NODELIST,
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
    JOB_ID,
    ATTEMPT_ID,
    CHECKPOINT_DIR,
    BEACON_SOCKET,
    SNAPSHOT_DIR,
    AGENT_URL,
    AGENT_TOKEN,
    CONTROL_FILE,
    RESTORE_STEP,
    DISTRIBUTED,
    DIST_BACKEND,
    PROGRESS_LOG,
    STEP_HOOK,
    DIST_TIMEOUT_S,
    HOME,
    URL,
    TOKEN,
    CA_FILE,
    AGENT_CA_FILE,
    PRESET_TOKEN,
    JOIN_TOKEN,
)

#: What a worker never inherits from its agent's environment: the cluster's secrets (a job
#: that needs the CLI's token sets it in its own env).
SECRETS = (TOKEN, PRESET_TOKEN, JOIN_TOKEN)
