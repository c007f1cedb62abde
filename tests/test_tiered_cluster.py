"""Tiered checkpoints end to end on a 4-node local cluster: where each recovery restores from.

The GPT recipe snapshots every step into its node's memory (the agent replicates each snapshot
to the other node of the job) and writes a durable checkpoint every 10 steps. Each fault must
restore from the fastest tier that still has the newest step, and the job's final weights must
be bitwise equal to a fault-free run's:

- a worker crash: from its own node's memory;
- a node killed with its shared memory: the lost rank from the peer's copy;
- both nodes of the job killed with their memory: from the durable tier;
- a corrupted memory copy: it fails its checksum and the peer's copy is used.
"""

from __future__ import annotations

import re
import shutil
import signal
import stat
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import torch

from ironpod import snapshot as snap
from ironpod.client import IronpodClient, JobView, is_terminal
from ironpod.cluster import local
from ironpod.errors import IronpodError
from tests import recovery_util as ru

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 180.0
DURABLE_EVERY = 10
FAULT_STEP = 14


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ru.prepare_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with ru.local_cluster(tmp_path_factory.mktemp("home"), 4) as where:
        yield where


@pytest.fixture(scope="module")
def api(home: Path) -> Iterator[IronpodClient]:
    with local.require_cluster(home).admin_client() as client:
        yield client


def spec(name: str, root: Path, cache: Path) -> dict[str, Any]:
    # No test here is about hangs: after its last step a rank closes its checkpointer and saves
    # the final weights, which on a loaded machine took longer than the 4 s hang timeout.
    out = ru.job_spec(name, root / "ckpt", cache, hang_timeout_s=60.0)
    out["command"] += [
        *("--set", "checkpoint.memory_every=1", "--set", f"checkpoint.every={DURABLE_EVERY}"),
        *("--final-weights", str(root / "final.pt")),
    ]
    return out


def run(api: IronpodClient, job_spec: dict[str, Any], fault: Any = None) -> JobView:
    api.submit(job_spec)
    name = job_spec["name"]
    try:
        if fault is not None:
            fault(name)
        return ru.wait_terminal(api, name, JOB_TIMEOUT_S)
    finally:
        with suppress(IronpodError):
            if not is_terminal(api.job(name)):
                api.cancel(name)


def weights(path: Path) -> dict[str, torch.Tensor]:
    loaded: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return loaded


def assert_same_weights(got: Path, expected: Path) -> None:
    a, b = weights(got), weights(expected)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def restored_from(home: Path, api: IronpodClient, view: JobView, rank: int) -> str:
    """The restore line of ``rank`` in the last attempt (memory: local/replica, or durable)."""
    attempt = (view.get("attempts") or [])[-1]
    text = ru.rank_log(home, api, attempt, rank).read_text(errors="replace")
    found = re.findall(r"checkpoint: (restored .*)", text)
    assert found, text[-3000:]
    return str(found[-1])


def settled(area: Path, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
    """Wait until the copies in ``area`` stop changing (replication and pins in flight land)."""
    deadline = time.monotonic() + timeout_s
    seen, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = sorted((str(r.path), r.step) for r in snap.list_snapshots(area))
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.1)
    raise AssertionError(f"{area}: copies still changing after {timeout_s} s")


def agent_area(home: Path, node: str, job_id: int) -> Path:
    shm = local.require_cluster(home).agents[node].shm_dir
    return snap.job_area(Path(shm), job_id)


@pytest.fixture(scope="module")
def reference(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    root = tmp_path_factory.mktemp("reference")
    view = run(api, spec("reference", root, cache_dir))
    assert view["state"] == "succeeded", view["reason"]
    return root / "final.pt"


def check(view: JobView, restarts: int) -> None:
    assert view["state"] == "succeeded", f"{view['state']}: {view['reason']}"
    causes = [a["end_cause"] for a in view.get("attempts") or []]
    assert view["restarts"] == restarts, causes


def test_crash_restores_from_own_node_memory(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: Path
) -> None:
    def crash(name: str) -> None:
        ru.wait_for_step(home, api, name, rank=1, step=FAULT_STEP)
        ru.signal_worker(ru.wait_pid(api, name, 1), signal.SIGKILL)

    view = run(api, spec("crash", tmp_path, cache_dir), crash)
    check(view, restarts=1)
    plan = view["attempts"][1]["restore"]
    assert plan is not None and plan["step"] > DURABLE_EVERY, plan
    for rank in (0, 1):
        line = restored_from(home, api, view, rank)
        assert line.startswith(f"restored step {plan['step']} from memory (local)"), line
    assert_same_weights(tmp_path / "final.pt", reference)


def exposed(root: Path) -> list[str]:
    """What another user of the machine could read under ``root``: files readable by group or
    others through directories all searchable by them (``root`` itself included)."""
    found: list[str] = []

    def walk(path: Path, reachable: bool) -> None:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            return
        if path.is_dir():
            for child in path.iterdir():
                walk(child, reachable and bool(mode & 0o011))
        elif reachable and mode & 0o044:
            found.append(f"{path} ({oct(mode)})")

    walk(root, True)
    return found


def test_state_logs_snapshots_and_checkpoints_are_private(
    home: Path, api: IronpodClient, reference: Path
) -> None:
    """Issue 10, item 4: the database (every job's env), tokens, rank logs, memory snapshots
    and durable checkpoints were 0644 in 0755 directories."""
    view = api.job("reference")
    shm = [Path(a.shm_dir) for a in local.require_cluster(home).agents.values()]
    roots = [home / "controller", *(home / "nodes").iterdir(), *shm, reference.parent / "ckpt"]
    assert ru.rank_log(home, api, view["attempts"][0], 0).exists()
    assert list((reference.parent / "ckpt").iterdir()), "the job wrote durable checkpoints"
    for root in roots:
        assert stat.S_IMODE(root.stat().st_mode) == 0o700, root
        assert exposed(root) == [], root


def test_node_loss_restores_the_lost_rank_from_its_peer(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: Path
) -> None:
    lost: list[str] = []

    def kill_node(name: str) -> None:
        first = ru.wait_for_step(home, api, name, rank=1, step=FAULT_STEP)
        victim = ru.attempt_nodes(api, first)[1]
        local.kill_agent(home, victim)
        shutil.rmtree(agent_area(home, victim, api.job(name)["id"]))  # its memory is gone too
        lost.append(victim)

    try:
        view = run(api, spec("node-lost", tmp_path, cache_dir), kill_node)
    finally:
        for node in lost:
            local.restart_agent(home, node)
    check(view, restarts=1)
    again = view["attempts"][1]
    assert lost[0] not in ru.attempt_nodes(api, again)
    plan = again["restore"]
    assert plan is not None, view["attempts"]
    assert restored_from(home, api, view, 0).startswith(f"restored step {plan['step']} from")
    assert restored_from(home, api, view, 1).startswith(
        f"restored step {plan['step']} from memory (replica)"
    )
    log = ru.rank_log(home, api, again, 1).read_text(errors="replace")
    assert f"fetched step {plan['step']} from" in log, log[-3000:]
    assert_same_weights(tmp_path / "final.pt", reference)


def test_losing_every_copy_restores_from_durable(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: Path
) -> None:
    lost: list[str] = []

    def kill_both(name: str) -> None:
        first = ru.wait_for_step(home, api, name, rank=1, step=FAULT_STEP)
        for victim in ru.attempt_nodes(api, first):
            local.kill_agent(home, victim)
            shutil.rmtree(agent_area(home, victim, api.job(name)["id"]))
            lost.append(victim)

    try:
        view = run(api, spec("all-lost", tmp_path, cache_dir), kill_both)
    finally:
        for node in lost:
            local.restart_agent(home, node)
    check(view, restarts=1)
    assert view["attempts"][1]["restore"] is None
    planned = [e for e in api.events(job="all-lost") if e["kind"] == "restore_planned"]
    assert planned and planned[-1]["data"]["tier"] == "durable", planned
    line = restored_from(home, api, view, 0)  # rank 0 reports a durable restore for all
    assert re.match(r"restored step-\d+ from ", line), line
    assert_same_weights(tmp_path / "final.pt", reference)


def test_corrupted_memory_copy_falls_through_to_the_peer(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: Path
) -> None:
    def corrupt_then_crash(name: str) -> None:
        first = ru.wait_for_step(home, api, name, rank=1, step=FAULT_STEP)
        pids = [ru.wait_pid(api, name, rank) for rank in (0, 1)]
        # Both ranks stopped: no new snapshot, so no peer announces a step and no agent pins
        # a fresh copy of rank 1 out of its ring after we damaged the ring (a pin made from
        # a slot read just before the damage is a good copy; CI once restored from one).
        for pid in pids:
            ru.stop_worker(pid)
        area = agent_area(home, ru.attempt_nodes(api, first)[1], api.job(name)["id"])
        settled(area)
        for ref in snap.list_snapshots(area, rank=1):
            data = ref.path / snap.DATA
            # The agent may prune an old pinned copy meanwhile: one copy fewer to damage.
            with suppress(FileNotFoundError):
                raw = bytearray(data.read_bytes())
                raw[len(raw) // 2] ^= 0xFF
                data.write_bytes(bytes(raw))
        ru.signal_worker(pids[1], signal.SIGKILL)

    view = run(api, spec("corrupt", tmp_path, cache_dir), corrupt_then_crash)
    check(view, restarts=1)
    again = view["attempts"][1]
    plan = again["restore"]
    assert plan is not None
    log = ru.rank_log(home, api, again, 1).read_text(errors="replace")
    assert f"fetched step {plan['step']} from" in log, log[-3000:]
    line = restored_from(home, api, view, 1)
    assert line.startswith(f"restored step {plan['step']} from memory (replica)"), line
    assert_same_weights(tmp_path / "final.pt", reference)
