"""Asynchronous, atomic, self-checking checkpoints for any PyTorch training loop.

How a save works, and why each step is there:

1. ``save()`` on the training thread waits for the previous write (at most one in flight, so
   memory stays bounded), then copies the model and optimizer state out of the training
   tensors (the only part that must stop training: later steps mutate them in place) and
   captures the per-rank extras (RNG, data position). The seconds spent here are the stall,
   returned to the caller and kept in :attr:`Checkpointer.history`.
2. A background thread writes everything into a temporary directory
   ``.tmp-step-NNNNNNNN-<nonce>`` with torch.distributed.checkpoint (DCP) on a dedicated gloo
   process group (so it never interleaves with the training collectives), each file fsynced.
3. Every rank checksums the files it wrote; rank 0 gathers the lists, writes ``manifest.json``
   and renames the directory to ``step-NNNNNNNN``. Only then is the checkpoint visible; a crash
   before leaves a temporary directory that the next start removes.
4. Rank 0 applies retention: keep the last K and every N-th step.

Loading walks the checkpoints newest first and takes the first whose manifest exists and whose
every file has the listed size and checksum (the ranks split the checking); a torn or damaged
checkpoint is reported and skipped, never loaded.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ironpod import env
from ironpod.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLocationError,
    ConfigError,
)
from ironpod.train.checkpoint.manifest import (
    MANIFEST_NAME,
    TMP_PREFIX,
    FileEntry,
    Manifest,
    extra_file_name,
    parse_step_dir,
    read_manifest,
    step_dir_name,
    verify_files,
)
from ironpod.train.checkpoint.state import (
    TrainState,
    capture_extra,
    restore_extra,
    set_tensor_state,
    tensor_state,
)
from ironpod.train.checkpoint.storage import CheckpointStorage, open_storage
from ironpod.train.context import TrainContext

log = logging.getLogger(__name__)

# DCP warns on every single-process save/load that it "assumes the intent" is one process: it is
# ours (no process group exists), so the warning only adds noise to every user's log.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed is (disabled|unavailable)", category=UserWarning
)


@dataclass(slots=True)
class SaveRecord:
    """What one save cost and how it ended."""

    step: int
    blocked_s: float
    waited_s: float = 0.0  # of blocked_s: waiting for the previous save to finish
    write_s: float | None = None
    committed: bool | None = None
    error: str | None = None


def _report(message: str) -> None:
    """Checkpoint events go to stderr on one line each, whatever logging the script set up."""
    print(f"[ironpod] checkpoint: {message}", file=sys.stderr, flush=True)
    log.info(message)


class Checkpointer:
    """Saves and restores a :class:`TrainState` at a local path or fsspec URL.

    Collective: in a distributed job every rank constructs it, and calls ``save`` and
    ``load_latest`` for the same steps, as with torch.distributed.checkpoint.
    """

    def __init__(
        self,
        location: str | None = None,
        *,
        ctx: TrainContext | None = None,
        keep_last: int = 3,
        keep_every: int | None = None,
        asynchronous: bool = True,
    ) -> None:
        location = location or (ctx.checkpoint_dir if ctx else None)
        location = location or os.environ.get(env.CHECKPOINT_DIR)
        if not location:
            raise CheckpointLocationError(
                f"no checkpoint location: pass one or set {env.CHECKPOINT_DIR}"
            )
        if keep_last < 1:
            raise ConfigError(f"checkpoint keep_last must be at least 1, got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ConfigError(f"checkpoint keep_every must be at least 1, got {keep_every}")
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.asynchronous = asynchronous
        self.job_id = ctx.job_id if ctx else os.environ.get(env.JOB_ID, "local")
        self.attempt_id = ctx.attempt_id if ctx else 0
        self.history: list[SaveRecord] = []
        self.skipped: list[tuple[int, str]] = []

        self._distributed = dist.is_available() and dist.is_initialized()
        self._rank = dist.get_rank() if self._distributed else 0
        self._world = dist.get_world_size() if self._distributed else 1
        # A group of its own: the background thread's collectives never meet training's.
        self._pg = dist.new_group(backend="gloo") if self._distributed else None
        try:
            self._storage: CheckpointStorage = open_storage(location)
        except (ImportError, ValueError, OSError) as exc:
            raise CheckpointLocationError(f"checkpoint location {location}: {exc}") from None
        self.location = self._storage.root
        self._nonce = self._prepare_location()

        on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        self._stager = BlockingAsyncStager(cache_staged_state_dict=on_cuda)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ironpod-ckpt")
        self._inflight: Future[None] | None = None
        self._last_step: int | None = None

    # -- collectives on the checkpoint group (no-ops in a single process)

    def _all_gather(self, obj: Any) -> list[Any]:
        if not self._distributed:
            return [obj]
        out: list[Any] = [None] * self._world
        dist.all_gather_object(out, obj, group=self._pg)
        return out

    def _broadcast(self, obj: Any) -> Any:
        if not self._distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self._pg)
        return box[0]

    # -- setup

    def _prepare_location(self) -> str:
        """Check every rank can write here, clear leftovers of crashed saves, agree on a nonce."""
        error = None
        try:
            self._storage.makedirs(self.location)
            probe = self._storage.join(self.location, f".probe-{self._rank}-{os.getpid()}")
            self._storage.write_bytes(probe, b"ironpod")
            self._storage.remove_tree(probe)
        except Exception as exc:  # any failure here means "cannot write", reported below
            error = f"{type(exc).__name__}: {exc}"
        errors = [e for e in self._all_gather(error) if e]
        if errors:
            raise CheckpointLocationError(
                f"checkpoint location {self.location} is not writable: {errors[0]}"
            )
        if self._rank == 0:
            for name in self._storage.listdir(self.location):
                if name.startswith(TMP_PREFIX):
                    self._storage.remove_tree(self._storage.join(self.location, name))
        nonce: str = self._broadcast(uuid.uuid4().hex[:8])
        return nonce

    # -- saving

    def save(self, step: int, state: TrainState) -> float:
        """Checkpoint ``state`` as of ``step``; returns the seconds the caller was blocked.

        Asynchronous by default: the write goes on in the background; :meth:`wait` waits for it.
        Call after at least one optimizer step (before it, the optimizer has no state).
        """
        start = time.perf_counter()
        self._wait_inflight(raise_on_error=False)
        if self._last_step is not None and step <= self._last_step:
            raise CheckpointError(
                f"save(step={step}) after save(step={self._last_step}): steps must increase"
            )
        staged = self._stager.stage(tensor_state(state))
        extra = capture_extra(state)
        record = SaveRecord(step=step, blocked_s=0.0)
        self._last_step = step
        self.history.append(record)
        if self.asynchronous:
            self._inflight = self._executor.submit(self._write, step, staged, extra, record)
            record.blocked_s = time.perf_counter() - start
        else:
            self._write(step, staged, extra, record)
            record.blocked_s = time.perf_counter() - start
            if not record.committed:
                raise CheckpointError(f"checkpoint of step {step} failed: {record.error}")
        return record.blocked_s

    def _write(
        self, step: int, staged: dict[str, Any], extra: dict[str, Any], record: SaveRecord
    ) -> None:
        """Background half of a save. Every rank reaches every collective, whatever fails."""
        start = time.perf_counter()
        storage = self._storage
        tmp = storage.join(self.location, f"{TMP_PREFIX}{step_dir_name(step)}-{self._nonce}")
        error: str | None = None
        files: dict[str, FileEntry] = {}
        my_extra = extra_file_name(self._rank)
        try:
            storage.makedirs(tmp)
            buffer = io.BytesIO()
            torch.save(extra, buffer)
            storage.write_bytes(storage.join(tmp, my_extra), buffer.getvalue())
        except Exception as exc:
            error = f"rank {self._rank}: {type(exc).__name__}: {exc}"
        try:  # collective: DCP agrees on failure across ranks by itself
            dcp_save(
                staged,
                storage_writer=storage.dcp_writer(tmp),
                process_group=self._pg,
                no_dist=not self._distributed,
            )
        except Exception as exc:
            error = error or f"rank {self._rank}: {type(exc).__name__}: {exc}"
        if error is None:
            try:
                mine = f"__{self._rank}_"
                for name in storage.listdir(tmp):
                    if name == my_extra or name.startswith(mine):
                        size, crc = storage.checksum(storage.join(tmp, name))
                        files[name] = FileEntry(size=size, crc32=crc)
            except Exception as exc:
                error = f"rank {self._rank}: {type(exc).__name__}: {exc}"
        reports = self._all_gather((error, files))
        outcome: tuple[bool, str | None] = (False, None)
        if self._rank == 0:
            outcome = self._commit(step, tmp, reports)
        committed, commit_error = self._broadcast(outcome)
        record.write_s = time.perf_counter() - start
        record.committed = committed
        record.error = commit_error
        if not committed:
            _report(f"step {step} NOT saved: {commit_error}")

    def _commit(
        self, step: int, tmp: str, reports: list[tuple[str | None, dict[str, FileEntry]]]
    ) -> tuple[bool, str | None]:
        """Rank 0: write the manifest and make the checkpoint visible, or clean up."""
        storage = self._storage
        errors = [err for err, _ in reports if err]
        if errors:
            storage.remove_tree(tmp)
            return False, errors[0]
        try:
            files: dict[str, FileEntry] = {}
            for _, entries in reports:
                files.update(entries)
            for name in storage.listdir(tmp):  # files no rank claimed, such as DCP's .metadata
                if name not in files:
                    size, crc = storage.checksum(storage.join(tmp, name))
                    files[name] = FileEntry(size=size, crc32=crc)
            manifest = Manifest(
                step=step,
                world_size=self._world,
                files=files,
                job_id=self.job_id,
                attempt_id=self.attempt_id,
            )
            storage.write_bytes(storage.join(tmp, MANIFEST_NAME), manifest.to_json())
            final = storage.join(self.location, step_dir_name(step))
            if storage.exists(final):  # a damaged copy from an earlier attempt at this step
                old = storage.join(self.location, f"{TMP_PREFIX}replaced-{step_dir_name(step)}")
                storage.rename_dir(final, old)
                storage.rename_dir(tmp, final)
                storage.remove_tree(old)
            else:
                storage.rename_dir(tmp, final)
        except Exception as exc:
            storage.remove_tree(tmp)
            return False, f"rank 0: {type(exc).__name__}: {exc}"
        self._apply_retention()
        return True, None

    def committed_steps(self) -> list[int]:
        """Steps of the checkpoints that have a manifest, oldest first (not verified)."""
        steps = []
        for name in self._storage.listdir(self.location):
            step = parse_step_dir(name)
            manifest = self._storage.join(self.location, name, MANIFEST_NAME)
            if step is not None and self._storage.exists(manifest):
                steps.append(step)
        return sorted(steps)

    def _apply_retention(self) -> None:
        steps = self.committed_steps()
        keep = set(steps[-self.keep_last :])
        if self.keep_every:
            keep |= {s for s in steps if s % self.keep_every == 0}
        for step in steps:
            if step not in keep:
                self._storage.remove_tree(self._storage.join(self.location, step_dir_name(step)))

    def _wait_inflight(self, *, raise_on_error: bool) -> None:
        if self._inflight is None:
            return
        future, self._inflight = self._inflight, None
        future.result()  # _write never raises; a bug in it should surface here
        last = self.history[-1]
        if raise_on_error and not last.committed:
            raise CheckpointError(f"checkpoint of step {last.step} failed: {last.error}")

    def wait(self) -> None:
        """Block until the in-flight write is durable; raise CheckpointError if it failed."""
        self._wait_inflight(raise_on_error=True)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)

    # -- loading

    def load_latest(self, state: TrainState) -> int | None:
        """Load the newest good checkpoint into ``state`` in place; its step, or None if none.

        Damaged or unfinished checkpoints are reported on stderr, recorded in :attr:`skipped`
        and passed over for the next older one.
        """
        self._wait_inflight(raise_on_error=False)
        steps: list[int] = []
        if self._rank == 0:
            names = self._storage.listdir(self.location)
            steps = sorted((s for s in map(parse_step_dir, names) if s is not None), reverse=True)
        for step in self._broadcast(steps):
            ckpt_dir = self._storage.join(self.location, step_dir_name(step))
            manifest, problem = self._agree_on(ckpt_dir)
            if manifest is None:
                self.skipped.append((step, str(problem)))
                if self._rank == 0:
                    _report(f"skipping {step_dir_name(step)}: {problem}")
                continue
            self._load_step(ckpt_dir, manifest, state)
            if self._rank == 0:
                _report(f"restored {step_dir_name(step)} from {self.location}")
            self._last_step = step
            return int(step)
        return None

    def _agree_on(self, ckpt_dir: str) -> tuple[Manifest | None, str | None]:
        """Every rank checks a share of the files; the checkpoint is good only if all agree."""
        body: bytes | None = None
        problem: str | None = None
        if self._rank == 0:
            try:
                body = read_manifest(self._storage, ckpt_dir).to_json()
            except CheckpointCorruptError as exc:
                problem = str(exc)
        body, problem = self._broadcast((body, problem))
        if body is None:
            return None, problem
        manifest = Manifest.from_json(body, ckpt_dir)
        names = sorted(manifest.files)
        error = None
        try:
            verify_files(self._storage, ckpt_dir, manifest, names[self._rank :: self._world])
            if self._rank == 0 and ".metadata" not in manifest.files:
                raise CheckpointCorruptError(f"{ckpt_dir}: manifest lists no DCP .metadata")
        except CheckpointCorruptError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"{ckpt_dir}: {type(exc).__name__}: {exc}"
        errors = [e for e in self._all_gather(error) if e]
        return (None, errors[0]) if errors else (manifest, None)

    def _load_step(self, ckpt_dir: str, manifest: Manifest, state: TrainState) -> None:
        storage = self._storage
        try:
            target = tensor_state(state)
            dcp_load(
                target,
                storage_reader=storage.dcp_reader(ckpt_dir),
                process_group=self._pg,
                no_dist=not self._distributed,
            )
            set_tensor_state(state, target)
            own = extra_file_name(self._rank)
            name = own if own in manifest.files else extra_file_name(0)
            blob = storage.read_bytes(storage.join(ckpt_dir, name))
            extra = torch.load(io.BytesIO(blob), weights_only=True)
            if name != own:
                _report(
                    f"rank {self._rank}: checkpoint saved by {manifest.world_size} ranks has no "
                    "state of its own; using rank 0's data position, RNG left as seeded"
                )
            restore_extra(state, extra, rng=name == own)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"loading {ckpt_dir} failed after its checks passed: {type(exc).__name__}: {exc}"
            ) from exc

    # -- reporting

    def summary(self) -> dict[str, float | int]:
        """Totals a recipe prints at the end and the goodput ledger reads."""
        blocked = [r.blocked_s for r in self.history]
        writes = [r.write_s for r in self.history if r.write_s is not None]
        return {
            "saves": len(self.history),
            "failed": sum(1 for r in self.history if r.committed is False),
            "blocked_total_s": sum(blocked),
            "blocked_mean_s": sum(blocked) / len(blocked) if blocked else 0.0,
            "blocked_max_s": max(blocked, default=0.0),
            "write_mean_s": sum(writes) / len(writes) if writes else 0.0,
        }
