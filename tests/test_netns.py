"""Several real hosts: agents in network namespaces, a controller on the bridge, real faults.

Two of three hosts run a 2-node DDP job of the GPT recipe (gloo over the hosts' own eth0) once
without faults, for the reference loss. Then the job runs again under each fault, injected
inside the hosts the way hardware and kernels do it:

- a host's link is cut (``ip link set ... down``): the node is lost, the job moves to the
  third host;
- every process of a host is SIGKILLed (its agent and the workers: the machine died);
- one worker is SIGSTOPped (a hung rank: alive, silent).

Each time the job succeeds and its final loss equals the reference's. Between faults the host
is repaired (link up, a new agent) and returned to service with ``undrain``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironpod import tls
from ironpod.client import IronpodClient
from ironpod.train.beacon import parse_progress_line
from tests import netns
from tests.conftest import clean_env, free_port

pytestmark = pytest.mark.slow
REASON = netns.skip_reason()
STEPS = 30


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    if REASON:
        pytest.skip(REASON)
    netns.remove_stale()
    root = tmp_path_factory.mktemp("netns")
    hosts = netns.Hosts(3).create()
    env = clean_env()
    port = free_port()
    controller = subprocess.Popen(
        [sys.executable, "-m", "ironpod.cli", "controller", "--host", hosts.gateway,
         "--port", str(port), "--state-dir", str(root / "controller"),
         "--node-lost-after", "3", "--heartbeat-interval", "0.5"],
        env=env, stdout=_log(root / "controller.log"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    # Off loopback the controller serves TLS: the hosts join as a real cluster's would, by
    # the CA's hash (the join line the controller prints).
    url = f"https://{hosts.gateway}:{port}"
    ca = root / "controller" / "tls" / "ca.pem"
    try:
        tokens = _wait_for(lambda: _read_json(root / "controller" / "tokens.json"), 30)
        _wait_for(ca.exists, 30)
        pin = tls.ca_hash(ca.read_bytes())
        client = IronpodClient(url, tokens["admin"], ca_file=ca)
        _wait_for(lambda: _ok(client.healthz), 30)

        def start_agent(i: int) -> None:
            _start_agent(hosts, i, url, tokens["join"], pin, root, env)

        for i in range(3):
            start_agent(i)
        _wait_for(lambda: len([n for n in client.nodes() if n["state"] == "ready"]) == 3, 60)
        yield {"client": client, "hosts": hosts, "root": root, "start_agent": start_agent}
    finally:
        hosts.destroy()
        controller.send_signal(signal.SIGTERM)
        try:
            controller.wait(timeout=15)
        except subprocess.TimeoutExpired:
            controller.kill()


def _start_agent(
    hosts: netns.Hosts, i: int, url: str, token: str, pin: str, root: Path, env: dict[str, str]
) -> None:
    hosts.popen(
        i,
        [sys.executable, "-m", "ironpod.agent", "--join", url, "--token", token, "--ca-hash", pin,
         "--name", f"host{i}", "--workdir", str(root / f"host{i}"),
         "--address", hosts.address(i), "--heartbeat-interval", "0.5",
         "--health-level", "none"],
        env=env, stdout=_log(root / f"agent{i}.log", append=True), stderr=subprocess.STDOUT,
    )  # fmt: skip


def _log(path: Path, append: bool = False) -> Any:
    """A log file the child process writes to for its whole life (closed when it exits)."""
    return open(path, "ab" if append else "wb")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _ok(call: Any) -> bool:
    try:
        call()
        return True
    except Exception:
        return False


def _wait_for(condition: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"condition not met in {timeout_s} s")


def _spec(name: str, root: Path, hang_timeout_s: float = 60) -> dict[str, Any]:
    sets = [
        f"train.steps={STEPS}", "train.global_batch=8", "train.warmup=4", "train.num_threads=1",
        "train.eval_every=1000", "data.seq_len=64", "data.max_bytes=400000",
        "model.n_layers=2", "train.parallel=ddp", "checkpoint.every=3",
        f"checkpoint.dir={root / name / 'ckpt'}",
    ]  # fmt: skip
    command = [sys.executable, "-m", "recipes.gpt.train", "--config", "tiny"]
    for item in sets:
        command += ["--set", item]
    return {
        "apiVersion": "ironpod/v1",
        "name": name,
        "nodes": 2,
        "command": command,
        "workdir": str(Path(__file__).resolve().parent.parent),
        "env": {"GLOO_SOCKET_IFNAME": "eth0", "IRONPOD_CACHE_DIR": str(root / "cache")},
        "restart": {
            "max_restarts": 3,
            "node_failures_to_quarantine": 1,
            "hang_timeout_s": hang_timeout_s,
        },
    }


def _final_loss(client: IronpodClient, name: str) -> float:
    text, _ = client.logs(name, rank=0)
    losses = [parse_progress_line(line) for line in text.splitlines()]
    steps = {int(f["step"]): float(f["loss"]) for f in losses if f and "loss" in f}
    assert max(steps) == STEPS, text[-2000:]
    return steps[STEPS]


def _wait_done(client: IronpodClient, name: str, timeout_s: float = 240) -> dict[str, Any]:
    job = _wait_for(
        lambda: (j := client.job(name))["state"] in ("succeeded", "failed", "cancelled") and j,
        timeout_s,
    )
    return dict(job)


@pytest.fixture(scope="module")
def reference_loss(cluster: dict[str, Any]) -> float:
    client: IronpodClient = cluster["client"]
    client.submit(_spec("reference", cluster["root"]))
    reference = _wait_done(client, "reference")
    assert reference["state"] == "succeeded", reference["reason"]
    return _final_loss(client, "reference")


def _start_and_pick_victim(cluster: dict[str, Any], name: str, **spec: Any) -> tuple[int, str]:
    """Submit ``name``, wait until it trained 8 steps; the host index and node id of its rank 1."""
    client: IronpodClient = cluster["client"]
    client.submit(_spec(name, cluster["root"], **spec))
    job = _wait_for(
        lambda: (j := client.job(name))["attempts"] and (j["last_step"] or 0) >= 8 and j, 180
    )
    victim = job["attempts"][0]["node_ids"][1]
    names = {n["id"]: n["name"] for n in client.nodes()}
    return int(names[victim].removeprefix("host")), victim


def _repair(cluster: dict[str, Any], host: int) -> None:
    """Return a host to service: all three nodes ready again, as after a technician's visit."""
    client: IronpodClient = cluster["client"]
    client.undrain(f"host{host}")
    _wait_for(lambda: len([n for n in client.nodes() if n["state"] == "ready"]) == 3, 60)


def _check_recovered(
    cluster: dict[str, Any],
    name: str,
    victim: str,
    cause: str,
    expected: float,
    moved: bool | None,
) -> list[Any]:
    """The job succeeded on a second attempt, which avoided the victim's host if ``moved``
    (None: exactly when the fault blamed it), with the reference's final loss; returns its
    fault events."""
    client: IronpodClient = cluster["client"]
    done = _wait_done(client, name)
    assert done["state"] == "succeeded", done["reason"]
    attempts = done["attempts"]
    assert len(attempts) == 2, attempts
    assert attempts[0]["end_cause"].startswith(cause), attempts[0]["end_cause"]
    faults = [e for e in client.events(job=name) if e["kind"] == "fault_detected"]
    if moved is None:
        victim_name = {n["id"]: n["name"] for n in client.nodes()}[victim]
        moved = any(victim_name in e["data"]["nodes"] for e in faults)
    assert (victim not in attempts[1]["node_ids"]) == moved, (attempts, faults)
    assert _final_loss(client, name) == expected
    return faults


def _report(fault: str, event: dict[str, Any], injected_unix: float) -> None:
    """One line per fault for ``pytest -s``: how long detection and the decision took."""
    data = event["data"]
    print(
        f"\n[netns] {fault}: detected {data['detected_unix'] - injected_unix:.2f} s,"
        f" decided {data['decided_unix'] - injected_unix:.2f} s after injection ({event['cause']})"
    )


def test_cut_link_moves_the_job_to_the_third_host(
    cluster: dict[str, Any], reference_loss: float
) -> None:
    hosts: netns.Hosts = cluster["hosts"]
    host, victim = _start_and_pick_victim(cluster, "cut")
    hosts.link(host, up=False)
    cut_at = time.time()
    lost = _check_recovered(
        cluster, "cut", victim, f"node lost: host{host}", reference_loss, moved=True
    )
    assert lost and lost[0]["data"]["detected_unix"] - cut_at < 10
    _report("link cut", lost[0], cut_at)
    hosts.link(host, up=True)
    _repair(cluster, host)


def test_killed_host_moves_the_job_to_the_third_host(
    cluster: dict[str, Any], reference_loss: float
) -> None:
    """SIGKILL every process of one host: its agent and its workers die together."""
    hosts: netns.Hosts = cluster["hosts"]
    host, victim = _start_and_pick_victim(cluster, "killed")
    killed = hosts.kill_all(host)
    killed_at = time.time()
    assert len(killed) >= 2  # the agent and at least its worker
    # The survivor's collective fails at once (a crash), or the controller declares the node
    # lost first: either way the dead host is blamed, quarantined, and the job moves.
    lost = _check_recovered(cluster, "killed", victim, "", reference_loss, moved=True)
    assert lost and lost[0]["data"]["detected_unix"] - killed_at < 10
    _report("host killed", lost[0], killed_at)
    cluster["start_agent"](host)
    _repair(cluster, host)


def test_stopped_worker_is_detected_as_a_hang(
    cluster: dict[str, Any], reference_loss: float
) -> None:
    """SIGSTOP one worker: it stays alive and silent, its peer blocks in the all-reduce. If
    both ranks stopped at the same step no node is to blame and the job restarts in place; if
    the stopped rank was caught a step behind, its node is blamed (quarantined at the first
    failure here) and the job moves to the third host."""
    client: IronpodClient = cluster["client"]
    hosts: netns.Hosts = cluster["hosts"]
    host, victim = _start_and_pick_victim(cluster, "stopped", hang_timeout_s=5)
    pid = next(int(p) for p in hosts.worker_pids(host))
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.time()
    hangs = _check_recovered(cluster, "stopped", victim, "hang", reference_loss, moved=None)
    assert hangs and hangs[0]["data"]["fault"] == "hang"
    assert hangs[0]["data"]["detected_unix"] - stopped_at < 5 + 10
    _report("worker stopped", hangs[0], stopped_at)
    log, _ = client.logs("stopped", rank=1, attempt=0)
    assert "hang detected: no progress for" in log


def test_two_host_launch_serves_tls_and_nodes_trust_it_by_the_shared_token(
    tmp_path: Path,
) -> None:
    """``ironpod launch`` on two hosts that share a secret but no file system (Slurm without
    a shared job directory): node rank 0's embedded controller serves TLS on every address;
    node rank 1 accepts its CA only signed with the token, and its agent joins over https."""
    if REASON:
        pytest.skip(REASON)
    netns.remove_stale()
    hosts = netns.Hosts(2).create()
    port = free_port()
    env = clean_env(IRONPOD_PRESET_TOKEN="a-secret-both-nodes-share", GLOO_SOCKET_IFNAME="eth0")
    script = Path(__file__).resolve().parent / "scripts" / "launch_worker.py"
    try:
        procs = []
        for rank in (1, 0):
            argv = [
                sys.executable, "-m", "ironpod.cli", "launch", "--nnodes", "2",
                "--nproc-per-node", "1", "--node-rank", str(rank),
                f"--rdzv-endpoint={hosts.address(0)}:{port}", "--max-restarts", "2",
                "--job-dir", str(tmp_path / f"host{rank}"), str(script),
            ]  # fmt: skip
            out = _log(tmp_path / f"launch{rank}.log")
            procs.append(hosts.popen(rank, argv, env=env, stdout=out, stderr=subprocess.STDOUT))
        for proc in procs:
            proc.wait(timeout=240)
        logs = {r: (tmp_path / f"launch{r}.log").read_text(errors="replace") for r in (0, 1)}
        assert [p.returncode for p in procs] == [0, 0], logs
        assert all("job succeeded" in text for text in logs.values()), logs
        assert "world 2 sum 3.0 attempt 1" in logs[1]  # the crash of attempt 0, then TLS still
        follower = tmp_path / "host1"
        assert len(list((follower / "agents").glob("*-ca.pem"))) == 1  # fetched and checked
        controller_log = (tmp_path / "host0" / "logs" / "controller.log").read_text()
        assert "TLS; agents join with --ca-hash" in controller_log, controller_log[-2000:]
        for host in ("host0", "host1"):  # each agent serves https with a cluster certificate
            text = "".join(p.read_text() for p in (tmp_path / host / "logs").glob("agent-*.log"))
            assert "logs at https://" in text, text[-2000:]
    finally:
        hosts.destroy()
