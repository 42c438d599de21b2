"""``service/keeper.py`` (unit, real SQLite state): the sampling, what is stored for an offer, the
bounded queue, the retention limits, and a full volume (tmpfs; skipped without ``mount``) that
stops keeping with one log line while offers go on being answered."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from service import keeper as keeper_module
from service.keeper import Offer, PredictionKeeper, to_new_prediction
from store.predictions import is_prediction_id
from store.state import open_state
from tests.support.images import grey_png
from tests.support.polling import eventually
from tests.support.volumes import fill, tmpfs

LABELS = ("ant", "bee", "wasp")


def offer(level: int, *, minutes_ago: float = 0, scores: tuple[float, ...] = (0.5, 0.3, 0.2)) -> Offer:
    """A kept-prediction offer of a small grey PNG (one distinct image per ``level``)."""
    return Offer(f"{level:032x}", grey_png(level), "v1", LABELS, np.array(scores, np.float32),
                 np.arange(4, dtype=np.float32) + level, datetime.now(UTC) - timedelta(minutes=minutes_ago))


def keeper_on(home: Path, **limits: float) -> PredictionKeeper:
    state = open_state(home=home)
    return PredictionKeeper(lambda: state.predictions, fraction=1.0, max_items=int(limits.get("max_items", 100)),
                            max_days=limits.get("max_days", 30), queue_size=int(limits.get("queue_size", 64)))


def test_an_offer_is_stored_with_its_hash_uncertainty_and_best_labels() -> None:
    new = to_new_prediction(offer(7, scores=(0.2, 0.5, 0.3)))
    assert new.image_id == hashlib.sha256(grey_png(7)).hexdigest()
    assert (new.label, new.score, new.margin) == ("bee", pytest.approx(0.5), pytest.approx(0.2))
    assert 0.9 < new.entropy < 1.0
    assert [label for label, _ in new.top_k] == ["bee", "wasp", "ant"]


def test_ids_are_given_to_the_sampled_fraction_only() -> None:
    keeper = PredictionKeeper(lambda: None, fraction=0.25, max_items=1, max_days=1,  # type: ignore[arg-type,return-value]
                              queue_size=1, rng=random.Random(0))
    ids = [keeper.new_id() for _ in range(2000)]
    kept = [i for i in ids if i is not None]
    assert 400 < len(kept) < 600
    assert all(is_prediction_id(i) for i in kept) and len(set(kept)) == len(kept)
    off = PredictionKeeper(lambda: None, fraction=0.0, max_items=1, max_days=1, queue_size=1)  # type: ignore[arg-type,return-value]
    assert not off.enabled and off.new_id() is None


def test_offers_are_written_in_the_background_and_a_full_queue_drops_without_blocking(tmp_path: Path) -> None:
    keeper = keeper_on(tmp_path / "home", queue_size=3)
    assert [keeper.offer(offer(level)) for level in range(4)] == [True, True, True, False]  # not started yet
    keeper.start()
    keeper.stop()
    store = open_state(home=tmp_path / "home").predictions
    assert store.count() == 3
    kept = store.get(f"{1:032x}")
    assert kept.label == "ant" and kept.embedding is not None and kept.embedding.tolist() == [1, 2, 3, 4]
    assert store.read_image(f"{1:032x}") == grey_png(1)


def test_offers_arriving_one_by_one_are_gathered_into_one_write(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # each write costs a database open and a commit: under load, one per prediction would cost
    # more than the predictions' own writes (bench/README.md). Gathering for longer than the test
    # runs, so that a slow machine cannot split the batch: stop() writes what was gathered.
    monkeypatch.setattr(keeper_module, "GATHER_S", 60.0)
    state = open_state(home=tmp_path / "home")
    writes: list[int] = []

    class CountingStore:
        def add_many(self, predictions: list[object]) -> None:
            writes.append(len(predictions))
            state.predictions.add_many(predictions)  # type: ignore[arg-type]

        def prune(self, **limits: object) -> int:
            return 0

    keeper = PredictionKeeper(lambda: CountingStore(), fraction=1.0, max_items=100, max_days=1,  # type: ignore[arg-type,return-value]
                              queue_size=64)
    keeper.start()
    for level in range(5):
        keeper.offer(offer(level))
        time.sleep(0.05)  # time for a writer that writes as offers come to write each alone
    assert writes == []
    keeper.stop()
    assert writes == [5] and state.predictions.count() == 5


def test_the_retention_limits_remove_the_oldest_first(tmp_path: Path) -> None:
    keeper = keeper_on(tmp_path / "home", max_items=3, max_days=1)
    for level in range(6):  # level 0 is the oldest; level 5 is two days old: over the age limit
        keeper.offer(offer(level, minutes_ago=2 * 24 * 60 if level == 5 else 60 - level))
    keeper.start()
    keeper.stop()
    store = open_state(home=tmp_path / "home").predictions
    assert sorted(int(p.prediction_id, 16) for p in store.unlabelled(order="margin", limit=10)) == [2, 3, 4]


def test_a_full_volume_stops_keeping_with_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with tmpfs(tmp_path / "volume", "4m") as volume:
        keeper = keeper_on(volume / "home")
        keeper.offer(offer(1))
        keeper.start()
        eventually(lambda: open_state(home=volume / "home").predictions.count() == 1, timeout=20)
        fill(volume, "filler", leave=0)
        with caplog.at_level(logging.INFO, logger="service.keeper"):
            big = Offer(f"{2:032x}", bytes(300_000), "v1", LABELS, np.array([0.5, 0.3, 0.2], np.float32), None,
                        datetime.now(UTC))
            keeper.offer(big)
            eventually(lambda: keeper.new_id() is None, timeout=20)  # paused: no more ids handed out
            assert keeper.offer(big)  # an offer queued before the pause is still taken (and dropped)
            keeper.stop()
        stopped = [r for r in caplog.records if "keeping predictions stopped" in r.getMessage()]
        assert len(stopped) == 1 and stopped[0].levelno == logging.ERROR, caplog.text
        assert "out of space" in stopped[0].getMessage() and "predictions go on" in stopped[0].getMessage()
