"""Request handling for ``POST /predict`` that needs no BentoML: upload checks, and turning
probabilities into the response. Every client mistake becomes a :class:`RequestError` with the
HTTP status and a message that says what to fix and, for a multi-image request, which image."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from models.errors import ImageTooLargeError, InputError

from .settings import Settings


class LabelScore(BaseModel):
    label: str
    score: float = Field(description="softmax probability")


class Prediction(BaseModel):
    label: str = Field(description="the most probable label")
    score: float = Field(description="its softmax probability")
    top_k: list[LabelScore] = Field(description="the k most probable labels, best first")
    model_version: str = Field(description="the model version that produced this result")


class RequestError(Exception):
    """A client error: HTTP ``status`` and a message for the caller."""

    def __init__(self, status: int, message: str, *, image: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.status = status
        self.image = image
        self.filename = filename

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"error": str(self)}
        if self.image is not None:
            body["image"] = self.image
            body["filename"] = self.filename
        return body


_BENTOML_TEMP_PREFIX = re.compile(r"^tmp[a-z0-9_]{8}")


def display_name(path: Path | str) -> str:
    """A client's file name, safe to echo back (never used as a path). BentoML stores each upload
    as a NamedTemporaryFile whose name is 'tmp' + 8 random characters + the client's base name."""
    name = _BENTOML_TEMP_PREFIX.sub("", Path(str(path)).name)
    return "".join(ch if ch.isprintable() else "?" for ch in name)[:100]


def read_uploads(paths: Sequence[Path], settings: Settings) -> list[bytes]:
    """The uploads' bytes, after the count, size and emptiness checks."""
    if not paths:
        raise RequestError(400, "no images: send one or more files in the multipart field 'images'")
    if len(paths) > settings.max_files:
        raise RequestError(413, f"{len(paths)} images in one request; the limit is {settings.max_files}. "
                                "Split the request.")
    blobs = []
    for index, path in enumerate(paths):
        size = path.stat().st_size
        if size > settings.max_file_bytes:
            raise RequestError(413, f"image {index} ('{display_name(path)}') is {size} bytes; the limit "
                                    f"is {settings.max_file_bytes} bytes", image=index, filename=display_name(path))
        if size == 0:
            raise RequestError(400, f"image {index} ('{display_name(path)}') is empty",
                               image=index, filename=display_name(path))
        blobs.append(path.read_bytes())
    return blobs


def image_error(index: int, path: Path, exc: InputError) -> RequestError:
    status = 413 if isinstance(exc, ImageTooLargeError) else 422
    name = display_name(path)
    return RequestError(status, f"image {index} ('{name}'): {exc}", image=index, filename=name)


def build_predictions(probabilities: np.ndarray, labels: Sequence[str], top_k: int, version: str) -> list[dict[str, Any]]:
    """One result per row, shaped like :class:`Prediction`, its top-k labels best first; k is
    capped at the number of labels. Plain dicts: the service sends them as they are (validating
    and serialising through pydantic costs a measurable share of each request's CPU)."""
    k = min(top_k, len(labels))
    # argpartition then sort only the k best: cheap even for 1000 classes
    best = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(best, np.argsort(-np.take_along_axis(probabilities, best, 1), axis=1), 1)
    results = []
    for row, indices in zip(probabilities.tolist(), order.tolist()):
        top = [{"label": labels[i], "score": row[i]} for i in indices]
        results.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top, "model_version": version})
    return results
