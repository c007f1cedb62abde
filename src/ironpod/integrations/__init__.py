"""Callbacks that fit ironpod's contract into third-party trainers (Hugging Face, Lightning).

The contract (the one :func:`ironpod.train.init` gives a hand-written loop): SIGTERM is a stop
request; the job saves a checkpoint at the step it is on, then exits with
:data:`ironpod.errors.EXIT_PREEMPTED` so the controller restarts it without counting a failure,
and the restart resumes from that checkpoint. Each framework module imports its framework
lazily: ``import ironpod`` works without transformers or lightning installed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from ironpod.errors import EXIT_PREEMPTED

__all__ = ["EXIT_PREEMPTED", "StopRequest"]


class StopRequest:
    """SIGTERM turns into a flag that every rank agrees on at a step boundary.

    Ranks get the signal at slightly different instants; a rank that saved and stopped alone
    would leave the others blocked in their next collective. :meth:`agreed` is one tiny
    all-reduce (MAX) when torch.distributed is up, so all ranks stop after the same step.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: Any = None
        self._chain = True
        self._installed = False

    def install(self, *, chain: bool = True) -> None:
        """Take SIGTERM (main thread only; elsewhere signals cannot be handled).

        ``chain``: the handler found there hears the signal too (ironpod.train's, a user's);
        off where that handler would act on it in a way of its own (Lightning's exits 0).
        """
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_term)
        self._chain = chain
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def request(self) -> None:
        self._event.set()

    def requested(self) -> bool:
        """This rank's own view: a SIGTERM (or :meth:`request`) arrived."""
        return self._event.is_set()

    def agreed(self) -> bool:
        """True on every rank if any rank was asked to stop (collective when distributed)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested()
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if self.requested() else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            self._event.set()
        return bool(flag.item())

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        self._event.set()
        # ironpod.train's own handler (a script that also calls it.init()) hears it too.
        if self._chain and callable(self._previous):
            self._previous(signum, frame)
