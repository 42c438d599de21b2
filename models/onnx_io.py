"""ONNX artifacts: checking a graph against its spec, and opening onnxruntime sessions.

The contract every version's ``model.onnx`` meets: one float32 input ``input`` of shape
(batch, 3, S, S) with a dynamic batch axis, and two outputs, ``logits`` (batch, num_classes) and
``embedding`` (batch, embedding_size).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ModelError
from .spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS, ModelSpec

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)


def _dims(value_info: object) -> list[int | str]:
    shape = value_info.type.tensor_type.shape  # type: ignore[attr-defined]
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in shape.dim]


def check_onnx_contract(path: str | os.PathLike[str], spec: ModelSpec) -> None:
    """Raise :class:`ModelError` unless the file is a valid ONNX graph whose input and outputs
    match ``spec`` (names, ranks, class count, embedding size, dynamic batch axis)."""
    import onnx

    try:
        model = onnx.load(os.fspath(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several unrelated types for a damaged file
        raise ModelError(f"{path}: not a valid ONNX model ({exc.__class__.__name__}: {exc})") from exc
    graph = model.graph
    inputs = {i.name: _dims(i) for i in graph.input}
    outputs = {o.name: _dims(o) for o in graph.output}
    size = spec.preprocess.input_size
    problems = []
    if inputs.get(ONNX_INPUT, [None])[1:] != [3, size, size]:
        problems.append(f"input '{ONNX_INPUT}' should be (batch, 3, {size}, {size}), got {inputs}")
    if outputs.get(ONNX_LOGITS, [None])[1:] != [spec.num_classes]:
        problems.append(
            f"output '{ONNX_LOGITS}' should be (batch, {spec.num_classes}), got {outputs.get(ONNX_LOGITS)}"
        )
    if outputs.get(ONNX_EMBEDDING, [None])[1:] != [spec.embedding_size]:
        problems.append(
            f"output '{ONNX_EMBEDDING}' should be (batch, {spec.embedding_size}), "
            f"got {outputs.get(ONNX_EMBEDDING)}"
        )
    for name, dims in [*inputs.items(), *outputs.items()]:
        if dims and isinstance(dims[0], int) and dims[0] > 0:
            problems.append(f"'{name}' has a fixed batch size {dims[0]}; the batch axis must be dynamic")
    if problems:
        raise ModelError(f"{path} does not match its spec: " + "; ".join(problems))


def cpu_session(
    path: str | os.PathLike[str], *, intra_op_threads: int | None = None
) -> onnxruntime.InferenceSession:
    """An onnxruntime session on the CPU provider alone (named explicitly, so a GPU build of
    onnxruntime on a CPU-only host does not try CUDA and log errors)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def run_in_batches(
    session: onnxruntime.InferenceSession, inputs: np.ndarray, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``inputs`` (N, 3, S, S) through a session; returns (logits, embeddings)."""
    if inputs.ndim != 4 or len(inputs) == 0:
        raise ValueError(f"expected a non-empty (N, 3, S, S) batch, got shape {inputs.shape}")
    logits, embeddings = [], []
    for start in range(0, len(inputs), batch_size):
        chunk = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
        out_logits, out_embedding = session.run([ONNX_LOGITS, ONNX_EMBEDDING], {ONNX_INPUT: chunk})
        logits.append(out_logits)
        embeddings.append(out_embedding)
    return np.concatenate(logits), np.concatenate(embeddings)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)
