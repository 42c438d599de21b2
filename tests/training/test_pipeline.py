"""``training/pipeline.py`` (bootstrap), real network level (slow): the bootstrap model of each
offline backbone through onnxruntime proves its weight mapping and the shared preprocessing are
wired right (a wrong mapping or mean/std gives nonsense classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.onnx_io import cpu_session, run_in_batches, softmax
from models.preprocess import preprocess_image
from store.state import open_state
from training.backbones import OFFLINE_BACKBONES

pytestmark = pytest.mark.slow

#: each offline backbone's input side (timm's config for it), which its versions' specs carry
INPUT_SIZES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}


def classify(home: Path, photo: np.ndarray) -> list[int]:
    from PIL import Image

    version = open_state(home=home).registry.active()
    assert version is not None
    x = preprocess_image(Image.fromarray(photo), version.spec.preprocess)[None]
    logits, _ = run_in_batches(cpu_session(version.onnx_path), x)
    return np.argsort(-softmax(logits)[0])[:3].tolist()


@pytest.fixture(params=list(OFFLINE_BACKBONES))
def backbone_home(request: pytest.FixtureRequest, bootstrapped_home_of) -> tuple[str, Path]:
    return request.param, bootstrapped_home_of(request.param)


def test_bootstrap_registers_the_imagenet_classifier(backbone_home: tuple[str, Path]) -> None:
    backbone, home = backbone_home
    version = open_state(home=home).registry.active()
    assert version is not None and version.version == "v1"
    assert version.spec.backbone == OFFLINE_BACKBONES[backbone].arch
    assert version.spec.preprocess.input_size == INPUT_SIZES[backbone]
    assert version.spec.num_classes == 1000
    assert version.spec.labels[967] == "espresso"
    assert version.spec.preprocess.mean == (0.5, 0.5, 0.5)
    assert version.spec.preprocess.interpolation == "bicubic"
    assert version.spec.embedding_size == 1280
    assert version.info["details"]["onnx_parity"]["max_logit_diff"] < 1e-4
    assert version.info["details"]["onnx_parity"]["exporter"] == "dynamo"
    assert version.summary()["exporter"] == "dynamo"
    version.verify()


def test_chelsea_is_a_cat_and_coffee_is_espresso(backbone_home: tuple[str, Path]) -> None:
    from skimage import data

    _, home = backbone_home
    assert classify(home, data.chelsea())[0] in {281, 282, 283, 284, 285}
    assert classify(home, data.coffee())[0] == 967


