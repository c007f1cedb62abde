"""The GPT recipe's data: corpus selection, tokenizer and token caches, resumable batches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.gpt import data, tokenizer
from recipes.gpt.config import DataConfig

SMALL = 200_000  # bytes of corpus: enough for a BPE of a few hundred merges, trained in ~1 s


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A private cache, also through the environment, so no test reads ~/.cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("IRONPOD_CACHE_DIR", str(path))
    return str(path)


def stream(n: int = 5000) -> np.ndarray:
    return np.arange(n, dtype=np.int64).astype(np.uint16)


# -- corpus


def test_corpus_skips_tests_site_packages_and_idlelib(tmp_path: Path) -> None:
    for rel in [
        "a.py",
        "pkg/__init__.py",
        "pkg/mod.py",
        "pkg/notes.txt",
        "test/test_a.py",
        "pkg/tests/t.py",
        "pkg/testing/t.py",
        "site-packages/x/y.py",
        "dist-packages/z.py",
        "idlelib/run.py",
        "b.py",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    assert data.corpus_files(tmp_path) == ["a.py", "b.py", "pkg/__init__.py", "pkg/mod.py"]


def test_stdlib_corpus_is_sorted_and_clean() -> None:
    files = data.corpus_files(data.stdlib_root())
    assert files == sorted(files)
    assert files == data.corpus_files(data.stdlib_root())
    assert "os.py" in files and "json/decoder.py" in files
    for rel in files:
        dirs = rel.split("/")[:-1]
        assert not any(d.startswith("test") or d in data.EXCLUDED_DIRS for d in dirs), rel


def test_max_bytes_caps_the_corpus_and_changes_the_fingerprint() -> None:
    small, smaller = data.stdlib_corpus(SMALL), data.stdlib_corpus(SMALL // 2)
    assert sum(len(d.encode()) for d in small.documents()) <= SMALL
    assert sum(len(d.encode()) for d in small.documents()) > SMALL - 10  # only a cut char lost
    assert small.fingerprint != smaller.fingerprint
    assert small.fingerprint == data.stdlib_corpus(SMALL).fingerprint


# -- tokenizers and caches


def test_byte_tokenizer_round_trips() -> None:
    tok = tokenizer.ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.vocab_size == 256


def test_bpe_is_trained_once_then_read_from_the_cache(
    cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    corpus = data.stdlib_corpus(SMALL)
    first = tokenizer.build_tokenizer("bpe", 512, corpus, cache)
    files = list(Path(cache).glob("bpe-*.json"))
    assert len(files) == 1
    assert str(512) in files[0].name and corpus.fingerprint[:16] in files[0].name

    def no_training(*args: object) -> str:
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(tokenizer, "train_bpe", no_training)
    second = tokenizer.build_tokenizer("bpe", 512, corpus, cache)
    assert second.name == first.name
    assert first.vocab_size == 512
    text = "import os\n\nclass Foo(Bar):\n    def __init__(self) -> None: ...\n"
    ids = second.encode(text)
    assert second.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges learned from Python source apply


def test_cache_is_built_once_by_concurrent_builders(tmp_path: Path) -> None:
    target = tmp_path / "entry.bin"
    builds: list[int] = []
    results: list[bytes] = []

    def build() -> bytes:
        builds.append(1)
        time.sleep(0.3)  # long enough that the other thread arrives while this one builds
        return b"payload"

    threads = [
        threading.Thread(target=lambda: results.append(tokenizer.cached_bytes(target, build)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert builds == [1]
    assert results == [b"payload"] * 3
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    def broken() -> bytes:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        tokenizer.cached_bytes(tmp_path / "x.bin", broken)
    assert not (tmp_path / "x.bin").exists()


def test_token_stream_is_cached_and_split_at_the_tail(
    cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(tokenizer="bytes", seq_len=32, max_bytes=SMALL, val_fraction=0.1)
    first = data.prepare(cfg)
    assert first.train.dtype == np.uint16
    assert len(first.val) == int(SMALL * 0.1) or abs(len(first.val) - SMALL * 0.1) < 10
    text = "".join(data.stdlib_corpus(SMALL).documents()).encode()
    np.testing.assert_array_equal(
        np.concatenate([first.train, first.val]), np.frombuffer(text, np.uint8)
    )

    monkeypatch.setattr(np, "save", lambda *a, **k: pytest.fail("token cache not used"))
    again = data.prepare(cfg)
    np.testing.assert_array_equal(again.val, first.val)


def test_corpus_too_small_for_the_window_is_an_error(cache: str) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        data.prepare(DataConfig(seq_len=512, max_bytes=600))


# -- batches


def loader(seed: int = 0, rank: int = 0, world: int = 1, batch: int = 8) -> data.BatchLoader:
    return data.BatchLoader(
        stream(), seq_len=16, global_batch=batch, seed=seed, rank=rank, world_size=world
    )


def test_targets_are_inputs_shifted_by_one() -> None:
    x, y = loader().batch(0)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    torch.testing.assert_close(y[:, -1], x[:, -1] + 1)  # the stream is 0, 1, 2, ...


def test_batch_is_a_pure_function_of_seed_and_index() -> None:
    a, b = loader(seed=3), loader(seed=3)
    for _ in range(4):
        next(a)
    x4, _ = next(a)
    torch.testing.assert_close(x4, b.batch(4)[0])
    assert not torch.equal(loader(seed=4).batch(4)[0], x4)
    assert not torch.equal(b.batch(5)[0], x4)


def test_resumed_loader_continues_like_an_uninterrupted_one() -> None:
    uninterrupted = loader(seed=1)
    expected = [next(uninterrupted)[0] for _ in range(10)]

    first = loader(seed=1)
    seen = [next(first)[0] for _ in range(4)]
    saved = first.state_dict()
    assert saved == {"next_index": 4}

    resumed = loader(seed=1)
    resumed.load_state_dict(saved)
    seen += [next(resumed)[0] for _ in range(6)]
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_concatenate_to_the_single_process_batch(world: int) -> None:
    whole_x, whole_y = loader(seed=2).batch(7)
    parts = [loader(seed=2, rank=r, world=world).batch(7) for r in range(world)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole_x)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), whole_y)


def test_global_batch_must_divide_among_ranks() -> None:
    with pytest.raises(ValueError, match="divisible"):
        loader(world=3)


def test_validation_batches_are_fixed_and_rank_sliced() -> None:
    kwargs = {"seq_len": 16, "global_batch": 4, "n_batches": 3}
    one = data.eval_batches(stream(500), **kwargs)
    assert len(one) == 3
    again = data.eval_batches(stream(500), **kwargs)
    for (x1, _), (x2, _) in zip(one, again, strict=True):
        torch.testing.assert_close(x1, x2)
    halves = [data.eval_batches(stream(500), rank=r, world_size=2, **kwargs) for r in (0, 1)]
    for b in range(3):
        torch.testing.assert_close(torch.cat([halves[0][b][0], halves[1][b][0]]), one[b][0])
    # Spread over the whole held-out stream, first window at its start, last at its end.
    assert one[0][0][0, 0] == 0 and one[-1][1][-1, -1] == 499
