"""Files only their owner can read: ironpod's state holds every job's env (its secrets), the
workers' output, and the model's weights (memory snapshots, checkpoints).

A directory made private here is mode 0700, so what it holds is out of other users' reach
whatever the files' own modes (torch.distributed.checkpoint writes with the process umask).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path) -> Path:
    """Create ``path`` (parents as usual) and make it 0700, closing up one made before this
    rule; a directory someone else owns is left as it is."""
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077 and st.st_uid == os.geteuid():
        path.chmod(DIR_MODE)
    return path


def open_private_append(path: Path) -> int:
    """A file descriptor appending to ``path``, created 0600 (an older file is closed up)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        os.fchmod(fd, FILE_MODE)
    return fd


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` as 0600, atomically (write, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), FILE_MODE)  # an old temporary file kept its mode
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_or_create_secret(path: Path, nbytes: int = 32) -> bytes:
    """A random secret kept in ``path`` (0600), made at first use."""
    try:
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    except FileNotFoundError:
        pass
    data = os.urandom(nbytes)
    write_private(path, data)
    return data
