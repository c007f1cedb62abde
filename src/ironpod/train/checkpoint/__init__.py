"""Durable checkpoints: asynchronous, atomic, verified, at any fsspec location."""

from ironpod.train.checkpoint.checkpointer import Checkpointer, SaveRecord
from ironpod.train.checkpoint.manifest import Manifest, step_dir_name
from ironpod.train.checkpoint.state import Stateful, TrainState

__all__ = ["Checkpointer", "Manifest", "SaveRecord", "Stateful", "TrainState", "step_dir_name"]
