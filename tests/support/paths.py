"""Where things are: the repository, the shared photo folder, the two sample photos."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the hymenoptera photos (ants/, bees/), checked out beside the repository as ../shared
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera" / "train"
SAMPLES = ROOT / "training" / "samples"
#: scikit-image's cat and coffee cup (the bootstrap model calls them a cat and espresso)
CHELSEA = (SAMPLES / "chelsea.jpg").read_bytes()
COFFEE = (SAMPLES / "coffee.jpg").read_bytes()
