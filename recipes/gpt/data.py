"""The corpus, its cached token stream, and batch loaders whose batches are pure functions.

The corpus is the Python source of the running interpreter's standard library: real text that
every machine already has. Training batches are drawn so that batch ``i`` depends only on
``(seed, i)`` and never on what ran before, which buys two properties the resilience tests
check bitwise: a resumed run sees exactly the batches an uninterrupted run sees (the loader's
whole state is the index of the next batch), and the global batch is the same at any world size
(each rank takes its own contiguous slice of it).
"""

from __future__ import annotations

import hashlib
import io
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipes.gpt.config import DataConfig
from recipes.gpt.tokenizer import Tokenizer, build_tokenizer, cache_root, cached_bytes

#: Directories skipped anywhere in the tree: installed third-party code and tooling that is not
#: the standard library proper. Directories whose name starts with "test" are skipped too.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "idlelib", "__pycache__"})


def stdlib_root() -> Path:
    """Where the running interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded(dirname: str) -> bool:
    return dirname in EXCLUDED_DIRS or dirname.startswith("test")


def corpus_files(root: Path) -> list[str]:
    """``.py`` files under ``root`` as sorted relative POSIX paths, test and site dirs left out.

    Sorting the full list (not trusting ``os.walk`` order, which follows the file system) makes
    the corpus, and therefore every token id, the same on every machine with the same Python.
    """
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _excluded(d)]
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / name).as_posix() for name in filenames if name.endswith(".py"))
    return sorted(found)


@dataclass(frozen=True)
class Corpus:
    """The documents (one per source file), optionally capped at ``max_bytes`` of UTF-8."""

    root: Path
    files: tuple[str, ...]
    max_bytes: int | None = None

    def documents(self) -> Iterator[str]:
        budget = self.max_bytes
        for rel in self.files:
            raw = (self.root / rel).read_bytes()
            if budget is not None:
                raw = raw[:budget]
                budget -= len(raw)
            yield raw.decode("utf-8", errors="ignore")
            if budget is not None and budget <= 0:
                return

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of every document's path and content: the key of everything cached from it."""
        digest = hashlib.sha256()
        for rel, text in zip(self.files, self.documents(), strict=False):
            data = text.encode("utf-8")
            digest.update(f"{rel}\0{len(data)}\0".encode())
            digest.update(data)
        return digest.hexdigest()


def stdlib_corpus(max_bytes: int | None = None, root: Path | None = None) -> Corpus:
    """The standard library corpus of the running interpreter (or of ``root``)."""
    base = root or stdlib_root()
    return Corpus(root=base, files=tuple(corpus_files(base)), max_bytes=max_bytes)


def token_dtype(vocab_size: int) -> type[np.unsignedinteger[Any]] | type[np.signedinteger[Any]]:
    """uint16 halves the cache and the loader's memory whenever the ids fit in it."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def tokenize(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | None = None) -> np.ndarray:
    """The corpus as one flat array of token ids, cached per (tokenizer, corpus)."""
    key = f"tokens-{tokenizer.name}-{corpus.fingerprint[:16]}.npy"

    def build() -> bytes:
        dtype = token_dtype(tokenizer.vocab_size)
        docs = list(corpus.documents())
        if tokenizer.name == "bytes":
            flat = np.frombuffer("".join(docs).encode("utf-8"), dtype=np.uint8).astype(dtype)
        else:
            ids = tokenizer.encode_batch(docs)
            flat = np.concatenate([np.asarray(x, dtype=dtype) for x in ids])
        buf = io.BytesIO()
        np.save(buf, flat, allow_pickle=False)
        return buf.getvalue()

    payload = cached_bytes(cache_root(cache_dir) / key, build)
    tokens: np.ndarray = np.load(io.BytesIO(payload), allow_pickle=False)
    return tokens


@dataclass(frozen=True)
class TokenData:
    """Train and held-out token streams, and the tokenizer that made them."""

    tokenizer: Tokenizer
    train: np.ndarray
    val: np.ndarray


def prepare(cfg: DataConfig) -> TokenData:
    """Corpus, tokenizer and token stream for a config; the last ``val_fraction`` is held out."""
    corpus = stdlib_corpus(cfg.max_bytes)
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.vocab_size, corpus, cfg.cache_dir)
    tokens = tokenize(corpus, tokenizer, cfg.cache_dir)
    n_val = max(int(len(tokens) * cfg.val_fraction), cfg.seq_len + 1)
    if len(tokens) - n_val < cfg.seq_len + 1:
        raise ValueError(
            f"corpus of {len(tokens)} tokens is too small for seq_len {cfg.seq_len}; "
            "raise data.max_bytes"
        )
    return TokenData(tokenizer=tokenizer, train=tokens[:-n_val], val=tokens[-n_val:])


def _rows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int) -> torch.Tensor:
    rows = np.stack([tokens[o : o + seq_len + 1] for o in offsets.tolist()])
    return torch.from_numpy(rows.astype(np.int64))


def _rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by {world_size} ranks")
    per_rank = global_batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


class BatchLoader:
    """Random windows of the training stream; batch ``i`` is a pure function of ``(seed, i)``.

    Every rank draws the same global batch of offsets and keeps its own contiguous slice, so
    rank slices concatenated in rank order are exactly the one-process batch.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} tokens cannot fill a window of {seq_len} + 1")
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self._mine = _rank_slice(global_batch, rank, world_size)
        self.next_index = 0

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) of global batch ``index``, each (B/W, seq_len) int64."""
        rows = _rows(self.tokens, self.offsets(index)[self._mine], self.seq_len)
        return rows[:, :-1], rows[:, 1:]

    def offsets(self, index: int) -> np.ndarray:
        """Start of every window of global batch ``index``, the same on every rank.

        ``SeedSequence((seed, index))`` hashes both numbers into PCG64's 128-bit state, so no
        two batches share a stream (torch's CPU generator keeps only 32 bits of its seed, which
        would repeat batches within a long run). Raw 64-bit draws are used rather than a
        distribution method because numpy guarantees the bit stream, not the sampling
        algorithms, across versions; the modulo bias is below 2**-30 for any corpus.
        """
        bits = np.random.PCG64(np.random.SeedSequence((self.seed, index)))
        high = len(self.tokens) - self.seq_len  # exclusive: a window needs seq_len + 1 ids
        return bits.random_raw(self.global_batch) % np.uint64(high)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.next_index)
        self.next_index += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """The whole state: identical on every rank, so it loads at any world size."""
        return {"next_index": self.next_index}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.next_index = int(state_dict["next_index"])


def eval_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch: int,
    n_batches: int,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: windows evenly spaced over the held-out stream, rank-sliced."""
    count = global_batch * n_batches
    last = len(tokens) - seq_len - 1
    if last < 0:
        raise ValueError(f"{len(tokens)} held-out tokens cannot fill a window of {seq_len} + 1")
    offsets = np.linspace(0, last, count).round().astype(np.int64)
    mine = _rank_slice(global_batch, rank, world_size)
    out = []
    for b in range(n_batches):
        rows = _rows(tokens, offsets[b * global_batch : (b + 1) * global_batch][mine], seq_len)
        out.append((rows[:, :-1], rows[:, 1:]))
    return out
