"""INT8 variants of a graph: static quantisation (:func:`quantize_onnx`, torch-free so the
service's retrain jobs can run it) and the INT8 gate: a variant is stored only if it scores within
:data:`MAX_ACCURACY_LOSS` of the fp32 graph on the same images.

Every way a variant comes about runs this one check: ``python -m training quantize`` (a version
quantised on its own training images), the retrain job (the parent's INT8 backbone with the new
head, or the new graph calibrated on the store's images) and ``python -m training reexport``.
Without labels the fp32 graph's own answers are the reference, so the figure is how often INT8
agrees with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_io import cpu_session, run_in_batches, softmax
from .spec import ONNX_INPUT, ONNX_LOGITS

#: Top-1 accuracy an INT8 variant may lose against fp32 on its check images (0.5 percentage
#: points); a variant that loses more is not stored.
MAX_ACCURACY_LOSS = 0.005
#: Most images a variant is calibrated on: MinMax ranges settle well before this.
MAX_CALIBRATION_IMAGES = 200
CALIBRATION_BATCH = 8
#: Tolerance of the comparison itself: accuracies are ratios of small counts.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Int8Check:
    """The figures of one comparison, and its verdict."""

    check_images: int
    labelled: bool  #: whether ``targets`` were given (else fp32's answers are the reference)
    fp32_accuracy: float
    int8_accuracy: float
    top1_agreement: float
    max_logit_diff: float
    max_score_diff: float  #: largest difference of a softmax score (what a response reports)
    max_accuracy_loss: float

    @property
    def accuracy_loss(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    @property
    def passed(self) -> bool:
        return self.accuracy_loss <= self.max_accuracy_loss + _EPSILON

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_loss": self.accuracy_loss, "passed": self.passed}


def check_int8(fp32_graph: str | os.PathLike[str], int8_graph: str | os.PathLike[str], inputs: np.ndarray,
               targets: np.ndarray | None, *, threads: int | None = None,
               max_accuracy_loss: float = MAX_ACCURACY_LOSS) -> Int8Check:
    """Run both graphs on preprocessed ``inputs`` (N, 3, S, S) and compare their top-1 answers
    with ``targets`` (class indices), or with fp32's answers when there are no targets."""
    if len(inputs) == 0:
        raise ValueError("the INT8 check needs at least one image")
    fp32_logits, _ = run_in_batches(cpu_session(fp32_graph, intra_op_threads=threads), inputs, batch_size=16)
    int8_logits, _ = run_in_batches(cpu_session(int8_graph, intra_op_threads=threads), inputs, batch_size=16)
    fp32_top1, int8_top1 = fp32_logits.argmax(1), int8_logits.argmax(1)
    reference = fp32_top1 if targets is None else np.asarray(targets)
    return Int8Check(
        check_images=len(inputs),
        labelled=targets is not None,
        fp32_accuracy=float((fp32_top1 == reference).mean()),
        int8_accuracy=float((int8_top1 == reference).mean()),
        top1_agreement=float((fp32_top1 == int8_top1).mean()),
        max_logit_diff=float(np.abs(fp32_logits - int8_logits).max()),
        max_score_diff=float(np.abs(softmax(fp32_logits) - softmax(int8_logits)).max()),
        max_accuracy_loss=max_accuracy_loss,
    )


class _BatchReader:
    """onnxruntime's CalibrationDataReader over an array of preprocessed images."""

    def __init__(self, inputs: np.ndarray, batch_size: int = CALIBRATION_BATCH) -> None:
        self._batches = iter([np.ascontiguousarray(inputs[i : i + batch_size], dtype=np.float32)
                              for i in range(0, len(inputs), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {ONNX_INPUT: batch}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization logs an INFO line per adjusted weight channel (hundreds) on the
    root logger: keep them out of INFO-level output, not out of DEBUG."""
    root = logging.getLogger()
    saved = root.level
    if saved == logging.INFO:
        root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(saved)


def quantize_onnx(source: Path, destination: Path, calibration: np.ndarray) -> None:
    """Write ``source`` quantised statically to INT8 (QDQ format; uint8 activations, int8
    weights per output channel; MinMax ranges over ``calibration``) to ``destination``. The node
    that computes ``logits`` (the linear head) stays float."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration.ndim != 4 or len(calibration) == 0:
        raise ValueError(f"calibration needs a non-empty (N, 3, S, S) batch, got shape {calibration.shape}")

    class Reader(_BatchReader, CalibrationDataReader):
        pass

    with tempfile.TemporaryDirectory(prefix="transfer-serve-quantize-") as tmp, _quiet_root_logger():
        prepared = Path(tmp) / "prepared.onnx"
        # ORT's recommended step before quantising: shape inference and graph clean-up
        quant_pre_process(str(source), str(prepared))
        head = [node.name for node in onnx.load(str(prepared)).graph.node if ONNX_LOGITS in node.output]
        quantize_static(
            str(prepared), str(destination), Reader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=head,
        )
