"""``store/labels.py``, unit level: the label rule (what a label may be, and the message that says
why one is refused), checked by itself and through the single-machine label store, which must then
store nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.errors import InputError
from service.errors import input_status
from store.labels import InvalidLabelError, validate_label
from store.local.labels import SqliteLabelStore
from tests.support.images import noise_png
from tests.support.stores import MAX_PIXELS, label_store, stored_files


@pytest.fixture
def store(tmp_path: Path) -> SqliteLabelStore:
    return label_store(tmp_path / "home")


@pytest.mark.parametrize("label", ["ants", "Golden Retriever", "a.b-c_d", "x" * 64, "7", "...", "a b"])
def test_valid_labels(label: str) -> None:
    assert validate_label(label) == label


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("", "empty"),
        ("x" * 65, "65 characters long; the most is 64"),
        ("a/b", r"may only contain letters, digits, space, '-', '_' and '.' \(found '/', U\+002F SOLIDUS\)"),
        ("a\\b", "REVERSE SOLIDUS"),
        ("ant\x00", r"found U\+0000"),
        ("bee\n", r"found U\+000A"),
        ("..", "not allowed"),
        (".", "not allowed"),
        ("\u0430nts", "U+0430 CYRILLIC SMALL LETTER A".replace("+", r"\+")),  # Cyrillic а
        ("caf\u00e9", "LATIN SMALL LETTER E WITH ACUTE"),
        (" ants", "may not start or end with a space"),
        ("ants ", "may not start or end with a space"),
        ("a\tb", r"U\+0009"),
    ],
)
def test_invalid_labels_are_refused_with_the_rule(store: SqliteLabelStore, label: str, message: str) -> None:
    with pytest.raises(InvalidLabelError, match=message) as info:
        validate_label(label)
    assert isinstance(info.value, InputError) and input_status(info.value) == 422
    with pytest.raises(InvalidLabelError):
        store.add(noise_png(6, 5, seed=0), label, max_pixels=MAX_PIXELS)
    assert len(store.images()) == 0 and stored_files(store) == []
