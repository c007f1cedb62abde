"""The step hook (ironpod.agent.stephook) and the hang rule that uses it.

Hook tests start real interpreters with the hook's directory on PYTHONPATH, as the agent does,
and read the beacons from a real Unix datagram socket in a temp dir. The rule tests drive
:class:`RankProgress` with made-up times. The end-to-end test runs an unmodified DDP script
(tests/scripts/plain_train.py) on a real local cluster and SIGSTOPs one of its ranks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ironpod import env
from ironpod.agent import stephook
from ironpod.agent.progress import LONGEST_WINDOW_S, ProgressUpdate, RankProgress
from ironpod.agent.stephook import sitecustomize as hook
from ironpod.agent.supervisor import _MONITOR_INTERVAL_S as MONITOR_INTERVAL_S
from ironpod.agent.worker import worker_env
from ironpod.cluster import local
from ironpod.spec import RestartPolicy
from ironpod.wire import Assignment
from tests import recovery_util as ru
from tests.conftest import SCRIPTS, clean_env, python

PLAIN = SCRIPTS / "plain_train.py"


class Receiver:
    """The agent's end, minimal: a bound datagram socket read on a thread into ``beacons``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.beacons: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beacons.append(json.loads(self._sock.recv(65536)))
            except TimeoutError:
                continue

    def close(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        return self.beacons


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(tmp_path / "beacon.sock")
    yield r
    r.close()


def run_hooked(
    code: str | None = None,
    *,
    script: list[str] | None = None,
    socket_path: str | None = None,
    hook_on: bool = True,
    extra_path: str | None = None,
    **extra_env: str,
) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter with the hook on PYTHONPATH (first), as the agent starts workers."""
    environ = clean_env(**extra_env)
    environ["PYTHONPATH"] = stephook.pythonpath(
        os.pathsep.join(p for p in (extra_path, environ.get("PYTHONPATH")) if p)
    )
    if socket_path:
        environ[env.BEACON_SOCKET] = socket_path
    if not hook_on:
        environ[env.STEP_HOOK] = "0"
    argv = [sys.executable, *(script or ["-c", textwrap.dedent(code or "")])]
    return subprocess.run(
        argv, env=environ, capture_output=True, text=True, timeout=120, check=False
    )


# -- the hook at start-up


def test_names_agree_with_ironpod_env_and_the_files_ship() -> None:
    """The hook repeats ironpod.env's names (it must not import ironpod): they must agree."""
    assert (hook.SWITCH_ENV, hook.SOCKET_ENV, hook.RANK_ENV) == (
        env.STEP_HOOK,
        env.BEACON_SOCKET,
        env.RANK,
    )
    assert env.STEP_HOOK in env.ALL
    # A package (setuptools' find includes ironpod*): sitecustomize.py ships in the wheel.
    assert (Path(stephook.DIRECTORY) / "__init__.py").is_file()
    assert (Path(stephook.DIRECTORY) / "sitecustomize.py").is_file()


def test_worker_env_puts_the_hook_first_unless_turned_off() -> None:
    a = Assignment(
        attempt_id=1,
        job_id=1,
        job_name="j",
        command=["python"],
        env={"PYTHONPATH": "/mine"},
        ranks=[0],
        world_size=1,
        node_rank=0,
        nnodes=1,
        master_addr="127.0.0.1",
        master_port=1,
    )
    out = worker_env(a, rank=0, local_rank=0, beacon_socket="/s", base={})
    assert out["PYTHONPATH"] == os.pathsep.join([stephook.DIRECTORY, "/mine"])
    off = a.model_copy(update={"env": {"PYTHONPATH": "/mine", env.STEP_HOOK: "0"}})
    assert worker_env(off, rank=0, local_rank=0, beacon_socket="/s", base={})["PYTHONPATH"] == (
        "/mine"
    )
    assert worker_env(a, rank=0, local_rank=0, beacon_socket="/s", base={env.STEP_HOOK: "off"})[
        "PYTHONPATH"
    ] == ("/mine")
    assert stephook.pythonpath(stephook.pythonpath("")) == stephook.DIRECTORY  # only once


def test_start_up_does_not_import_torch(receiver: Receiver) -> None:
    code = """
        import sys
        print("torch" in sys.modules, sorted(type(f).__name__ for f in sys.meta_path))
    """
    on = run_hooked(code, socket_path=receiver.path)
    assert on.returncode == 0, on.stderr
    assert on.stdout.startswith("False [") and "_Finder" in on.stdout
    off = run_hooked(code, socket_path=receiver.path, hook_on=False)
    assert off.stdout.startswith("False [") and "_Finder" not in off.stdout
    nowhere = run_hooked(code)  # no agent socket: nothing to arm
    assert "_Finder" not in nowhere.stdout
    assert on.stderr == off.stderr == nowhere.stderr == ""


def test_a_users_own_sitecustomize_still_runs(tmp_path: Path, receiver: Receiver) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sitecustomize.py").write_text("import builtins\nbuiltins.USER_SITE_RAN = True\n")
    code = """
        import sys, builtins
        site = getattr(sys.modules.get("sitecustomize"), "__file__", None)
        print(getattr(builtins, "USER_SITE_RAN", False), site)
        print(any(type(f).__name__ == "_Finder" for f in sys.meta_path))
    """
    done = run_hooked(code, socket_path=receiver.path, extra_path=str(mine))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"True {mine / 'sitecustomize.py'}", "True"]
    (mine / "sitecustomize.py").write_text("raise RuntimeError('user site is broken')\n")
    broken = run_hooked(code, socket_path=receiver.path, extra_path=str(mine))
    # As without the hook: site.py reports the user's error, the script runs; the hook is armed.
    assert broken.returncode == 0 and "user site is broken" in broken.stderr
    assert broken.stdout.splitlines() == ["False None", "True"]


# -- the beacons


STEPS_CODE = """
    import os, sys, time
    import torch

    model = torch.nn.Linear(2, 2)
    a = torch.optim.SGD(model.parameters(), lr=0.1)
    b = torch.optim.Adam(model.parameters())

    def iteration(*optimizers):
        time.sleep(0.06)  # longer than the hook's MIN_SEND_S: every step gets its beacon
        for opt in optimizers:
            model(torch.ones(2)).sum().backward()
            opt.step()
            opt.zero_grad()

    for _ in range(3):
        iteration(a)  # steps 1-3
    for _ in range(4):
        iteration(a, b)  # two optimizers an iteration (a GAN, a param-group split): steps 4-7
    child = os.fork()
    if child == 0:  # a forked child (a DataLoader worker) inherits the hook: it must not send
        iteration(a)
        iteration(a)
        os._exit(0)
    os.waitpid(child, 0)
    iteration(a)  # step 8
    import ironpod.train  # the script reports its own steps from now on: the hook stands down
    iteration(a)
    print(os.getpid(), flush=True)
"""


def test_one_beacon_per_step_only_from_the_rank_process(receiver: Receiver) -> None:
    done = run_hooked(STEPS_CODE, socket_path=receiver.path, RANK="3")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    pid = int(done.stdout.split()[-1])
    beacons = [b for b in receiver.close() if not b.get("busy")]
    assert [b["step"] for b in beacons] == list(range(1, 9))
    assert {(b["rank"], b["pid"], b["src"]) for b in beacons} == {(3, pid, "hook")}
    assert all(b["step_s"] >= 0 and b["t"] > 0 for b in beacons)
    assert beacons[0]["step_s"] == 0.0  # no previous step to time


def test_a_busy_process_pulses(receiver: Receiver) -> None:
    """Computing without stepping (an evaluation, a checkpoint, the teardown) sends busy
    pulses, also once ironpod.train is imported (it only silences the step beacons)."""
    code = """
        import time, torch
        import ironpod.train
        torch.optim.SGD([torch.zeros(1, requires_grad=True)])
        end = time.process_time() + 1.0
        while time.process_time() < end:
            pass
    """
    assert run_hooked(code, socket_path=receiver.path, RANK="2").returncode == 0
    beacons = receiver.close()
    assert len(beacons) >= 2 and all(b["busy"] == 1 and b["rank"] == 2 for b in beacons)
    assert beacons[-1].get("exiting") == 1  # atexit: the teardown that follows is no hang


def test_turned_off_sends_nothing(receiver: Receiver) -> None:
    """IRONPOD_STEP_HOOK=0 (without an agent socket it does not even arm: the start-up test)."""
    assert run_hooked(STEPS_CODE, socket_path=receiver.path, hook_on=False).returncode == 0
    assert receiver.close() == []


def test_never_blocks_and_never_raises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hook, "LIBRARY", "not.imported")  # this process has ironpod.train
    lonely = hook.StepBeacon(str(tmp_path / "nobody.sock"), rank=0)
    lonely(object(), (), {})
    assert (lonely.steps, lonely.sent, lonely.dropped) == (1, 0, 1)

    path = tmp_path / "slow.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))  # bound, never read: the queue fills and the rest are dropped
    optimizer = object()
    monkeypatch.setattr(hook, "MIN_SEND_S", 0.0)
    beacon = hook.StepBeacon(str(path), rank=0)
    for _ in range(200):
        beacon(optimizer, (), {})
    assert beacon.steps == 200 and beacon.sent > 0 and beacon.dropped > 0
    monkeypatch.setattr(hook, "MIN_SEND_S", 3600.0)  # at most one beacon an hour
    sparse = hook.StepBeacon(str(path), rank=0)
    for _ in range(5):
        sparse(optimizer, (), {})
    assert (sparse.steps, sparse.sent + sparse.dropped) == (5, 1)

    def broken(key: int) -> None:
        raise ValueError("boom")

    beacon._on_step = broken  # type: ignore[method-assign]
    beacon(optimizer, (), {})
    beacon(optimizer, (), {})
    assert beacon.off
    err = capsys.readouterr().err
    assert err.count("[ironpod] step beacon off: the step hook failed (ValueError('boom'))") == 1
    server.close()

    class NoHooks:
        def register_optimizer_step_post_hook(self, fn: object) -> None:
            raise AttributeError("no such hook in this torch")

    hook._armed.clear()
    os.environ[env.BEACON_SOCKET] = str(path)
    try:
        assert hook.arm(NoHooks()) is None
    finally:
        del os.environ[env.BEACON_SOCKET]
        hook._armed.clear()
    assert "cannot register the optimizer step hook" in capsys.readouterr().err


def test_losses_and_parameters_are_bitwise_the_same(receiver: Receiver) -> None:
    argv = [str(PLAIN), "--steps", "30", "--workers", "2", "--step-sleep", "0.06"]
    with_hook = run_hooked(script=argv, socket_path=receiver.path)
    without = run_hooked(script=argv, socket_path=receiver.path, hook_on=False)
    assert with_hook.returncode == 0 and without.returncode == 0, with_hook.stderr
    assert with_hook.stdout == without.stdout
    assert with_hook.stdout.count("\nloss ") == 29 and "params " in with_hook.stdout
    beacons = [b for b in receiver.close() if not b.get("busy")]
    assert [b["step"] for b in beacons] == list(range(1, 31))  # DataLoader workers send none


# -- the hang rule with the hook's beacons


def steady(p: RankProgress, start: float, steps: int, gap: float, hook: bool = True) -> float:
    t = start
    for i in range(steps):
        t += gap
        p.record(ProgressUpdate(t=t, step=i + 1, metrics={}, hook=hook))
    return t


def policy_assignment(**restart: Any) -> Assignment:
    policy = RestartPolicy(**restart)
    return Assignment(
        attempt_id=1,
        job_id=1,
        job_name="j",
        command=["x"],
        ranks=[0],
        world_size=1,
        node_rank=0,
        nnodes=1,
        master_addr="127.0.0.1",
        master_port=1,
        hang_timeout_s=policy.hang_timeout_s,
        hang_floor_s=policy.hang_floor_s,
        hang_factor=policy.hang_factor,
        startup_timeout_s=policy.startup_timeout_s,
    )


def test_a_steady_script_is_caught_within_3_medians_plus_1_s() -> None:
    a = policy_assignment()  # the spec's defaults: factor 3, floor 1 s
    assert (a.hang_factor, a.hang_floor_s) == (3.0, 1.0)
    # The monitor checks every 0.05 s, which adds to the timeout: from 17 ms steps up, the
    # report still comes within the target (below, up to 50 ms after it).
    for gap in (0.02, 0.1, 0.5, 2.0, 30.0):
        p = RankProgress()
        last = steady(p, 1000.0, 50, gap)
        assert p.overdue(a, 0.0, now=last + 0.9 * min(3 * gap, 1.0)) is None
        late = p.overdue(a, 0.0, now=last + max(3 * gap, 1.0) + 1e-6)
        assert late is not None, gap
        assert late.timeout == pytest.approx(max(3 * gap, 1.0))
        assert late.timeout + MONITOR_INTERVAL_S <= 3 * gap + 1.0 + 1e-9
    p = RankProgress()
    last = steady(p, 1000.0, 50, 0.1)
    assert p.overdue(a, 0.0, now=last + 0.99) is None
    late = p.overdue(a, 0.0, now=last + 1.2)
    assert late is not None and late.rule == "hang_floor_s 1 s (over 3 x median 0.10 s)"
    p = RankProgress()
    last = steady(p, 1000.0, 50, 2.0)
    late = p.overdue(a, 0.0, now=last + 6.5)
    assert late is not None and late.rule == "3 x median step 2.00 s"


def test_a_recurring_long_step_is_learnt_not_a_hang_again() -> None:
    """A checkpoint every 50 steps takes 5 s: the first is longer than anything seen (a hang
    by the rule; real scripts set hang_floor_s for that), the next ones are expected."""
    a = policy_assignment()
    p = RankProgress()
    t = steady(p, 1000.0, 50, 0.1)
    late = p.overdue(a, 0.0, now=t + 4.0)
    assert late is not None and late.timeout == 1.0
    t += 5.0
    p.record(ProgressUpdate(t=t, step=51, metrics={}, hook=True))  # the checkpoint step ends
    t = steady(p, t, 49, 0.1)
    t0 = t
    for step in range(100, 106):  # steps 100-105 with p.last_step advancing
        assert p.overdue(a, 0.0, now=t + 5.5) is None  # 2 x the 5 s seen
        t += 0.1
        p.record(ProgressUpdate(t=t, step=step + 1, metrics={}, hook=True))
    late = p.overdue(a, 0.0, now=t + 10.5)
    assert late is not None and late.rule == "2 x longest recent step 5.00 s"
    # An hour later the checkpoint is forgotten (unless it recurred meanwhile).
    assert p.overdue(a, 0.0, now=t0 + LONGEST_WINDOW_S + 2.0) is not None
    assert p.longest_gap_s(t0 + LONGEST_WINDOW_S + 2.0) is None


def test_warm_up_steps_do_not_stretch_the_timeout() -> None:
    a = policy_assignment()
    p = RankProgress()
    t = 1000.0
    for step, gap in enumerate((8.0, 3.0, 2.0), start=1):  # compilation, a cold cache
        t += gap
        p.record(ProgressUpdate(t=t, step=step, metrics={}, hook=True))
    t = steady(p, t, 30, 0.1)
    assert p.longest_gap_s(t) == pytest.approx(0.1)
    assert p.overdue(a, 0.0, now=t + 1.1) is not None


def test_a_busy_rank_gets_the_longer_timeout() -> None:
    """After its last step a script saves, evaluates, tears down: with CPU in use that is no
    hang until max(10 x median, 30 s); with the CPU idle (stopped, waiting) it is one at once."""
    a = policy_assignment()
    p = RankProgress()
    t = steady(p, 1000.0, 50, 0.1)
    for i in range(1, 21):
        p.record(ProgressUpdate(t=t + 0.25 * i, step=50, metrics={}, hook=True, busy=True))
    assert (p.last_step, p.last_progress_unix, len(p.gaps)) == (50, t, 20)
    assert p.overdue(a, 0.0, now=t + 5.1) is None
    idle = p.overdue(a, 0.0, now=t + 6.2)  # the pulses stopped 1.2 s ago
    assert idle is not None and idle.rule.startswith("hang_floor_s")
    p.record(ProgressUpdate(t=t + 29.9, step=50, metrics={}, hook=True, busy=True))
    assert p.overdue(a, 0.0, now=t + 29.95) is None
    late = p.overdue(a, 0.0, now=t + 30.5)
    assert late is not None
    assert late.rule == "busy (CPU in use on this node): max(10 x median step 0.10 s, 30 s)"
    fixed = a.model_copy(update={"hang_timeout_s": 2.0})  # a fixed timeout stays fixed
    assert p.overdue(fixed, 0.0, now=t + 29.95) is not None
    p = RankProgress()
    t = steady(p, 1000.0, 50, 0.1)
    p.record(ProgressUpdate(t=t + 0.5, step=50, metrics={}, hook=True, busy=True, exiting=True))
    assert p.overdue(a, 0.0, now=t + 20.0) is None  # exiting: busy from then on, CPU or not
    late = p.overdue(a, 0.0, now=t + 30.5)
    assert late is not None and late.rule.startswith("exiting: max(10 x median")


def test_a_rank_waiting_for_a_busy_peer_on_its_node_is_no_hang() -> None:
    """Rank 1 waits idle in a collective while rank 0 (same node) evaluates or is slowed by a
    busy machine: the peer's CPU counts; when every rank here is idle, the fast rule holds."""
    a = policy_assignment()
    waiting, peer = RankProgress(), RankProgress()
    t = steady(waiting, 1000.0, 50, 0.1)
    peer.record(ProgressUpdate(t=t + 4.5, step=50, metrics={}, hook=True, busy=True))
    assert waiting.overdue(a, 0.0, now=t + 5.0, peers=peer) is None
    late = waiting.overdue(a, 0.0, now=t + 5.0, peers=RankProgress())  # both idle: stopped
    assert late is not None and late.rule.startswith("hang_floor_s")
    assert waiting.overdue(a, 0.0, now=t + 6.0, peers=peer) is not None  # pulses 1.5 s old
    peer.record(ProgressUpdate(t=t + 6.0, step=50, metrics={}, hook=True, busy=True, exiting=True))
    assert waiting.overdue(a, 0.0, now=t + 20.0, peers=peer) is None  # the peer tears down


def test_the_scripts_own_step_numbers_win_over_the_hooks() -> None:
    p = RankProgress()
    assert p.record(ProgressUpdate(t=10.0, step=1, metrics={}, hook=True)) is True
    p.record(ProgressUpdate(t=10.5, step=2, metrics={}, hook=True))
    assert p.last_step == 2 and not p.explicit
    # ironpod.train reports step 101 (a resumed run): no duration from hook step 2 to it.
    p.record(ProgressUpdate(t=11.0, step=101, metrics={"loss": 1.0}))
    assert (p.last_step, p.explicit, list(p.step_seconds)) == (101, True, [0.5])
    p.record(ProgressUpdate(t=11.2, step=3, metrics={}, hook=True))  # liveness only
    assert (p.last_step, p.last_progress_unix, len(p.gaps)) == (101, 11.2, 2)
    p.record(ProgressUpdate(t=11.5, step=102, metrics={"loss": 0.9}))
    assert p.last_step == 102 and list(p.step_seconds) == [0.5, 0.5]


# -- end to end


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_unmodified_ddp_script_hang_is_caught_in_seconds(tmp_path: Path) -> None:
    """2 nodes x 1 rank run plain_train.py (its own gloo timeout: 60 s); rank 1 is SIGSTOPped
    mid-run. The agents see the hook's beacons stop: the hang is reported within 3 x the
    median step + 1 s (+ the monitor period, the heartbeat and a loaded machine's slack: under
    10 s asserted, where the script's own timeout would take 60 s), and the job restarts and
    finishes."""
    steps, step_s = 150, 0.1
    spec = {
        "name": "plain-hang",
        "nodes": 2,
        "nproc_per_node": 1,
        "command": [sys.executable, str(PLAIN), "--steps", str(steps), "--step-sleep", str(step_s)],
        "workdir": str(ru.ROOT),
        "env": {"OMP_NUM_THREADS": "1"},
        "restart": {
            "max_restarts": 2,
            "startup_timeout_s": 120.0,
            "node_failures_to_quarantine": 1000,
        },
    }
    with (
        ru.local_cluster(tmp_path / "home", 2) as home,
        local.require_cluster(home).admin_client() as api,
    ):
        api.submit(spec)
        poll_step = 40

        def reached() -> Any:
            found = ru.attempts(api, "plain-hang")
            ranks = found[-1]["ranks"] if found else {}
            info = ranks.get("1", {})
            return found[-1] if (info.get("last_step") or 0) >= poll_step else None

        first = ru.poll(reached, 120, "rank 1 to reach step 40 (the hook's count)")
        median = first["ranks"]["1"].get("median_step_s")
        pid = ru.wait_pid(api, "plain-hang", rank=1)
        injected = ru.signal_worker(pid, signal.SIGSTOP)
        view = ru.wait_terminal(api, "plain-hang", 180)
        causes = [a["end_cause"] for a in view["attempts"]]
        assert view["state"] == "succeeded", (view["reason"], causes)
        assert view["restarts"] == 1, causes
        failed = view["attempts"][0]
        assert failed["end_cause"].startswith("hang: rank "), failed["end_cause"]
        timings = ru.recovery_timings(api, "plain-hang", injected)
        events = api.all_events(job="plain-hang")
        last_log = ru.rank_log(home, api, view["attempts"][-1], 0).read_text()
    detected = timings["detected_s"]
    bound = 3 * (median or step_s) + 1.0
    print(
        f"\n[step hook] median step {median} s: hang detected {detected:.2f} s after SIGSTOP "
        f"(3 x median + 1 s = {bound:.2f} s), first new step {timings['first_new_step_s']:.2f} s"
        f"\n[step hook] cause: {failed['end_cause']}"
    )
    assert detected < 10.0, timings
    assert "timeout" in failed["end_cause"] and "median" in failed["end_cause"], failed
    assert f"loss {steps} " in last_log and "params " in last_log
    first_steps = [e for e in events if e["kind"] == "first_step"]
    assert first_steps and all(e["data"].get("step") is None for e in first_steps)


# -- the benchmark


@pytest.mark.timeout(240)
def test_beacon_bench_quick() -> None:
    """bench/beacon.py still runs end to end. A smoke test: its timings are never asserted."""
    proc = python([str(ru.ROOT / "bench" / "beacon.py"), "--quick"], timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    for title in ("Beacon cost per call", "Step hook in a training loop", "Interpreter start-up"):
        assert title in out, proc.stdout
    assert "hook cost:" in out and "python -c 'import torch'" in out
