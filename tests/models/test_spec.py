"""``models/spec.py``, unit level: the model spec's validation and round trip."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.spec import ModelSpec, PreprocessConfig
from tests.support.models import tiny_spec


def test_round_trip_through_json() -> None:
    spec = tiny_spec()
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_resize_size_follows_crop_pct_like_timm() -> None:
    assert PreprocessConfig(input_size=224, crop_pct=0.875).resize_size == 256
    assert PreprocessConfig(input_size=224, crop_pct=1.0).resize_size == 224


def test_duplicate_labels_are_rejected() -> None:
    with pytest.raises(ValidationError, match="repeated"):
        tiny_spec(labels=("cat", "dog", "cat"))


def test_a_single_label_is_rejected() -> None:
    with pytest.raises(ValidationError):
        tiny_spec(labels=("cat",))


@pytest.mark.parametrize("field,value", [("std", (0.5, 0.0, 0.5)), ("crop_pct", 0.0), ("input_size", 0)])
def test_unsafe_preprocessing_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        PreprocessConfig(**{field: value})


def test_unknown_fields_are_rejected() -> None:
    data = tiny_spec().model_dump()
    data["surprise"] = 1
    with pytest.raises(ValidationError):
        ModelSpec.model_validate(data)
