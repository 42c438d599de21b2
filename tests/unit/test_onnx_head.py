"""Replacing the head of an exported graph (tiny real ONNX model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.errors import ModelError
from models.onnx_io import check_onnx_contract, read_head, replace_head, run_in_batches, cpu_session, verify_head
from tests.conftest import tiny_spec, write_tiny_onnx


def test_replace_head_with_more_classes(tmp_path: Path) -> None:
    source = write_tiny_onnx(tmp_path / "src.onnx")
    weight, bias = read_head(source)
    assert weight.shape == (2, 3) and bias.shape == (2,)
    new_w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    new_b = np.array([0.1, -0.2, 0.3, 0.0], np.float32)
    replace_head(source, tmp_path / "new.onnx", new_w, new_b)
    check_onnx_contract(tmp_path / "new.onnx", tiny_spec(labels=("a", "b", "c", "d")))
    x = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
    assert verify_head(tmp_path / "new.onnx", new_w, new_b, x) < 1e-5
    _, old_embedding = run_in_batches(cpu_session(source), x)
    _, new_embedding = run_in_batches(cpu_session(tmp_path / "new.onnx"), x)
    np.testing.assert_array_equal(old_embedding, new_embedding)
    np.testing.assert_array_equal(read_head(tmp_path / "new.onnx")[0], new_w)


def test_verify_head_catches_a_mismatch(tmp_path: Path) -> None:
    source = write_tiny_onnx(tmp_path / "src.onnx")
    weight, bias = read_head(source)
    x = np.ones((2, 3, 4, 4), np.float32)
    with pytest.raises(ModelError, match="does not match"):
        verify_head(source, weight, bias + 0.5, x)


def test_verify_head_allows_float32_rounding_of_large_heads(tmp_path: Path) -> None:
    # heads fitted on a few images reach logits in the hundreds; float32 rounding of such sums
    # exceeds any fixed absolute tolerance, while a wrong head misses by far more
    source = write_tiny_onnx(tmp_path / "src.onnx")
    rng = np.random.default_rng(1)
    weight = (rng.normal(size=(2, 3)) * 3e4).astype(np.float32)
    bias = (rng.normal(size=2) * 1e3).astype(np.float32)
    replace_head(source, tmp_path / "big.onnx", weight, bias)
    x = rng.normal(size=(8, 3, 4, 4)).astype(np.float32)
    assert verify_head(tmp_path / "big.onnx", weight, bias, x) > 1e-5  # beyond the old fixed bound
    with pytest.raises(ModelError, match="does not match"):
        verify_head(tmp_path / "big.onnx", weight, bias * 1.01, x)


def test_replace_head_refuses_wrong_shapes(tmp_path: Path) -> None:
    source = write_tiny_onnx(tmp_path / "src.onnx")
    with pytest.raises(ValueError, match="embedding size"):
        replace_head(source, tmp_path / "x.onnx", np.zeros((2, 5), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="head must be"):
        replace_head(source, tmp_path / "x.onnx", np.zeros((2, 3), np.float32), np.zeros(3, np.float32))
