"""End to end: a 2-node GPT job on a real local cluster survives each kind of fault, exactly.

One local cluster (a controller and 3 agents as processes, IRONPOD_HOME in a temporary
directory) runs the GPT recipe as a 2-node DDP job over gloo, one rank per node; the third node
is the spare capacity a lost node's work moves to. A fault-free run of the same job gives the
reference. For every fault the job must succeed and rank 0's last loss must equal the
reference's exactly (``==`` on floats): the recipe is deterministic and resumes bitwise from its
checkpoints, so anything else means a resume restored the wrong state.

Faults are real: SIGKILL and SIGSTOP of a worker, SIGKILL of an agent and its workers, an agent
restarted, the controller killed with SIGKILL and started again on its state directory. For each
recovery the stage timings (detect, decide, restart, first new step) are printed (``pytest -s``)
and appended as JSON lines to ``$IRONPOD_RECOVERY_REPORT`` when set.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from ironpod.client import IronpodClient, JobView, is_terminal
from ironpod.cluster import local
from ironpod.errors import IronpodError
from tests import recovery_util as ru

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenized corpus prepared once, so no job's ranks race to build it."""
    return ru.prepare_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """3 nodes, heartbeats every 0.5 s, a node lost after 3 s without one."""
    with ru.local_cluster(tmp_path_factory.mktemp("home"), 3) as where:
        yield where


@pytest.fixture(scope="module")
def api(home: Path) -> Iterator[IronpodClient]:
    with local.require_cluster(home).admin_client() as client:
        yield client


@contextmanager
def job(api: IronpodClient, spec: dict[str, Any]) -> Iterator[str]:
    """Submit; on the way out cancel it if it still runs, so the next test finds free nodes."""
    api.submit(spec)
    try:
        yield spec["name"]
    finally:
        with suppress(IronpodError):  # a dead controller: the test's own error tells more
            if not is_terminal(api.job(spec["name"])):
                api.cancel(spec["name"])


def spec_for(name: str, tmp_path: Path, cache_dir: Path) -> dict[str, Any]:
    return ru.job_spec(name, tmp_path / "ckpt", cache_dir)


@pytest.fixture(scope="module")
def reference(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, float]:
    """step -> rank 0's loss of the fault-free job on the same cluster."""
    spec = spec_for("reference", tmp_path_factory.mktemp("reference"), cache_dir)
    with job(api, spec) as name:
        view = ru.wait_terminal(api, name, JOB_TIMEOUT_S)
    assert view["state"] == "succeeded", view["reason"]
    assert view["restarts"] == 0
    found = ru.final_losses(home, api, name)
    assert sorted(found) == list(range(1, ru.STEPS + 1))
    return found


def assert_recovered(
    home: Path,
    api: IronpodClient,
    name: str,
    view: JobView,
    reference: dict[int, float],
    *,
    restarts: int,
) -> None:
    """Succeeded after ``restarts`` restarts, and every step of the last attempt, the final one
    included, has exactly the reference's loss."""
    assert view["state"] == "succeeded", f"{view['state']}: {view['reason']}"
    attempts = view.get("attempts") or []
    causes = [a["end_cause"] for a in attempts]
    assert view["restarts"] == restarts, causes
    assert len(attempts) == restarts + 1, causes
    found = ru.final_losses(home, api, name)
    assert found, f"no progress lines in rank 0's log of the last attempt of {name}"
    assert max(found) == ru.STEPS
    assert found[ru.STEPS] == reference[ru.STEPS]
    assert {s: found[s] for s in found} == {s: reference[s] for s in found}
    goodput = api.job(name)["goodput"]
    assert goodput["restarts"] == restarts
    assert goodput["recomputed_steps"] >= 0


def test_worker_crash_restarts_in_place(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    with job(api, spec_for("crash", tmp_path, cache_dir)) as name:
        first = ru.wait_for_step(home, api, name, rank=1, step=ru.FAULT_STEP)
        injected = ru.signal_worker(ru.wait_pid(api, name, rank=1), signal.SIGKILL)
        view = ru.wait_terminal(api, name, JOB_TIMEOUT_S)
    assert_recovered(home, api, name, view, reference, restarts=1)
    failed, again = view["attempts"]
    assert failed["end_cause"].startswith("crash: rank 1"), failed["end_cause"]
    assert "killed by signal 9" in failed["end_cause"]
    assert again["node_ids"] == first["node_ids"]  # in place: the node itself is healthy
    ru.report("worker crash", ru.recovery_timings(api, name, injected))


def test_hang_is_detected_with_stacks_and_restarted(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    with job(api, spec_for("hang", tmp_path, cache_dir)) as name:
        first = ru.wait_for_step(home, api, name, rank=1, step=ru.FAULT_STEP)
        pid = ru.wait_pid(api, name, rank=1)
        injected = ru.signal_worker(pid, signal.SIGSTOP)
        view = ru.wait_terminal(api, name, JOB_TIMEOUT_S)
    assert_recovered(home, api, name, view, reference, restarts=1)
    failed, again = view["attempts"]
    assert failed["end_cause"].startswith("hang: rank "), failed["end_cause"]
    assert again["node_ids"] == first["node_ids"]
    stopped_log = ru.rank_log(home, api, failed, 1).read_text(errors="replace")
    assert "[ironpod agent] hang detected: no progress for" in stopped_log
    # py-spy's dump of the stopped process: its header, and a frame of the training loop.
    assert f"[ironpod agent] Process {pid}:" in stopped_log, stopped_log[-3000:]
    frame = r"\[ironpod agent\] +train \(\S*recipes/gpt/train\.py:\d+\)"
    assert re.search(frame, stopped_log), stopped_log[-3000:]
    ru.report("hang", ru.recovery_timings(api, name, injected))


def test_node_lost_moves_the_job_to_the_free_node(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    lost = ""
    try:
        with job(api, spec_for("node-lost", tmp_path, cache_dir)) as name:
            first = ru.wait_for_step(home, api, name, rank=1, step=ru.FAULT_STEP)
            lost = ru.attempt_nodes(api, first)[1]
            pid = ru.wait_pid(api, name, rank=1)
            injected = time.time()
            local.kill_agent(home, lost, (pid,))
            view = ru.wait_terminal(api, name, JOB_TIMEOUT_S)
        # The surviving rank's collective usually fails at once (a crash on the healthy node),
        # before the silent node is declared lost; either way the restart must avoid that node.
        assert_recovered(home, api, name, view, reference, restarts=1)
        failed, again = view["attempts"]
        assert lost not in ru.attempt_nodes(api, again)
        assert set(again["node_ids"]) != set(failed["node_ids"])
        declared = ru.event(api.all_events(node=lost), "node_lost")
        assert declared["time_unix"] > injected
        timings = ru.recovery_timings(api, name, injected)
        ru.report("node lost", timings, node_lost_s=declared["time_unix"] - injected)
    finally:
        if lost:  # the next tests need all three nodes again
            local.restart_agent(home, lost)


def test_agent_restart_fails_the_attempt_and_the_job_recovers(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    with job(api, spec_for("agent-restart", tmp_path, cache_dir)) as name:
        first = ru.wait_for_step(home, api, name, rank=1, step=ru.FAULT_STEP)
        node = ru.attempt_nodes(api, first)[1]
        injected = time.time()
        local.restart_agent(home, node)
        view = ru.wait_terminal(api, name, JOB_TIMEOUT_S)
    assert_recovered(home, api, name, view, reference, restarts=1)
    failed, again = view["attempts"]
    # A stopping agent stops its workers gracefully (SIGTERM): the recipe saves and exits as
    # preempted, on every rank, before the new agent has registered; had the new agent come
    # first, the controller would have failed the attempt for the agent restart itself. A
    # stopping agent no longer heartbeats: where its workers' save outlasts node_lost_after
    # (a loaded machine), the node is lost first; the attempt ends all the same.
    cause = failed["end_cause"]
    assert re.fullmatch(
        rf"rank [01] stopped on request|agent restarted on node {node}"
        rf"|node lost: {node} silent for [0-9.]+ s",
        cause,
    ), cause
    # The graceful stop saved the step it stopped at: nothing is computed twice.
    assert again["first_step"] == max(ru.losses(ru.rank_log(home, api, failed, 0))) + 1
    ru.report("agent restarted", ru.recovery_timings(api, name, injected))


def test_controller_restart_leaves_the_running_job_alone(
    home: Path, api: IronpodClient, cache_dir: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    info = local.require_cluster(home)
    with job(api, spec_for("controller-restart", tmp_path, cache_dir)) as name:
        first = ru.wait_for_step(home, api, name, rank=1, step=2)
        before = api.all_events(job=name)
        # Down for as long as the node-lost timeout (plus its own start): silence while no
        # controller could be reached is no sign of a dead node.
        killed, back = ru.restart_controller(home, down_s=info.node_lost_after_s)
        at_restart = max(ru.losses(ru.rank_log(home, api, first, 0)))
        assert at_restart < ru.STEPS, "the job ended before the controller was back: no test"

        def progress_seen() -> float | None:
            attempt = ru.attempts(api, name)[-1]
            return time.time() if (attempt["last_step"] or 0) > at_restart else None

        seen = ru.poll(progress_seen, 60, "progress reported to the new controller")
        view = ru.wait_terminal(api, name, JOB_TIMEOUT_S)
    assert_recovered(home, api, name, view, reference, restarts=0)
    assert view["attempts"][0]["id"] == first["id"]
    after = api.all_events(job=name)
    assert [(e["id"], e["kind"]) for e in before] == [
        (e["id"], e["kind"]) for e in after[: len(before)]
    ]
    assert not [e for e in after if e["kind"] == "fault_detected"]
    assert not [e for e in api.all_events(after=before[-1]["id"]) if e["kind"] == "node_lost"]
    timings = {"controller_down_s": back - killed, "progress_seen_s": seen - killed}
    ru.report("controller restart", timings, step_when_back=at_restart, attempts=1)


@pytest.mark.parametrize(
    ("command", "workdir", "said"),
    [
        (["ironpod-no-such-command"], None, "cannot start: 'ironpod-no-such-command' in "),
        ([sys.executable, "-c", "pass"], "/ironpod/no/such/dir", "cannot start: workdir "),
    ],
)
def test_a_command_that_cannot_start_fails_at_once_in_one_line(
    api: IronpodClient,
    cache_dir: Path,
    tmp_path: Path,
    command: list[str],
    workdir: str | None,
    said: str,
) -> None:
    """Exit 127 from the agent (a failed exec, a missing workdir): no restart, end_kind
    no_restart, and the reason names what cannot start."""
    spec = {**spec_for(f"cannot-start-{len(command)}", tmp_path, cache_dir), "command": command}
    if workdir is not None:
        spec["workdir"] = workdir
    with job(api, spec) as name:
        view = ru.wait_terminal(api, name, JOB_TIMEOUT_S)
    assert view["state"] == "failed" and view.get("end_kind") == "no_restart", view["reason"]
    assert view["reason"].startswith(said) and view["reason"].endswith("(exit 127)"), view
    assert "\n" not in view["reason"]
    assert len(view.get("attempts") or []) == 1
