"""Node health: the controller's policy (in process), and a real unhealthy node on a real cluster.

The policy tests drive the controller over its HTTP API with heartbeats that carry health rows.
The end-to-end test (slow, root only) gives one node of a local cluster a work directory on a
16 MiB tmpfs, fills it while that node runs a job, and expects: the disk check fails, the node
is quarantined, the job continues on the hot spare with no human action, and once the disk is
freed the node passes its recheck and returns to ``ready``. Timings are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironpod.client import IronpodClient
from ironpod.cluster import local
from ironpod.health import CheckResult, Status
from tests import recovery_util as ru
from tests.test_controller import Cluster, running


def row(status: Status, check: str = "system.disk_free", **extra: Any) -> dict[str, Any]:
    fields = {"value": 0.001, "threshold": 5.0, "unit": "GiB", "target": "/w", **extra}
    return CheckResult(check=check, status=status, message=f"{status}", **fields).model_dump(
        mode="json"
    )


def health_beat(c: Cluster, node_id: int, name: str, rows: list[dict[str, Any]], **kw: Any) -> Any:
    body = {
        "agent_instance": c.instances[name],
        "time_unix": time.time(),
        "workers": kw.get("workers", []),
        "health": rows,
    }
    reply = c.http.post(f"/api/v1/nodes/{node_id}/heartbeat", json=body, headers=c.as_node(node_id))
    assert reply.status_code == 200, reply.text
    return reply.json()


def node_events(c: Cluster, name: str) -> list[dict[str, Any]]:
    reply = c.http.get("/api/v1/events", params={"node": name}, headers=c.admin)
    return list(reply.json())


def test_fail_quarantines_and_restarts_the_job_on_the_spare(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'db'}", reserve_spares=1)
    a, b = c.register("a"), c.register("b")
    job = c.submit()
    c.controller.reconcile()
    attempt = c.job(job)["attempts"][0]
    assert attempt["node_ids"] == [a]  # b is the hot spare: kept free by normal scheduling
    reply = health_beat(c, a, "a", [row(Status.FAIL)], workers=[running(attempt["id"])])
    assert reply["assignment"] is None and reply["time_unix"] > 0
    node = c.nodes()["a"]
    assert node["state"] == "quarantined"
    assert "system.disk_free /w: 0.001 GiB (threshold 5 GiB)" in node["reason"]
    assert node["health"]["system.disk_free"][0]["status"] == "fail"
    fault = next(e for e in c.events(job) if e["kind"] == "fault_detected")
    assert fault["data"]["fault"] == "unhealthy" and fault["data"]["nodes"] == ["a"]
    c.heartbeat(b, "b")
    c.controller.reconcile()
    c.controller.reconcile()
    assert c.job(job)["attempts"][-1]["node_ids"] == [b]  # recovery may take the spare
    # The quarantined node is asked for the deep suite; a run with no fail brings it back.
    assert c.heartbeat(a, "a")["health_recheck"] is True
    assert c.heartbeat(b, "b")["health_recheck"] is False
    health_beat(c, a, "a", [row(Status.PASS, value=9.0), row(Status.SKIP, check="gpu.ecc")])
    assert c.nodes()["a"]["state"] == "ready"
    assert [e["kind"] for e in node_events(c, "a")].count("node_recovered") == 1


def test_repeat_offender_stays_out_until_undrain(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'db'}", health_repeat_limit=3)
    a = c.register("a")
    for _ in range(3):
        health_beat(c, a, "a", [row(Status.FAIL)])
        health_beat(c, a, "a", [row(Status.FAIL)])  # still failing: no new event
        health_beat(c, a, "a", [row(Status.PASS)])
    node = c.nodes()["a"]
    assert node["state"] == "quarantined" and "ironpod undrain" in node["reason"]
    kinds = [e["kind"] for e in node_events(c, "a")]
    assert kinds.count("node_unhealthy") == 3 and kinds.count("node_recovered") == 2
    c.http.post("/api/v1/nodes/a/undrain", headers=c.admin)
    assert c.nodes()["a"]["state"] == "ready"
    health_beat(c, a, "a", [row(Status.FAIL)])
    health_beat(c, a, "a", [row(Status.PASS)])
    assert c.nodes()["a"]["state"] == "ready"  # undrain forgave the earlier offences


def test_label_action_records_only(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'db'}", health_action="label")
    a = c.register("a")
    job = c.submit()
    c.controller.reconcile()
    attempt = c.job(job)["attempts"][0]
    reply = health_beat(c, a, "a", [row(Status.FAIL)], workers=[running(attempt["id"])])
    assert reply["assignment"] is not None
    assert c.nodes()["a"]["state"] == "busy"
    unhealthy = [e for e in node_events(c, "a") if e["kind"] == "node_unhealthy"]
    assert unhealthy[0]["data"]["action"] == "label"


def test_passing_run_does_not_release_a_node_quarantined_for_failures(tmp_path: Path) -> None:
    c = Cluster(tmp_path, f"sqlite:///{tmp_path / 'db'}")
    a = c.register("a")
    with c.controller.lock, c.controller.sessions.begin() as s:
        from ironpod.controller.db import Node
        from ironpod.states import NodeState

        node = s.get(Node, a)
        assert node is not None
        c.controller._set_node(s, node, NodeState.QUARANTINED, "3 failures within 600 s")
    health_beat(c, a, "a", [row(Status.PASS)])
    assert c.nodes()["a"]["state"] == "quarantined"


# -- end to end, on a real local cluster

STEPS = 100
#: Each rank of the job counts steps (0.1 s each) and keeps its count in a file every 5 steps:
#: a job that restarts where it stopped, with nothing of the checkpoint library in the way.
JOB = """
import json, os, sys, time
from ironpod.train.beacon import progress
path = os.path.join(sys.argv[1], f"rank-{os.environ['RANK']}.json")
step = json.load(open(path))["step"] if os.path.exists(path) else 0
while step < int(sys.argv[2]):
    time.sleep(0.1)
    step += 1
    progress(step)
    if step % 5 == 0:
        with open(path + ".tmp", "w") as f:
            json.dump({"step": step}, f)
        os.replace(path + ".tmp", path)
"""
TMPFS_BYTES = 16 << 20
FILL_BYTES = 10 << 20
#: The disk check fails below 8 MiB free (the default, 5 GiB, suits real nodes only). On 2 busy
#: cores a 1 MiB write can stall past 50 MB/s and a heartbeat reply can arrive a second late, so
#: the write and clock limits are loosened: this test is about the disk filling up.
HEALTH_ARGS = [
    *("--health-threshold", f"min_free_disk_gib={8 / 1024}"),
    *("--health-threshold", f"disk_write_test_bytes={1 << 20}"),
    *("--health-threshold", "min_write_mb_s=1"),
    *("--health-threshold", "max_clock_skew_s=10"),
]


@pytest.fixture
def tmpfs_home(tmp_path: Path) -> Iterator[Path]:
    """IRONPOD_HOME whose nodes' work directories are 16 MiB tmpfs mounts (root only).

    Every node gets one: which nodes the scheduler picks depends on the order they joined."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    home = tmp_path / "home"
    mounts: list[Path] = []
    try:
        for i in range(3):
            mount = home / "nodes" / f"node-{i}"
            mount.mkdir(parents=True)
            done = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
            mounts.append(mount)
        yield home
    finally:
        local.down(home)
        for mount in mounts:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_full_disk_moves_the_job_to_the_spare_and_the_node_returns(
    tmpfs_home: Path, tmp_path: Path
) -> None:
    home = tmpfs_home
    info = local.up(
        3,
        home,
        spares=1,
        heartbeat_interval_s=0.5,
        node_lost_after_s=3.0,
        timeout_s=90,
        health_level="light",
        health_interval_s=1.0,
        health_args=HEALTH_ARGS,
    )
    spec = {
        "name": "healthjob",
        "nodes": 2,
        "command": [sys.executable, "-c", JOB, str(tmp_path / "state"), str(STEPS)],
        "env": {"PYTHONPATH": str(ru.ROOT)},
        "restart": {"startup_timeout_s": 60.0, "hang_timeout_s": 10.0},
    }
    (tmp_path / "state").mkdir()
    with info.admin_client() as api:
        joined = api.nodes()
        assert {n["state"] for n in joined} == {"ready"}, [n["reason"] for n in joined]
        api.submit(spec)
        first = ru.poll(lambda: _running_attempt(api, 0, step=10), 60, "attempt 0 at step 10")
        healthy, bad = ru.attempt_nodes(api, first)
        (spare,) = {"node-0", "node-1", "node-2"} - {healthy, bad}  # kept free: --spares 1
        assert _state(api, spare) == "ready"

        injected = time.time()
        (home / "nodes" / bad / "fill").write_bytes(b"\0" * FILL_BYTES)
        ru.poll(lambda: _state(api, bad) == "quarantined", 30, f"{bad} quarantined")
        second = ru.poll(lambda: _running_attempt(api, 1, step=1), 60, "attempt 1 stepping")
        assert ru.attempt_nodes(api, second) == [healthy, spare]

        freed = time.time()
        (home / "nodes" / bad / "fill").unlink()
        ru.poll(lambda: _state(api, bad) == "ready", 30, f"{bad} back to ready")
        back = time.time()

        view = ru.wait_terminal(api, "healthjob", 90)
        assert view["state"] == "succeeded", view["reason"]
        node_events = api.all_events(node=bad)
        unhealthy = ru.event(node_events, "node_unhealthy")
        assert "system.disk_free" in unhealthy["cause"] and "threshold" in unhealthy["cause"]
        assert unhealthy["data"]["action"] == "quarantine"
        ru.event(node_events, "node_recovered")
        timings = ru.recovery_timings(api, "healthjob", injected)
        assert timings["cause"].startswith(f"node {bad} unhealthy: system.disk_free")
        ru.report(
            "disk_full",
            timings,
            quarantined_s=unhealthy["time_unix"] - injected,
            recovered_s=back - freed,
        )


def _state(api: IronpodClient, name: str) -> str:
    return next(n["state"] for n in api.nodes() if n["name"] == name)


def _running_attempt(api: IronpodClient, number: int, *, step: int) -> Any:
    found = ru.attempts(api, "healthjob")
    if len(found) <= number or found[number]["state"] not in {"starting", "running"}:
        return None
    last = found[number].get("last_step")
    return found[number] if last is not None and last >= step else None


# -- the agent's monitor


def test_monitor_learns_a_baseline_when_idle_and_skips_benchmarks_when_busy(
    tmp_path: Path,
) -> None:
    from ironpod.agent.health import HealthConfig, HealthMonitor
    from ironpod.health import Level

    busy = False
    monitor = HealthMonitor(
        HealthConfig(join_level=Level.LIGHT, interval_s=60.0),
        work_dir=tmp_path,
        shm_dir=None,
        expected_gpus=None,
        busy=lambda: busy,
    )
    try:
        monitor.set_controller_time(time.time())
        first = monitor.run_once(Level.LIGHT)
        assert monitor.take() == first and monitor.take() is None  # handed over once
        matmul = [r for r in first if r.check == "compute.matmul"]
        assert matmul and monitor.baselines == {matmul[0].details["baseline_key"]: matmul[0].value}
        skew = [r for r in first if r.check == "system.clock_skew"]
        assert skew[0].status == Status.PASS
        busy = True
        second = monitor.run_once(Level.LIGHT)
        assert not {r.check for r in second} & {"compute.matmul", "system.disk_write"}
    finally:
        monitor.close()


def test_monitor_runs_the_deep_suite_when_the_controller_asks(tmp_path: Path) -> None:
    from ironpod.agent.health import HealthConfig, HealthMonitor
    from ironpod.health import Level

    monitor = HealthMonitor(
        HealthConfig(
            join_level=Level.LIGHT,
            interval_s=0.2,
            skip=frozenset({"compute.matmul", "collective.allreduce", "compute.gpu_memory"}),
        ),
        work_dir=tmp_path,
        shm_dir=None,
        expected_gpus=None,
        busy=lambda: False,
    )
    levels: list[Level] = []
    original = monitor.run_once

    def spy(level: Level) -> list[CheckResult]:
        levels.append(level)
        return original(level)

    monitor.run_once = spy  # type: ignore[method-assign]
    try:
        monitor.start()
        assert monitor.first_done.wait(30)
        monitor.request(Level.DEEP)
        deadline = time.monotonic() + 30
        while Level.DEEP not in levels and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        monitor.close()
    assert levels[0] == Level.LIGHT and Level.DEEP in levels
    assert levels.count(Level.DEEP) == 1  # once per request, then light again
