"""``service/open_inference.py``, unit level: the Open Inference Protocol codec checked against
Triton's own Python client (``tritonclient.http`` builds the requests it parses and reads the
responses it builds), the classification extension's strings, the metadata bodies, and one
refusal per way a request body can be wrong, each an :class:`OipError` that says what to fix."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from models.errors import InputError
from service.errors import api_error
from service.open_inference import (
    EXTENSIONS,
    MAX_ELEMENTS,
    MAX_JSON_BYTES,
    MAX_TENSORS,
    InferRequest,
    OipError,
    OipTooLargeError,
    OutputTensor,
    RequestedOutput,
    check_outputs,
    classification,
    classification_output,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    server_metadata,
    tensor_metadata,
)

IMAGES = np.array([b"\x89PNG\r\n\x1a\n\x00\xff", b"", "caf\u00e9".encode()], dtype=np.object_)
PIXELS = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)


def triton_request(inputs: list[triton.InferInput], outputs: list[triton.InferRequestedOutput] | None = None,
                   request_id: str = "") -> InferRequest:
    """What :func:`parse_infer_request` makes of the body tritonclient would send."""
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, outputs=outputs,
                                                                         request_id=request_id)
    return parse_infer_request(body, json_length=json_size)


def triton_input(name: str, array: np.ndarray, datatype: str, *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def triton_result(outputs: list[OutputTensor], request_id: str | None = "r-1") -> tuple[Any, dict[str, str]]:
    """The response as tritonclient reads it, and its headers."""
    body, headers = encode_infer_response(model_name="flowers", model_version="v3", request_id=request_id,
                                          outputs=outputs)
    length = headers.get("Inference-Header-Content-Length")
    return triton.InferenceServerClient.parse_response_body(body, header_length=length), headers


def json_body(document: Any) -> bytes:
    return json.dumps(document).encode()


def one_input(**fields: Any) -> bytes:
    """A JSON request of one input, ``fields`` replacing the defaults (a 2x2 UINT8)."""
    tensor = {"name": "x", "datatype": "UINT8", "shape": [2, 2], "data": [1, 2, 3, 4], **fields}
    return json_body({"inputs": [{k: v for k, v in tensor.items() if v is not None}]})


def with_binary(tensors: list[dict[str, Any]], data: bytes, **document: Any) -> tuple[bytes, int]:
    header = json_body({"inputs": tensors, **document})
    return header + data, len(header)


# ---------------------------------------------------------------------------------------------
# Requests built by tritonclient


@pytest.mark.parametrize("images_binary", [True, False])
@pytest.mark.parametrize("pixels_binary", [True, False])
def test_bytes_and_uint8_inputs_from_tritonclient_decode_to_what_was_sent(images_binary: bool,
                                                                          pixels_binary: bool) -> None:
    # JSON can carry BYTES only as UTF-8 text, so tritonclient sends the non-text images in binary
    images = IMAGES if images_binary else np.array([b"a photo", b"", "caf\u00e9".encode()], dtype=np.object_)
    request = triton_request([triton_input("images", images, "BYTES", binary=images_binary),
                              triton_input("pixels", PIXELS, "UINT8", binary=pixels_binary)],
                             [triton.InferRequestedOutput("scores", binary_data=True)], request_id="r-7")
    assert request.id == "r-7"
    first, second = request.inputs
    assert (first.name, first.datatype, first.shape, first.data) == ("images", "BYTES", [3], list(images))
    assert (second.name, second.datatype, second.shape) == ("pixels", "UINT8", [2, 3, 4])
    assert isinstance(second.data, np.ndarray) and second.data.dtype == np.uint8
    np.testing.assert_array_equal(second.data, PIXELS)
    assert request.outputs == [RequestedOutput("scores", binary_data=True, class_count=0)]


def test_a_request_without_outputs_asks_for_every_output_in_binary_as_tritonclient_does() -> None:
    request = triton_request([triton_input("pixels", PIXELS, "UINT8", binary=True)])
    assert request.outputs is None and request.binary_data_output is True and request.id is None


def test_requested_outputs_carry_binary_data_and_the_classification_count() -> None:
    request = triton_request([triton_input("pixels", PIXELS, "UINT8", binary=False)],
                             [triton.InferRequestedOutput("scores", binary_data=False, class_count=5),
                              triton.InferRequestedOutput("embedding", binary_data=True)])
    assert request.outputs == [RequestedOutput("scores", False, 5), RequestedOutput("embedding", True, 0)]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize(("datatype", "array"), [
    ("BOOL", np.array([[True, False, True]])),
    ("INT8", np.array([-128, 0, 127], np.int8)),
    ("UINT16", np.array([0, 65535], np.uint16)),
    ("INT32", np.array([[-(2 ** 31)], [2 ** 31 - 1]], np.int32)),
    ("UINT64", np.array([0, 2 ** 64 - 1], np.uint64)),
    ("INT64", np.array([-(2 ** 63), 2 ** 63 - 1], np.int64)),
    ("FP16", np.array([0.5, -65504.0, 1e-3], np.float16)),
    ("FP32", np.array([[0.1, -2.5], [3.4e38, 0.0]], np.float32)),
    ("FP64", np.array([1e-300, -1.7e308], np.float64)),
    ("FP32", np.zeros((0, 3), np.float32)),
])
def test_every_numeric_datatype_from_tritonclient_keeps_its_values_and_shape(datatype: str, array: np.ndarray,
                                                                             binary: bool) -> None:
    (tensor,) = triton_request([triton_input("x", array, datatype, binary=binary)]).inputs
    assert isinstance(tensor.data, np.ndarray)
    assert tensor.data.dtype == array.dtype and tensor.data.shape == array.shape
    np.testing.assert_array_equal(tensor.data, array)


def test_json_data_may_be_nested_as_the_shape() -> None:
    (tensor,) = parse_infer_request(one_input(data=[[1, 2], [3, 4]]), json_length=None).inputs
    np.testing.assert_array_equal(tensor.data, np.array([[1, 2], [3, 4]], np.uint8))


@pytest.mark.parametrize(("request_parameters", "tensor_parameters", "expected"), [
    ({}, {"content_type": "base64"}, [b"\x00\xff", b""]),
    ({"content_type": "base64"}, {}, [b"\x00\xff", b""]),
    ({"content_type": "base64"}, {"content_type": "str"}, [b"AP8=", b""]),
    ({}, {}, [b"AP8=", b""]),
])
def test_bytes_given_as_json_strings_are_base64_decoded_when_content_type_says_so(
        request_parameters: dict[str, str], tensor_parameters: dict[str, str], expected: list[bytes]) -> None:
    # MLServer's convention: the tensor's content_type wins over the request's
    body = json_body({"parameters": request_parameters, "inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [2], "parameters": tensor_parameters,
         "data": ["AP8=", ""]}]})
    (tensor,) = parse_infer_request(body, json_length=None).inputs
    assert tensor.data == expected


def test_an_outputs_own_binary_data_overrides_the_requests_binary_data_output() -> None:
    body = one_input()[:-1] + b', "parameters": {"binary_data_output": true}, "outputs": [' \
        b'{"name": "a", "parameters": {"binary_data": false}}, {"name": "b"}]}'
    request = parse_infer_request(body, json_length=None)
    assert request.outputs == [RequestedOutput("a", binary_data=False), RequestedOutput("b", binary_data=True)]


def test_the_header_length_may_be_given_as_the_header_text() -> None:
    body, length = with_binary([{"name": "x", "datatype": "UINT8", "shape": [2],
                                 "parameters": {"binary_data_size": 2}}], b"\x07\x08")
    (tensor,) = parse_infer_request(body, json_length=f"{length}").inputs
    np.testing.assert_array_equal(tensor.data, [7, 8])


def test_unknown_parameters_and_fields_are_ignored() -> None:
    body = json_body({"model_name": "flowers", "parameters": {"priority": 1, "sequence_id": 0},
                      "inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [-1],
                                  "parameters": {"something_new": "yes"}}]})
    (tensor,) = parse_infer_request(body, json_length=None).inputs
    np.testing.assert_array_equal(tensor.data, [-1])


# ---------------------------------------------------------------------------------------------
# Responses read by tritonclient


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_outputs_read_back_through_tritonclient(binary: bool) -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    result, headers = triton_result([OutputTensor.from_array("scores", scores, binary=binary)])
    np.testing.assert_array_equal(result.as_numpy("scores"), scores)
    assert result.as_numpy("scores").dtype == np.float32
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("flowers", "v3", "r-1")
    if binary:
        assert headers["Content-Type"] == "application/octet-stream"
        assert "data" not in response["outputs"][0]
        assert response["outputs"][0]["parameters"] == {"binary_data_size": scores.nbytes}
    else:
        assert headers == {"Content-Type": "application/json"}
        assert response["outputs"][0]["data"] == scores.reshape(-1).tolist()


@pytest.mark.parametrize("binary", [True, False])
def test_bytes_outputs_read_back_through_tritonclient(binary: bool) -> None:
    elements = [b"rose", b"", "tulip \u00e9".encode()]
    result, _ = triton_result([OutputTensor("names", "BYTES", [1, 3], elements, binary=binary)])
    decoded = result.as_numpy("names")
    assert decoded.shape == (1, 3)
    # tritonclient gives binary BYTES as bytes and JSON BYTES as the strings they were sent as
    expected = elements if binary else [element.decode() for element in elements]
    assert decoded.reshape(-1).tolist() == expected


@pytest.mark.parametrize("binary", [True, False])
def test_classification_output_reads_back_as_score_index_label_strings(binary: bool) -> None:
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)
    output = classification_output("scores", scores, ["daisy", "rose", "tulip"], 2, binary=binary)
    result, _ = triton_result([output])
    decoded = [element if isinstance(element, bytes) else element.encode()
               for element in result.as_numpy("scores").reshape(-1)]
    assert result.as_numpy("scores").shape == (2, 2)
    assert decoded == [b"0.700000:1:rose", b"0.200000:2:tulip", b"0.500000:0:daisy", b"0.250000:1:rose"]
    assert result.get_output("scores")["datatype"] == "BYTES"


def test_mixed_binary_and_json_outputs_share_one_body_in_output_order() -> None:
    scores = np.array([[1.0, 2.0]], np.float32)
    result, headers = triton_result([OutputTensor.from_array("a", scores, binary=True),
                                     OutputTensor.from_array("b", scores * 2),
                                     OutputTensor.from_array("c", scores.astype(np.float16), binary=True)],
                                    request_id=None)
    assert int(headers["Inference-Header-Content-Length"]) > 0
    np.testing.assert_array_equal(result.as_numpy("a"), scores)
    np.testing.assert_array_equal(result.as_numpy("b"), scores * 2)
    np.testing.assert_array_equal(result.as_numpy("c"), scores.astype(np.float16))
    assert "id" not in result.get_response()


def test_a_response_without_a_version_leaves_model_version_out() -> None:
    body, _ = encode_infer_response(model_name="m", model_version=None, request_id="7",
                                    outputs=[OutputTensor.from_array("x", np.array([True]))])
    assert json.loads(body) == {"model_name": "m", "id": "7",
                                "outputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [True]}]}


@pytest.mark.parametrize(("output", "message"), [
    (OutputTensor.from_array("p", np.array([np.nan], np.float32)), "output 'p' holds NaN or infinity"),
    (OutputTensor("s", "BYTES", [1], [b"\xff"]), "output 's' holds bytes that are not UTF-8"),
])
def test_an_output_json_cannot_carry_is_refused_with_a_hint_to_ask_for_binary(output: OutputTensor,
                                                                               message: str) -> None:
    with pytest.raises(OipError, match=message) as raised:
        encode_infer_response(model_name="m", model_version=None, request_id=None, outputs=[output])
    assert "binary_data true" in str(raised.value)


@pytest.mark.parametrize(("fields", "error"), [
    (dict(datatype="FP32", shape=[2], data=np.zeros(2, np.float64)), ValueError),
    (dict(datatype="FP32", shape=[3], data=np.zeros(2, np.float32)), ValueError),
    (dict(datatype="BYTES", shape=[1], data=["text"]), TypeError),
    (dict(datatype="FP32", shape=[1], data=[1.0]), TypeError),
    (dict(datatype="BF16", shape=[1], data=np.zeros(1, np.float32)), ValueError),
])
def test_an_output_whose_data_does_not_match_its_declaration_is_a_server_error(fields: dict[str, Any],
                                                                               error: type[Exception]) -> None:
    with pytest.raises(error) as raised:
        OutputTensor(name="out", **fields)
    assert not isinstance(raised.value, OipError)


# ---------------------------------------------------------------------------------------------
# Classification extension


def test_classification_follows_tritons_example_with_tritons_number_formatting() -> None:
    # extension_classification.md's example output; src/classification.cc writes the value with
    # std::to_string, which gives six decimals for a float ("3.3" in the document's prose)
    assert classification(np.array([[1.1, 3.3, 0.5, 2.4]], np.float32), None, 2) == [[b"3.300000:1", b"2.400000:3"]]
    assert classification(np.array([[1, 5, 10, 4]], np.int32), ["pear", "pickle", "apple", "fig"], 2) == \
        [[b"10:2:apple", b"5:1:pickle"]]


def test_classification_caps_k_at_the_number_of_classes_and_breaks_ties_by_index() -> None:
    rows = classification(np.array([[0.25, 0.5, 0.25]], np.float64), ["a", "b", "c"], 10)
    assert rows == [[b"0.500000:1:b", b"0.250000:0:a", b"0.250000:2:c"]]
    assert classification_output("o", np.zeros((4, 3), np.float32), None, 10).shape == [4, 3]


@pytest.mark.parametrize(("probabilities", "labels", "k", "message"), [
    (np.zeros(3, np.float32), None, 1, r"takes an \[N, C\] output"),
    (np.zeros((1, 3), np.float32), ["a"], 1, "1 labels for 3 classes"),
    (np.zeros((1, 3), np.float32), None, 0, "at least 1"),
])
def test_classification_refuses_a_misuse_by_the_server(probabilities: np.ndarray, labels: list[str] | None,
                                                       k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        classification(probabilities, labels, k)
    assert not isinstance(raised.value, OipError)  # the server's own bug: a 500, not the client's 400


# ---------------------------------------------------------------------------------------------
# Metadata and output checks


def test_server_and_model_metadata_bodies_follow_the_protocol() -> None:
    assert server_metadata("transfer-serve", "0.1.0") == {
        "name": "transfer-serve", "version": "0.1.0", "extensions": list(EXTENSIONS)}
    body = model_metadata("flowers", versions=["v2", "v3"],
                          inputs=[tensor_metadata("images", "FP32", ["batch", 3, 224, 224])],
                          outputs=[tensor_metadata("probabilities", "FP32", [None, 5])])
    assert body == {"name": "flowers", "versions": ["v2", "v3"], "platform": "onnx_onnxv1",
                    "inputs": [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
                    "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]}]}
    assert "versions" not in model_metadata("m", versions=None, inputs=[], outputs=[])
    json.dumps(body)
    with pytest.raises(ValueError, match="unknown datatype"):
        tensor_metadata("x", "FLOAT", [1])


def test_check_outputs_names_the_unknown_output_and_the_ones_the_model_has() -> None:
    check_outputs(None, ["probabilities"])
    check_outputs([RequestedOutput("probabilities")], ["probabilities", "embedding"])
    with pytest.raises(OipError, match="no output 'logits': its outputs are 'probabilities', 'embedding'"):
        check_outputs([RequestedOutput("probabilities"), RequestedOutput("logits")], ["probabilities", "embedding"])


def test_an_oip_error_is_answered_400_with_the_protocols_error_body() -> None:
    with pytest.raises(OipError) as raised:
        parse_infer_request(b"{", json_length=None)
    assert isinstance(raised.value, InputError)
    error = api_error(raised.value)
    assert error.status == 400 and set(error.body()) == {"error"}


def test_a_json_header_over_the_limit_is_413_before_it_is_parsed_with_a_hint_to_send_binary() -> None:
    # JSON numbers become a Python object each: a body of "0,0,0,..." within the request limit
    # would cost several times its size to parse, so large tensors must come as binary data.
    numbers = b"0," * (MAX_JSON_BYTES // 2)
    body = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [-1], "data": [' + numbers + b"0]}]}"
    with pytest.raises(OipTooLargeError, match="binary data") as raised:
        parse_infer_request(body, json_length=None)
    assert api_error(raised.value).status == 413
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 4}}]}).encode()
    padded = header + b" " * (MAX_JSON_BYTES - len(header))  # at the limit, with binary data after it
    request = parse_infer_request(padded + b"\x00\x00\x00\x00", json_length=len(padded))
    assert request.inputs[0].data == [b""]


# ---------------------------------------------------------------------------------------------
# Refusals: one per way a body can be wrong


def uint8(**parameters: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "UINT8", "shape": [2], "parameters": parameters}


def bytes_tensor(count: int, size: int) -> dict[str, Any]:
    return {"name": "s", "datatype": "BYTES", "shape": [count], "parameters": {"binary_data_size": size}}


def raw(body: bytes, json_length: int | str | None = None) -> tuple[bytes, int | str | None]:
    return body, json_length


INPUTS = {"name": "x", "datatype": "UINT8", "shape": [1], "data": [1]}

REFUSED: list[tuple[str, tuple[bytes, int | str | None], str]] = [
    # the body's framing
    ("negative header length", raw(one_input(), -1), "Inference-Header-Content-Length is -1"),
    ("header length past the body", raw(one_input(), 10_000), "is 10000 but the body has only"),
    ("raw binary request", raw(b"\x00" * 4, 0), "raw binary request .* is not supported"),
    ("header length not a number", raw(one_input(), "12a"), "must be the JSON header's length in bytes, not '12a'"),
    ("binary header", raw(b"\xff\xfe\x00\x01 binary", 6), "the JSON header is not UTF-8"),
    ("header that is not JSON", raw(b"inputs=1"), "the JSON header does not parse"),
    ("header cut short", raw(one_input(), 20), "does not parse.*must be the length of the JSON header alone"),
    ("binary data without a header length", raw(one_input() + b"\x00\x00"), "does not parse.*send "
                                                                            "Inference-Header-Content-Length"),
    ("NaN in the JSON", raw(b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [NaN]}]}'),
     "NaN is not JSON"),
    ("nesting past the parser's depth", raw(b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    ("integer too long to parse", raw(b'{"id": ' + b"9" * 5000 + b"}"), "does not parse"),
    ("a repeated key", raw(b'{"inputs": [], "inputs": []}'), 'key "inputs" appears twice'),
    ("not an object", raw(b"[1, 2]"), "must be a JSON object"),
    ("id not a string", raw(json_body({"id": 42, "inputs": [INPUTS]})), '"id" must be a string, not the number 42'),
    ("request parameters not an object", raw(json_body({"parameters": [1], "inputs": [INPUTS]})),
     '"parameters" must be an object'),
    ("binary_data_output not a boolean", raw(json_body({"parameters": {"binary_data_output": 1}, "inputs": [INPUTS]})),
     "parameter binary_data_output must be true or false"),
    ("content_type not a string", raw(json_body({"parameters": {"content_type": 64}, "inputs": [INPUTS]})),
     "parameter content_type must be a string"),
    # the inputs
    ("no inputs", raw(json_body({"inputs": []})), "at least one input tensor"),
    ("inputs missing", raw(json_body({"id": "1"})), "at least one input tensor"),
    ("too many inputs", raw(json_body({"inputs": [{**INPUTS, "name": f"x{i}"} for i in range(MAX_TENSORS + 1)]})),
     f"{MAX_TENSORS + 1} inputs: at most {MAX_TENSORS}"),
    ("input not an object", raw(json_body({"inputs": ["x"]})), "input 0 must be an object"),
    ("input without a name", raw(one_input(name=None)), 'input 0: "name" must be a non-empty string'),
    ("duplicate input names", raw(json_body({"inputs": [INPUTS, INPUTS]})), "input 'x' is given twice"),
    ("unknown datatype", raw(one_input(datatype="BF16")), "datatype 'BF16' is not one of BOOL, UINT8"),
    ("shape not a list", raw(one_input(shape=4)), '"shape" must be a list of dimensions, not the number 4'),
    ("shape with a fraction", raw(one_input(shape=[2.0, 2])), "has the number 2.0 where a dimension must be"),
    ("negative dimension", raw(one_input(shape=[-1, 4])), "negative dimension"),
    ("too many dimensions", raw(one_input(shape=[1] * 9)), "shape has 9 dimensions; at most 8"),
    ("one huge dimension", raw(one_input(shape=[0, 2 ** 40])), "has a dimension over"),
    ("too many elements", raw(one_input(shape=[MAX_ELEMENTS, 2])), f"at most {MAX_ELEMENTS} are taken per input"),
    ("shared memory", raw(one_input(parameters={"shared_memory_region": "r"})), "shared memory .* is not supported"),
    ("input parameters not an object", raw(one_input(parameters="binary")), '"parameters" must be an object'),
    # JSON data
    ("no data", raw(one_input(data=None)), 'no "data" and no parameter binary_data_size'),
    ("data not a list", raw(one_input(data=5)), '"data" must be a list, not the number 5'),
    ("too few elements", raw(one_input(data=[1, 2, 3])), r"data has 3 elements but shape \[2, 2\] holds 4"),
    ("nesting off the shape", raw(one_input(data=[[1, 2, 3], [4]])), r"nested data does not match shape \[2, 2\]"),
    ("a list inside flat data", raw(one_input(shape=[4], data=[1, 2, [3], 4])), "element 2 is a list"),
    ("UINT8 out of range", raw(one_input(data=[1, 2, 300, 4])), "element 2 is the number 300; UINT8 takes whole "
                                                                "numbers from 0 to 255"),
    ("UINT8 given a float", raw(one_input(data=[1, 2.5, 3, 4])), "element 1 is the number 2.5; UINT8 takes whole"),
    ("UINT8 given 3.0", raw(one_input(data=[3.0, 2, 3, 4])), "element 0 is the number 3.0"),
    ("UINT8 given a boolean", raw(one_input(data=[True, 2, 3, 4])), "element 0 is a boolean"),
    ("UINT8 negative", raw(one_input(data=[-1, 2, 3, 4])), "element 0 is the number -1"),
    ("INT64 past its range", raw(one_input(datatype="INT64", shape=[1], data=[2 ** 63])), "from -9223372036854775808"),
    ("UINT64 past its range", raw(one_input(datatype="UINT64", shape=[1], data=[2 ** 64])), "to 18446744073709551615"),
    ("FP32 given a string", raw(one_input(datatype="FP32", shape=[1], data=["1.0"])), "element 0 is a string; FP32"),
    ("FP32 past its range", raw(one_input(datatype="FP32", shape=[1], data=[1e39])), "FP32 takes finite numbers"),
    ("FP64 given an overflowing literal", raw(b'{"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], '
                                              b'"data": [1e400]}]}'), "element 0 is the number inf"),
    ("FP16 past its range", raw(one_input(datatype="FP16", shape=[1], data=[70000])), r"within ±65504"),
    ("FP64 given a huge integer", raw(one_input(datatype="FP64", shape=[1], data=[10 ** 400])), "FP64 takes finite"),
    ("BOOL given a number", raw(one_input(datatype="BOOL", shape=[1], data=[1])), "BOOL takes true or false"),
    ("BYTES given a number", raw(one_input(datatype="BYTES", shape=[1], data=[5])), "BYTES takes strings"),
    ("BYTES with a lone surrogate", raw(b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], '
                                        b'"data": ["\\ud800"]}]}'), "not a valid Unicode string"),
    ("invalid base64", raw(one_input(datatype="BYTES", shape=[1], data=["not base64!"],
                                     parameters={"content_type": "base64"})), "element 0 is not valid base64"),
    ("base64 with bad padding", raw(one_input(datatype="BYTES", shape=[1], data=["AP8"],
                                              parameters={"content_type": "base64"})), "not valid base64"),
    ("base64 outside ASCII", raw(one_input(datatype="BYTES", shape=[1], data=["AP\u00e98"],
                                           parameters={"content_type": "base64"})), "not valid base64"),
    ("request-level base64 invalid", raw(json_body({"parameters": {"content_type": "base64"}, "inputs": [
        {"name": "x", "datatype": "BYTES", "shape": [1], "data": ["@@@@"]}]})), "not valid base64"),
    # binary data
    ("data and binary_data_size", raw(*with_binary([{**uint8(binary_data_size=2), "data": [1, 2]}], b"\x01\x02")),
     'either "data" or parameter binary_data_size'),
    ("negative binary_data_size", raw(*with_binary([uint8(binary_data_size=-2)], b"\x01\x02")),
     "binary_data_size must be a byte count"),
    ("boolean binary_data_size", raw(*with_binary([uint8(binary_data_size=True)], b"\x01")),
     "binary_data_size must be a byte count, not a boolean"),
    ("binary_data_size past the body", raw(*with_binary([uint8(binary_data_size=3)], b"\x01\x02")),
     "binary_data_size is 3 but only 2 bytes"),
    ("binary_data_size without a header length", raw(json_body({"inputs": [uint8(binary_data_size=2)]})),
     "no Inference-Header-Content-Length was sent"),
    ("bytes left over after the inputs", raw(*with_binary([uint8(binary_data_size=2)], b"\x01\x02\x03")),
     "3 bytes follow the JSON header but the inputs' binary_data_size add up to 2"),
    ("bytes after a JSON-only request", raw(*with_binary([INPUTS], b"\x01")),
     "1 bytes follow the JSON header but the inputs' binary_data_size add up to 0"),
    ("binary size off the shape", raw(*with_binary([{**uint8(binary_data_size=4), "datatype": "FP32"}], b"\x00" * 4)),
     r"binary_data_size is 4 but shape \[2\] of FP32 takes 8 bytes"),
    ("BOOL binary not 0 or 1", raw(*with_binary([{**uint8(binary_data_size=2), "datatype": "BOOL"}], b"\x01\x02")),
     "BOOL binary data must be bytes 0 and 1 only"),
    ("BYTES length prefix cut short", raw(*with_binary([bytes_tensor(1, 3)], b"\x01\x00\x00")),
     "cut short in element 0's 4-byte length"),
    ("BYTES element past its tensor", raw(*with_binary([bytes_tensor(1, 6)], struct.pack("<I", 100) + b"ab")),
     "BYTES element 0 says 100 bytes but only 2 remain"),
    ("BYTES with more elements than the shape", raw(*with_binary([bytes_tensor(1, 8)], b"\x00" * 8)),
     "holds more than the 1 elements its shape says"),
    ("BYTES with fewer elements than the shape", raw(*with_binary([bytes_tensor(2, 5)], b"\x01\x00\x00\x00a")),
     "holds 1 elements but the shape holds 2"),
    # requested outputs
    ("outputs not a list", raw(json_body({"inputs": [INPUTS], "outputs": {"name": "y"}})),
     '"outputs" must be a list'),
    ("outputs empty", raw(json_body({"inputs": [INPUTS], "outputs": []})), "leave it out to receive every output"),
    ("too many outputs", raw(json_body({"inputs": [INPUTS], "outputs": [{"name": f"y{i}"} for i in range(17)]})),
     "17 outputs requested: at most 16"),
    ("output not an object", raw(json_body({"inputs": [INPUTS], "outputs": ["y"]})), "output 0 must be an object"),
    ("output without a name", raw(json_body({"inputs": [INPUTS], "outputs": [{"parameters": {}}]})),
     'output 0: "name" must be a non-empty string'),
    ("output requested twice", raw(json_body({"inputs": [INPUTS], "outputs": [{"name": "y"}, {"name": "y"}]})),
     "requested output 'y' is requested twice"),
    ("binary_data not a boolean", raw(json_body({"inputs": [INPUTS], "outputs": [
        {"name": "y", "parameters": {"binary_data": "yes"}}]})), "parameter binary_data must be true or false"),
    ("negative classification", raw(json_body({"inputs": [INPUTS], "outputs": [
        {"name": "y", "parameters": {"classification": -1}}]})), "classification must be the number of classes"),
    ("classification as text", raw(json_body({"inputs": [INPUTS], "outputs": [
        {"name": "y", "parameters": {"classification": "3"}}]})), "classification must be .*, not a string"),
    ("output shared memory", raw(json_body({"inputs": [INPUTS], "outputs": [
        {"name": "y", "parameters": {"shared_memory_region": "r"}}]})), "shared memory"),
]


@pytest.mark.parametrize(("body", "message"), [pytest.param(case, message, id=name)
                                               for name, case, message in REFUSED])
def test_a_bad_request_is_refused_with_an_oip_error_that_says_what_to_fix(
        body: tuple[bytes, int | str | None], message: str) -> None:
    content, json_length = body
    with pytest.raises(OipError, match=message):
        parse_infer_request(content, json_length=json_length)


def test_damaged_bodies_raise_nothing_but_oip_error() -> None:
    # random truncations and byte flips of a valid binary request: each either parses or is an OipError
    body, length = triton.InferenceServerClient.generate_request_body(
        [triton_input("images", IMAGES, "BYTES", binary=True), triton_input("pixels", PIXELS, "UINT8", binary=True),
         triton_input("scale", np.array([0.5], np.float16), "FP16", binary=False)],
        outputs=[triton.InferRequestedOutput("scores", class_count=2)], request_id="r")
    rng = random.Random(17)
    for _ in range(2000):
        damaged = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cut = rng.choice([len(damaged), rng.randrange(len(damaged) + 1)])
        header = rng.choice([length, rng.randrange(-2, len(damaged) + 2), None])
        try:
            parse_infer_request(bytes(damaged[:cut]), json_length=header)
        except OipError:
            pass
