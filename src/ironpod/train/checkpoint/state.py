"""What a checkpoint holds, and the per-rank part that is not model or optimizer tensors."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict``/``load_state_dict``: a data loader, a scheduler, a sampler."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(kw_only=True, slots=True)
class TrainState:
    """The training state to save and restore.

    ``model`` may be a plain module, DDP or an FSDP2 (``fully_shard``) module; ``optimizer`` any
    torch optimizer over its parameters. Both go through torch.distributed.checkpoint and so load
    at another world size. ``dataloader`` and ``extras`` are saved per rank: ``extras`` must be
    plain data (numbers, strings, lists, dicts, tensors) so it loads without unpickling code.
    RNG states (torch, CUDA, numpy, python) are captured and restored by the checkpointer.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None = None
    dataloader: Stateful | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def tensor_state(state: TrainState) -> dict[str, Any]:
    """Model and optimizer state through DCP's state-dict API: ``{"model": ..., "optim": ...}``
    (tensors of plain, DDP and FSDP2 modules alike; DTensors for the sharded ones)."""
    if state.optimizer is None:
        return {"model": get_model_state_dict(state.model)}
    model_sd, optim_sd = get_state_dict(state.model, state.optimizer)
    return {"model": model_sd, "optim": optim_sd}


def set_tensor_state(state: TrainState, tree: dict[str, Any]) -> None:
    """The inverse of :func:`tensor_state`: load the tree into the model and optimizer."""
    if state.optimizer is None:
        set_model_state_dict(state.model, tree["model"])
    else:
        set_state_dict(
            state.model,
            state.optimizer,
            model_state_dict=tree["model"],
            optim_state_dict=tree["optim"],
        )


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": _python_rng_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    random.setstate(_python_rng_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_rng_to_plain(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_plain(plain: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = plain
    return (version, tuple(internal), gauss)


def capture_extra(state: TrainState) -> dict[str, Any]:
    """The per-rank part of a checkpoint, copied so training may go on mutating the originals."""
    return {
        "rng": capture_rng(),
        "dataloader": copy.deepcopy(state.dataloader.state_dict()) if state.dataloader else None,
        "extras": copy.deepcopy(state.extras),
    }


def restore_extra(state: TrainState, extra: dict[str, Any], *, rng: bool = True) -> None:
    if rng:
        restore_rng(extra["rng"])
    if state.dataloader is not None and extra.get("dataloader") is not None:
        state.dataloader.load_state_dict(extra["dataloader"])
    state.extras.clear()
    state.extras.update(extra.get("extras") or {})
