"""TLS on the control plane (issue 10, item 5): a cluster CA pinned by its hash on first
contact, a controller that serves only HTTPS, agents that serve HTTPS with certificates the
controller signs, and an agent that refuses a controller it was not told to trust."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ironpod import tls
from ironpod.agent.logs import LogServer
from ironpod.agent.main import run_agent
from ironpod.agent.snapshots import SnapshotStore
from ironpod.client import IronpodClient
from ironpod.controller.auth import load_or_create_tokens
from ironpod.errors import ConfigError
from tests import test_snapshot_store as sss
from tests.conftest import clean_env, free_port

# -- the CA and its pin


def test_the_ca_is_made_once_and_its_hash_is_kubeadms(tmp_path: Path) -> None:
    first = tls.Authority.load_or_create(tmp_path / "tls")
    again = tls.Authority.load_or_create(tmp_path / "tls")
    assert tls.ca_hash(first.pem) == tls.ca_hash(again.pem)
    assert tls.ca_hash(first.pem).startswith("sha256:") and len(tls.ca_hash(first.pem)) == 71
    assert (tmp_path / "tls" / "ca.key").stat().st_mode & 0o077 == 0
    # openssl computes the same pin: the SubjectPublicKeyInfo's SHA-256 (kubeadm's)
    openssl = subprocess.run(
        "openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum",
        input=first.pem,
        shell=True,
        capture_output=True,
        check=False,
    )
    if openssl.returncode == 0 and openssl.stdout:
        assert tls.ca_hash(first.pem) == "sha256:" + openssl.stdout.split()[0].decode()


@pytest.mark.parametrize("bad", ["", "sha256:abc", "md5:" + "0" * 64, "sha256:" + "g" * 64])
def test_a_malformed_ca_hash_is_named(bad: str) -> None:
    with pytest.raises(ConfigError, match="CA hash"):
        tls.check_hash(bad)


def test_a_signed_agent_certificate_verifies_only_for_its_address(tmp_path: Path) -> None:
    ca = tls.Authority.load_or_create(tmp_path / "tls")
    key_pem, csr = tls.new_request(["10.1.2.3"])
    cert = ca.sign_request(csr, ["127.0.0.1"])  # the controller's choice of name wins
    (tmp_path / "a.pem").write_text(cert)
    tls.write_private(tmp_path / "a.key", key_pem)
    files = tls.TlsFiles(tmp_path / "a.pem", tmp_path / "a.key", tmp_path / "tls" / "ca.pem")
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    ctx = tls.server_context(files)

    def accept() -> None:
        with ctx.wrap_socket(server.accept()[0], server_side=True) as conn:
            conn.sendall(b"ok")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    client = tls.client_context(files.ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
    ):
        assert conn.recv(2) == b"ok"
    thread.join(timeout=10)
    server.close()
    with pytest.raises(ConfigError, match="certificate request"):
        ca.sign_request("not a csr", ["127.0.0.1"])


# -- agents replicate to each other over HTTPS


class TlsNode:
    """An agent's snapshot store behind an HTTPS server with a certificate of ``ca``."""

    def __init__(self, root: Path, ca: tls.Authority) -> None:
        files = ca.issue_files(root / "tls", "agent", ["127.0.0.1"])
        tokens = {sss.JOB: sss.TOKEN}
        self.store = SnapshotStore(root / "shm", budget_bytes=10**8, peer_tokens=tokens)
        self.store.tls_client = tls.client_context(files.ca)
        context = tls.server_context(files)
        self.http = LogServer("127.0.0.1", 0, root / "logs", sss.TOKEN, {}, context)
        self.http.serve_snapshots(self.store)
        self.http.start()
        self.store.start()
        self.url = self.http.url

    def close(self) -> None:
        self.store.close()
        self.http.close()


def test_agents_replicate_over_https_and_refuse_plain_http(tmp_path: Path) -> None:
    ca = tls.Authority.load_or_create(tmp_path / "ca")
    a, b = TlsNode(tmp_path / "a", ca), TlsNode(tmp_path / "b", ca)
    try:
        assert a.url.startswith("https://") and b.url.startswith("https://")
        sss.write_slot(a.store.area(sss.JOB), 0, 0, step=10)
        sss.write_slot(b.store.area(sss.JOB), 1, 0, step=10)
        sss.assign(a, 0, b)  # type: ignore[arg-type]
        sss.assign(b, 1, a)  # type: ignore[arg-type]
        sss.wait_until(
            lambda: (
                (10, "replica") in sss.held(b, 0)  # type: ignore[arg-type]
                and (10, "replica") in sss.held(a, 1)
            )  # type: ignore[arg-type]
        )
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on a TLS agent
            httpx.get(b.url.replace("https", "http") + "/healthz", timeout=5)
        with pytest.raises(httpx.HTTPError):  # nor a client that does not know the CA
            httpx.get(b.url + "/healthz", timeout=5)
    finally:
        a.close()
        b.close()


# -- a whole cluster: controller, agents, CLI

#: A worker reserves snapshot memory with its agent as ironpod.train does, over the agent's
#: https URL, verified with the CA file the agent gives its workers.
RESERVE_OVER_HTTPS = """
import json, os, ssl, urllib.request
body = {"job_id": os.environ["IRONPOD_JOB_ID"], "rank": 0, "slot_bytes": 10, "slots": 3}
request = urllib.request.Request(
    os.environ["IRONPOD_AGENT_URL"] + "/snapshots/reserve", data=json.dumps(body).encode(),
    method="POST", headers={"Authorization": "Bearer " + os.environ["IRONPOD_AGENT_TOKEN"]})
assert os.environ["IRONPOD_AGENT_URL"].startswith("https://")
context = ssl.create_default_context(cafile=os.environ["IRONPOD_AGENT_CA_FILE"])
print("reserved over https:", urllib.request.urlopen(request, context=context).status)
"""


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS controller (its CA made at first start) as a process: (url, state dir)."""
    state = tmp_path / "controller"
    port = free_port()
    log = (tmp_path / "controller.log").open("wb")
    argv = [sys.executable, "-m", "ironpod.cli", "controller", "--tls", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*argv, "--port", str(port), "--state-dir", str(state)],
        env=clean_env(),
        stdout=log,
        stderr=log,
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not (state / "tls" / "server.pem").exists() or not _answers(url, state):
            assert proc.poll() is None, (tmp_path / "controller.log").read_text()
            assert time.monotonic() < deadline, "controller did not start"
            time.sleep(0.2)
        yield url, state
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _answers(url: str, state: Path) -> bool:
    try:
        httpx.get(url + "/healthz", verify=tls.client_context(state / "tls" / "ca.pem"), timeout=2)
    except (httpx.HTTPError, ssl.SSLError, OSError):
        return False
    return True


def test_a_cluster_runs_over_tls_end_to_end(controller: tuple[str, Path], tmp_path: Path) -> None:
    url, state = controller
    tokens = load_or_create_tokens(state)
    pin = tls.ca_hash((state / "tls" / "ca.pem").read_bytes())
    assert f"--ca-hash {pin}" in (tmp_path / "controller.log").read_text()  # the join line
    with pytest.raises(httpx.HTTPError):  # no plain HTTP, and not trusted without the CA
        httpx.get(url.replace("https", "http") + "/healthz", timeout=5)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/healthz", timeout=5)
    # a launch's nodes know the token, not the pin: the CA comes signed with it
    assert tls.fetch_ca_signed(url, tokens.join) == (state / "tls" / "ca.pem").read_bytes()
    with pytest.raises(ConfigError, match="did not sign its CA with this node's join token"):
        tls.fetch_ca_signed(url, "another-token")
    stop = threading.Event()
    agent = threading.Thread(
        target=run_agent,
        args=(url, tokens.join),
        kwargs={
            "name": "n0",
            "workdir": str(tmp_path / "n0"),
            "shm_dir": str(tmp_path / "shm"),
            "stop_event": stop,
            "ca_hash": pin,
        },
        daemon=True,
    )
    agent.start()
    try:
        with IronpodClient(url, tokens.admin, ca_file=state / "tls" / "ca.pem") as api:
            deadline = time.monotonic() + 60
            while not any(n["state"] == "ready" for n in api.nodes()):
                assert time.monotonic() < deadline, "the agent did not join over TLS"
                time.sleep(0.2)
            api.submit(
                {
                    "name": "hello",
                    "nodes": 1,
                    "command": [sys.executable, "-c", RESERVE_OVER_HTTPS],
                }
            )
            deadline = time.monotonic() + 60
            while api.job("hello")["state"] not in ("succeeded", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            assert api.job("hello")["state"] == "succeeded"
            # the controller reads the rank's log from the agent over HTTPS
            assert "reserved over https: 200" in api.logs("hello", rank=0)[0]
        # the agent pinned the CA and keeps its certificate for the next start
        assert (tmp_path / "n0" / "tls" / "controller-ca.pem").read_bytes() == (
            state / "tls" / "ca.pem"
        ).read_bytes()
        assert (tmp_path / "n0" / "tls" / "agent.key").stat().st_mode & 0o077 == 0
    finally:
        stop.set()
        agent.join(timeout=30)


def test_an_agent_refuses_a_controller_with_another_ca(
    controller: tuple[str, Path], tmp_path: Path
) -> None:
    url, state = controller
    tokens = load_or_create_tokens(state)
    other = tls.Authority.load_or_create(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="refusing to join"):
        run_agent(
            url,
            tokens.join,
            name="n1",
            workdir=str(tmp_path / "n1"),
            shm_dir=str(tmp_path / "shm1"),
            ca_hash=tls.ca_hash(other.pem),
        )
    # nor will a CA file that did not sign the controller's certificate do
    with pytest.raises(ConfigError, match="certificate"):
        run_agent(
            url,
            tokens.join,
            name="n2",
            workdir=str(tmp_path / "n2"),
            shm_dir=str(tmp_path / "shm2"),
            ca_file=str(tmp_path / "elsewhere" / "ca.pem"),
        )
    with IronpodClient(url, tokens.admin, ca_file=state / "tls" / "ca.pem") as api:
        assert api.nodes() == []
    assert json.loads((state / "tokens.json").read_text())["join"] == tokens.join
