"""ONNX export that validates itself: ``onnx.checker``, then the same real images through torch
and onnxruntime, compared numerically. An export that fails either check raises
:class:`ExportError` and nothing gets registered."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.errors import ExportError
from models.onnx_io import cpu_session, run_in_batches
from models.spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS

from .backbones import ClassifierWithEmbedding

log = logging.getLogger(__name__)

OPSET = 17
LOGITS_ATOL = 1e-4


@dataclass(frozen=True)
class ParityResult:
    images: int
    max_logit_diff: float
    max_embedding_diff: float
    top1_agreement: float

    def as_dict(self) -> dict[str, float]:
        return {
            "images": self.images,
            "max_logit_diff": self.max_logit_diff,
            "max_embedding_diff": self.max_embedding_diff,
            "top1_agreement": self.top1_agreement,
        }


def export_onnx(model: nn.Module, path: Path, parity_inputs: np.ndarray) -> ParityResult:
    """Export ``model`` (a timm classifier) to ``path`` with outputs ``logits`` and
    ``embedding`` and a dynamic batch axis, then check it on ``parity_inputs`` (N, 3, S, S)
    preprocessed real images: logits within 1e-4 of torch's and the same top-1 for every image.
    """
    if parity_inputs.ndim != 4 or len(parity_inputs) < 2:
        raise ExportError("parity check needs at least two preprocessed images (N, 3, S, S)")
    wrapper = ClassifierWithEmbedding(model).eval()
    example = torch.from_numpy(np.ascontiguousarray(parity_inputs[:2], dtype=np.float32))
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, whose export is slower and
        # writes external-data files (bench/README.md, "Tried and not kept"); the classic
        # exporter's output is what we verify.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=[ONNX_INPUT],
            output_names=[ONNX_LOGITS, ONNX_EMBEDDING],
            dynamic_axes={name: {0: "batch"} for name in (ONNX_INPUT, ONNX_LOGITS, ONNX_EMBEDDING)},
            opset_version=OPSET,
            dynamo=False,
        )
    import onnx

    try:
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    except Exception as exc:  # checker raises ValidationError and friends
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc
    return check_parity(wrapper, path, parity_inputs)


def check_parity(wrapper: nn.Module, path: Path, inputs: np.ndarray) -> ParityResult:
    """Compare torch and onnxruntime on the same inputs, in a batch and one image alone (which
    also proves the batch axis is dynamic)."""
    with torch.inference_mode():
        torch_logits, torch_embedding = (
            t.numpy() for t in wrapper(torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)))
        )
    session = cpu_session(path)
    ort_logits, ort_embedding = run_in_batches(session, inputs, batch_size=len(inputs))
    single_logits, _ = run_in_batches(session, inputs[:1], batch_size=1)
    logit_diff = float(
        max(np.abs(ort_logits - torch_logits).max(), np.abs(single_logits - torch_logits[:1]).max())
    )
    embedding_diff = float(np.abs(ort_embedding - torch_embedding).max())
    agreement = float((ort_logits.argmax(1) == torch_logits.argmax(1)).mean())
    result = ParityResult(len(inputs), logit_diff, embedding_diff, agreement)
    log.info("ONNX parity on %d images: max logit diff %.2e, top-1 agreement %.3f",
             len(inputs), logit_diff, agreement)
    if logit_diff > LOGITS_ATOL or agreement < 1.0:
        raise ExportError(
            f"ONNX output differs from torch: max logit difference {logit_diff:.2e} "
            f"(limit {LOGITS_ATOL:.0e}), top-1 agreement {agreement:.3f} (must be 1.0)"
        )
    return result
