"""``models/extract.py``, unit level on a tiny real ONNX model: batched extraction on worker
threads, each with its own single-threaded session, gives the same results, in the same order, as
running the whole batch through one session."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.extract import extract
from models.onnx_io import cpu_session, run_in_batches
from models.preprocess import decode_and_crop, normalise_crops
from tests.support.images import noise_png
from tests.support.models import tiny_spec, write_tiny_onnx


def png(seed: int) -> bytes:
    return noise_png(7, 9, seed)


@pytest.mark.parametrize("workers,batch_size", [(1, 4), (2, 3), (3, 1), (4, 50)])
def test_extract_equals_one_session_in_order(tmp_path: Path, workers: int, batch_size: int) -> None:
    model = write_tiny_onnx(tmp_path / "tiny.onnx")
    config = tiny_spec().preprocess
    blobs = {f"img{i}": png(i) for i in range(23)}
    names = list(blobs)
    seen_names: list[str] = []
    logits, embeddings = [], []
    for batch, batch_logits, batch_embeddings in extract(model, names, blobs.__getitem__, config,
                                                         workers=workers, batch_size=batch_size):
        assert len(batch) == len(batch_logits) == len(batch_embeddings) <= batch_size
        seen_names += batch
        logits.append(batch_logits)
        embeddings.append(batch_embeddings)
    assert seen_names == names
    # the serving path: the crops /predict would make of these images
    inputs = normalise_crops(np.stack([decode_and_crop(blobs[n], config, fast=True) for n in names]), config)
    expected_logits, expected_embeddings = run_in_batches(cpu_session(model), inputs)
    np.testing.assert_allclose(np.concatenate(logits), expected_logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(embeddings), expected_embeddings, rtol=1e-6, atol=1e-6)


def test_nothing_to_extract_and_read_errors(tmp_path: Path) -> None:
    model = write_tiny_onnx(tmp_path / "tiny.onnx")
    config = tiny_spec().preprocess
    assert list(extract(model, [], bytes, config, workers=2)) == []
    nothing: dict[str, bytes] = {}
    with pytest.raises(KeyError):
        list(extract(model, ["missing"], nothing.__getitem__, config, workers=2))
    with pytest.raises(ValueError, match="workers"):
        list(extract(model, ["x"], bytes, config, workers=0))  # type: ignore[arg-type]  # never called


def test_extract_decodes_on_the_serving_fast_path(tmp_path: Path) -> None:
    """A large JPEG, where the fast path (reduced-scale decoding) and the exact one differ: the
    embeddings are those of the crops /predict makes, not of the exact path's."""
    model = write_tiny_onnx(tmp_path / "tiny.onnx")
    config = tiny_spec().preprocess
    rng = np.random.default_rng(3)
    pixels = (rng.random((1200, 1600, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    blob = out.getvalue()
    fast, exact = decode_and_crop(blob, config), decode_and_crop(blob, config, fast=False)
    assert not np.array_equal(fast, exact)  # else this test could not tell the paths apart
    ((_, _, embeddings),) = list(extract(model, ["big"], {"big": blob}.__getitem__, config, workers=1))
    _, want = run_in_batches(cpu_session(model), normalise_crops(fast[None], config))
    _, other = run_in_batches(cpu_session(model), normalise_crops(exact[None], config))
    np.testing.assert_allclose(embeddings, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(embeddings, other, rtol=1e-6, atol=1e-6)
