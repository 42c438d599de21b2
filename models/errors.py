"""The project's exception hierarchy.

Every error a caller can cause derives from :class:`TransferServeError`; the service maps
:class:`InputError` subclasses to 4xx responses with their message, so each message says what
was wrong and how to fix it.
"""

from __future__ import annotations


class TransferServeError(Exception):
    """Base class: catch this to catch every error raised by this project."""


class InputError(TransferServeError, ValueError):
    """Bad input from a caller (an upload, a data folder, an argument): the service answers a
    4xx with its message (service/errors.py says which)."""


class ImageDecodeError(InputError):
    """The bytes are empty, corrupt, truncated, or not an image format Pillow can read."""


class ImageTooLargeError(InputError):
    """The image has more pixels than the configured limit (a decompression-bomb guard)."""


class DatasetError(InputError):
    """A labelled folder or manifest cannot be trained on (empty, one class, too few images)."""


class ModelError(TransferServeError):
    """A model version is missing, incomplete, corrupt, or inconsistent with its spec."""


class VersionNotFoundError(ModelError, LookupError):
    """No model version with that name exists in the registry."""


class ExportError(ModelError):
    """ONNX export failed its checks (onnx.checker or torch/onnxruntime parity)."""
