"""Tokenizers (raw bytes, or a byte-level BPE trained here) and the on-disk cache they share.

BPE is trained locally on the corpus itself, so the recipe needs no download. Training takes
seconds to a minute, so the result is cached under a key naming everything it depends on: the
corpus fingerprint, the vocabulary size and the ``tokenizers`` version. The cache is written
atomically (temporary file, fsync, ``os.replace``) under an exclusive lock: when several ranks
start at once, the first builds and the others wait and then read its file, so every rank of a
node uses the very same tokenizer. ``data.py`` caches token streams with the same helpers.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from recipes.gpt.config import CACHE_DIR_ENV

DEFAULT_CACHE_DIR = "~/.cache/ironpod/gpt"
#: Bump when the cached formats change, so stale entries are never read.
CACHE_FORMAT = 1


class TextCorpus(Protocol):
    """What a tokenizer needs from the corpus: its documents and a fingerprint of them."""

    @property
    def fingerprint(self) -> str: ...

    def documents(self) -> Iterator[str]: ...


class Tokenizer(Protocol):
    """Text to token ids and back; ``name`` keys caches of what it produced."""

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: nothing to train, and every string round-trips exactly."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A trained byte-level BPE from the ``tokenizers`` package."""

    def __init__(self, inner: tokenizers.Tokenizer, name: str) -> None:
        self._inner = inner
        self.name = name

    @property
    def vocab_size(self) -> int:
        return int(self._inner.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self._inner.encode(text).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(enc.ids) for enc in self._inner.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return str(self._inner.decode(list(ids)))


def cache_root(cache_dir: str | None = None) -> Path:
    """The cache directory: the config's ``data.cache_dir`` (which already folds in the
    environment, see ``config.py``), else ``$IRONPOD_CACHE_DIR``, else ``~/.cache/ironpod/gpt``.
    """
    chosen = cache_dir or os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(chosen).expanduser()


def cached_bytes(path: Path, build: Callable[[], bytes]) -> bytes:
    """Return the file at ``path``, building and writing it first if it does not exist.

    An exclusive ``flock`` on a sibling lock file serialises builders across processes; the
    write itself is atomic, so a reader that takes no lock still never sees a torn file.
    """
    if path.is_file():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(path.with_name(path.name + ".lock")):
        if path.is_file():  # another process built it while we waited for the lock
            return path.read_bytes()
        payload = build()
        atomic_write(path, payload)
        return payload


def atomic_write(path: Path, payload: bytes) -> None:
    """Write ``payload`` to a unique temporary name, fsync it, rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is for everyone
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def build_tokenizer(
    kind: str, vocab_size: int, corpus: TextCorpus, cache_dir: str | None = None
) -> Tokenizer:
    """The tokenizer named by the config: ``bytes``, or ``bpe`` trained on ``corpus`` (cached)."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"unknown tokenizer {kind!r}")
    key = f"bpe-v{CACHE_FORMAT}-{vocab_size}-{corpus.fingerprint[:16]}-tok{tokenizers.__version__}"
    path = cache_root(cache_dir) / f"{key}.json"
    payload = cached_bytes(path, lambda: train_bpe(corpus, vocab_size).encode("utf-8"))
    inner = tokenizers.Tokenizer.from_str(payload.decode("utf-8"))
    digest = hashlib.sha256(payload).hexdigest()[:12]
    return BPETokenizer(inner, name=f"bpe{vocab_size}-{digest}")


def train_bpe(corpus: TextCorpus, vocab_size: int) -> str:
    """Train a byte-level BPE on the corpus; returns the tokenizer as JSON."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.documents(), trainer=trainer)
    return str(tok.to_str())
