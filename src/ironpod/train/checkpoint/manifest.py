"""The manifest: the file that makes a checkpoint real.

A checkpoint directory counts only if it has a manifest that lists every file with its size
and CRC-32, and every listed file is present with that size and checksum. The manifest is
written after all ranks finished their files and before the directory gets its final name,
so a crash at any moment leaves either a complete checkpoint or one that is skipped.

CRC-32 catches the damage that happens in practice (truncation, torn writes, bit rot, a file
from another checkpoint) at several GB/s; it is not a defence against tampering.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

from ironpod.errors import CheckpointCorruptError
from ironpod.train.checkpoint.storage import CheckpointStorage

FORMAT = "ironpod-checkpoint/1"
MANIFEST_NAME = "manifest.json"
STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def extra_file_name(rank: int) -> str:
    """Per-rank file with what is not a tensor of the model or optimizer (RNG, data position)."""
    return f"rank-{rank:05d}.extra.pt"


def parse_step_dir(name: str) -> int | None:
    match = STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


@dataclass(slots=True)
class FileEntry:
    size: int
    crc32: str


@dataclass(slots=True)
class Manifest:
    step: int
    world_size: int
    files: dict[str, FileEntry]
    job_id: str = "local"
    attempt_id: int = 0
    created_unix: float = field(default_factory=time.time)
    format: str = FORMAT

    def to_json(self) -> bytes:
        body = asdict(self)
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            body = json.loads(data)
            if body.get("format") != FORMAT:
                raise CheckpointCorruptError(
                    f"{where}: unknown manifest format {body.get('format')!r}"
                )
            files = {name: FileEntry(**entry) for name, entry in body["files"].items()}
            return cls(
                step=int(body["step"]),
                world_size=int(body["world_size"]),
                files=files,
                job_id=str(body.get("job_id", "local")),
                attempt_id=int(body.get("attempt_id", 0)),
                created_unix=float(body.get("created_unix", 0.0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointCorruptError(f"{where}: unreadable manifest ({exc})") from None


def read_manifest(storage: CheckpointStorage, ckpt_dir: str) -> Manifest:
    path = storage.join(ckpt_dir, MANIFEST_NAME)
    if not storage.exists(path):
        raise CheckpointCorruptError(f"{ckpt_dir}: no {MANIFEST_NAME} (torn or unfinished)")
    return Manifest.from_json(storage.read_bytes(path), ckpt_dir)


def verify_files(
    storage: CheckpointStorage, ckpt_dir: str, manifest: Manifest, names: list[str]
) -> None:
    """Check the listed files of a checkpoint; raise CheckpointCorruptError on the first bad one.

    Sizes are compared before checksums so a truncated file is found without reading it.
    """
    for name in names:
        entry = manifest.files[name]
        path = storage.join(ckpt_dir, name)
        if not storage.exists(path):
            raise CheckpointCorruptError(f"{ckpt_dir}: file {name} is missing")
        size = storage.size(path)
        if size != entry.size:
            raise CheckpointCorruptError(
                f"{ckpt_dir}: file {name} has {size} bytes, manifest says {entry.size}"
            )
        _, crc = storage.checksum(path)
        if crc != entry.crc32:
            raise CheckpointCorruptError(
                f"{ckpt_dir}: file {name} has checksum {crc}, manifest says {entry.crc32}"
            )
