"""Bulk import into the label store: ``python -m training import --data DIR``.

Adds every image of a labelled folder (one subfolder per class) or CSV manifest (``path,label``)
to the label store exactly as ``POST /admin/labels`` would: deduplicated by content, an image
already stored under another label moves to the new one. Files that cannot be read, are not
images, are too large, or carry an invalid label are skipped with their reason; they never stop
the import.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import InputError
from store.labels import LabelStore

from .data import scan_source

log = logging.getLogger(__name__)


@dataclass
class ImportSummary:
    """What an import did: how many images were new, moved to another label, already stored
    as they are, and which files were skipped (path, reason)."""

    stored: int = 0
    moved: int = 0
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.stored + self.moved + self.unchanged + len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "stored": self.stored,
            "moved": self.moved,
            "unchanged": self.unchanged,
            "skipped": len(self.skipped),
            "skipped_files": [{"path": path, "reason": reason} for path, reason in self.skipped],
        }

    def describe(self) -> str:
        """One line for a person."""
        return (
            f"{self.total} files: {self.stored} stored, {self.moved} moved to a new label, "
            f"{self.unchanged} unchanged, {len(self.skipped)} skipped"
        )


def import_folder(
    source: Path, store: LabelStore, *, max_pixels: int, progress: bool = True
) -> ImportSummary:
    """Add every image of ``source`` to ``store`` under its folder (or CSV) label.

    Raises:
        DatasetError: ``source`` is neither a directory nor a CSV manifest, or lists no files.
    """
    from tqdm import tqdm

    summary = ImportSummary()
    for record in tqdm(scan_source(source), desc="importing", unit="img", disable=not progress):
        try:
            result = store.add(record.path.read_bytes(), record.label, max_pixels=max_pixels)
        except (OSError, InputError) as exc:
            summary.skipped.append((str(record.path), str(exc)))
            log.warning("skipping %s: %s", record.path, exc)
            continue
        if result.status == "stored":
            summary.stored += 1
        elif result.status == "moved":
            summary.moved += 1
        else:
            summary.unchanged += 1
    log.info("import from %s: %s", source, summary.describe())
    return summary
