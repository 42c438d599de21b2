"""Fixtures shared by every test directory: the real photo folder, one bootstrapped state
directory per session (and one per other offline backbone, where a test asks), and a
single-machine registry whose v1 was trained on flat grey images. Helpers live in
:mod:`tests.support`; fixtures of one directory in that directory's conftest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from store.local.registry import DirectoryRegistry
from tests.support.models import GREYS, grey_folder, tiny_spec, write_conv_onnx
from tests.support.paths import HYMENOPTERA


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.fail(f"test data missing: {HYMENOPTERA} (CI checks out ../shared beside the repo)")
    return HYMENOPTERA


@pytest.fixture(scope="session")
def bootstrapped_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory holding the bootstrap model (built once per session: ~15 s)."""
    from store.state import open_state
    from training.pipeline import bootstrap

    home = tmp_path_factory.mktemp("bootstrapped")
    bootstrap(open_state(home=home).registry)
    return home


@pytest.fixture(scope="session")
def bootstrapped_home_of(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A state directory holding the bootstrap model of the offline backbone named, each built
    once per session on first use by ``python -m training bootstrap --backbone NAME`` (in
    process; ``efficientnet_lite0``'s is :func:`bootstrapped_home`)."""
    from training.backbones import DEFAULT_BACKBONE
    from training.cli import main

    homes = {DEFAULT_BACKBONE: bootstrapped_home}

    def home_of(backbone: str) -> Path:
        if backbone not in homes:
            home = tmp_path_factory.mktemp(f"bootstrapped-{backbone}")
            assert main(["--home", str(home), "bootstrap", "--backbone", backbone]) == 0
            homes[backbone] = home
        return homes[backbone]

    return home_of


@pytest.fixture
def grey_version(tmp_path: Path) -> tuple[DirectoryRegistry, Path]:
    """A registry whose v1 (the tiny conv model, :func:`tests.support.models.write_conv_onnx`)
    was "trained" on the flat grey images of a folder, also returned: its stored hashes and
    targets are theirs, its details say it was not fit's split (so a quantisation check runs on
    the calibration images)."""
    folder, hashes, targets = grey_folder(tmp_path / "images", GREYS)
    registry = DirectoryRegistry(tmp_path / "home")
    registry.register(
        onnx_file=write_conv_onnx(tmp_path / "conv.onnx"), spec=tiny_spec(), metrics={"accuracy": 1.0},
        embeddings=np.zeros((len(hashes), 3), np.float32), embedding_targets=np.array(targets),
        embedding_hashes=hashes, parent=None, dataset_fingerprint=None, details={"strategy": "retrain"},
    )
    return registry, folder
