"""Project level: what the README promises about inputs is what the code accepts (the accepted
image formats are written once, in the decoder, and the README lists the same ones)."""

from __future__ import annotations

import re

from models.preprocess import SUPPORTED_FORMATS
from tests.support.paths import ROOT


def test_the_readme_lists_exactly_the_formats_the_decoder_accepts() -> None:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"Accepted formats: ([^.]+)\.", readme)
    assert match, "README.md has no 'Accepted formats: ...' sentence"
    listed = {name.strip().upper() for name in match.group(1).split(",")}
    assert listed == set(SUPPORTED_FORMATS)
