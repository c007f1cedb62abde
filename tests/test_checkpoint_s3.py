"""The durable tier on ``s3://`` URLs, against a real S3 server (moto) started on loopback.

No ironpod code knows about the test server: the endpoint and credentials reach s3fs the way
they reach any AWS client, through the environment (botocore reads ``AWS_ENDPOINT_URL_S3``
itself), so these tests exercise the same path a job on a real bucket takes. Damage is done with
a separate boto3 client, as an operator or a crash would leave it, not through ironpod's storage.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ironpod.train as it
from ironpod.train.checkpoint.manifest import MANIFEST_NAME, TMP_PREFIX, step_dir_name
from ironpod.train.checkpoint.storage import COMMIT_MARKER, open_storage
from tests.conftest import SCRIPTS, torchrun
from tests.test_checkpoint import assert_same_model, make_state, train_step

moto_server = pytest.importorskip(
    "moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')"
)
s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3]')")
boto3 = pytest.importorskip("boto3", reason="boto3 (a dependency of moto) is not installed")

BUCKET = "ironpod-ckpt"


class S3:
    """The test server: its endpoint, a boto3 client on it, and helpers to look at the bucket."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix=f"{prefix}/"
        )
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def top_level(self, prefix: str) -> set[str]:
        """Names of the 'directories' directly under ``prefix``."""
        return {k[len(prefix) + 1 :].split("/", 1)[0] for k in self.keys(prefix)}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent")  # no user config can redirect the client
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        env.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        s3fs.S3FileSystem.clear_instance_cache()  # none built before the endpoint was set
        store = S3(endpoint)
        store.client.create_bucket(Bucket=BUCKET)
        try:
            yield store
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def save_steps(url: str, steps: int, **kwargs: Any) -> it.TrainState:
    """Train ``steps`` steps saving after each (asynchronously); the state as of the last."""
    state = make_state()
    ckpt = it.Checkpointer(url, **kwargs)
    for step in range(1, steps + 1):
        train_step(state)
        ckpt.save(step, state)
    ckpt.close()
    return state


def test_rename_copies_the_commit_marker_last_and_remove_deletes_it_first(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """S3 has no rename: the manifest must never be visible beside an incomplete set of files."""
    assert COMMIT_MARKER == MANIFEST_NAME  # storage.py orders its object operations by this name
    storage = open_storage(s3.url("order"))
    src, dst = storage.join(storage.root, "src"), storage.join(storage.root, "dst")
    for name in ("__0_0.distcp", MANIFEST_NAME, "rank-00000.extra.pt", ".metadata"):
        storage.write_bytes(storage.join(src, name), name.encode())
    copied: list[str] = []
    deleted: list[str] = []
    fs = storage.fs  # type: ignore[attr-defined]
    copy, rm_file, rm = fs.copy, fs.rm_file, fs.rm

    def record_copy(path1: Any, path2: Any, **kwargs: Any) -> None:
        copied.extend(path2 if isinstance(path2, list) else [path2])
        copy(path1, path2, **kwargs)

    def record_rm_file(path: str) -> None:
        deleted.append(path)
        rm_file(path)

    def record_rm(path: Any, recursive: bool = False, **kwargs: Any) -> None:
        deleted.append(path)
        rm(path, recursive=recursive, **kwargs)

    monkeypatch.setattr(fs, "copy", record_copy)
    monkeypatch.setattr(fs, "rm_file", record_rm_file)
    monkeypatch.setattr(fs, "rm", record_rm)
    storage.rename_dir(src, dst)
    assert len(copied) == 4 and copied[-1].endswith(f"/dst/{MANIFEST_NAME}")
    assert deleted[0].endswith(f"/src/{MANIFEST_NAME}")
    assert s3.keys("order") == [f"order/dst/{n}" for n in sorted(storage.listdir(dst))]
    assert storage.read_bytes(storage.join(dst, MANIFEST_NAME)) == MANIFEST_NAME.encode()


def test_async_round_trip_is_bitwise_exact(s3: S3) -> None:
    url = s3.url("round-trip")
    saved = save_steps(url, 2)
    assert s3.top_level("round-trip") == {step_dir_name(1), step_dir_name(2)}
    files = {k.rsplit("/", 1)[-1] for k in s3.keys(f"round-trip/{step_dir_name(2)}")}
    assert {MANIFEST_NAME, ".metadata", "__0_0.distcp", "rank-00000.extra.pt"} <= files

    loaded = make_state(seed=99)
    reader = it.Checkpointer(url)
    assert reader.load_latest(loaded) == 2
    reader.close()
    assert_same_model(saved.model, loaded.model)
    assert saved.optimizer is not None and loaded.optimizer is not None
    old, new = saved.optimizer.state_dict(), loaded.optimizer.state_dict()
    assert old["param_groups"] == new["param_groups"]
    assert old["state"].keys() == new["state"].keys()
    for key, entry in old["state"].items():
        assert entry.keys() == new["state"][key].keys()
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(new["state"][key][name]))
    assert loaded.dataloader is not None and loaded.dataloader.position == 8  # type: ignore[attr-defined]


def _delete_shard(s3: S3, ckpt: str) -> None:
    s3.client.delete_object(Bucket=BUCKET, Key=f"{ckpt}/__0_0.distcp")


def _delete_manifest(s3: S3, ckpt: str) -> None:
    s3.client.delete_object(Bucket=BUCKET, Key=f"{ckpt}/{MANIFEST_NAME}")


def _flip_a_byte(s3: S3, ckpt: str) -> None:
    key = f"{ckpt}/__0_0.distcp"
    data = bytearray(s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_delete_shard, "is missing"),
        (_delete_manifest, "no manifest.json"),
        (_flip_a_byte, "checksum"),
    ],
)
def test_torn_checkpoint_is_skipped_for_the_older_one(s3: S3, damage: Any, reason: str) -> None:
    prefix = f"torn{damage.__name__.replace('_', '-')}"
    url = s3.url(prefix)
    state = make_state()
    ckpt = it.Checkpointer(url)
    for step in (1, 2, 3):
        train_step(state)
        ckpt.save(step, state)
        if step == 2:
            ckpt.wait()
            reference = copy.deepcopy(state.model)
    ckpt.close()
    damage(s3, f"{prefix}/{step_dir_name(3)}")

    loaded = make_state(seed=7)
    reader = it.Checkpointer(url)
    assert reader.load_latest(loaded) == 2
    reader.close()
    assert reader.skipped and reader.skipped[0][0] == 3 and reason in reader.skipped[0][1]
    assert_same_model(reference, loaded.model)


def test_retention_deletes_old_steps_on_s3(s3: S3) -> None:
    save_steps(s3.url("retention"), 6, keep_last=2, keep_every=3)
    assert s3.top_level("retention") == {step_dir_name(s) for s in (3, 5, 6)}
    assert not [k for k in s3.keys("retention") if f"/{TMP_PREFIX}" in k]


@pytest.mark.slow
def test_two_rank_fsdp2_round_trip(s3: S3, tmp_path: Path) -> None:
    url = s3.url("two-rank")
    script = str(SCRIPTS / "dist_checkpoint.py")
    results = {}
    for action in ("save", "load"):
        out = tmp_path / f"{action}.pt"
        proc = torchrun(2, [script, "fsdp2", action, url, str(out), "2"], timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[action] = torch.load(out, weights_only=False)
    saved, loaded = results["save"], results["load"]
    assert loaded["loaded"] == 2
    assert saved["model"].keys() == loaded["model"].keys()
    for key in saved["model"]:
        assert torch.equal(saved["model"][key], loaded["model"][key]), key
    for key, entry in saved["optim_state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(entry[name], loaded["optim_state"][key][name]), (key, name)
    assert loaded["position"] == saved["position"] == 16
    files = {k.rsplit("/", 1)[-1] for k in s3.keys(f"two-rank/{step_dir_name(2)}")}
    assert {MANIFEST_NAME, "__0_0.distcp", "__1_0.distcp", "rank-00001.extra.pt"} <= files
