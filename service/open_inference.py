"""The Open Inference Protocol (KServe V2 REST) as pure functions over bytes: an infer request's
body parsed into tensors, an infer response's body and headers built from tensors, and the
metadata bodies; with Triton's binary tensor data extension (tensors as raw little-endian bytes
after the JSON header, ``Inference-Header-Content-Length`` giving the header's length), its
classification extension (an output as top-k ``"score:index:label"`` strings) and MLServer's
``content_type: "base64"`` for BYTES tensors sent as JSON strings.

No HTTP and no model here: routes call these and send what they return. Every request that does
not parse raises :class:`OipError` (an :class:`~models.errors.InputError`, so
:func:`service.errors.api_error` answers it 400 with the protocol's ``{"error": "..."}`` body);
nothing else escapes from a bad body. A server-side mistake (an output whose data does not match
its declared type) raises ``ValueError`` or ``TypeError``, which is a 500, as it should be.

Specifications followed: kserve/open-inference-protocol ``specification/protocol/inference_rest.md``;
triton-inference-server/server ``docs/protocol/extension_binary_data.md`` and
``extension_classification.md``, and ``src/classification.cc`` for the score's formatting.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.errors import InputError

#: At most this many inputs in a request, and outputs requested.
MAX_TENSORS = 16
#: At most this many elements in one input tensor (64 MiB of FP32): far above a batch of images,
#: far below what would take the server down while the body-size limit still held.
MAX_ELEMENTS = 1 << 24
#: At most this many dimensions in an input's shape.
MAX_RANK = 8
#: The largest JSON header taken (413 above): parsing JSON numbers makes a Python object per
#: element, several times the bytes they came as, so large tensors must come as binary data. This
#: still takes one image of the largest upload size as base64 in JSON.
MAX_JSON_BYTES = 16 * 1024 * 1024

#: The numeric datatypes and how their elements travel as binary data (little-endian, packed).
NUMERIC_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("|b1"),
    "UINT8": np.dtype("|u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("|i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
#: Every datatype this codec takes; BYTES elements are byte strings of any length.
DATATYPES = (*NUMERIC_DTYPES, "BYTES")

#: ONNX Runtime's type names (``NodeArg.type``) as protocol datatypes, for model metadata.
ONNX_DATATYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

#: The extensions this codec implements, by the names Triton reports in its server metadata.
EXTENSIONS = ("binary_tensor_data", "classification")

#: Where the protocol puts a BYTES element's length in binary data: 4 bytes, little-endian.
_LENGTH = struct.Struct("<I")
_JSON_CONSTANTS = ("NaN", "Infinity", "-Infinity")

TensorData = np.ndarray | list[bytes]


class OipError(InputError):
    """A request the protocol's server answers 400: the message says what to fix."""


class OipTooLargeError(OipError):
    """A request part over one of this module's size limits: answered 413."""


@dataclass(frozen=True, slots=True)
class InputTensor:
    """One input as decoded: numeric ``data`` is an array already shaped as ``shape`` (native byte
    order; from binary data, a read-only view of the body, not a copy); BYTES ``data`` is the
    elements in row-major order, ``shape`` says how they are laid out. BYTES sent as binary data are
    taken as they are: ``content_type`` "base64" applies to JSON strings only."""

    name: str
    datatype: str
    shape: list[int]
    data: TensorData


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the request names. ``binary_data`` is already resolved: the output's own
    parameter, else the request's ``binary_data_output``. ``class_count`` > 0 asks for the
    classification extension's top-``class_count`` strings instead of the tensor."""

    name: str
    binary_data: bool = False
    class_count: int = 0


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A parsed infer request. ``outputs`` is None when the request names none: send every output,
    in binary when ``binary_data_output`` is true."""

    id: str | None
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None
    binary_data_output: bool = False


@dataclass(frozen=True, slots=True)
class OutputTensor:
    """One output to send: numeric ``data`` an array of ``datatype``'s type holding
    product(``shape``) elements; BYTES ``data`` that many byte strings, row-major. ``binary``
    sends it after the JSON header instead of inside it."""

    name: str
    datatype: str
    shape: list[int]
    data: TensorData
    binary: bool = False

    def __post_init__(self) -> None:
        # a mismatch is the server's own bug: refuse it here rather than send a body the client misreads
        count = math.prod(self.shape)
        if self.datatype == "BYTES":
            if not isinstance(self.data, list) or not all(isinstance(item, bytes) for item in self.data):
                raise TypeError(f"output '{self.name}': BYTES data must be a list of bytes")
            size = len(self.data)
        elif self.datatype in NUMERIC_DTYPES:
            if not isinstance(self.data, np.ndarray):
                raise TypeError(f"output '{self.name}': {self.datatype} data must be a numpy array")
            expected = NUMERIC_DTYPES[self.datatype]
            if (self.data.dtype.kind, self.data.dtype.itemsize) != (expected.kind, expected.itemsize):
                raise ValueError(f"output '{self.name}' is declared {self.datatype} but holds {self.data.dtype}")
            size = self.data.size
        else:
            raise ValueError(f"output '{self.name}': unknown datatype {self.datatype!r}")
        if size != count:
            raise ValueError(f"output '{self.name}' has {size} elements but shape {self.shape} holds {count}")

    @classmethod
    def from_array(cls, name: str, array: np.ndarray, *, binary: bool = False) -> OutputTensor:
        """A numeric output whose datatype and shape are the array's own."""
        return cls(name, datatype_of(array.dtype), list(array.shape), array, binary)


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol's name for a numeric numpy dtype (any byte order)."""
    for name, known in NUMERIC_DTYPES.items():
        if (dtype.kind, dtype.itemsize) == (known.kind, known.itemsize):
            return name
    raise ValueError(f"no Open Inference Protocol datatype for numpy dtype {dtype}")


# ---------------------------------------------------------------------------------------------
# Infer request


def parse_infer_request(body: bytes, *, json_length: int | str | None) -> InferRequest:
    """Decode an infer request's body. ``json_length`` is the ``Inference-Header-Content-Length``
    header as received (a number or its text), None when absent: then the whole body is JSON.
    Binary tensor data follows the JSON header in the order of the inputs that declare
    ``binary_data_size``, and must fill the rest of the body exactly."""
    header, binary = _split_body(body, json_length)
    if len(header) > MAX_JSON_BYTES:
        raise OipTooLargeError(f"the JSON header is {len(header)} bytes; at most {MAX_JSON_BYTES} are taken: send "
                               "large tensors as binary data (Inference-Header-Content-Length and each input's "
                               "binary_data_size)")
    document = _load_json(header, has_header_length=json_length is not None)
    if not isinstance(document, dict):
        raise OipError("the inference request must be a JSON object with \"inputs\"")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise OipError(f"\"id\" must be a string, not {_kind(request_id)}")
    parameters = _parameters(document, "the request")
    binary_data_output = _flag(parameters, "binary_data_output", "the request", default=False)
    content_type = _content_type(parameters, "the request")

    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise OipError("\"inputs\" must be a list of at least one input tensor")
    if len(raw_inputs) > MAX_TENSORS:
        raise OipError(f"{len(raw_inputs)} inputs: at most {MAX_TENSORS} are taken")
    inputs: list[InputTensor] = []
    offset = 0
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _parse_input(raw, index, binary, offset, content_type, json_length is not None)
        if any(seen.name == tensor.name for seen in inputs):
            raise OipError(f"input '{tensor.name}' is given twice: name each input once")
        inputs.append(tensor)
    if offset != len(binary):
        raise OipError(f"{len(binary)} bytes follow the JSON header but the inputs' binary_data_size add up to "
                       f"{offset}: Inference-Header-Content-Length must be the JSON header's length and "
                       "binary_data_size each input's byte count")
    return InferRequest(request_id, inputs, _parse_outputs(document.get("outputs", None), binary_data_output),
                        binary_data_output)


def check_outputs(requested: Sequence[RequestedOutput] | None, available: Sequence[str]) -> None:
    """Refuse a requested output the model does not have; None (every output) always passes."""
    for output in requested or ():
        if output.name not in available:
            raise OipError(f"the model has no output '{output.name}': its outputs are "
                           f"{', '.join(repr(name) for name in available)}")


def _split_body(body: bytes, json_length: int | str | None) -> tuple[bytes, bytes]:
    if json_length is None:
        return body, b""
    if isinstance(json_length, str):
        text = json_length.strip()
        if not (text.isascii() and text.isdigit()):
            raise OipError(f"Inference-Header-Content-Length must be the JSON header's length in bytes, "
                           f"not {json_length!r}")
        json_length = int(text)
    if json_length < 0:
        raise OipError(f"Inference-Header-Content-Length is {json_length}: it must be the JSON header's length "
                       "in bytes")
    if json_length == 0:
        raise OipError("Inference-Header-Content-Length 0 (a raw binary request without a JSON header) is not "
                       "supported: send the JSON header with the input's name, datatype, shape and "
                       "binary_data_size")
    if json_length > len(body):
        raise OipError(f"Inference-Header-Content-Length is {json_length} but the body has only {len(body)} "
                       "bytes")
    return body[:json_length], body[json_length:]


def _refuse_constant(name: str) -> Any:
    raise OipError(f"{name} is not JSON: send non-finite numbers as binary data")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # a repeated key would otherwise be silently dropped, and the request read as something else
    document = dict(pairs)
    if len(document) != len(pairs):
        repeated = next(key for index, (key, _) in enumerate(pairs) if key in dict(pairs[:index]))
        raise OipError(f"key \"{repeated}\" appears twice in one JSON object")
    return document


def _load_json(header: bytes, *, has_header_length: bool) -> Any:
    hint = ("; Inference-Header-Content-Length must be the length of the JSON header alone" if has_header_length
            else "; if the body carries binary tensor data, send Inference-Header-Content-Length with the JSON "
            "header's length")
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise OipError(f"the JSON header is not UTF-8 (byte {exc.start}){hint}") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise OipError("the JSON header is nested too deeply") from None
    except OipError:
        raise
    except ValueError as exc:  # JSONDecodeError, and Python's limit on an integer's digits
        raise OipError(f"the JSON header does not parse: {exc}{hint}") from None


def _named_object(raw: Any, which: str, fields: str) -> str:
    """The name of a tensor's JSON object (an input, or an output asked for); ``which`` says
    which one it is in the request, ``fields`` what the object should hold."""
    if not isinstance(raw, dict):
        raise OipError(f"{which} must be an object with {fields}, not {_kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise OipError(f"{which}: \"name\" must be a non-empty string")
    return name


def _kind(value: Any) -> str:
    """A JSON value's type, as a client would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


def _parameters(owner: Mapping[str, Any], where: str) -> dict[str, Any]:
    parameters = owner.get("parameters", {})
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise OipError(f"{where}: \"parameters\" must be an object, not {_kind(parameters)}")
    if "shared_memory_region" in parameters:
        raise OipError(f"{where}: shared memory (shared_memory_region) is not supported: send the data in the body")
    return parameters


def _flag(parameters: Mapping[str, Any], name: str, where: str, *, default: bool) -> bool:
    value = parameters.get(name, default)
    if not isinstance(value, bool):
        raise OipError(f"{where}: parameter {name} must be true or false, not {_kind(value)}")
    return value


def _content_type(parameters: Mapping[str, Any], where: str) -> str | None:
    value = parameters.get("content_type")
    if value is not None and not isinstance(value, str):
        raise OipError(f"{where}: parameter content_type must be a string, not {_kind(value)}")
    return value


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_shape(raw: Any, where: str) -> list[int]:
    if not isinstance(raw, list):
        raise OipError(f"{where}: \"shape\" must be a list of dimensions, not {_kind(raw)}")
    if len(raw) > MAX_RANK:
        raise OipError(f"{where}: shape has {len(raw)} dimensions; at most {MAX_RANK} are taken")
    for dim in raw:
        if not _whole_number(dim):
            raise OipError(f"{where}: shape {raw} has {_kind(dim)} where a dimension must be a whole number")
        if dim < 0:
            raise OipError(f"{where}: shape {raw} has a negative dimension; a request's shape is the data's "
                           "actual shape (-1 appears only in model metadata)")
        if dim > MAX_ELEMENTS:
            raise OipError(f"{where}: shape {raw} has a dimension over {MAX_ELEMENTS}")
    if math.prod(raw) > MAX_ELEMENTS:
        raise OipError(f"{where}: shape {raw} holds {math.prod(raw)} elements; at most {MAX_ELEMENTS} are "
                       "taken per input")
    return list(raw)


def _parse_input(raw: Any, index: int, binary: bytes, offset: int, request_content_type: str | None,
                 has_header_length: bool) -> tuple[InputTensor, int]:
    """One input, and the offset in ``binary`` after its binary data (unchanged without any)."""
    name = _named_object(raw, f"input {index}", "name, datatype, shape and data")
    where = f"input '{name}'"
    datatype = raw.get("datatype")
    if datatype not in DATATYPES:
        raise OipError(f"{where}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
    shape = _parse_shape(raw.get("shape"), where)
    count = math.prod(shape)
    parameters = _parameters(raw, where)
    content_type = _content_type(parameters, where) or request_content_type

    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not _whole_number(size) or size < 0:
            raise OipError(f"{where}: binary_data_size must be a byte count, not {_kind(size)}")
        if "data" in raw:
            raise OipError(f"{where}: give either \"data\" or parameter binary_data_size, not both")
        if offset + size > len(binary):
            header = "" if has_header_length else " (no Inference-Header-Content-Length was sent: it must give " \
                                                  "the JSON header's length when binary data follows)"
            raise OipError(f"{where}: binary_data_size is {size} but only {len(binary) - offset} bytes of binary "
                           f"data remain after the JSON header{header}")
        chunk = binary[offset:offset + size]
        data = _bytes_elements(chunk, count, where) if datatype == "BYTES" else \
            _binary_numbers(chunk, datatype, shape, where)
        return InputTensor(name, datatype, shape, data), offset + size

    if "data" not in raw:
        raise OipError(f"{where}: no \"data\" and no parameter binary_data_size: send the tensor's contents")
    values = _flatten(raw["data"], shape, where)
    if len(values) != count:
        raise OipError(f"{where}: data has {len(values)} elements but shape {shape} holds {count}")
    if datatype == "BYTES":
        return InputTensor(name, datatype, shape, _json_bytes(values, content_type, where)), offset
    return InputTensor(name, datatype, shape, _json_numbers(values, datatype, where).reshape(shape)), offset


def _flatten(data: Any, shape: list[int], where: str) -> list[Any]:
    """``data`` as a flat list: it is either flat already, or nested exactly as ``shape``."""
    if not isinstance(data, list):
        raise OipError(f"{where}: \"data\" must be a list, not {_kind(data)}")
    if len(shape) < 2 or not data or not isinstance(data[0], list):
        return data
    level: list[Any] = [data]
    for depth, dim in enumerate(shape):
        flat: list[Any] = []
        for item in level:
            if not isinstance(item, list) or len(item) != dim:
                got = f"{len(item)} elements" if isinstance(item, list) else _kind(item)
                raise OipError(f"{where}: nested data does not match shape {shape}: {got} at depth {depth} where "
                               f"{dim} are expected (or send the data flat)")
            flat.extend(item)
        level = flat
    return level


def _element_error(where: str, position: int, value: Any, datatype: str, takes: str) -> OipError:
    return OipError(f"{where}: element {position} is {_kind(value)}; {datatype} takes {takes}")


def _json_numbers(values: list[Any], datatype: str, where: str) -> np.ndarray:
    dtype = NUMERIC_DTYPES[datatype].newbyteorder("=")
    if datatype == "BOOL":
        for position, value in enumerate(values):
            if not isinstance(value, bool):
                raise _element_error(where, position, value, datatype, "true or false")
        return np.array(values, dtype=dtype)
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        low, high = int(limits.min), int(limits.max)
        for position, value in enumerate(values):
            if not _whole_number(value) or not low <= value <= high:
                raise _element_error(where, position, value, datatype, f"whole numbers from {low} to {high}")
        return np.array(values, dtype=dtype)
    largest = float(np.finfo(dtype).max)
    for position, value in enumerate(values):
        # an int too large for a float raises OverflowError on conversion: compare it as an int instead
        if not (isinstance(value, float | int) and not isinstance(value, bool) and abs(value) <= largest):
            raise _element_error(where, position, value, datatype, f"finite numbers within ±{largest:g}")
    return np.array(values, dtype=np.float64).astype(dtype)


def _json_bytes(values: list[Any], content_type: str | None, where: str) -> list[bytes]:
    elements: list[bytes] = []
    for position, value in enumerate(values):
        if not isinstance(value, str):
            raise _element_error(where, position, value, "BYTES", "strings")
        if content_type == "base64":
            try:
                # validate=True: characters outside the base64 alphabet are refused, not skipped
                elements.append(base64.b64decode(value, validate=True))
            except (binascii.Error, ValueError):  # ValueError: a character outside ASCII
                raise OipError(f"{where}: element {position} is not valid base64 (content_type is "
                               "\"base64\")") from None
        else:
            try:
                elements.append(value.encode("utf-8"))
            except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
                raise OipError(f"{where}: element {position} is not a valid Unicode string; send bytes that "
                               "are not text as base64 (parameter content_type \"base64\") or binary data") from None
    return elements


def _binary_numbers(chunk: bytes, datatype: str, shape: list[int], where: str) -> np.ndarray:
    dtype = NUMERIC_DTYPES[datatype]
    count = math.prod(shape)
    if len(chunk) != count * dtype.itemsize:
        raise OipError(f"{where}: binary_data_size is {len(chunk)} but shape {shape} of {datatype} takes "
                       f"{count * dtype.itemsize} bytes")
    if datatype == "BOOL" and chunk.translate(None, b"\x00\x01"):
        raise OipError(f"{where}: BOOL binary data must be bytes 0 and 1 only")
    # frombuffer reads the little-endian layout; astype only copies on a big-endian machine
    return np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="), copy=False).reshape(shape)


def _bytes_elements(chunk: bytes, count: int, where: str) -> list[bytes]:
    """Triton's BYTES binary layout: each element a 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    position = 0
    while position < len(chunk):
        if len(elements) == count:
            raise OipError(f"{where}: BYTES binary data holds more than the {count} elements its shape says")
        if position + _LENGTH.size > len(chunk):
            raise OipError(f"{where}: BYTES binary data is cut short in element {len(elements)}'s 4-byte length")
        (length,) = _LENGTH.unpack_from(chunk, position)
        position += _LENGTH.size
        if position + length > len(chunk):
            raise OipError(f"{where}: BYTES element {len(elements)} says {length} bytes but only "
                           f"{len(chunk) - position} remain in binary_data_size")
        elements.append(chunk[position:position + length])
        position += length
    if len(elements) != count:
        raise OipError(f"{where}: BYTES binary data holds {len(elements)} elements but the shape holds {count}")
    return elements


def _parse_outputs(raw: Any, binary_data_output: bool) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise OipError(f"\"outputs\" must be a list of requested outputs, not {_kind(raw)}")
    if not raw:
        raise OipError("\"outputs\" is empty: leave it out to receive every output")
    if len(raw) > MAX_TENSORS:
        raise OipError(f"{len(raw)} outputs requested: at most {MAX_TENSORS} are taken")
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(raw):
        name = _named_object(item, f"output {index}", "a name")
        where = f"requested output '{name}'"
        if any(seen.name == name for seen in outputs):
            raise OipError(f"{where} is requested twice: name each output once")
        parameters = _parameters(item, where)
        class_count = parameters.get("classification", 0)
        if not _whole_number(class_count) or class_count < 0:
            raise OipError(f"{where}: parameter classification must be the number of classes to return, "
                           f"not {_kind(class_count)}")
        # the output's own binary_data overrides the request's binary_data_output (the extension's rule)
        outputs.append(RequestedOutput(name, _flag(parameters, "binary_data", where, default=binary_data_output),
                                       class_count))
    return outputs


# ---------------------------------------------------------------------------------------------
# Infer response


def encode_infer_response(*, model_name: str, model_version: str | None, request_id: str | None,
                          outputs: Sequence[OutputTensor]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: ``Content-Type: application/json`` when every output is
    JSON; otherwise ``application/octet-stream`` with ``Inference-Header-Content-Length``, the
    binary outputs' bytes following the JSON header in output order."""
    document: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        document["model_version"] = model_version
    if request_id is not None:
        document["id"] = request_id
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in outputs:
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": list(output.shape)}
        if output.binary:
            raw = _binary_output(output)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_output(output)
        entries.append(entry)
    document["outputs"] = entries
    header = json.dumps(document, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream",
                                       "Inference-Header-Content-Length": str(len(header))}


def _binary_output(output: OutputTensor) -> bytes:
    if isinstance(output.data, list):
        return b"".join(_LENGTH.pack(len(element)) + element for element in output.data)
    return np.ascontiguousarray(output.data, dtype=NUMERIC_DTYPES[output.datatype]).tobytes()


def _json_output(output: OutputTensor) -> list[Any]:
    if isinstance(output.data, list):
        try:
            return [element.decode("utf-8") for element in output.data]
        except UnicodeDecodeError:
            raise OipError(f"output '{output.name}' holds bytes that are not UTF-8, which JSON cannot carry: "
                           "request it with parameter binary_data true") from None
    if output.data.dtype.kind == "f" and not np.isfinite(output.data).all():
        raise OipError(f"output '{output.name}' holds NaN or infinity, which JSON cannot carry: request it "
                       "with parameter binary_data true")
    values: list[Any] = output.data.reshape(-1).tolist()
    return values


# ---------------------------------------------------------------------------------------------
# Classification extension


def classification(probabilities: np.ndarray, labels: Sequence[str] | None, k: int) -> list[list[bytes]]:
    """Triton's classification strings for each row of an [N, C] output: the top ``min(k, C)``
    classes, highest value first, each ``"value:index:label"`` (``"value:index"`` without labels).
    The value is written as Triton's ``std::to_string`` writes it (``%f``: six decimals) for
    floats, as a whole number for integers; ties go to the lower index (Triton's sort leaves
    their order unspecified)."""
    if probabilities.ndim != 2:
        raise ValueError(f"classification takes an [N, C] output, not shape {probabilities.shape}")
    if labels is not None and len(labels) != probabilities.shape[1]:
        raise ValueError(f"{len(labels)} labels for {probabilities.shape[1]} classes")
    if k < 1:
        raise ValueError(f"classification count must be at least 1, not {k}")
    floats = probabilities.dtype.kind == "f"
    # a stable sort of the negated values: descending, the lower index first among equals
    order = np.argsort(-probabilities.astype(np.float64), axis=1, kind="stable")[:, :k]
    rows: list[list[bytes]] = []
    for values, indices in zip(probabilities.tolist(), order.tolist(), strict=True):
        row = []
        for index in indices:
            value = f"{values[index]:f}" if floats else str(int(values[index]))
            suffix = "" if labels is None else f":{labels[index]}"
            row.append(f"{value}:{index}{suffix}".encode())
        rows.append(row)
    return rows


def classification_output(name: str, probabilities: np.ndarray, labels: Sequence[str] | None, k: int, *,
                          binary: bool = False) -> OutputTensor:
    """:func:`classification` as the BYTES output the extension returns in place of the tensor,
    shaped [N, min(k, C)]."""
    rows = classification(probabilities, labels, k)
    width = min(k, probabilities.shape[1])
    return OutputTensor(name, "BYTES", [len(rows), width], [entry for row in rows for entry in row], binary)


# ---------------------------------------------------------------------------------------------
# Metadata


def server_metadata(name: str, version: str, extensions: Sequence[str] = EXTENSIONS) -> dict[str, Any]:
    """``GET /v2``'s body."""
    return {"name": name, "version": version, "extensions": list(extensions)}


def tensor_metadata(name: str, datatype: str, shape: Sequence[int | str | None]) -> dict[str, Any]:
    """A model input's or output's metadata. ``shape`` may be ONNX Runtime's own (a symbolic
    dimension is a name or None); every dimension that is not a fixed size becomes -1."""
    if datatype not in DATATYPES:
        raise ValueError(f"unknown datatype {datatype!r}: one of {', '.join(DATATYPES)}")
    dims = [dim if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 else -1 for dim in shape]
    return {"name": name, "datatype": datatype, "shape": dims}


def model_metadata(name: str, *, versions: Sequence[str] | None, platform: str = "onnx_onnxv1",
                   inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``GET /v2/models/{name}``'s body; ``inputs`` and ``outputs`` from :func:`tensor_metadata`.
    ``versions`` None leaves the field out (the protocol makes it optional)."""
    document: dict[str, Any] = {"name": name}
    if versions is not None:
        document["versions"] = list(versions)
    document.update(platform=platform, inputs=[dict(t) for t in inputs], outputs=[dict(t) for t in outputs])
    return document
