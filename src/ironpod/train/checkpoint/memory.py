"""Per-rank in-memory snapshots: the fast tier that survives a worker crash.

Each rank copies its training state into a ring of slots in the node's snapshot area (tmpfs,
format in :mod:`ironpod.snapshot`) every few steps. The idea, a cheap local copy in host memory
taken often and a durable checkpoint taken rarely, is Gemini's (Wang et al., SOSP'23) and
DLRover's flash checkpoint; the code here is ours.

What blocks the training step, and nothing more: take the tensor state, copy every tensor into
the slot's ``data.bin`` (mapped once per slot, shared), or on CUDA into a pinned host buffer
with non-blocking copies and one synchronize, and capture the extras (RNG, data position). A
background thread then serialises ``meta.bin``, checksums both files and writes ``commit.json``.
At most one snapshot is in flight, and the newest committed slot is never overwritten, so a
crash at any moment leaves the previous snapshot intact.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from ironpod import env
from ironpod import snapshot as snap
from ironpod.errors import CheckpointError, ConfigError
from ironpod.train.checkpoint.checkpointer import SaveRecord
from ironpod.train.checkpoint.state import (
    TrainState,
    capture_extra,
    restore_extra,
    set_tensor_state,
    tensor_state,
)
from ironpod.train.context import TrainContext

log = logging.getLogger(__name__)

ALIGN = 64
#: Bytes moved to a GPU in one host-to-device copy when restoring (see ``_copy_in``).
STAGE_BYTES = 256 * 2**20
#: Marks a tensor's place in ``meta.bin``'s tree; the entry says where its bytes are.
TENSOR_KEY = "__ironpod_tensor__"
#: 2: the tree is JSON inside meta.bin (the weights-only unpickler is slow on many small
#: objects: a restore spent more time there than copying the tensors).
META_VERSION = 2
#: Seconds to wait for the agent's answer to a reservation.
RESERVE_TIMEOUT_S = 5.0
#: Head room left on the area's file system when no agent hands out budgets.
FREE_MARGIN_BYTES = 16 * 1024 * 1024
FREE_MARGIN_RATIO = 0.10


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(f"snapshot names an unknown dtype {name!r}")
    return value


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's bytes of a tensor: the local shard of a DTensor (FSDP2), else itself."""
    if isinstance(tensor, DTensor):
        local: torch.Tensor = tensor.to_local()
        return local
    return tensor


def _in_place(module: torch.nn.Module, model_tree: Any) -> bool:
    """Whether every tensor of ``model_tree`` is a live parameter or buffer of ``module``
    (what ``get_model_state_dict`` hands out for plain, DDP and FSDP2 modules): then copying
    into them has already restored the model and ``set_model_state_dict`` would only copy the
    same bytes onto themselves again."""
    live = {_local(t).data_ptr() for t in (*module.parameters(), *module.buffers())}
    tensors = flatten(model_tree)[1]
    return bool(tensors) and all(_local(t).data_ptr() in live for t in tensors)


def apply_tensor_state(state: TrainState, tree: dict[str, Any]) -> None:
    """Hand the filled tree to the model and optimizer (the model only if not in place)."""
    model_done = _in_place(state.model, tree["model"])
    if not model_done:
        set_tensor_state(state, tree)
    elif state.optimizer is not None:
        set_optimizer_state_dict(state.model, state.optimizer, tree["optim"])


# -- the tree of a state dict, flattened


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Where one tensor's (local) bytes sit in ``data.bin``."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    dtensor: bool

    def placeholder(self, index: int) -> dict[str, Any]:
        return {
            TENSOR_KEY: index,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "dtensor": self.dtensor,
        }


def _is_placeholder(node: Any) -> bool:
    return isinstance(node, dict) and TENSOR_KEY in node


def flatten(tree: Any) -> tuple[Any, list[torch.Tensor], list[TensorSpec], int]:
    """The tree with tensors replaced by placeholders, the tensors, their specs, total bytes."""
    tensors: list[torch.Tensor] = []
    specs: list[TensorSpec] = []
    offset = 0

    def walk(node: Any) -> Any:
        nonlocal offset
        if isinstance(node, torch.Tensor):
            local = _local(node)
            nbytes = local.numel() * local.element_size()
            spec = TensorSpec(
                local.dtype, tuple(local.shape), offset, nbytes, isinstance(node, DTensor)
            )
            offset = _align(offset + nbytes)
            tensors.append(local)
            specs.append(spec)
            return spec.placeholder(len(specs) - 1)
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple):
            return tuple(walk(v) for v in node)
        return node

    skeleton = walk(tree)
    return skeleton, tensors, specs, max(offset, ALIGN)


def unflatten_into(skeleton: Any, target: Any, data: torch.Tensor) -> Any:
    """Copy the bytes in ``data`` into the matching tensors of ``target`` in place.

    Returns the tree to hand to ``set_state_dict``: the target's tensors where the snapshot had
    tensors, the snapshot's values (learning rates, step counts) everywhere else.
    """
    copies: list[tuple[torch.Tensor, int, int]] = []  # (destination, offset, bytes)

    def walk(node: Any, into: Any, path: str) -> Any:
        if _is_placeholder(node):
            if not isinstance(into, torch.Tensor) or isinstance(into, DTensor) != node["dtensor"]:
                raise CheckpointError(f"snapshot tensor {path} has no matching tensor in the state")
            local = _local(into)
            dtype, shape = _dtype(node["dtype"]), tuple(node["shape"])
            if local.dtype != dtype or tuple(local.shape) != shape:
                raise CheckpointError(
                    f"snapshot tensor {path} is {node['dtype']}{list(shape)}, the state's is "
                    f"{_dtype_name(local.dtype)}{list(local.shape)}"
                )
            start, nbytes = int(node["offset"]), int(node["nbytes"])
            if start + nbytes > data.numel():
                raise CheckpointError(f"snapshot tensor {path} lies beyond data.bin")
            copies.append((local, start, nbytes))
            return into
        if isinstance(node, dict):
            mapping = into if isinstance(into, dict) else {}
            return {k: walk(v, mapping.get(k), f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, list | tuple):
            seq = into if isinstance(into, list | tuple) else []
            items = [
                walk(v, seq[i] if i < len(seq) else None, f"{path}[{i}]")
                for i, v in enumerate(node)
            ]
            return items if isinstance(node, list) else tuple(items)
        return node

    result = walk(skeleton, target, "state")
    wanted = len(flatten(target)[1])
    if len(copies) != wanted:
        raise CheckpointError(f"snapshot holds {len(copies)} tensors, the state has {wanted}")
    _copy_in(copies, data)
    return result


def _copy_in(copies: list[tuple[torch.Tensor, int, int]], data: torch.Tensor) -> None:
    """Copy each destination's bytes out of ``data`` (host memory, often a mapped file).

    Host destinations take a plain copy. GPU destinations are filled a staging chunk at a time:
    one large host-to-device copy of up to :data:`STAGE_BYTES` of ``data``, then device-side
    copies into the tensors inside it, instead of one small synchronous transfer per tensor.
    """
    on_gpu: list[tuple[torch.Tensor, int, int]] = []
    for dst, start, nbytes in copies:
        if dst.is_cuda:
            on_gpu.append((dst, start, nbytes))
        else:
            dst.copy_(_view(data, start, nbytes, dst))
    on_gpu.sort(key=lambda c: c[1])
    i = 0
    while i < len(on_gpu):
        device, first = on_gpu[i][0].device, on_gpu[i][1]
        j, end = i, first
        while (
            j < len(on_gpu)
            and on_gpu[j][0].device == device
            and (j == i or on_gpu[j][1] + on_gpu[j][2] - first <= STAGE_BYTES)
        ):
            end = max(end, on_gpu[j][1] + on_gpu[j][2])
            j += 1
        stage = data[first:end].to(device)
        for dst, start, nbytes in on_gpu[i:j]:
            dst.copy_(_view(stage, start - first, nbytes, dst))
        i = j


def _view(buffer: torch.Tensor, start: int, nbytes: int, like: torch.Tensor) -> torch.Tensor:
    return buffer[start : start + nbytes].view(like.dtype).reshape(like.shape)


# -- the tensor layout, cached between snapshots


@dataclass(slots=True)
class _Layout:
    """One flattening of the state, reused while the live tensors stay the same."""

    skeleton: Any
    tensors: list[torch.Tensor]
    specs: list[TensorSpec]
    nbytes: int
    signature: tuple[Any, ...]
    fingerprint: tuple[int, ...] | None  # live storage pointers; None: do not reuse tensors
    group_params: list[Any] = field(default_factory=list)


def _fingerprint(state: TrainState) -> tuple[int, ...] | None:
    """Storage pointers and sizes of every live tensor, or None if the state holds anything
    (a non-tensor optimizer entry, a tensor hyperparameter) that a cached tree would miss."""
    out: list[int] = []
    for t in [*state.model.parameters(), *state.model.buffers()]:
        local = _local(t)
        out += [local.data_ptr(), local.numel()]
    if state.optimizer is not None:
        for per_param in state.optimizer.state.values():
            for value in per_param.values():
                if not isinstance(value, torch.Tensor):
                    return None
                local = _local(value)
                out += [local.data_ptr(), local.numel()]
        for group in state.optimizer.param_groups:
            if any(isinstance(v, torch.Tensor) for k, v in group.items() if k != "params"):
                return None
    return tuple(out)


def _signature(specs: list[TensorSpec]) -> tuple[Any, ...]:
    return tuple((s.dtype, s.shape, s.dtensor) for s in specs)


def _has_plain_leaves(tree: Any) -> bool:
    """True if the model or optimizer state (outside param_groups) holds non-tensor values."""
    model = tree.get("model", {})
    if any(not isinstance(v, torch.Tensor) for v in model.values()):
        return True
    optim_state = tree.get("optim", {}).get("state", {})
    return any(
        not isinstance(v, torch.Tensor) for per in optim_state.values() for v in per.values()
    )


# -- the snapshot area of one rank


@dataclass(slots=True)
class _Slot:
    index: int
    path: Path
    nbytes: int = 0
    buffer: torch.Tensor | None = None  # data.bin mapped shared, uint8
    views_for: tuple[Any, ...] | None = None  # the layout signature ``views`` were made for
    views: list[torch.Tensor] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    """What the background half of one snapshot needs."""

    step: int
    slot: _Slot
    skeleton: Any
    extra: dict[str, Any]
    pinned: torch.Tensor | None
    record: SaveRecord
    copied: Any = None  # torch.cuda.Event: the copy into ``pinned`` is done


@dataclass(frozen=True, slots=True)
class GoodCopy:
    """A snapshot mapped into memory whose sizes and digests checked out."""

    step: int
    kind: str  # "slot" or "replica"
    path: Path
    meta: dict[str, Any]
    data: torch.Tensor


def _to_json(node: Any) -> Any:
    """The tree as JSON values; tuples and dicts with non-string keys are tagged."""
    if isinstance(node, dict):
        if all(isinstance(k, str) for k in node):
            return {k: _to_json(v) for k, v in node.items()}
        return {"__items__": [[_to_json(k), _to_json(v)] for k, v in node.items()]}
    if isinstance(node, tuple):
        return {"__tuple__": [_to_json(v) for v in node]}
    if isinstance(node, list):
        return [_to_json(v) for v in node]
    if node is None or isinstance(node, bool | int | float | str):
        return node
    raise TypeError(f"{type(node).__name__} is not plain data")


def _from_json(node: Any) -> Any:
    if isinstance(node, dict):
        if "__tuple__" in node and len(node) == 1:
            return tuple(_from_json(v) for v in node["__tuple__"])
        if "__items__" in node and len(node) == 1:
            return {_from_json(k): _from_json(v) for k, v in node["__items__"]}
        return {k: _from_json(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_from_json(v) for v in node]
    return node


def encode_meta(skeleton: Any, extra: dict[str, Any]) -> bytes:
    """meta.bin: the tree as JSON text (falls back to pickled data) plus the rank's extras."""
    body: dict[str, Any] = {"version": META_VERSION, "extra": extra}
    try:
        body["tree_json"] = json.dumps(_to_json(skeleton))
    except (TypeError, ValueError):
        body["tree"] = skeleton
    out = io.BytesIO()
    torch.save(body, out)
    return out.getvalue()


def decode_meta(data: bytes | memoryview | Any) -> dict[str, Any]:
    meta: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True)
    if "tree_json" in meta:
        meta["tree"] = _from_json(json.loads(meta.pop("tree_json")))
    return meta


def _has_buffers(state: TrainState, layout: _Layout) -> bool:
    """Whether the snapshot holds module buffers (which a forward pass may change)."""
    buffers = {_local(b).data_ptr() for b in state.model.buffers()}
    return any(t.data_ptr() in buffers for t in layout.tensors)


def _wait_before_next_step(optimizer: torch.optim.Optimizer, copied: Any) -> None:
    """Make the optimizer's next ``step`` wait (on the GPU) until the snapshot copy is done."""
    handle: Any = None

    def wait(*_: Any) -> None:
        torch.cuda.current_stream().wait_event(copied)
        handle.remove()

    handle = optimizer.register_step_pre_hook(wait)


def _report(message: str) -> None:
    print(f"[ironpod] checkpoint: {message}", file=sys.stderr, flush=True)
    log.info(message)


class MemorySnapshots:
    """One rank's ring of in-memory snapshots in the job's snapshot area.

    Not collective: each rank writes and reads only its own ``rank-NNNNN`` directory. Agreeing
    on a step to restore is :class:`~ironpod.train.checkpoint.tiered.TieredCheckpointer`'s job.

    On CUDA with ``overlap=True`` the copy to host memory runs on a stream of its own while the
    next forward and backward passes run: ``snapshot`` returns at once, and the optimizer's next
    ``step`` waits for the copy on the GPU (a stream wait, the host never blocks). That needs
    the snapshotted tensors to change only through that optimizer until then (the usual loop);
    a model with persistent buffers (batch-norm statistics change in forward) or no optimizer
    gets the blocking copy, as does ``overlap=False``.
    """

    def __init__(
        self,
        area: str | Path | None = None,
        *,
        ctx: TrainContext | None = None,
        slots: int = 3,
        overlap: bool = True,
    ) -> None:
        if slots < 2:
            raise ConfigError(f"memory snapshots need at least 2 slots, got {slots}")
        raw_area = area or os.environ.get(env.SNAPSHOT_DIR)
        self.area = Path(raw_area) if raw_area else None
        self.slots = slots
        self.overlap = overlap
        self._copy_stream: Any = None  # torch.cuda.Stream, made on first use
        self.job_id = ctx.job_id if ctx else os.environ.get(env.JOB_ID, "local")
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = ctx.rank if ctx else (dist.get_rank() if distributed else 0)
        self.world_size = ctx.world_size if ctx else (dist.get_world_size() if distributed else 1)
        self.history: list[SaveRecord] = []
        self.disabled_reason: str | None = None
        self.reserved_bytes = 0
        self.last_nbytes = 0  # data.bin + meta.bin of the newest committed snapshot

        self._layout: _Layout | None = None
        self._slots: list[_Slot] = []
        self._newest: tuple[int, int] | None = None  # (slot, step) of the newest committed slot
        self._cursor = -1
        self._pinned: torch.Tensor | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ironpod-snap")
        self._inflight: Future[None] | None = None
        self._last_step: int | None = None
        if self.area is None:
            self._disable(f"no snapshot area ({env.SNAPSHOT_DIR} is not set)")
            return
        self._rank_dir = snap.rank_dir(self.area, self.rank)
        self._slots = [_Slot(i, snap.slot_dir(self.area, self.rank, i)) for i in range(slots)]
        self._newest = self._scan_newest()
        self._cursor = self._newest[0] if self._newest else -1

    def _scan_newest(self) -> tuple[int, int] | None:
        """(slot, step) of the newest committed slot of this rank, or None."""
        newest = None
        for slot in self._slots:
            commit = snap.read_commit(slot.path)
            if commit is not None and (newest is None or commit.step > newest[1]):
                newest = (slot.index, commit.step)
        return newest

    @property
    def enabled(self) -> bool:
        return self.disabled_reason is None

    @property
    def on_cuda(self) -> bool:
        """Whether the snapshotted state lives on a GPU (known after the first snapshot)."""
        return self._layout is not None and any(t.is_cuda for t in self._layout.tensors)

    def _disable(self, reason: str) -> None:
        """Turn the tier off for this rank: one line on stderr, training goes on (durable only)."""
        if self.disabled_reason is None:
            self.disabled_reason = reason
            print(f"[ironpod] memory tier off for rank {self.rank}: {reason}", file=sys.stderr)
            sys.stderr.flush()

    # -- budget

    def _reserve(self, slot_bytes: int) -> bool:
        """Ask for room for the ring (the agent, else the file system); False if refused."""
        assert self.area is not None
        reason = None
        url = os.environ.get(env.AGENT_URL)
        if url:
            reason = self._reserve_with_agent(url, slot_bytes)
        else:
            reason = self._check_free_space(slot_bytes)
        if reason is not None:
            self._disable(reason)
            return False
        self.reserved_bytes = slot_bytes
        return True

    def _reserve_with_agent(self, url: str, slot_bytes: int) -> str | None:
        body = {
            "job_id": str(self.job_id),
            "rank": self.rank,
            "slot_bytes": slot_bytes,
            "slots": self.slots,
        }
        request = urllib.request.Request(
            url.rstrip("/") + "/snapshots/reserve",
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {os.environ.get(env.AGENT_TOKEN, '')}",
            },
        )
        ca_file = os.environ.get(env.AGENT_CA_FILE)  # an agent serving https (cluster TLS)
        context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        try:
            with urllib.request.urlopen(
                request, timeout=RESERVE_TIMEOUT_S, context=context
            ) as reply:
                if reply.status == 200:
                    return None
                return f"agent refused the reservation (HTTP {reply.status})"
        except urllib.error.HTTPError as exc:
            detail = ""
            with contextlib.suppress(Exception):
                detail = str(json.loads(exc.read()).get("reason", ""))
            return f"agent refused {self.slots} x {slot_bytes} bytes (HTTP {exc.code}) {detail}"
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"agent at {url} unreachable: {reason}"

    def _check_free_space(self, slot_bytes: int) -> str | None:
        assert self.area is not None
        try:
            self._rank_dir.mkdir(parents=True, exist_ok=True)
            stat = os.statvfs(self._rank_dir)
        except OSError as exc:
            return f"snapshot area {self.area}: {exc.strerror or exc}"
        have = stat.f_bavail * stat.f_frsize
        have += sum(_file_size(s.path / snap.DATA) for s in self._slots)
        need = self.slots * slot_bytes
        need += max(FREE_MARGIN_BYTES, int(need * FREE_MARGIN_RATIO))
        if have < need:
            return f"{self.area} has {have} bytes free, {need} needed for {self.slots} slots"
        return None

    # -- saving

    def snapshot(self, step: int, state: TrainState) -> float:
        """Snapshot ``state`` as of ``step``; returns the seconds the caller was blocked."""
        start = time.perf_counter()
        if not self.enabled:
            return 0.0
        self._wait_inflight()
        waited = time.perf_counter() - start
        if self._last_step is not None and step <= self._last_step:
            raise CheckpointError(
                f"snapshot(step={step}) after snapshot(step={self._last_step}): steps must increase"
            )
        layout = self._current_layout(state)
        record = SaveRecord(step=step, blocked_s=0.0, waited_s=waited)
        try:
            if layout.nbytes + ALIGN > self.reserved_bytes and not self._reserve(
                self._slot_bytes(layout, state)
            ):
                return time.perf_counter() - start
            slot = self._slots[self._next_slot()]
            snap.uncommit(slot.path)
            pinned, copied = self._copy_out(slot, layout, state)
        except OSError as exc:
            self._disable(f"cannot write the snapshot area {self.area}: {exc.strerror or exc}")
            return time.perf_counter() - start
        extra = capture_extra(state)
        self._last_step = step
        self.history.append(record)
        pending = _Pending(step, slot, layout.skeleton, extra, pinned, record, copied)
        self._inflight = self._executor.submit(self._finish, pending)
        record.blocked_s = time.perf_counter() - start
        return record.blocked_s

    def _current_layout(self, state: TrainState) -> _Layout:
        """The cached layout if the live tensors are still the cached ones, else a fresh one."""
        cached = self._layout
        if cached is not None and cached.fingerprint == _fingerprint(state) is not None:
            if state.optimizer is not None:  # learning rates and the like change between steps
                groups = [
                    {**{k: v for k, v in g.items() if k != "params"}, "params": params}
                    for g, params in zip(
                        state.optimizer.param_groups, cached.group_params, strict=True
                    )
                ]
                cached.skeleton = {
                    **cached.skeleton,
                    "optim": {**cached.skeleton["optim"], "param_groups": groups},
                }
            return cached
        tree = tensor_state(state)
        skeleton, tensors, specs, nbytes = flatten(tree)
        signature = _signature(specs)
        fingerprint = None if _has_plain_leaves(tree) else _fingerprint(state)
        if fingerprint is not None:  # reuse only tensors that alias live storage
            live = set(fingerprint[0::2])
            if any(t.data_ptr() not in live for t in tensors):
                fingerprint = None
        group_params = (
            [g["params"] for g in tree["optim"]["param_groups"]] if "optim" in tree else []
        )
        if state.optimizer is not None and len(group_params) != len(state.optimizer.param_groups):
            fingerprint = None
        self._layout = _Layout(
            skeleton, tensors, specs, nbytes, signature, fingerprint, group_params
        )
        return self._layout

    def _slot_bytes(self, layout: _Layout, state: TrainState) -> int:
        """Room one slot needs: data.bin plus meta.bin (measured once, with head room)."""
        meta = encode_meta(layout.skeleton, capture_extra(state))
        return layout.nbytes + 2 * len(meta) + 64 * 1024

    def _next_slot(self) -> int:
        """Round robin over the slots, skipping the newest committed one."""
        newest = self._newest[0] if self._newest else None
        for i in range(1, self.slots + 1):
            candidate = (self._cursor + i) % self.slots
            if candidate != newest:
                self._cursor = candidate
                return candidate
        raise AssertionError("unreachable: at least 2 slots")

    def _map(self, slot: _Slot, nbytes: int) -> torch.Tensor:
        """The slot's data.bin, sized and mapped; re-mapped only when the size changes."""
        if slot.buffer is not None and slot.nbytes == nbytes:
            return slot.buffer
        slot.path.mkdir(parents=True, exist_ok=True)
        path = slot.path / snap.DATA
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, nbytes)
            # Allocate the pages now: on a full tmpfs this fails with ENOSPC here instead of
            # killing the process with SIGBUS when the copy touches an unbacked page.
            with contextlib.suppress(AttributeError):
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError as exc:
                    if exc.errno not in {95, 22}:  # EOPNOTSUPP, EINVAL: no fallocate here
                        raise
        finally:
            os.close(fd)
        slot.buffer = torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)
        slot.nbytes = nbytes
        slot.views_for = None
        return slot.buffer

    @staticmethod
    def _views(buffer: torch.Tensor, specs: list[TensorSpec]) -> list[torch.Tensor]:
        return [
            buffer[s.offset : s.offset + s.nbytes].view(s.dtype).reshape(s.shape) for s in specs
        ]

    def _copy_out(
        self, slot: _Slot, layout: _Layout, state: TrainState
    ) -> tuple[torch.Tensor | None, Any]:
        """Copy the tensors into the slot (CPU) or the pinned buffer (CUDA).

        Returns the pinned buffer (None on CPU) and, when the CUDA copy still runs on its own
        stream, the event that marks its end (None when it is already done).
        """
        on_cuda = any(t.is_cuda for t in layout.tensors)
        buffer = self._map(slot, layout.nbytes)
        if not on_cuda:
            if slot.views_for != layout.signature:
                slot.views = self._views(buffer, layout.specs)
                slot.views_for = layout.signature
            for dst, src in zip(slot.views, layout.tensors, strict=True):
                dst.copy_(src)
            return None, None
        if self._pinned is None or self._pinned.numel() != layout.nbytes:
            self._pinned = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=True)
        views = self._views(self._pinned, layout.specs)
        if not (self.overlap and state.optimizer is not None and not _has_buffers(state, layout)):
            for dst, src in zip(views, layout.tensors, strict=True):
                dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            return self._pinned, None
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream = self._copy_stream
        stream.wait_stream(torch.cuda.current_stream())  # the step's last writes come first
        with torch.cuda.stream(stream):
            for dst, src in zip(views, layout.tensors, strict=True):
                dst.copy_(src, non_blocking=True)
            copied = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copied.record(stream)
        _wait_before_next_step(state.optimizer, copied)
        return self._pinned, copied

    def _finish(self, job: _Pending) -> None:
        """Background half: meta.bin, checksums, commit. Never raises; errors are recorded."""
        start = time.perf_counter()
        record = job.record
        try:
            buffer = job.slot.buffer
            assert buffer is not None
            if job.copied is not None:
                job.copied.synchronize()  # the copy off the GPU, on its own stream
            if job.pinned is not None:
                buffer.copy_(job.pinned)
            meta_bytes = encode_meta(job.skeleton, job.extra)
            (job.slot.path / snap.META).write_bytes(meta_bytes)
            files = {
                snap.DATA: (buffer.numel(), snap.digest(buffer.numpy().data)),
                snap.META: (len(meta_bytes), snap.digest(meta_bytes)),
            }
            commit = snap.Commit(
                job_id=str(self.job_id),
                rank=self.rank,
                world_size=self.world_size,
                step=job.step,
                files=files,
            )
            snap.write_commit(job.slot.path, commit)
            self._newest = (job.slot.index, job.step)
            self.last_nbytes = commit.nbytes
            record.committed = True
        except Exception as exc:
            record.committed = False
            record.error = f"{type(exc).__name__}: {exc}"
            _report(f"rank {self.rank}: memory snapshot of step {job.step} failed: {record.error}")
        record.write_s = time.perf_counter() - start

    def _wait_inflight(self) -> None:
        if self._inflight is not None:
            future, self._inflight = self._inflight, None
            future.result()

    def wait(self) -> None:
        """Block until the in-flight snapshot is committed (or has failed, see history)."""
        self._wait_inflight()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            for slot in self._slots:
                slot.buffer, slot.views = None, []
            self._pinned = None

    # -- loading

    def _refs(self) -> list[snap.SnapshotRef]:
        if self.area is None:
            return []
        return [
            ref
            for ref in snap.list_snapshots(self.area, self.rank)
            if ref.rank == self.rank and ref.commit.world_size == self.world_size
        ]

    def local_steps(self) -> list[int]:
        """Committed steps of this rank in the area (slots and replicas), newest first."""
        return sorted({ref.step for ref in self._refs()}, reverse=True)

    def find_good(self, step: int) -> GoodCopy | None:
        """This rank's first copy of ``step`` that reads back intact (size, digest), in memory.

        A damaged copy is reported on stderr and the next copy of the same step is tried.
        """
        self._wait_inflight()
        for ref in self._refs():
            if ref.step != step:
                continue
            read = snap.map_verified(ref.path)
            if read is None:
                problem = snap.verify(ref.path, ref.commit) or "changed while being read"
                _report(f"rank {self.rank}: skipping snapshot {ref.path}: {problem}")
                continue
            _, blobs = read
            try:
                meta = decode_meta(blobs[snap.META])
            except Exception as exc:
                _report(f"rank {self.rank}: skipping snapshot {ref.path}: meta.bin: {exc}")
                continue
            with warnings.catch_warnings():  # read-only bytes, only ever read from
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(blobs[snap.DATA], dtype=torch.uint8)
            return GoodCopy(step, ref.kind, ref.path, meta, data)
        return None

    def load_copy(self, copy: GoodCopy, state: TrainState) -> None:
        """Copy a verified snapshot into ``state`` in place and restore the extras."""
        try:
            tree = unflatten_into(copy.meta["tree"], tensor_state(state), copy.data)
            apply_tensor_state(state, tree)
            restore_extra(state, copy.meta["extra"])
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"loading snapshot {copy.path} failed after its checks passed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._last_step = copy.step

    def load(self, step: int, state: TrainState) -> bool:
        """Load this rank's intact copy of ``step`` into ``state``; False if there is none."""
        copy = self.find_good(step)
        if copy is None:
            return False
        self.load_copy(copy, state)
        return True

    def discard_newer(self, step: int | None) -> None:
        """Withdraw this rank's snapshots newer than ``step``, the point training resumes from:
        they belong to an abandoned timeline and must never be restored later."""
        self._wait_inflight()
        for ref in self._refs():
            if step is None or ref.step > step:
                snap.uncommit(ref.path)
        self._newest = self._scan_newest()
        self._last_step = step

    # -- reporting

    def summary(self) -> dict[str, float | int]:
        blocked = [r.blocked_s for r in self.history]
        writes = [r.write_s for r in self.history if r.write_s is not None]
        return {
            "snapshots": len(self.history),
            "snapshot_failed": sum(1 for r in self.history if r.committed is False),
            "snapshot_blocked_mean_s": sum(blocked) / len(blocked) if blocked else 0.0,
            "snapshot_blocked_max_s": max(blocked, default=0.0),
            "snapshot_write_mean_s": sum(writes) / len(writes) if writes else 0.0,
            "snapshot_bytes": self.last_nbytes,
        }


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
