"""ONNX export that validates itself: ``onnx.checker``, then the same real images through torch
and onnxruntime, compared numerically. An export that fails either check raises
:class:`ExportError` and nothing gets registered.

Two exporters, in order of preference:

``dynamo``
    ``torch.export`` traces the network for a fixed image size, so the padding of
    TensorFlow-"same" convolutions (``tf_efficientnet_*``) is a constant folded into each ``Conv``.
    onnxruntime then fuses every convolution with its activation.
``torchscript``
    The older tracer keeps that padding as arithmetic on the input's shape at run time (``Shape``,
    ``Ceil``, ``Pad``: about 500 extra nodes for lite0), which blocks the fusions and costs
    onnxruntime a third of its speed (bench/README.md). Used only for a backbone that the first
    exporter cannot export or exports unfaithfully; the log says so and the version's details name
    the exporter.

Either way the result is one self-contained ``.onnx`` file (weights inside, no external-data
files) with a dynamic batch axis.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
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

DYNAMO = "dynamo"
TORCHSCRIPT = "torchscript"
EXPORTERS = (DYNAMO, TORCHSCRIPT)
#: The TorchScript exporter's opset; the dynamo exporter writes its own (torch's choice).
TORCHSCRIPT_OPSET = 17
LOGITS_ATOL = 1e-4


@dataclass(frozen=True)
class ParityResult:
    images: int
    max_logit_diff: float
    max_embedding_diff: float
    top1_agreement: float
    exporter: str = DYNAMO

    def as_dict(self) -> dict[str, float | str]:
        return {
            "images": self.images,
            "max_logit_diff": self.max_logit_diff,
            "max_embedding_diff": self.max_embedding_diff,
            "top1_agreement": self.top1_agreement,
            "exporter": self.exporter,
        }


def export_onnx(model: nn.Module, path: Path, parity_inputs: np.ndarray,
                exporters: Sequence[str] = EXPORTERS) -> ParityResult:
    """Export ``model`` (a timm classifier) to ``path`` with outputs ``logits`` and
    ``embedding`` and a dynamic batch axis, then check it on ``parity_inputs`` (N, 3, S, S)
    preprocessed real images: logits within 1e-4 of torch's and the same top-1 for every image.
    ``exporters`` are tried in order until one passes; the last one's failure is raised.
    """
    if parity_inputs.ndim != 4 or len(parity_inputs) < 2:
        raise ExportError("parity check needs at least two preprocessed images (N, 3, S, S)")
    if not exporters or set(exporters) - set(EXPORTERS):
        raise ValueError(f"exporters must be some of {EXPORTERS}, got {exporters}")
    wrapper = ClassifierWithEmbedding(model).eval()
    example = torch.from_numpy(np.ascontiguousarray(parity_inputs[:2], dtype=np.float32))
    for attempt, exporter in enumerate(exporters, start=1):
        try:
            _EXPORT[exporter](wrapper, example, path)
            check_graph(path)
            return check_parity(wrapper, path, parity_inputs, exporter=exporter)
        except Exception as exc:  # exporters fail in many types; the next one may succeed
            if attempt == len(exporters):
                if isinstance(exc, ExportError):
                    raise
                raise ExportError(f"the {exporter} ONNX exporter failed: {exc.__class__.__name__}: {exc}") from exc
            log.warning("the %s ONNX exporter failed for %s (%s: %s); falling back to the %s exporter, whose graph "
                        "onnxruntime may run slower", exporter, _model_name(model), exc.__class__.__name__,
                        str(exc).splitlines()[0] if str(exc) else "", exporters[attempt])
    raise AssertionError("unreachable")


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "pretrained_cfg", None)
    return str(config.get("architecture")) if isinstance(config, dict) and config.get("architecture") \
        else model.__class__.__name__


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """The dynamo exporter's graph passes log a line per folded constant at INFO: keep them out
    of the CLI's output."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _export_dynamo(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    path.unlink(missing_ok=True)
    with _quiet("onnx_ir", "onnxscript"):
        program = torch.onnx.export(
            wrapper, (example,), input_names=[ONNX_INPUT], output_names=[ONNX_LOGITS, ONNX_EMBEDDING],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False,
        )
    if program is None:
        raise ExportError("the dynamo exporter returned no program")
    # weights inside the one file: a version is a set of checksummed files, not a directory tree
    program.save(str(path), external_data=False)


def _export_torchscript(wrapper: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation warning: it is the fallback, knowingly
        torch.onnx.export(
            wrapper, (example,), str(path),
            input_names=[ONNX_INPUT], output_names=[ONNX_LOGITS, ONNX_EMBEDDING],
            dynamic_axes={name: {0: "batch"} for name in (ONNX_INPUT, ONNX_LOGITS, ONNX_EMBEDDING)},
            opset_version=TORCHSCRIPT_OPSET, dynamo=False,
        )


_EXPORT = {DYNAMO: _export_dynamo, TORCHSCRIPT: _export_torchscript}


def check_graph(path: Path) -> None:
    """``onnx.checker`` in full (with shape inference) on the file, which must hold its weights."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        if external:
            raise ExportError(f"the graph keeps {len(external)} weights in external files; it must be one file")
        onnx.checker.check_model(model, full_check=True)
    except ExportError:
        raise
    except Exception as exc:  # checker raises ValidationError and friends
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc


def check_parity(wrapper: nn.Module, path: Path, inputs: np.ndarray, *, exporter: str = DYNAMO) -> ParityResult:
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
    result = ParityResult(len(inputs), logit_diff, embedding_diff, agreement, exporter)
    log.info("ONNX parity (%s exporter) on %d images: max logit diff %.2e, top-1 agreement %.3f",
             exporter, len(inputs), logit_diff, agreement)
    if logit_diff > LOGITS_ATOL or agreement < 1.0:
        raise ExportError(
            f"ONNX output differs from torch: max logit difference {logit_diff:.2e} "
            f"(limit {LOGITS_ATOL:.0e}), top-1 agreement {agreement:.3f} (must be 1.0)"
        )
    return result
