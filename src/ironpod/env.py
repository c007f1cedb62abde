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
#: Seconds torch.distributed waits in a collective before giving up (default: torch's own).
DIST_TIMEOUT_S = "IRONPOD_DIST_TIMEOUT_S"

# -- the CLI and the local cluster
#: Directory of the local cluster and the CLI's defaults (default ``~/.ironpod``).
HOME = "IRONPOD_HOME"
#: Controller URL for the CLI (default: the local cluster's, from ``$IRONPOD_HOME``).
URL = "IRONPOD_URL"
#: Bearer token for the CLI (default: the local cluster's admin token).
TOKEN = "IRONPOD_TOKEN"

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
    DIST_TIMEOUT_S,
    HOME,
    URL,
    TOKEN,
    PRESET_TOKEN,
)
