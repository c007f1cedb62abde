"""Where durable checkpoints live: a local directory or any fsspec URL.

The checkpointer needs only a few operations from storage, listed by :class:`CheckpointStorage`.
Paths are ``str``, never ``pathlib.Path``, because a location may be ``s3://bucket/run``.
Local directories get real durability (fsync of files and of the directory after a rename);
object stores get what they offer (a PUT is durable when it returns) and rely on the manifest,
written last, as the commit marker, since their "rename" is a copy.
"""

from __future__ import annotations

import os
import shutil
import zlib
from typing import Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter

_CHUNK = 8 << 20

# The file whose presence makes a checkpoint directory count (the checkpointer's manifest). Where
# "rename" and "remove" are many object operations (S3, GCS), it is copied last and deleted first,
# so no crash in between shows it beside an incomplete set of files.
COMMIT_MARKER = "manifest.json"


class CheckpointStorage(Protocol):
    """The operations a checkpoint location must support (STYLE.md lesson 3)."""

    root: str

    def join(self, *parts: str) -> str: ...
    def makedirs(self, path: str) -> None: ...
    def listdir(self, path: str) -> list[str]:
        """Names (not paths) of the entries directly under ``path``; [] when it is missing."""
        ...

    def exists(self, path: str) -> bool: ...
    def size(self, path: str) -> int: ...
    def read_bytes(self, path: str) -> bytes: ...
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file durably (returns only when the bytes are on stable storage)."""
        ...

    def checksum(self, path: str) -> tuple[int, str]:
        """(size, crc32 as 8 hex digits) of a file, read in chunks."""
        ...

    def rename_dir(self, src: str, dst: str) -> None: ...
    def remove_tree(self, path: str) -> None: ...
    def dcp_writer(self, path: str) -> StorageWriter: ...
    def dcp_reader(self, path: str) -> StorageReader: ...


def _crc_stream(read: object) -> tuple[int, str]:
    crc = 0
    total = 0
    while chunk := read(_CHUNK):  # type: ignore[operator]
        crc = zlib.crc32(chunk, crc)
        total += len(chunk)
    return total, f"{crc:08x}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStorage:
    """A directory on a local or mounted POSIX file system (shared file systems included)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def makedirs(self, path: str) -> None:
        # 0700 where it creates one (a checkpoint holds the weights and the data position);
        # a directory the user made keeps the mode they gave it
        os.makedirs(path, mode=0o700, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def read_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def checksum(self, path: str) -> tuple[int, str]:
        with open(path, "rb") as f:
            return _crc_stream(f.read)

    def rename_dir(self, src: str, dst: str) -> None:
        os.rename(src, dst)
        _fsync_dir(os.path.dirname(dst) or ".")

    def remove_tree(self, path: str) -> None:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.unlink(path)

    def dcp_writer(self, path: str) -> StorageWriter:
        return FileSystemWriter(path, sync_files=True)

    def dcp_reader(self, path: str) -> StorageReader:
        return FileSystemReader(path)


class FsspecStorage:
    """Any fsspec file system named by URL: ``s3://``, ``gs://``, ``memory://``, ``file://``."""

    def __init__(self, url: str) -> None:
        self.fs, path = fsspec.core.url_to_fs(url)
        protocol = self.fs.protocol
        scheme = protocol[0] if isinstance(protocol, tuple | list) else protocol
        self._scheme = url.split("://", 1)[0] if "://" in url else scheme
        self.root = self._url(path)

    def _url(self, path: str) -> str:
        path = self.fs._strip_protocol(path)
        return f"{self._scheme}://{path.lstrip('/') if self._scheme != 'file' else path}"

    def _path(self, url: str) -> str:
        return str(self.fs._strip_protocol(url))

    def join(self, *parts: str) -> str:
        return "/".join([parts[0].rstrip("/"), *(p.strip("/") for p in parts[1:])])

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(self._path(path), exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(self._path(path), detail=False, refresh=True)
        except TypeError:
            entries = self.fs.ls(self._path(path), detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self._path(path)))

    def size(self, path: str) -> int:
        return int(self.fs.size(self._path(path)))

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open(self._path(path), "rb") as f:
            return bytes(f.read())

    def write_bytes(self, path: str, data: bytes) -> None:
        with self.fs.open(self._path(path), "wb") as f:
            f.write(data)

    def checksum(self, path: str) -> tuple[int, str]:
        with self.fs.open(self._path(path), "rb") as f:
            return _crc_stream(f.read)

    def rename_dir(self, src: str, dst: str) -> None:
        """A real rename on ``file://``; elsewhere a copy of every file, the commit marker last.

        Not ``fs.mv``: on object stores it also copies the directory itself, a key that does not
        exist, and fails after the files (commit marker included, in any order) were copied.
        """
        source, target = self._path(src), self._path(dst)
        if isinstance(self.fs, LocalFileSystem):
            self.fs.mv(source, target, recursive=True)
            return
        files = sorted(str(f) for f in self.fs.find(source))
        marker = f"{source}/{COMMIT_MARKER}"
        rest = [f for f in files if f != marker]
        if rest:
            self.fs.copy(rest, [target + f[len(source) :] for f in rest])
        if marker in files:
            self.fs.copy(marker, f"{target}/{COMMIT_MARKER}")
        self.remove_tree(src)

    def remove_tree(self, path: str) -> None:
        target = self._path(path)
        if not self.fs.exists(target):
            return
        if self.fs.isdir(target):
            marker = f"{target}/{COMMIT_MARKER}"
            if self.fs.exists(marker):
                self.fs.rm_file(marker)
        self.fs.rm(target, recursive=True)

    def dcp_writer(self, path: str) -> StorageWriter:
        return FsspecWriter(path, sync_files=True)

    def dcp_reader(self, path: str) -> StorageReader:
        return FsspecReader(path)


def open_storage(location: str) -> CheckpointStorage:
    """A plain path is a local directory; anything with ``scheme://`` goes through fsspec."""
    if "://" in location:
        return FsspecStorage(location)
    return LocalStorage(location)
