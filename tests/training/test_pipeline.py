"""``training/pipeline.py`` (bootstrap), real network level (slow): the bootstrap model through
onnxruntime proves the offline weight mapping and the shared preprocessing are wired right (a
wrong mapping or mean/std gives nonsense classes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.onnx_io import cpu_session, run_in_batches, softmax
from models.preprocess import preprocess_image
from store.state import open_state

pytestmark = pytest.mark.slow


def classify(home: Path, photo: np.ndarray) -> list[int]:
    from PIL import Image

    version = open_state(home=home).registry.active()
    assert version is not None
    x = preprocess_image(Image.fromarray(photo), version.spec.preprocess)[None]
    logits, _ = run_in_batches(cpu_session(version.onnx_path), x)
    return np.argsort(-softmax(logits)[0])[:3].tolist()


def test_bootstrap_registers_the_imagenet_classifier(bootstrapped_home: Path) -> None:
    version = open_state(home=bootstrapped_home).registry.active()
    assert version is not None and version.version == "v1"
    assert version.spec.num_classes == 1000
    assert version.spec.labels[967] == "espresso"
    assert version.spec.preprocess.mean == (0.5, 0.5, 0.5)
    assert version.spec.preprocess.interpolation == "bicubic"
    assert version.spec.embedding_size == 1280
    assert version.info["details"]["onnx_parity"]["max_logit_diff"] < 1e-4
    assert version.info["details"]["onnx_parity"]["exporter"] == "dynamo"
    assert version.summary()["exporter"] == "dynamo"
    version.verify()


def test_chelsea_is_a_cat_and_coffee_is_espresso(bootstrapped_home: Path) -> None:
    from skimage import data

    assert classify(bootstrapped_home, data.chelsea())[0] in {281, 282, 283, 284, 285}
    assert classify(bootstrapped_home, data.coffee())[0] == 967


