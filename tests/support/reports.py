"""A hand-worked classification example and a check of written PNG files, for the tests of
training's metrics, plots and reports."""

from __future__ import annotations

from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LABELS = ["cat", "dog", "bird"]

# Hand-worked 3-class example. Confusion (rows true, columns predicted):
#   cat:  2 cat, 1 dog, 0 bird   -> support 3
#   dog:  0 cat, 1 dog, 1 bird   -> support 2
#   bird: 0 cat, 0 dog, 1 bird   -> support 1
# Column sums (predictions): cat 2, dog 2, bird 2.
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 2000  # a real rendered figure, not an empty stub
