"""Several real hosts: agents in network namespaces, a controller on the bridge, a cut link.

Two of three hosts run a 2-node DDP job of the GPT recipe (gloo over the hosts' own eth0);
then the job runs again and one host's link is cut mid-run (``ip link set ... down``): the
controller loses the node, restarts the job on the third host, and the final loss equals the
uninterrupted run's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
    url = f"http://{hosts.gateway}:{port}"
    try:
        tokens = _wait_for(lambda: _read_json(root / "controller" / "tokens.json"), 30)
        client = IronpodClient(url, tokens["admin"])
        _wait_for(lambda: _ok(client.healthz), 30)
        for i in range(3):
            hosts.popen(
                i,
                [sys.executable, "-m", "ironpod.agent", "--join", url, "--token",
                 tokens["join"], "--name", f"host{i}", "--workdir", str(root / f"host{i}"),
                 "--address", hosts.address(i), "--heartbeat-interval", "0.5"],
                env=env, stdout=_log(root / f"agent{i}.log"), stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_for(lambda: len([n for n in client.nodes() if n["state"] == "ready"]) == 3, 60)
        yield {"client": client, "hosts": hosts, "root": root}
    finally:
        hosts.destroy()
        controller.send_signal(signal.SIGTERM)
        try:
            controller.wait(timeout=15)
        except subprocess.TimeoutExpired:
            controller.kill()


def _log(path: Path) -> Any:
    """A log file the child process writes to for its whole life (closed when it exits)."""
    return open(path, "wb")


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


def _spec(name: str, root: Path) -> dict[str, Any]:
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
        "restart": {"max_restarts": 3, "node_failures_to_quarantine": 1, "hang_timeout_s": 60},
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


def test_cut_link_moves_the_job_to_the_third_host(cluster: dict[str, Any]) -> None:
    client: IronpodClient = cluster["client"]
    hosts: netns.Hosts = cluster["hosts"]
    root: Path = cluster["root"]

    client.submit(_spec("reference", root))
    reference = _wait_done(client, "reference")
    assert reference["state"] == "succeeded", reference["reason"]
    expected = _final_loss(client, "reference")

    client.submit(_spec("cut", root))
    job = _wait_for(
        lambda: (j := client.job("cut"))["attempts"] and (j["last_step"] or 0) >= 8 and j, 180
    )
    first = job["attempts"][0]
    victim = first["node_ids"][1]
    names = {n["id"]: n["name"] for n in client.nodes()}
    hosts.link(int(names[victim].removeprefix("host")), up=False)
    cut_at = time.time()

    done = _wait_done(client, "cut")
    assert done["state"] == "succeeded", done["reason"]
    attempts = done["attempts"]
    assert len(attempts) == 2
    assert attempts[0]["end_cause"].startswith(f"node lost: {names[victim]}")
    assert victim not in attempts[1]["node_ids"]
    assert _final_loss(client, "cut") == expected
    lost = [e for e in client.events(job="cut") if e["kind"] == "fault_detected"]
    assert lost and lost[0]["data"]["detected_unix"] - cut_at < 10
