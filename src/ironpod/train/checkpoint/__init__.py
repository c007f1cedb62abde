"""Checkpoints: durable (asynchronous, atomic, verified, any fsspec location) and in-memory."""

from ironpod.train.checkpoint.checkpointer import Checkpointer, SaveRecord
from ironpod.train.checkpoint.manifest import Manifest, step_dir_name
from ironpod.train.checkpoint.memory import MemorySnapshots
from ironpod.train.checkpoint.state import Stateful, TrainState
from ironpod.train.checkpoint.tiered import TieredCheckpointer

__all__ = [
    "Checkpointer",
    "Manifest",
    "MemorySnapshots",
    "SaveRecord",
    "Stateful",
    "TieredCheckpointer",
    "TrainState",
    "step_dir_name",
]
