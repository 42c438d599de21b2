"""Request bodies of the Open Inference Protocol for the benchmarks' load generator
(:class:`tests.support.load.Load`): encoded images as a binary BYTES tensor, or uint8 crops made
beforehand with the served version's preprocessing, as a binary UINT8 tensor (what a client
that preprocesses itself sends). The outputs come back as binary data too; the answer is valid
when it holds one label per image."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import httpx
import numpy as np

from models.preprocess import decode_and_crop
from models.spec import ModelSpec
from tests.support.load import ImageFile

#: TRANSFER_SERVE_OIP_MODEL_NAME's default
INFER_ROUTE = "/v2/models/transfer-serve/infer"


def binary_body(name: str, datatype: str, shape: list[int], data: bytes) -> tuple[bytes, dict[str, str]]:
    """One input as binary tensor data, every output asked for as binary data."""
    header = json.dumps({"inputs": [{"name": name, "datatype": datatype, "shape": shape,
                                     "parameters": {"binary_data_size": len(data)}}],
                         "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                                     {"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()
    return header + data, {"Content-Type": "application/octet-stream",
                           "Inference-Header-Content-Length": str(len(header))}


@dataclass
class EncodedImages:
    """``images``: BYTES [N], each element 4-byte little-endian length then the file's bytes."""

    def encode(self, images: list[ImageFile]) -> tuple[bytes, dict[str, str]]:
        data = b"".join(struct.pack("<I", len(image.data)) + image.data for image in images)
        return binary_body("images", "BYTES", [len(images)], data)

    def valid(self, response: httpx.Response, images: int) -> bool:
        return _valid(response, images)


@dataclass
class Crops:
    """``pixels``: UINT8 [N, S, S, 3], cropped here with ``spec``'s preprocessing (each image once)."""

    spec: ModelSpec
    _cache: dict[int, bytes] = field(default_factory=dict)

    def encode(self, images: list[ImageFile]) -> tuple[bytes, dict[str, str]]:
        size = self.spec.preprocess.input_size
        data = b"".join(self._crop(image) for image in images)
        return binary_body("pixels", "UINT8", [len(images), size, size, 3], data)

    def _crop(self, image: ImageFile) -> bytes:
        key = id(image)
        if key not in self._cache:
            self._cache[key] = np.ascontiguousarray(decode_and_crop(image.data, self.spec.preprocess,
                                                                    fast=True)).tobytes()
        return self._cache[key]

    def valid(self, response: httpx.Response, images: int) -> bool:
        return _valid(response, images)


def _valid(response: httpx.Response, images: int) -> bool:
    length = response.headers.get("inference-header-content-length")
    if length is None:
        return False
    header = json.loads(response.content[:int(length)])
    outputs = {output["name"]: output for output in header.get("outputs", [])}
    return outputs.get("label", {}).get("shape") == [images] and \
        outputs.get("probabilities", {}).get("shape", [0])[0] == images
