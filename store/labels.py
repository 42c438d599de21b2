"""The label store: images an operator has labelled, kept for head-only retraining.

Uploads (``POST /admin/labels``, ``python -m training import``) are stored by content: an image's
id is the SHA-256 of its bytes (the client's file name is never used), so the same bytes uploaded
twice are one image, and uploaded again with another label the image moves to that label. An
upload of several images is stored all or none: when the state cannot take a write (disk full,
read-only volume...), :class:`~store.errors.StorageError` says so and nothing of that upload
remains.

This module holds what every backend shares: the interface (:class:`LabelStore`), the naming
rules of labels and image ids, and the check an image passes before it may be stored.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from models.errors import InputError
from models.preprocess import decode_image

MAX_LABEL_LENGTH = 64
#: The whole rule of :func:`validate_label` but the names '.' and '..' and the length, as a
#: regular expression (for the API's schema; the function gives the reasons).
LABEL_PATTERN = "^[A-Za-z0-9._-]([A-Za-z0-9 ._-]*[A-Za-z0-9._-])?$"
_LABEL_CHARACTER = re.compile(r"[A-Za-z0-9 ._-]")
_IMAGE_ID_RE = re.compile(r"[0-9a-f]{64}")

AddStatus = Literal["stored", "moved", "unchanged"]


class InvalidLabelError(InputError):
    """A label that breaks the naming rules of :func:`validate_label`."""


class ImageNotFoundError(InputError, LookupError):
    """No stored image has that id (or the id is not a sha256 hex digest at all)."""


def validate_domain(domain: str | None) -> str | None:
    """Return ``domain`` (a tag naming where images come from: a camera, a site) if it follows the
    naming rules of labels, else raise :class:`InvalidLabelError` saying which rule it breaks."""
    if domain is None:
        return None
    try:
        return validate_label(domain)
    except InvalidLabelError as exc:
        raise InvalidLabelError("domain: " + str(exc).replace("label", "name")) from None


def validate_label(label: str) -> str:
    """Return ``label`` if it is a valid label, else raise :class:`InvalidLabelError` saying
    which rule it breaks.

    A label is 1-64 characters from ASCII letters, digits, space, ``-``, ``_`` and ``.``, does
    not start or end with a space, and is not ``.`` or ``..``. Labels name classes in reports
    and may name folders, so look-alike Unicode letters, control characters and path
    separators are refused rather than normalised: the operator sees exactly what is stored.
    """
    if not isinstance(label, str):
        raise InvalidLabelError(f"a label must be text, got {type(label).__name__}")
    if not label:
        raise InvalidLabelError("the label is empty; give 1 to 64 characters")
    if len(label) > MAX_LABEL_LENGTH:
        raise InvalidLabelError(
            f"label {label[:20]!r}... is {len(label)} characters long; "
            f"the most is {MAX_LABEL_LENGTH}"
        )
    bad = next((c for c in label if not _LABEL_CHARACTER.fullmatch(c)), None)
    if bad is not None:
        raise InvalidLabelError(
            f"label {label!r} may only contain letters, digits, space, '-', '_' and '.' "
            f"(found {_describe_char(bad)})"
        )
    if label != label.strip(" "):
        raise InvalidLabelError(f"label {label!r} may not start or end with a space")
    if label in {".", ".."}:
        raise InvalidLabelError(f"label {label!r} is not allowed (it names a directory)")
    if not re.fullmatch(LABEL_PATTERN, label):  # the checks above say why; this keeps the two in step
        raise InvalidLabelError(f"label {label!r} does not match {LABEL_PATTERN}")
    return label


def _describe_char(char: str) -> str:
    name = unicodedata.name(char, "")
    if char.isprintable() and name:
        return f"{char!r}, U+{ord(char):04X} {name}"
    return f"U+{ord(char):04X}{' ' + name if name else ''}"


def is_image_id(value: object) -> bool:
    """Whether ``value`` has the form of an image id: 64 lowercase hex digits."""
    return isinstance(value, str) and _IMAGE_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class CheckedImage:
    """An upload that decoded as an image within the pixel limit: its id, bytes and size."""

    image_id: str
    data: bytes
    width: int
    height: int


def check_image(data: bytes, *, max_pixels: int) -> CheckedImage:
    """Decode an upload: only what passes may be stored.

    Raises:
        ImageDecodeError: the bytes are not a readable image.
        ImageTooLargeError: the image has more than ``max_pixels`` pixels.
    """
    width, height = decode_image(data, max_pixels=max_pixels).size
    return CheckedImage(hashlib.sha256(data).hexdigest(), data, width, height)


@dataclass(frozen=True)
class AddResult:
    """What :meth:`LabelStore.add_many` did with one upload.

    ``status`` is ``"stored"`` (a new image), ``"moved"`` (these bytes were stored under
    ``previous_label`` and now have ``label``) or ``"unchanged"`` (already stored with ``label``).
    """

    image_id: str
    label: str
    status: AddStatus
    previous_label: str | None
    width: int
    height: int


@dataclass(frozen=True)
class LabelledImage:
    """One stored image: its id (sha256 hex), label and domain tag (None: untagged)."""

    image_id: str
    label: str
    domain: str | None = None


class LabelStore(ABC):
    """Labelled images. Safe to use from many threads and processes at once."""

    def add(self, data: bytes, label: str, *, max_pixels: int, domain: str | None = None) -> AddResult:
        """:func:`check_image` then :meth:`add_many` of one image."""
        return self.add_many([check_image(data, max_pixels=max_pixels)], label, domain)[0]

    @abstractmethod
    def add_many(self, images: Sequence[CheckedImage], label: str, domain: str | None = None) -> list[AddResult]:
        """Store images under ``label``, deduplicated by content, all or none. The same bytes
        twice in ``images`` are one image (the second is ``"unchanged"``). A ``domain`` tags the
        images (an image keeps the last domain it was uploaded with; an upload without one leaves
        it as it was): labelled images of a domain judge versions adapted to it.

        Raises:
            InvalidLabelError: the label breaks the naming rules.
            StorageError: the state cannot take the write; nothing was stored.
        """

    @abstractmethod
    def delete(self, image_id: str) -> bool:
        """Remove an image. False if there is no such image, including for anything that is not
        a well-formed image id."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Number of images per label, labels in sorted order."""

    @abstractmethod
    def images(self) -> list[LabelledImage]:
        """Every stored image, ordered by id."""

    def domain_counts(self) -> dict[str, dict[str, int]]:
        """Number of images per label of each domain tag, domains and labels in sorted order."""
        counts: dict[str, dict[str, int]] = {}
        for image in self.images():
            if image.domain is not None:
                per_label = counts.setdefault(image.domain, {})
                per_label[image.label] = per_label.get(image.label, 0) + 1
        return {domain: dict(sorted(per_label.items())) for domain, per_label in sorted(counts.items())}

    @abstractmethod
    def read(self, image_id: str) -> bytes:
        """The stored image's bytes.

        Raises:
            ImageNotFoundError: no image with that id is stored.
        """
