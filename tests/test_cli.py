"""The ``ironpod`` command against a real local cluster: controller and agents as processes.

Each command runs as a user would run it (``python -m ironpod.cli ...`` in a subprocess), with
``IRONPOD_HOME`` in a temporary directory; the cluster is always taken down, even when a test
fails, and the last test checks that ``down`` leaves no process and no shared-memory area.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ironpod.client import AuthError, IronpodClient, NotFoundError, UnreachableError
from tests.conftest import clean_env, free_port

pytestmark = pytest.mark.slow

Cli = Callable[..., subprocess.CompletedProcess[str]]


def make_cli(home: Path) -> Cli:
    home.mkdir(parents=True, exist_ok=True)
    env = clean_env(IRONPOD_HOME=str(home))

    def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ironpod.cli", *args],
            env=env,
            cwd=home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    return cli


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def up(home: Path, nodes: int) -> Cli:
    cli = make_cli(home)
    started = cli(
        "up", "--nodes", str(nodes), "--heartbeat-interval", "0.5", "--timeout", "45", timeout=60
    )
    assert started.returncode == 0, started.stdout + started.stderr
    return cli


def force_down(home: Path) -> None:
    """The fixture's safety net: `down`, and SIGKILL whatever it left (a failing test's debris)."""
    info_path = home / "cluster.json"
    pids: list[int] = []
    if info_path.exists():
        info = json.loads(info_path.read_text())
        pids = [info["controller"]["pid"], *(a["pid"] for a in info["agents"].values())]
    make_cli(home)("down", timeout=60)
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if "ironpod.cli" in " ".join(proc.cmdline()):
                proc.kill()
        except psutil.Error:
            pass


def admin_client(home: Path) -> IronpodClient:
    info = json.loads((home / "cluster.json").read_text())
    tokens = json.loads((home / "controller" / "tokens.json").read_text())
    return IronpodClient(info["url"], tokens["admin"])


def poll(what: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Cli]]:
    home = tmp_path_factory.mktemp("home")
    try:
        yield home, up(home, 2)
    finally:
        force_down(home)


def test_nodes_shows_the_two_nodes_ready(cluster: tuple[Path, Cli]) -> None:
    _, cli = cluster
    table = cli("nodes")
    assert table.returncode == 0, table.stderr
    assert "node-0" in table.stdout and "node-1" in table.stdout
    listed = json.loads(cli("nodes", "--json").stdout)
    assert sorted((n["name"], n["state"]) for n in listed) == [
        ("node-0", "ready"),
        ("node-1", "ready"),
    ]
    assert all(n["labels"]["shm_dir"].endswith(n["name"]) for n in listed)
    status = cli("status")
    assert status.returncode == 0 and "2 ready" in status.stdout, status.stdout


def test_up_refuses_a_second_cluster_in_the_same_home(cluster: tuple[Path, Cli]) -> None:
    _, cli = cluster
    again = cli("up", "--nodes", "1")
    assert again.returncode == 1
    assert "already running" in one_line_error(again)


def test_run_wait_logs_describe(cluster: tuple[Path, Cli]) -> None:
    _, cli = cluster
    ran = cli("run", "--nodes", "1", "--name", "hello", "--", "python", "-c", "print('hi')")
    assert ran.returncode == 0, ran.stderr
    assert "submitted job hello" in ran.stdout
    waited = cli("wait", "hello", "--timeout", "30")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "succeeded" in waited.stdout
    logs = cli("logs", "hello")
    assert logs.returncode == 0, logs.stderr
    assert "hi" in logs.stdout.splitlines()
    described = cli("describe", "hello")
    assert described.returncode == 0, described.stderr
    for part in ("succeeded", "attempts", "goodput", "job_submitted", "node-"):
        assert part in described.stdout, described.stdout
    jobs = cli("jobs")
    assert "hello" in jobs.stdout and "ETTR" in jobs.stdout


def test_no_token_is_on_a_command_line_or_in_a_workers_environment(
    cluster: tuple[Path, Cli],
) -> None:
    """Any local user reads /proc/PID/cmdline; a job's workers read their agent's too."""
    home, cli = cluster
    tokens = json.loads((home / "controller" / "tokens.json").read_text())
    secrets = {tokens["admin"], tokens["join"]}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        assert not any(s in line for s in secrets), (proc.info["pid"], line)
    info = json.loads((home / "cluster.json").read_text())
    for agent in info["agents"].values():  # nor in an agent's initial environment
        environ = Path(f"/proc/{agent['pid']}/environ").read_bytes().decode(errors="replace")
        assert not any(s in environ for s in secrets)
    probe = (
        "import os\n"
        "print(open(f'/proc/{os.getppid()}/cmdline').read().replace(chr(0), ' '))\n"
        "print(sorted(os.environ.items()))\n"
        "print('probe done')"
    )
    ran = cli("run", "--name", "peek", "--", "python", "-c", probe)
    assert ran.returncode == 0, ran.stderr
    assert cli("wait", "peek", "--timeout", "30").returncode == 0
    seen = cli("logs", "peek").stdout
    assert "probe done" in seen and "ironpod" in seen, seen  # it did read its agent's argv
    assert not any(s in seen for s in secrets), seen


def test_a_failed_job_makes_wait_exit_1(cluster: tuple[Path, Cli]) -> None:
    _, cli = cluster
    # Exit code 2 is in the default no_restart_exit_codes: the job fails without a restart.
    ran = cli("run", "--name", "boom", "--", "python", "-c", "raise SystemExit(2)")
    assert ran.returncode == 0, ran.stderr
    waited = cli("wait", "boom", "--timeout", "30")
    assert waited.returncode == 1, waited.stdout + waited.stderr
    assert "failed" in waited.stderr


def test_chaos_kill_rank_is_recovered_by_a_new_attempt(cluster: tuple[Path, Cli]) -> None:
    home, cli = cluster
    loop = "import time\nfor i in range(300):\n    print(i, flush=True); time.sleep(0.1)"
    assert cli("run", "--name", "victim", "--", "python", "-c", loop).returncode == 0
    with admin_client(home) as api:

        def pid_of_rank0() -> int | None:
            attempts = api.job("victim").get("attempts") or []
            status = attempts[-1]["ranks"].get("0", {}) if attempts else {}
            return status.get("pid") if status.get("state") == "running" else None

        pid = poll(pid_of_rank0)
        killed = cli("chaos", "kill-rank", "victim", "0")
        assert killed.returncode == 0, killed.stderr
        assert f"pid {pid}" in killed.stdout
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        poll(lambda: len(api.job("victim").get("attempts") or []) >= 2)
        recovered = api.job("victim")
        assert recovered["restarts"] == 1
        assert "killed by signal 9" in recovered["attempts"][0]["end_cause"]
        kinds = [e["kind"] for e in api.all_events(job="victim")]
        assert "fault_detected" in kinds
    assert cli("cancel", "victim").returncode == 0
    assert cli("wait", "victim", "--timeout", "30").returncode == 1


def test_submit_of_a_bad_spec_names_the_field(cluster: tuple[Path, Cli]) -> None:
    home, cli = cluster
    bad = home / "bad.yaml"
    bad.write_text("name: x\ncommand: [python]\nrestart:\n  max_restarts: many\n")
    proc = cli("submit", str(bad))
    assert proc.returncode == 2
    assert "restart.max_restarts" in one_line_error(proc)
    bad.write_text("name: x\ncommand: [python]\nnodez: 2\n")
    assert "unknown field 'nodez'" in one_line_error(cli("submit", str(bad)))


def test_describe_of_an_unknown_job_is_a_clear_error(cluster: tuple[Path, Cli]) -> None:
    _, cli = cluster
    proc = cli("describe", "no-such-job")
    assert proc.returncode == 2
    assert one_line_error(proc) == "error: no job 'no-such-job'"
    assert cli("wait", "no-such-job").returncode == 2


def test_the_api_needs_a_token(cluster: tuple[Path, Cli]) -> None:
    home, cli = cluster
    url = json.loads((home / "cluster.json").read_text())["url"]
    with pytest.raises(AuthError) as missing, IronpodClient(url, None) as anonymous:
        anonymous.nodes()
    assert missing.value.status == 401
    assert "401 missing bearer token" in str(missing.value)
    assert "--token" in str(missing.value)
    with pytest.raises(AuthError, match="403"), IronpodClient(url, "wrong") as wrong:
        wrong.jobs()
    refused = cli("--token", "wrong", "jobs")
    assert refused.returncode == 2
    assert "refused the token" in one_line_error(refused)
    with pytest.raises(NotFoundError, match="no job"), admin_client(home) as api:
        api.job("no-such-job")


def test_an_unreachable_controller_says_where_it_looked() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UnreachableError) as caught, IronpodClient(url, "t") as api:
        api.nodes()
    assert f"cannot reach the controller at {url}" in str(caught.value)
    assert "ironpod up" in str(caught.value)


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    cli = make_cli(tmp_path)
    for args in (["--bogus"], ["run"], ["run", "--nodes", "0", "--", "true"]):
        proc = cli(*args)
        assert proc.returncode == 2, args
        one_line_error(proc)
    assert cli("version").returncode == 0


def test_down_stops_every_process_and_removes_shared_memory(tmp_path: Path) -> None:
    home = tmp_path / "home"
    try:
        cli = up(home, 1)
        info = json.loads((home / "cluster.json").read_text())
        ran = cli("run", "--name", "sleeper", "--", "python", "-c", "import time; time.sleep(60)")
        assert ran.returncode == 0, ran.stderr
        with admin_client(home) as api:

            def worker_pid() -> int | None:
                attempts = api.job("sleeper").get("attempts") or []
                pid = attempts[-1]["ranks"].get("0", {}).get("pid") if attempts else None
                return pid if isinstance(pid, int) else None

            worker = poll(worker_pid)
        pids = [info["controller"]["pid"], info["agents"]["node-0"]["pid"], worker]
        assert all(psutil.pid_exists(p) for p in pids)
        stopped = cli("down")
        assert stopped.returncode == 0, stopped.stderr
        for pid in pids:
            gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
            assert gone, f"pid {pid} survived `ironpod down`"
        assert not (home / "cluster.json").exists()
        assert not Path(info["shm_root"]).exists()
        assert "no local cluster" in cli("down").stdout
    finally:
        force_down(home)


def test_kill_helpers_refuse_strangers(cluster: tuple[Path, Cli]) -> None:
    """Chaos never signals a process that is not a worker of the named node's agent."""
    from ironpod.cluster import local

    home, _ = cluster
    assert not local.is_worker_of(home, "node-0", os.getpid())
    with pytest.raises(local.ClusterError, match="no node 'node-9'"):
        local.signal_node(home, "node-9", signal.SIGCONT)
