"""The agent's in-memory snapshot store: tier 1 (this node) and tier 2 (copies for peers).

The agent owns a directory in shared memory (``--shm-dir``); each job's workers write their
snapshots into ``job-<id>/`` there (format: :mod:`ironpod.snapshot`), so a snapshot outlives
the worker that wrote it. The store:

- grants the workers' reservations within a memory budget (evicting copies held for other
  jobs first) or refuses them with a notice: a node is never pushed into the OOM killer;
- replicates each rank's newest committed snapshot to the peers the controller chose, at a
  capped bandwidth, outside the training processes. Before sending step S it announces S to
  every peer of the attempt, which then keeps ("pins") its own ranks' copy of step S: so after
  losing any one node, every rank still has step S somewhere (Gemini, SOSP'23, keeps the
  same invariant with a group placement; this is the 2-phase form of it for a ring);
- serves copies to peers and fetches them for a restore plan before the workers start;
- reports what it holds in every heartbeat; the controller plans restores from that.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import json
import logging
import re
import secrets
import shutil
import ssl
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ironpod import snapshot as snap
from ironpod.private import private_dir
from ironpod.wire import AgentNotice, Assignment, SnapshotHolding

log = logging.getLogger(__name__)

#: Copies of each peer rank kept (the newest may be half-received when a node dies).
KEEP_PEER_COPIES = 2
#: Steps announced by each peer whose own-rank copies are kept.
KEEP_ANNOUNCED = 2
_CHUNK = 1024 * 1024
_HTTP_TIMEOUT_S = 30.0


def pack(commit: snap.Commit, blobs: dict[str, bytes]) -> list[bytes]:
    """A snapshot as one HTTP body: the commit record's JSON, a newline, then the files."""
    return [commit.to_json() + b"\n", *(blobs[name] for name in sorted(commit.files))]


def unpack(body: bytes) -> tuple[snap.Commit, dict[str, bytes]]:
    head, _, rest = body.partition(b"\n")
    commit = snap.Commit.from_json(head)
    blobs: dict[str, bytes] = {}
    offset = 0
    for name in sorted(commit.files):
        size, crc = commit.files[name]
        blob = rest[offset : offset + size]
        if len(blob) != size or snap.digest(blob) != crc:
            raise ValueError(f"{name}: damaged in transit (size {len(blob)}, committed {size})")
        blobs[name] = blob
        offset += size
    if offset != len(rest):
        raise ValueError(f"{len(rest) - offset} unexpected trailing bytes")
    return commit, blobs


class BudgetError(Exception):
    """Not enough room within the memory budget."""


@dataclass
class _Replication:
    job_id: int
    ranks: list[int]
    replicate_to: list[str]
    peers: list[str]
    every: int = 1
    sent: dict[int, int] = field(default_factory=dict)  # rank -> newest step sent


class SnapshotStore:
    def __init__(
        self,
        root: Path,
        *,
        budget_bytes: int,
        peer_tokens: dict[int, str] | None = None,
        bandwidth_bytes_s: float | None = None,
    ) -> None:
        self.root = private_dir(root)  # every job's weights: 0700
        self.budget_bytes = budget_bytes
        # Peers call each other's snapshot routes with a token per job that the controller
        # gives the nodes of that job and those holding its copies (never the join token).
        self._peer_tokens: dict[int, str] = dict(peer_tokens or {})
        # Workers prove who they are with a token of their job's (worker_token): they never
        # see the peer tokens, and one job's workers cannot reserve memory in another's name.
        self._worker_secret = secrets.token_bytes(32)
        self.bandwidth_bytes_s = bandwidth_bytes_s
        self._lock = threading.RLock()
        self._reserved: dict[tuple[int, int], int] = {}  # (job, rank) -> bytes
        self._announced: dict[tuple[int, str], list[int]] = {}  # (job, peer) -> steps
        self._notices: list[AgentNotice] = []
        self._replication: _Replication | None = None
        self._stop = threading.Event()
        #: Set when the replication targets change (and on close): without targets (one node,
        #: or no job) the replication thread sleeps on it instead of polling.
        self._targets_changed = threading.Event()
        self._thread = threading.Thread(target=self._replicate_loop, name="agent-replicate")
        self._thread.daemon = True
        self.stats: dict[str, float] = {"sent_bytes": 0.0, "sent_s": 0.0, "sent": 0.0}
        # CPU seconds this store spent on the memory tier (replication, receiving, pinning,
        # and the replication thread's polling), and per replicated snapshot of one rank: on
        # a CPU node they come out of the training's cores, so the workers' automatic
        # interval counts them (cost_advice, through the control file).
        self._cpu_s = 0.0
        self._cpu_mark = 0.0
        self._cpu_per_snapshot: deque[float] = deque(maxlen=8)
        self.self_url = ""  # this agent's URL, sent along so peers know who announced
        #: How peers' https URLs are verified (the cluster CA), when the cluster runs TLS.
        self.tls_client: ssl.SSLContext | None = None

    def start(self) -> None:
        self._thread.start()

    def set_peer_tokens(self, tokens: dict[int, str]) -> None:
        """The controller's peer tokens, by job (each heartbeat reply)."""
        with self._lock:
            self._peer_tokens = dict(tokens)

    def peer_token(self, job_id: int) -> str | None:
        with self._lock:
            return self._peer_tokens.get(job_id)

    def worker_token(self, job_id: int) -> str:
        """The bearer token of this node's workers of job ``job_id`` (snapshot reservations)."""
        return hmac.new(self._worker_secret, f"job-{job_id}".encode(), "sha256").hexdigest()

    @contextlib.contextmanager
    def counting(self) -> Iterator[None]:
        """Count the calling thread's CPU time inside the block as memory-tier work."""
        began = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - began
            with self._lock:
                self._cpu_s += spent

    def cost_advice(self) -> dict[str, float]:
        """The node's CPU seconds per snapshot of one rank (median of the recent ones), for
        the workers' automatic interval; empty before the first snapshot was replicated."""
        with self._lock:
            if not self._cpu_per_snapshot:
                return {}
            return {"snapshot_agent_cpu_s": round(statistics.median(self._cpu_per_snapshot), 4)}

    def close(self) -> None:
        self._stop.set()
        self._targets_changed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def area(self, job_id: int) -> Path:
        return snap.job_area(self.root, job_id)

    # -- accounting

    def used_bytes(self, holdings: list[SnapshotHolding] | None = None) -> int:
        """Reservations (the workers' slots) plus every copy held outside them; pass the
        area's ``holdings()`` when already scanned."""
        with self._lock:
            reserved = sum(self._reserved.values())
        held = self.holdings() if holdings is None else holdings
        return reserved + sum(h.nbytes for h in held if h.kind == "replica")

    def _notice(
        self, kind: str, message: str, job_id: int | None, **data: float | int | str
    ) -> None:
        log.warning("%s: %s", kind, message)
        with self._lock:
            self._notices.append(
                AgentNotice(
                    kind=kind, message=message, job_id=job_id, time_unix=time.time(), data=data
                )
            )

    def drain_notices(self) -> list[AgentNotice]:
        with self._lock:
            out, self._notices = self._notices, []
        return out

    def _make_room(self, need: int, job_id: int, why: str) -> None:
        """Evict copies until ``need`` more bytes fit: other jobs' first, then this job's
        oldest peer copies; raise :class:`BudgetError` if even that is not enough."""
        free = self.budget_bytes - self.used_bytes()
        if need <= free:
            return
        copies = [h for h in self.holdings() if h.kind == "replica"]
        copies.sort(key=lambda h: (h.job_id == job_id, h.step))
        for victim in copies:
            if need <= free:
                break
            path = snap.replica_dir(self.area(victim.job_id), victim.rank, victim.step)
            shutil.rmtree(path, ignore_errors=True)
            free += victim.nbytes
            self._notice(
                "snapshot_evicted",
                f"evicted job {victim.job_id} rank {victim.rank} step {victim.step} "
                f"({victim.nbytes / 2**20:.1f} MiB) to make room for {why}",
                victim.job_id,
                rank=victim.rank,
                step=victim.step,
                bytes=victim.nbytes,
            )
        if need > free:
            raise BudgetError(
                f"{why} needs {need / 2**20:.1f} MiB but only {max(free, 0) / 2**20:.1f} MiB of "
                f"the {self.budget_bytes / 2**20:.1f} MiB snapshot budget is free"
            )

    def reserve(self, job_id: int, rank: int, slot_bytes: int, slots: int) -> str | None:
        """Grant a worker's slots (None) or say why not."""
        need = slot_bytes * slots
        with self._lock:
            previous = self._reserved.pop((job_id, rank), 0)
            try:
                self._make_room(need, job_id, f"rank {rank}'s {slots} snapshot slots")
            except BudgetError as exc:
                self._reserved[(job_id, rank)] = previous
                self._notice("snapshot_refused", str(exc), job_id, rank=rank, bytes=need)
                return str(exc)
            self._reserved[(job_id, rank)] = need
        return None

    # -- what is here

    def holdings(self) -> list[SnapshotHolding]:
        out = []
        for area in sorted(self.root.glob("job-*")):
            try:
                job_id = int(area.name.removeprefix("job-"))
            except ValueError:
                continue
            for ref in snap.list_snapshots(area):
                out.append(
                    SnapshotHolding(
                        job_id=job_id,
                        rank=ref.rank,
                        step=ref.step,
                        kind="slot" if ref.kind == "slot" else "replica",
                        nbytes=ref.nbytes,
                    )
                )
        return out

    def keep_only(self, jobs: list[int]) -> None:
        """Delete the snapshots of jobs that are over (the controller lists those still on)."""
        wanted = {f"job-{j}" for j in jobs}
        for area in self.root.glob("job-*"):
            if area.name not in wanted:
                shutil.rmtree(area, ignore_errors=True)
                with self._lock:
                    job = area.name.removeprefix("job-")
                    for key in [k for k in self._reserved if str(k[0]) == job]:
                        del self._reserved[key]

    def find(
        self, job_id: int, rank: int, step: int
    ) -> tuple[snap.Commit, dict[str, bytes]] | None:
        """A good copy of (rank, step) here, read into memory, or None."""
        for ref in snap.list_snapshots(self.area(job_id), rank):
            if ref.step == step:
                got = snap.read_consistent(ref.path)
                if got is not None:
                    return got
        return None

    # -- receiving and pinning

    def receive(self, job_id: int, rank: int, step: int, body: bytes) -> None:
        """Install a peer's copy (raises ValueError if damaged, BudgetError if it cannot fit)."""
        commit, blobs = unpack(body)
        if (commit.rank, commit.step) != (rank, step):
            raise ValueError(f"body holds rank {commit.rank} step {commit.step}")
        area = self.area(job_id)
        with self._lock:
            try:
                self._make_room(commit.nbytes, job_id, f"a copy of rank {rank} step {step}")
            except BudgetError as exc:
                self._notice("snapshot_refused", str(exc), job_id, rank=rank, step=step)
                raise
            snap.install(snap.replica_dir(area, rank, step), commit, blobs)
            snap.prune_replicas(area, rank, KEEP_PEER_COPIES)

    def announce(self, job_id: int, peer: str, step: int) -> None:
        """A peer is about to replicate ``step``: keep our own ranks' copies of it."""
        with self._lock:
            steps = self._announced.setdefault((job_id, peer), [])
            if step not in steps:
                steps.append(step)
                del steps[:-KEEP_ANNOUNCED]
            ranks = self._replication.ranks if self._replication else []
            if self._replication is None or self._replication.job_id != job_id:
                return
        for rank in ranks:
            self._pin(job_id, rank, step)

    def _pin(self, job_id: int, rank: int, step: int) -> bool:
        """Copy our own rank's slot of ``step`` out of the ring, so the worker may reuse it."""
        area = self.area(job_id)
        target = snap.replica_dir(area, rank, step)
        if snap.read_commit(target) is not None:
            return True
        for ref in snap.list_snapshots(area, rank):
            if ref.step == step and ref.kind == "slot":
                got = snap.read_consistent(ref.path)
                if got is None:
                    continue
                with self._lock:
                    try:
                        self._make_room(got[0].nbytes, job_id, f"pinning rank {rank} step {step}")
                    except BudgetError:
                        return False
                    snap.install(target, *got)
                self._prune_own(job_id, rank)
                return True
        return False

    def _prune_own(self, job_id: int, rank: int) -> None:
        """Keep our own rank's copies of the step we last sent and of the steps peers announced."""
        with self._lock:
            wanted = {s for (j, _), steps in self._announced.items() if j == job_id for s in steps}
            rep = self._replication
            if rep is not None and rep.job_id == job_id and rank in rep.sent:
                wanted.add(rep.sent[rank])
        for ref in snap.list_snapshots(self.area(job_id), rank):
            if ref.kind == "replica" and ref.step not in wanted:
                shutil.rmtree(ref.path, ignore_errors=True)

    # -- replication (our ranks' newest snapshots to the chosen peers)

    def set_assignment(self, assignment: Assignment | None, self_url: str) -> None:
        self._targets_changed.set()
        with self._lock:
            self.self_url = self_url
            if assignment is None:
                self._replication = None
                return
            current = self._replication
            if current is not None and current.job_id == assignment.job_id:
                current.ranks = list(assignment.ranks)
                current.replicate_to = [u for u in assignment.replicate_to if u != self_url]
                current.peers = [u for u in assignment.peers if u != self_url]
                return
            self._cpu_per_snapshot.clear()  # a new job: its snapshots have their own size
            self._cpu_mark = self._cpu_s
            self._replication = _Replication(
                job_id=assignment.job_id,
                ranks=list(assignment.ranks),
                replicate_to=[u for u in assignment.replicate_to if u != self_url],
                peers=[u for u in assignment.peers if u != self_url],
            )

    def _replicate_loop(self) -> None:
        while not self._stop.wait(0.02):
            with self._lock:
                rep = self._replication
            if rep is None or not rep.replicate_to:
                self._targets_changed.wait()
                self._targets_changed.clear()
                continue
            try:
                with self.counting():
                    sent = self._replicate_once(rep)
                if sent:
                    self._close_snapshot_cost(len(rep.ranks))
            except Exception as exc:  # a peer down mid-send: try again with the next snapshot
                log.warning("replication of job %d failed: %s", rep.job_id, exc)
                self._stop.wait(0.5)

    def _close_snapshot_cost(self, ranks: int) -> None:
        """A snapshot step of our ranks went out: what the tier cost since the last one."""
        with self._lock:
            spent, self._cpu_mark = self._cpu_s - self._cpu_mark, self._cpu_s
            self._cpu_per_snapshot.append(spent / max(ranks, 1))

    def _replicate_once(self, rep: _Replication) -> bool:
        """Send our ranks' newest common step to the targets; whether one went out."""
        area = self.area(rep.job_id)
        newest = {}
        for rank in rep.ranks:
            steps = [r.step for r in snap.list_snapshots(area, rank) if r.kind == "slot"]
            if not steps:
                return False
            newest[rank] = max(steps)
        step = min(newest.values())  # a step every rank of ours has
        if all(rep.sent.get(rank, -1) >= step for rank in rep.ranks):
            return False
        copies = {rank: self.find(rep.job_id, rank, step) for rank in rep.ranks}
        if any(c is None for c in copies.values()):
            return False  # the ring moved on while we looked: take the next one
        for peer in rep.peers:
            with contextlib.suppress(OSError, http.client.HTTPException):
                self._post(peer, f"/snapshots/{rep.job_id}/announce/{step}", b"", rep.job_id)
        for rank, got in copies.items():
            assert got is not None
            for peer in rep.replicate_to:
                start = time.monotonic()
                body = pack(*got)
                self._put(peer, f"/snapshots/{rep.job_id}/{rank}/{step}", body, rep.job_id)
                with self._lock:
                    self.stats["sent_bytes"] += sum(len(b) for b in body)
                    self.stats["sent_s"] += time.monotonic() - start
                    self.stats["sent"] += 1
            with self._lock:
                rep.sent[rank] = step
            self._pin(rep.job_id, rank, step)
        return True

    # -- HTTP to peers (the node token; bodies streamed under the bandwidth cap)

    def _connection(self, url: str) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        if parts.scheme == "https":
            # peers' certificates are the cluster CA's (ironpod.tls); never plain fallback
            return http.client.HTTPSConnection(
                host, parts.port or 443, timeout=_HTTP_TIMEOUT_S, context=self.tls_client
            )
        return http.client.HTTPConnection(host, parts.port or 80, timeout=_HTTP_TIMEOUT_S)

    def _post(self, url: str, path: str, body: bytes, job_id: int) -> None:
        conn = self._connection(url)
        try:
            conn.request("POST", path, body=body, headers=self._headers(len(body), job_id))
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()

    def _headers(self, length: int, job_id: int) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.peer_token(job_id) or ''}",
            "Content-Length": str(length),
            "X-Ironpod-From": self.self_url,
        }

    def _put(self, url: str, path: str, parts: list[bytes], job_id: int) -> None:
        total = sum(len(p) for p in parts)
        conn = self._connection(url)
        try:
            conn.putrequest("PUT", path)
            for key, value in self._headers(total, job_id).items():
                conn.putheader(key, value)
            conn.endheaders()
            began, sent = time.monotonic(), 0
            for part in parts:
                view = memoryview(part)
                for start in range(0, len(view), _CHUNK):
                    chunk = view[start : start + _CHUNK]
                    conn.send(chunk)
                    sent += len(chunk)
                    if self.bandwidth_bytes_s:
                        ahead = sent / self.bandwidth_bytes_s - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
            response = conn.getresponse()
            detail = response.read()
            if response.status != 200:
                raise OSError(f"{url} answered {response.status}: {detail[:200]!r}")
        finally:
            conn.close()

    def fetch(self, job_id: int, rank: int, step: int, urls: list[str]) -> str:
        """Make sure a good copy of (rank, step) is here before the worker starts: a note of
        where it came from for the rank's log."""
        if self.find(job_id, rank, step) is not None:
            return f"rank {rank}: step {step} is in this node's memory"
        problems = []
        for url in urls:
            start = time.monotonic()
            conn = self._connection(url)
            try:
                conn.request(
                    "GET",
                    f"/snapshots/{job_id}/{rank}/{step}",
                    headers={"Authorization": f"Bearer {self.peer_token(job_id) or ''}"},
                )
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    problems.append(f"{url}: {response.status}")
                    continue
                self.receive(job_id, rank, step, body)
            except (OSError, http.client.HTTPException, ValueError, BudgetError) as exc:
                problems.append(f"{url}: {exc}")
                continue
            finally:
                conn.close()
            took = time.monotonic() - start
            return (
                f"rank {rank}: fetched step {step} from {url} "
                f"({len(body) / 2**20:.1f} MiB in {took:.3f} s)"
            )
        return f"rank {rank}: step {step} not fetched ({'; '.join(problems) or 'no source'})"


class BodyError(Exception):
    """A request body refused before it is read: its HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


#: An id or a step in a route: ASCII digits that fit the database's 64-bit integers.
_NUMBER = re.compile(r"[0-9]{1,18}")
#: Most bytes of a reservation request (a small JSON object).
_RESERVE_MAX_BYTES = 4096
#: An upload may exceed the store's budget by this much (the commit record in front).
_PUT_SLACK_BYTES = 2**20


def _reservation(req: object) -> tuple[int, int, int, int]:
    if not isinstance(req, dict):
        raise ValueError("a JSON object with job_id, rank, slot_bytes and slots")
    out = []
    for key in ("job_id", "rank", "slot_bytes", "slots"):
        value = req.get(key)
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            value = int(value)  # the workers send the job's id as text (IRONPOD_JOB_ID)
        if type(value) is not int or not 0 <= value < 2**63:
            raise ValueError(f"{key} must be a non-negative 64-bit integer, got {value!r}")
        out.append(value)
    return out[0], out[1], out[2], out[3]


def handle(
    store: SnapshotStore,
    method: str,
    parts: list[str],
    body: Callable[[int], bytes],
    token_ok: Callable[[str], bool],
    sender: str = "",
) -> tuple[int, bytes, str]:
    """The agent's ``/snapshots/...`` routes: (status, body, content type). ``body(limit)``
    reads the request body, raising :class:`BodyError` past ``limit`` bytes."""
    text = "text/plain; charset=utf-8"
    try:
        return _route(store, method, parts, body, token_ok, sender)
    except BodyError as exc:
        return exc.status, f"{exc}\n".encode(), text


def _route(  # noqa: PLR0911 (one return per route and outcome reads best here)
    store: SnapshotStore,
    method: str,
    parts: list[str],
    body: Callable[[int], bytes],
    token_ok: Callable[[str], bool],
    sender: str,
) -> tuple[int, bytes, str]:
    text = "text/plain; charset=utf-8"
    if method == "POST" and parts == ["reserve"]:
        # The job's id is in the (small, bounded) body and the token is that job's.
        try:
            job_id, rank, slot_bytes, slots = _reservation(json.loads(body(_RESERVE_MAX_BYTES)))
        except ValueError as exc:
            return 400, f"bad reservation: {exc}\n".encode(), text
        if not token_ok(store.worker_token(job_id)):
            return 401, f"missing or wrong worker token for job {job_id}\n".encode(), text
        reason = store.reserve(job_id, rank, slot_bytes, slots)
        if reason is not None:
            return 507, json.dumps({"reason": reason}).encode(), "application/json"
        return 200, b'{"granted": true}', "application/json"
    # Every other route names its job first; the caller needs that job's peer token.
    job = int(parts[0]) if parts and _NUMBER.fullmatch(parts[0]) else None
    token = store.peer_token(job) if job is not None else None
    if token is None or not token_ok(token):
        return 401, b"missing or wrong peer token for this job\n", text
    numbers = [int(p) for p in parts if _NUMBER.fullmatch(p)]
    if method == "POST" and len(parts) == 3 and parts[1] == "announce" and len(numbers) == 2:
        with store.counting():
            store.announce(numbers[0], sender or "peer", numbers[1])
        return 200, b"{}", "application/json"
    if len(parts) == 3 and len(numbers) == 3:
        job_id, rank, step = numbers
        if method == "GET":
            got = store.find(job_id, rank, step)
            if got is None:
                return 404, b"no good copy of that snapshot here\n", text
            return 200, b"".join(pack(*got)), "application/octet-stream"
        if method == "PUT":
            try:
                with store.counting():
                    store.receive(job_id, rank, step, body(store.budget_bytes + _PUT_SLACK_BYTES))
            except ValueError as exc:
                return 400, f"{exc}\n".encode(), text
            except BudgetError as exc:
                return 507, f"{exc}\n".encode(), text
            return 200, b"{}", "application/json"
    return 404, b"not found\n", text
