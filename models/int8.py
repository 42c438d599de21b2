"""The INT8 gate: an INT8 variant of a graph is stored only if it scores within
:data:`MAX_ACCURACY_LOSS` of the fp32 graph on the same images.

Both ways a variant comes about run this one check: ``python -m training quantize`` (a version
quantised on its own training images) and the retrain job (the parent's INT8 backbone with the new
head). Without labels the fp32 graph's own answers are the reference, so the figure is how often
INT8 agrees with it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .onnx_io import cpu_session, run_in_batches, softmax

#: Top-1 accuracy an INT8 variant may lose against fp32 on its check images (0.5 percentage
#: points); a variant that loses more is not stored.
MAX_ACCURACY_LOSS = 0.005
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
