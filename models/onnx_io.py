"""ONNX artifacts: checking a graph against its spec, and opening onnxruntime sessions.

The contract every version's ``model.onnx`` meets: one float32 input ``input`` of shape
(batch, 3, S, S) with a dynamic batch axis, and two outputs, ``logits`` (batch, num_classes) and
``embedding`` (batch, embedding_size).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelError
from .hardware import cpu_count
from .preprocess import normalisation_table
from .spec import ONNX_EMBEDDING, ONNX_INPUT, ONNX_LOGITS, ModelSpec, PreprocessConfig

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

#: Images per onnxruntime call on the CPU provider, however many a batch holds: the activations
#: of one or two 224x224 images stay in the core's cache, those of six or more do not, and CPU
#: time per image grows with the images per call (measured: bench/README.md).
CPU_RUN_SLICE = 2


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
    options.intra_op_num_threads = intra_op_threads or cpu_count()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


#: The input of a graph from :func:`pixels_input_graph`: uint8 crops (batch, S, S, 3).
PIXELS_INPUT = "pixels"


def pixels_input_graph(model: Any, config: PreprocessConfig) -> Any:
    """``model`` (an ``onnx.ModelProto``, changed in place and returned) taking uint8 crops
    (batch, S, S, 3) as input ``pixels`` instead of the normalised float32 ``input``: the
    graph's first nodes look each level up in :func:`models.preprocess.normalisation_table`, the
    very table the host normalises with, and put channels first, on whatever device runs the
    graph. For GPUs: a quarter of the bytes cross to the device and the host does no float32
    pass over the batch."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    (original,) = [i for i in graph.input if i.name == ONNX_INPUT]
    batch_dim, _, size, _ = _dims(original)
    normalised = "pixels_normalised"
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == ONNX_INPUT:
                node.input[index] = normalised
    graph.input.remove(original)
    graph.input.insert(0, helper.make_tensor_value_info(PIXELS_INPUT, TensorProto.UINT8,
                                                        [batch_dim, size, size, 3]))
    table = normalisation_table(config)
    constants = {  # channel c's level v is row c, column v of the table, flattened
        "pixels_table": table.reshape(-1),
        "pixels_channel_offset": np.arange(0, table.size, table.shape[1], dtype=np.int32),
    }
    graph.initializer.extend(numpy_helper.from_array(value, name) for name, value in constants.items())
    first = [
        helper.make_node("Cast", [PIXELS_INPUT], ["pixels_levels"], to=TensorProto.INT32),
        helper.make_node("Add", ["pixels_levels", "pixels_channel_offset"], ["pixels_index"]),
        helper.make_node("Gather", ["pixels_table", "pixels_index"], ["pixels_values"], axis=0),
        helper.make_node("Transpose", ["pixels_values"], [normalised], perm=[0, 3, 1, 2]),
    ]
    for index, node in enumerate(first):
        graph.node.insert(index, node)
    return model


def serving_graph(
    path: str | os.PathLike[str], *, fp16: bool = False, pixels: PreprocessConfig | None = None
) -> bytes:
    """The verified fp32 graph at ``path`` as served, serialised for
    ``onnxruntime.InferenceSession``. With ``fp16``: weights and arithmetic in float16 (for GPUs:
    half the memory traffic, tensor cores), inputs and outputs still float32; converted from the
    verified fp32 graph each time it is loaded (a fraction of a second), so every version,
    retrained ones included, has it and it can never disagree with its fp32 graph's checksum.
    With ``pixels``: taking uint8 crops (:func:`pixels_input_graph`)."""
    import onnx

    model = onnx.load(os.fspath(path))
    if fp16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(model, keep_io_types=True)
    if pixels is not None:
        model = pixels_input_graph(model, pixels)
    return bytes(model.SerializeToString())


def run_bound(session: onnxruntime.InferenceSession, feeds: dict[str, np.ndarray], output: str,
              shape: tuple[int, ...]) -> np.ndarray:
    """Run ``session`` with IO binding: the inputs are bound from host memory (copied to the
    session's device once, by onnxruntime) and ``output`` is written by the device straight into a
    float32 host array of ``shape`` that we own, instead of into a buffer onnxruntime allocates and
    Python then copies. Same result as ``session.run([output], feeds)[0]``."""
    binding = session.io_binding()
    bound = {name: np.ascontiguousarray(value) for name, value in feeds.items()}  # alive until run ends
    for name, value in bound.items():
        binding.bind_cpu_input(name, value)
    out = np.empty(shape, dtype=np.float32)
    binding.bind_output(output, "cpu", 0, np.float32, list(shape), out.ctypes.data)
    session.run_with_iobinding(binding)
    return out


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


def _head_node(model: Any) -> Any:
    """The Gemm node that turns ``embedding`` into ``logits`` (a linear layer, weight (C, D)) of an
    ``onnx.ModelProto``."""
    for node in model.graph.node:
        if list(node.output) == [ONNX_LOGITS]:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            if node.op_type != "Gemm" or node.input[0] != ONNX_EMBEDDING or trans_b != 1 or len(node.input) != 3:
                raise ModelError("the graph's head is not a Gemm(embedding, W, b) with transB=1; "
                                 "head-only retraining needs the export layout of training/export.py")
            return node
    raise ModelError(f"no node produces '{ONNX_LOGITS}'")


def read_head(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's weight (C, D) and bias (C,) stored in an exported graph."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(os.fspath(path))
    node = _head_node(model)
    inits = {init.name: init for init in model.graph.initializer}
    return (numpy_helper.to_array(inits[node.input[1]]).astype(np.float32),
            numpy_helper.to_array(inits[node.input[2]]).astype(np.float32))


def replace_head(
    source: str | os.PathLike[str], destination: str | os.PathLike[str], weight: np.ndarray, bias: np.ndarray
) -> None:
    """Write ``source``'s graph with a new linear head (any number of classes) to
    ``destination``: the backbone is byte-for-byte the same, so its embeddings are too."""
    import onnx
    from onnx import numpy_helper

    weight = np.ascontiguousarray(weight, dtype=np.float32)
    bias = np.ascontiguousarray(bias, dtype=np.float32)
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"head must be weight (C, D) and bias (C,), got {weight.shape} and {bias.shape}")
    model = onnx.load(os.fspath(source))
    node = _head_node(model)
    for init in model.graph.initializer:
        if init.name == node.input[1]:
            if init.dims[1] != weight.shape[1]:
                raise ValueError(f"head input size {weight.shape[1]} does not match the embedding size {init.dims[1]}")
            init.CopyFrom(numpy_helper.from_array(weight, init.name))
        elif init.name == node.input[2]:
            init.CopyFrom(numpy_helper.from_array(bias, init.name))
    for output in model.graph.output:
        if output.name == ONNX_LOGITS:
            output.type.tensor_type.shape.dim[1].dim_value = weight.shape[0]
    # intermediate shape annotations would still say the old class count
    for value_info in list(model.graph.value_info):
        if value_info.name == ONNX_LOGITS:
            model.graph.value_info.remove(value_info)
    onnx.checker.check_model(model)
    onnx.save(model, os.fspath(destination))


def verify_head(
    path: str | os.PathLike[str], weight: np.ndarray, bias: np.ndarray, inputs: np.ndarray, rtol: float = 1e-5
) -> float:
    """Run real preprocessed images through the graph and check its logits equal a numpy linear
    layer on its own embedding. Returns the largest difference; raises :class:`ModelError`.

    The bound is 1e-5 (``rtol``) of each logit's magnitude scale ``|embedding| @ |weight|.T + |bias|``
    (at least 1): float32 sums lose precision in proportion to their terms, not their result, and
    heads fitted on a handful of images have weights, and logits, in the hundreds. A wrong head
    (another bias, another class order) misses by orders of magnitude more."""
    logits, embedding = run_in_batches(cpu_session(path), inputs)
    embedding64 = embedding.astype(np.float64)
    expected = embedding64 @ weight.T.astype(np.float64) + bias.astype(np.float64)
    scale = np.abs(embedding64) @ np.abs(weight.T.astype(np.float64)) + np.abs(bias.astype(np.float64))
    excess = np.abs(logits - expected) / np.maximum(scale, 1.0)
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    diff = float(np.abs(logits - expected)[worst])
    if float(excess[worst]) > rtol:
        raise ModelError(f"new head does not match: logit difference {diff:.2e} where the bound is "
                         f"{rtol:.0e} x {max(float(scale[worst]), 1.0):.3g}")
    return diff
