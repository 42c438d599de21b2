"""``store/local/embeddings.py``, unit level on a real SQLite file: the embedding cache keeps
vectors bit for bit, per backbone, for any number of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.support.stores import embedding_cache


def test_embedding_cache_round_trip_is_bit_exact(tmp_path: Path) -> None:
    cache = embedding_cache(tmp_path / "home")
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38, 1 / 3], dtype=np.float32)
    vectors = {"a" * 64: special, "b" * 64: np.random.default_rng(0).normal(size=1280).astype(np.float32)}
    cache.put_many(vectors, "backbone-1")
    got = cache.get_many(["a" * 64, "b" * 64, "c" * 64], "backbone-1")
    assert set(got) == {"a" * 64, "b" * 64}
    for key, vector in vectors.items():
        assert got[key].dtype == np.float32 and got[key].shape == vector.shape
        assert got[key].tobytes() == vector.tobytes()
    got["a" * 64][0] = 5.0  # callers get their own writable copy
    assert cache.get_many(["a" * 64], "backbone-1")["a" * 64][0] == 0.0


def test_embedding_cache_keeps_backbones_apart(tmp_path: Path) -> None:
    cache = embedding_cache(tmp_path / "home")
    cache.put_many({"a" * 64: np.ones(4, np.float32)}, "backbone-1")
    assert cache.get_many(["a" * 64], "backbone-2") == {}
    cache.put_many({"a" * 64: np.full(8, 2.0, np.float32)}, "backbone-2")
    assert cache.get_many(["a" * 64], "backbone-1")["a" * 64].tolist() == [1.0] * 4
    assert cache.get_many(["a" * 64], "backbone-2")["a" * 64].tolist() == [2.0] * 8
    cache.put_many({"a" * 64: np.zeros(4, np.float32)}, "backbone-1")  # replaces
    assert cache.get_many(["a" * 64], "backbone-1")["a" * 64].tolist() == [0.0] * 4
    assert (cache.count("backbone-1"), cache.count("backbone-2"), cache.count("other")) == (1, 1, 0)
    with pytest.raises(ValueError, match="1-D"):
        cache.put_many({"b" * 64: np.ones((2, 2), np.float32)}, "backbone-1")
    assert cache.count("backbone-1") == 1


def test_embedding_cache_many_ids(tmp_path: Path) -> None:
    cache = embedding_cache(tmp_path / "home")
    rng = np.random.default_rng(1)
    ids = [f"{n:064x}" for n in range(1300)]
    stored = {i: rng.normal(size=16).astype(np.float32) for i in ids[::2]}
    cache.put_many(stored, "bb")
    got = cache.get_many(ids + ids[:10], "bb")
    assert set(got) == set(stored) and cache.count("bb") == 650
    assert all(np.array_equal(got[i], v) for i, v in stored.items())
