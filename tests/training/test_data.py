"""``training/data.py``, unit level on real photos: labelled sources (folders, CSV manifests),
skipped files, trainability checks, the split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models.errors import DatasetError
from tests.support.images import jpeg_files, make_subset
from training.data import load_labelled, scan_source, stratified_split


def identity(image):  # the transform: keep the decoded size only
    return image.size


def test_folder_with_junk_files_skips_and_counts_them(hymenoptera: Path, tmp_path: Path) -> None:
    root = make_subset(hymenoptera, tmp_path / "data", per_class=3)
    (root / "ants" / "notes.txt").write_text("not an image")
    (root / "bees" / "empty.jpg").write_bytes(b"")
    truncated = jpeg_files(hymenoptera, "bees")[10].read_bytes()
    (root / "bees" / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    shutil.copy(hymenoptera / "ants" / "imageNotFound.gif", root / "ants")  # a real GIF: usable
    data = load_labelled(root, identity, progress=False)
    assert data.classes == ["ants", "bees"]
    assert data.class_counts() == {"ants": 4, "bees": 3}
    skipped = {Path(p).name for p, _ in data.skipped}
    assert skipped == {"notes.txt", "empty.jpg", "truncated.jpg"}
    assert all(reason for _, reason in data.skipped)


def test_csv_manifest_with_relative_paths(hymenoptera: Path, tmp_path: Path) -> None:
    ants, bees = jpeg_files(hymenoptera, "ants")[:2], jpeg_files(hymenoptera, "bees")[:3]
    for p in ants + bees:
        shutil.copy(p, tmp_path / p.name)
    manifest = tmp_path / "labels.csv"
    rows = ["path,label"] + [f"{p.name},ant" for p in ants] + [f"{bees[0].name},bee"] + [
        f"{tmp_path / p.name},bee" for p in bees[1:]
    ]
    manifest.write_text("\n".join(rows) + "\n")
    data = load_labelled(manifest, identity, progress=False)
    assert data.class_counts() == {"ant": 2, "bee": 3}
    assert [r.label for r in scan_source(manifest)] == ["ant", "ant", "bee", "bee", "bee"]


def test_fingerprint_depends_on_content_and_labels_not_names(hymenoptera: Path, tmp_path: Path) -> None:
    a = make_subset(hymenoptera, tmp_path / "a", per_class=2)
    b = tmp_path / "b"
    shutil.copytree(a, b, symlinks=False)
    for f in (b / "ants").iterdir():
        f.rename(f.with_name("renamed-" + f.name))
    fa = load_labelled(a, identity, progress=False).fingerprint()
    assert fa == load_labelled(b, identity, progress=False).fingerprint()
    shutil.move(str(next((b / "ants").iterdir())), b / "bees")
    (b / "ants" / "extra.jpg").symlink_to(jpeg_files(hymenoptera, "ants")[5])
    assert fa != load_labelled(b, identity, progress=False).fingerprint()


@pytest.mark.parametrize(
    "layout,message",
    [
        ({}, "no images"),
        ({"ants": 3}, "only one class"),
        ({"ants": 3, "bees": 1}, "at least 2"),
    ],
)
def test_untrainable_sources_raise_clear_errors(hymenoptera: Path, tmp_path: Path, layout: dict, message: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for label, count in layout.items():
        (root / label).mkdir()
        for photo in jpeg_files(hymenoptera, label)[:count]:
            (root / label / photo.name).symlink_to(photo)
    with pytest.raises(DatasetError, match=message):
        load_labelled(root, identity, progress=False)


def test_only_unreadable_files_is_an_error(tmp_path: Path) -> None:
    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for i in range(2):
            (tmp_path / label / f"{i}.jpg").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="no usable images"):
        load_labelled(tmp_path, identity, progress=False)


def test_missing_source_and_bad_manifest(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such directory"):
        scan_source(tmp_path / "nope")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\nonly-a-path.jpg\n")
    with pytest.raises(DatasetError, match="expected 'path,label'"):
        scan_source(bad)


def test_stratified_split_is_reproducible_disjoint_and_covers_every_class() -> None:
    targets = np.array([0] * 50 + [1] * 10 + [2] * 2)
    train, val = stratified_split(targets, 0.2, seed=7)
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(targets)
    assert np.bincount(targets[val]).tolist() == [10, 2, 1]
    assert (np.bincount(targets[train]) >= 1).all()
    again = stratified_split(targets, 0.2, seed=7)
    np.testing.assert_array_equal(val, again[1])
    assert not np.array_equal(val, stratified_split(targets, 0.2, seed=8)[1])
