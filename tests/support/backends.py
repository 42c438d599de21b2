"""The storage tests on every backend (SQLite + files, Postgres + a shared directory, Postgres +
S3): which backends, the mark that runs a test on each (with the ``deployment`` fixture of
``tests/store/conftest.py``), a replica's stores, small distinct images and predictions of them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from store.predictions import NewPrediction, new_prediction_id
from store.settings import StoreSettings
from store.state import State, open_state
from tests.support.images import noise_png

BACKENDS = ["local", "postgres+directory", "postgres+s3"]

#: run the test once per backend, its ``deployment`` argument set up for that backend
parametrized = pytest.mark.parametrize("deployment", BACKENDS, indirect=True)


def replica(deployment: dict[str, object], tmp_path: Path, name: str) -> State:
    """The stores of the replica ``name`` of ``deployment`` (on one machine, every name opens the
    same home)."""
    settings = {"home": tmp_path / name, **deployment, "replica_id": name}
    return open_state(StoreSettings(**settings))  # type: ignore[arg-type]


def png(seed: int) -> bytes:
    """A tiny PNG of random pixels, different for each seed."""
    return noise_png(5, 6, seed)


#: when :func:`kept` predictions are made (plus their minutes)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def kept(seed: int, minutes: float = 0, *, margin: float = 0.5, entropy: float = 0.5,
         embedding: np.ndarray | None = None, prediction_id: str | None = None, label: str = "ants") -> NewPrediction:
    """A prediction of the image ``png(seed)``, made ``minutes`` after :data:`T0`."""
    data = png(seed)
    return NewPrediction(
        prediction_id=prediction_id or new_prediction_id(), image=data,
        version="v1", label=label, score=0.5 + margin / 2, margin=margin, entropy=entropy,
        top_k=((label, 0.5 + margin / 2), ("bees", 0.5 - margin / 2)), created_at=T0 + timedelta(minutes=minutes),
        embedding=np.full(3, seed, np.float32) if embedding is None else embedding)
