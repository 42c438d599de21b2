"""``training/importer.py``, unit level on a real label store: importing a labelled folder counts
what it stored, moved and left unchanged, and skips (with the reason) what it cannot store."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.images import jpeg_files
from tests.support.stores import MAX_PIXELS, label_store
from training.importer import import_folder


def test_import_folder_counts_and_skips(hymenoptera: Path, tmp_path: Path) -> None:
    store = label_store(tmp_path / "home")
    root = tmp_path / "data"
    ants, bees = jpeg_files(hymenoptera, "ants")[:3], jpeg_files(hymenoptera, "bees")[:3]
    for label, photos in (("ants", ants), ("bees", bees + ants[:1]), ("caf\u00e9", bees[:1])):
        (root / label).mkdir(parents=True)
        for photo in photos:
            shutil.copy(photo, root / label / photo.name)
    (root / "ants" / "notes.txt").write_text("not an image")

    summary = import_folder(root, store, max_pixels=MAX_PIXELS, progress=False)
    # ants[0] is also in bees/: stored under ants, then moved to bees (the later folder wins)
    assert (summary.stored, summary.moved, summary.unchanged) == (6, 1, 0)
    assert sorted(Path(p).name for p, _ in summary.skipped) == [bees[0].name, "notes.txt"]
    reasons = dict((Path(p).name, r) for p, r in summary.skipped)
    assert "not a recognised image" in reasons["notes.txt"] and "may only contain" in reasons[bees[0].name]
    assert store.counts() == {"ants": 2, "bees": 4}
    assert summary.to_dict()["skipped"] == 2 and "6 stored" in summary.describe()

    again = import_folder(root, store, max_pixels=MAX_PIXELS, progress=False)
    assert (again.stored, again.unchanged, again.moved, len(again.skipped)) == (0, 5, 2, 2)
    assert len(store.images()) == 6
