"""``models/retrain.py``, unit level: the retrain's fixed held-out split (the arithmetic and the
promotion gate are exercised through ``service/retrain.py``, in ``tests/service/test_retrain.py``)."""

from __future__ import annotations

import random

import pytest

from models.retrain import is_held_out


def test_held_out_is_fixed_per_image_and_near_the_fraction() -> None:
    rng = random.Random(0)
    ids = [rng.randbytes(32).hex() for _ in range(2000)]
    split = [is_held_out(i) for i in ids]
    assert split == [is_held_out(i) for i in ids]
    assert 0.17 < sum(split) / len(ids) < 0.23
    assert sum(is_held_out(i, 0.5) for i in ids) / len(ids) == pytest.approx(0.5, abs=0.04)
    assert not any(is_held_out(i, 0.0) for i in ids) and all(is_held_out(i, 1.0) for i in ids)
    assert all(is_held_out(i, 0.5) for i, h in zip(ids, split, strict=True) if h)  # growing the fraction only adds
    with pytest.raises(ValueError):
        is_held_out("../x")
    with pytest.raises(ValueError):
        is_held_out(ids[0], 1.5)
