"""Bearer tokens: one admin token (people, the CLI) and one node join token (agents).

Both are generated at the controller's first start and kept in ``tokens.json`` in its state
directory, mode 0600, written atomically. Agents may use only the node routes; the admin token
opens everything.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ironpod.private import private_dir

TOKENS_FILE = "tokens.json"


@dataclass(frozen=True, slots=True)
class Tokens:
    admin: str
    join: str


def load_or_create_tokens(state_dir: Path, preset: str | None = None) -> Tokens:
    """The tokens of this state directory, created at first use.

    ``preset`` (from ``IRONPOD_PRESET_TOKEN``) becomes both tokens of a new directory: ``ironpod
    launch`` uses it where nodes share a secret but no file system (Kubernetes).
    """
    private_dir(state_dir)  # its database holds every job's env; an older 0755 one is closed up
    path = state_dir / TOKENS_FILE
    if path.exists():
        data = json.loads(path.read_text())
        return Tokens(admin=data["admin"], join=data["join"])
    tokens = (
        Tokens(admin=preset, join=preset)
        if preset
        else Tokens(admin=secrets.token_urlsafe(32), join=secrets.token_urlsafe(32))
    )
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"admin": tokens.admin, "join": tokens.join}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return tokens
