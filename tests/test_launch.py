"""``ironpod launch`` as torchrun's drop-in: its flags, its worker environment, its exits.

The real launches run the controller, an agent and workers as processes; the parser, the
Slurm host list, the error file and the exit-code mapping are tested as functions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from ironpod.agent.supervisor import read_error_file
from ironpod.agent.worker import worker_env
from ironpod.cli.launch import build_parser, expand_nodelist, nproc_per_node, resolve
from ironpod.errors import EXIT_DO_NOT_REQUEUE, EXIT_PREEMPTED, ConfigError
from ironpod.launch import end_code
from ironpod.wire import Assignment
from tests.conftest import SCRIPTS, clean_env, free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _env(**extra: str) -> dict[str, str]:
    out = {
        k: v
        for k, v in clean_env().items()
        if not k.startswith(("PET_", "SLURM_", "WANDB_")) and k != "OMP_NUM_THREADS"
    }
    return {**out, **extra}


def _launch(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ironpod.cli", "launch", *args],
        env=_env(**(env or {})), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# -- the command line


def _torchrun_flags() -> list[tuple[str, str | None]]:
    """Every option of the installed torch's ``torchrun --help``, with a value if it takes one."""
    text = subprocess.run(
        [str(TORCHRUN), "--help"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    options = text.split("options:", 1)[1]
    flags: dict[str, str | None] = {}
    for line in options.splitlines():
        if not line.startswith("  -"):
            continue
        for part in line.strip().split("  ")[0].split(", "):
            name, _, value = part.partition(" ")
            if name in ("-h", "--help"):
                continue
            choices = re.match(r"\{([^,}]+)", value)
            flags[name] = choices.group(1) if choices else ("1" if value else None)
    return list(flags.items())


def test_every_torchrun_flag_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = _torchrun_flags()
    assert len(flags) > 40  # dash and underscore spellings of 30-odd options
    for name, value in flags:
        argv = [name] if value is None else [name, value]
        ns = build_parser().parse_args([*argv, "train.py", "--lr", "1"])
        assert ns.training_script == "train.py", name
        assert ns.training_script_args == ["--lr", "1"], name


def test_flag_beats_pet_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("PET_", "SLURM_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PET_NPROC_PER_NODE", "3")
    monkeypatch.setenv("PET_MAX_RESTARTS", "7")
    monkeypatch.setenv("PET_STANDALONE", "1")
    cfg = resolve(["s.py"])
    assert (cfg.nproc_per_node, cfg.max_restarts, cfg.master_addr) == (3, 7, "127.0.0.1")
    assert resolve(["--nproc_per_node", "2", "s.py"]).nproc_per_node == 2
    monkeypatch.delenv("PET_STANDALONE")
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29555")
    cfg = resolve(["--nnodes", "2", "--node-rank", "1", "--rdzv-id", "exp7", "s.py"])
    assert (cfg.master_addr, cfg.master_port, cfg.run_id, cfg.shared_id) == (
        "10.1.2.3", 29555, "exp7", True,
    )  # fmt: skip
    cfg = resolve(["--nnodes", "2:4", "--master-addr", "h0", "--rdzv-endpoint", "h1:9", "s.py"])
    assert (cfg.min_nodes, cfg.max_nodes, cfg.master_addr, cfg.master_port) == (2, 4, "h1", 9)


def test_identity_and_job_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith(("PET_", "SLURM_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    one, two = resolve(["s.py"]), resolve(["s.py"])
    assert one.run_id != two.run_id and not one.shared_id  # a fresh id per invocation
    assert one.job_dir != two.job_dir
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NNODES", "4")
    monkeypatch.setenv("SLURM_NODEID", "3")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-10]")
    cfg = resolve(["--nproc-per-node", "cpu", "s.py"])
    assert (cfg.run_id, cfg.shared_id, cfg.node_rank, cfg.expected_nodes) == (
        "slurm-4242", True, 3, 4,
    )  # fmt: skip
    assert cfg.job_dir == tmp_path / "ironpod-launch-slurm-4242"
    assert cfg.master_addr == "gpu07" or cfg.master_addr  # scontrol, where present, wins
    assert cfg.nproc_per_node == len(os.sched_getaffinity(0))


def test_bad_values_are_config_errors() -> None:
    for argv in (["--nnodes", "3:2", "s.py"], ["--nproc-per-node", "many", "s.py"],
                 ["--no-python", "-m", "s.py"], ["--local-ranks-filter", "a", "s.py"],
                 ["--rdzv-conf", "x", "s.py"], ["--unknown-flag", "s.py"]):  # fmt: skip
        with pytest.raises(ConfigError):
            resolve(argv, environ={})


def test_nproc_per_node_names() -> None:
    assert nproc_per_node("4") == 4
    assert nproc_per_node("cpu") == len(os.sched_getaffinity(0))
    assert nproc_per_node("auto") == len(os.sched_getaffinity(0))  # torch here is CPU-only
    with pytest.raises(ConfigError, match="CUDA is not available"):
        nproc_per_node("gpu")


def test_slurm_nodelist_expansion() -> None:
    assert expand_nodelist("node[01-04,07]") == ["node01", "node02", "node03", "node04", "node07"]
    assert expand_nodelist("a1,b[8-10],c") == ["a1", "b8", "b9", "b10", "c"]
    assert expand_nodelist("r[1-2]n[1-2]") == ["r1n1", "r1n2", "r2n1", "r2n2"]
    assert expand_nodelist("gpu-[003-004].cluster") == ["gpu-003.cluster", "gpu-004.cluster"]
    with pytest.raises(ConfigError):
        expand_nodelist("n[a-b]")


# -- the worker's environment, its error file, the exit codes


def test_workers_never_inherit_the_clusters_secrets() -> None:
    a = Assignment(
        attempt_id=9, job_id=1, job_name="x", command=["x"], ranks=[0], world_size=1,
        node_rank=0, nnodes=1, master_addr="h", master_port=1,
        env={"IRONPOD_TOKEN": "the-job-asked-for-it"},
    )  # fmt: skip
    base = {"IRONPOD_JOIN_TOKEN": "j", "IRONPOD_PRESET_TOKEN": "p", "IRONPOD_TOKEN": "t", "A": "1"}
    out = worker_env(a, rank=0, local_rank=0, beacon_socket="s", base=base)
    assert not {"IRONPOD_JOIN_TOKEN", "IRONPOD_PRESET_TOKEN"} & set(out) and out["A"] == "1"
    assert out["IRONPOD_TOKEN"] == "the-job-asked-for-it"  # the job's own env is its choice


def test_worker_env_is_torchruns() -> None:
    a = Assignment(
        attempt_id=9, job_id=1, job_name="launch-x", command=["x"], ranks=[2, 3], world_size=4,
        node_rank=1, nnodes=2, master_addr="h", master_port=1, restart_count=2, max_restarts=5,
        run_id="r-1", env={"ROLE_NAME": "trainer"},
    )  # fmt: skip
    base = {"TORCHELASTIC_RUN_ID": "stale", "PATH": "/bin"}
    out = worker_env(a, rank=3, local_rank=1, beacon_socket="s", base=base, error_file="/e")
    assert out["OMP_NUM_THREADS"] == "1"
    assert out["TORCHELASTIC_RUN_ID"] == "r-1" and out["TORCHELASTIC_RESTART_COUNT"] == "2"
    assert out["TORCHELASTIC_MAX_RESTARTS"] == "5" and out["TORCHELASTIC_ERROR_FILE"] == "/e"
    assert out["TORCHELASTIC_USE_AGENT_STORE"] == "False"
    assert (out["ROLE_NAME"], out["ROLE_RANK"], out["ROLE_WORLD_SIZE"]) == ("trainer", "3", "4")
    assert (out["GROUP_RANK"], out["GROUP_WORLD_SIZE"]) == ("1", "2")
    assert out["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert (out["WANDB_RUN_ID"], out["WANDB_RESUME"]) == ("r-1", "allow")
    mine = worker_env(a, rank=3, local_rank=1, beacon_socket="s",
                      base={"OMP_NUM_THREADS": "8", "WANDB_RUN_ID": "w"})  # fmt: skip
    assert (mine["OMP_NUM_THREADS"], mine["WANDB_RUN_ID"]) == ("8", "w")
    solo = a.model_copy(update={"ranks": [0], "restart_count": None, "env": {}})
    assert "OMP_NUM_THREADS" not in worker_env(solo, rank=0, local_rank=0, beacon_socket="s",
                                               base={})  # fmt: skip
    old = Assignment.model_validate(
        {k: v for k, v in a.model_dump().items() if k not in ("restart_count", "run_id")}
    )  # an older controller's assignment still parses
    assert (
        worker_env(old, rank=3, local_rank=1, beacon_socket="s", base={})["TORCHELASTIC_RUN_ID"]
        == "launch-x-1"
    )


def test_error_file_becomes_one_line(tmp_path: Path) -> None:
    path = tmp_path / "error.json"
    assert read_error_file(path) is None
    stack = 'Traceback:\n  File "/a/x.py", line 3, in f\n  File "/w/train.py", line 42, in g\n'
    message = {"message": "ValueError: bad\n shape", "extraInfo": {"py_callstack": stack}}
    path.write_text(json.dumps({"message": message}))
    assert read_error_file(path) == "ValueError: bad shape (train.py:42)"
    path.write_text(json.dumps({"message": "RuntimeError: x"}))
    assert read_error_file(path) == "RuntimeError: x"
    path.write_text("not json")
    assert read_error_file(path) is None


def test_end_codes() -> None:
    assert end_code({"state": "succeeded"}) == 0
    assert end_code({"state": "failed", "end_kind": "restart_limit"}) == 1
    assert end_code({"state": "failed", "end_kind": "no_progress"}) == EXIT_DO_NOT_REQUEUE
    assert end_code({"state": "cancelled", "end_kind": "cancelled"}) == 1
    ranks = {"0": {"event": {"exit_code": 127}}}
    assert end_code({"state": "failed", "attempts": [{"ranks": ranks}]}) == EXIT_DO_NOT_REQUEUE


# -- real launches


ENV_PROBE = """\
    import json, os, sys
    keys = ["OMP_NUM_THREADS", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_WORLD_SIZE",
            "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
            "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
            "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "WANDB_RUN_ID"]
    print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
    print("ARGS", *sys.argv[1:], flush=True)
"""


@pytest.mark.slow
def test_worker_sees_torchruns_env_and_two_launches_both_run(tmp_path: Path) -> None:
    probe = _script(tmp_path, "probe.py", ENV_PROBE)
    seen = []
    for _ in range(2):  # the same directory: the first run's state must not answer the second
        proc = _launch(["--nproc-per-node", "2", "--role", "trainer", str(probe), "--x", "1"],
                       tmp_path)  # fmt: skip
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "OMP_NUM_THREADS=1" in out  # the warning, once
        envs = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ENV ")]
        assert sorted(e["RANK"] for e in envs) == ["0", "1"], out  # both ranks on the console
        assert out.count("ARGS --x 1") == 2
        seen.append(envs[0])
    for e in seen:
        assert e["OMP_NUM_THREADS"] == "1" and e["GROUP_WORLD_SIZE"] == "1"
        assert e["ROLE_NAME"] == "trainer" and e["ROLE_WORLD_SIZE"] == "2"
        assert e["TORCHELASTIC_RESTART_COUNT"] == "0" and e["TORCHELASTIC_MAX_RESTARTS"] == "3"
        assert e["TORCHELASTIC_USE_AGENT_STORE"] == "False"
        assert e["TORCHELASTIC_ERROR_FILE"].endswith(".json")
    assert seen[0]["TORCHELASTIC_RUN_ID"] != seen[1]["TORCHELASTIC_RUN_ID"]
    assert seen[0]["WANDB_RUN_ID"] != seen[1]["WANDB_RUN_ID"]


@pytest.mark.slow
def test_a_deep_temp_dir_still_runs(tmp_path: Path) -> None:
    """The job directory goes under $TMPDIR; one as deep as a CI runner's (pytest's own
    folders, a benchmark's run folder) makes the agent's socket path too long for AF_UNIX."""
    deep = tmp_path / ("t" * 90)
    deep.mkdir()
    probe = _script(tmp_path, "probe.py", ENV_PROBE)
    proc = _launch(["--nproc-per-node", "2", str(probe)], tmp_path, {"TMPDIR": str(deep)})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert out.count("ENV ") == 2, out


@pytest.mark.slow
def test_an_agent_that_dies_ends_the_launch_with_its_reason(tmp_path: Path) -> None:
    script = _script(tmp_path, "sleep.py", """\
        import os, time
        print("up", os.environ["RANK"], flush=True)
        time.sleep(600)
    """)  # fmt: skip
    proc = _launch(["--nproc-per-node", "2", str(script)], tmp_path)
    deadline = time.monotonic() + 120
    agent = None
    while agent is None:
        assert time.monotonic() < deadline and proc.poll() is None
        children = psutil.Process(proc.pid).children()
        agent = next((c for c in children if "ironpod.agent" in c.cmdline()), None)
        time.sleep(0.2)
    agent.kill()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "the agent exited with code -9 while the job ran" in out, out


@pytest.mark.slow
def test_requeue_with_the_same_id_carries_on(tmp_path: Path) -> None:
    probe = _script(tmp_path, "probe.py", ENV_PROBE)
    args = ["--rdzv-id", "exp1", str(probe)]
    first, _ = _launch(args, tmp_path).communicate(timeout=120)
    assert "ENV " in first
    proc = _launch(args, tmp_path)
    again, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ENV " not in again, again  # it already succeeded


@pytest.mark.slow
def test_sigterm_reaches_the_workers_and_leaves_nothing(tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    script = _script(tmp_path, "stop.py", f"""\
        import os, signal, sys, time
        def stop(signum, frame):
            open(os.path.join({str(marks)!r}, "term-" + os.environ["RANK"]), "w").close()
            sys.exit(75)
        signal.signal(signal.SIGTERM, stop)
        open(os.path.join({str(marks)!r}, "up-" + os.environ["RANK"]), "w").close()
        time.sleep(600)
    """)  # fmt: skip
    proc = _launch(["--nproc-per-node", "2", "--shutdown-timeout", "20", str(script)], tmp_path)
    deadline = time.monotonic() + 120
    while len(list(marks.glob("up-*"))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= 4  # controller, agent, two workers
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == EXIT_PREEMPTED, out
    assert sorted(p.name for p in marks.glob("term-*")) == ["term-0", "term-1"]
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, alive


@pytest.mark.slow
def test_a_command_that_cannot_start_is_not_requeued(tmp_path: Path) -> None:
    proc = _launch(["--no-python", "--max-restarts", "5", str(tmp_path / "missing")], tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_DO_NOT_REQUEUE, out


@pytest.mark.slow
def test_a_recorded_exception_is_the_failure_cause(tmp_path: Path) -> None:
    script = _script(tmp_path, "bad.py", """\
        from torch.distributed.elastic.multiprocessing.errors import record

        @record
        def main():
            raise ValueError("bad shape")

        main()
    """)  # fmt: skip
    proc = _launch(["--max-restarts", "0", str(script)], tmp_path)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, out
    outcome = [line for line in out.splitlines() if line.startswith("ironpod launch: job")]
    assert outcome and "ValueError: bad shape (bad.py:5)" in outcome[-1], out


@pytest.mark.slow
def test_two_node_launch_recovers_a_crash(tmp_path: Path) -> None:
    port = free_port()
    job_dir = tmp_path / "job"

    def node(rank: int) -> subprocess.Popen[str]:
        argv = [
            sys.executable, "-m", "ironpod.cli", "launch",
            "--nnodes", "2", "--nproc_per_node", "2", "--node-rank", str(rank),
            f"--rdzv-endpoint=127.0.0.1:{port}", "--max-restarts", "2",
            "--hang-timeout", "120",  # this test is about a crash; a slow shutdown is no hang
            "--job-dir", str(job_dir), str(SCRIPTS / "launch_worker.py"),
        ]  # fmt: skip
        return subprocess.Popen(
            argv, env=clean_env(), cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    follower, leader = node(1), node(0)
    lead_out, _ = leader.communicate(timeout=180)
    follow_out, _ = follower.communicate(timeout=60)
    assert leader.returncode == 0, lead_out
    assert follower.returncode == 0, follow_out
    assert "job succeeded" in lead_out
    assert "job succeeded" in follow_out
    logs = sorted(job_dir.glob("nodes/*/logs/*/rank-3.log"))
    assert len(logs) == 2  # attempt 0 crashed, attempt 1 finished
    text = "".join(p.read_text() for p in logs)
    assert "crashing on purpose" in text
    assert "world 4 sum 10.0 attempt 1" in text
    assert "world 4 sum 10.0 attempt 1" in follow_out  # each node prints its own ranks


def test_bad_flags_are_one_line_errors(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ironpod.cli", "launch", "--nnodes", "2", "--node-rank", "5",
         "train.py"],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --node-rank 5 is not within --nnodes 2"
