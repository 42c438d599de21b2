"""``training/export.py``, real network level (slow): ONNX export parity, the check passes for a
faithful export and fails for an unfaithful one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import ExportError
from models.onnx_io import check_onnx_contract, cpu_session, run_in_batches
from models.preprocess import decode_image, preprocess_image
from tests.support.images import jpeg_files
from training.backbones import ClassifierWithEmbedding, create_backbone
from training.export import check_parity, export_onnx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, hymenoptera: Path):
    backbone = create_backbone()
    backbone.reset_head(2)
    photos = jpeg_files(hymenoptera, "ants")[:3] + jpeg_files(hymenoptera, "bees")[:3]
    inputs = np.stack([preprocess_image(decode_image(p.read_bytes()), backbone.preprocess)
                       for p in photos])
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    parity = export_onnx(backbone.model, path, inputs)
    return backbone, path, inputs, parity


def test_export_matches_torch_on_real_photos(exported) -> None:
    backbone, path, inputs, parity = exported
    assert parity.images == 6
    assert parity.max_logit_diff < 1e-4 and parity.top1_agreement == 1.0


def test_exported_graph_has_the_contract_and_a_dynamic_batch(exported) -> None:
    from models.spec import ModelSpec

    backbone, path, inputs, _ = exported
    spec = ModelSpec(labels=("ants", "bees"), preprocess=backbone.preprocess, backbone=backbone.name,
                     backbone_fingerprint=backbone.fingerprint(), embedding_size=1280)
    check_onnx_contract(path, spec)
    session = cpu_session(path)
    for batch in (1, 5):
        logits, embedding = run_in_batches(session, inputs[:batch], batch_size=batch)
        assert logits.shape == (batch, 2) and embedding.shape == (batch, 1280)


def test_parity_check_catches_a_graph_that_differs_from_torch(exported) -> None:
    backbone, path, inputs, _ = exported
    wrapper = ClassifierWithEmbedding(backbone.model).eval()
    with torch.no_grad():
        backbone.model.get_classifier().bias += 1e-2  # torch now disagrees with the file
    try:
        with pytest.raises(ExportError, match="differs from torch"):
            check_parity(wrapper, path, inputs)
    finally:
        with torch.no_grad():
            backbone.model.get_classifier().bias -= 1e-2


def test_export_needs_real_images(exported, tmp_path: Path) -> None:
    backbone, _, inputs, _ = exported
    with pytest.raises(ExportError, match="at least two"):
        export_onnx(backbone.model, tmp_path / "m.onnx", inputs[:1])
