"""What the admin routes return: each is the route's response model, so the API's schema is
generated from the very classes the handlers build (a retrain job is :class:`store.jobs.Job`).
Routes send the fields that were set: an optional field left unset is absent from the body, one
set to None is null."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from store.labels import AddResult


class StoredImage(BaseModel):
    image_id: str = Field(pattern="^[0-9a-f]{64}$", description="SHA-256 of the image bytes")
    label: str
    status: Literal["stored", "unchanged", "moved"]
    filename: str
    previous_label: str | None = Field(None, description="only for status 'moved'")
    note: str | None = Field(None, description="only for status 'moved'")

    @classmethod
    def of(cls, result: AddResult, filename: str) -> StoredImage:
        """``previous_label`` and ``note`` are set (and so sent) only for a moved image."""
        moved = {"previous_label": result.previous_label,
                 "note": f"these bytes were labelled '{result.previous_label}'; now '{result.label}'"}
        return cls(image_id=result.image_id, label=result.label, status=result.status, filename=filename,
                   **(moved if result.status == "moved" else {}))


class LabelsStored(BaseModel):
    stored: list[StoredImage] = Field(description="one entry per uploaded image, in order")
    counts: dict[str, int] = Field(description="images per label in the store, after this upload")


class LabelSummary(BaseModel):
    counts: dict[str, int] = Field(description="images per label")
    total: int = Field(ge=0)
    not_in_active_model: int | None = Field(None, ge=0, description="labelled images the active version was not "
                                            "trained on (null when the active version's files cannot be read)")
    active_version: str | None
    domains: dict[str, dict[str, int]] = Field(default_factory=dict, description="images per label of each domain "
                                               "tag (POST /admin/labels with `domain`; they judge adapted versions)")


class LabelDeleted(BaseModel):
    deleted: str = Field(description="the image id")
    counts: dict[str, int]


class ModelSummary(BaseModel):
    """A version's summary; a damaged version (files unreadable) has only ``version``,
    ``active`` and ``error``."""

    version: str
    active: bool
    created_at: str | None = None
    labels: list[str] | None = None
    metrics: dict[str, Any] | None = None
    parent: str | None = None
    strategy: str | None = Field(None, description="how it was trained (head, finetune, retrain-head, ...)")
    exporter: str | None = Field(None, description="the ONNX exporter of its graph: dynamo, or torchscript for "
                                 "versions made before dynamo became the default (slower: `python -m training "
                                 "reexport` makes a faster copy of bootstrap and head-only ones)")
    variants: list[str] | None = Field(None, description="its graphs: fp32, and int8 where it has a checked "
                                       "INT8 variant (fp16 is converted from fp32 at load time)")
    serves: str | None = Field(None, description="the variant this deployment serves of it when it is active "
                               "(TRANSFER_SERVE_MODEL_VARIANT on this host's provider); each replica reports what "
                               "it really serves in `replicas`")
    error: str | None = Field(None, description="what is wrong with a damaged version")


class Replica(BaseModel):
    """A replica that reported what it serves within the last few seconds."""

    id: str = Field(description="TRANSFER_SERVE_REPLICA_ID (default: host name and port)")
    version: str | None = Field(description="the version it serves; null while it loads none")
    variant: str | None = Field(description="fp32, int8 or fp16")
    last_seen: str = Field(description="its last report, ISO 8601 UTC")


class ModelList(BaseModel):
    active: str | None = Field(description="the active version; null before the first is registered")
    versions: list[ModelSummary] = Field(description="oldest first")
    replicas: list[Replica] = Field(description="the replicas serving this deployment, from their heartbeats "
                                    "(one on a single machine); a replica silent for 15 s drops off")
    fallback_from: dict[str, Any] | None = Field(
        None, description="present when the version activated last failed verification and the service "
        "fell back to the last good one: that version and the reason")


class Activated(BaseModel):
    active: str


class ReviewItem(BaseModel):
    """A kept, unlabelled prediction waiting for an operator's label."""

    prediction_id: str = Field(pattern="^[0-9a-f]{32}$")
    image_id: str = Field(pattern="^[0-9a-f]{64}$", description="SHA-256 of the image bytes")
    label: str = Field(description="the predicted (top-1) label")
    score: float = Field(description="its softmax probability")
    margin: float = Field(description="top-1 minus top-2 score: 0 is a tie")
    entropy: float = Field(description="entropy of the scores over log(number of labels): 1 is uniform")
    top_k: list[dict[str, Any]] = Field(description="the best labels and scores, best first ({label, score})")
    model_version: str
    created_at: str = Field(description="when it was predicted, ISO 8601 UTC")


class ReviewQueue(BaseModel):
    items: list[ReviewItem] = Field(description="least certain first, near-duplicates spread out")
    kept: int = Field(ge=0, description="kept predictions in all, labelled ones included")


class Feedback(BaseModel):
    """``POST /admin/feedback``: the label of a kept prediction's image."""

    prediction_id: str = Field(description="as /predict returned it", examples=["0" * 32])
    label: str = Field(description="the image's class (the predicted one confirms it), named as in POST /admin/labels")
    domain: str | None = Field(None, description="optional domain tag, as in POST /admin/labels")


class PredictionDeleted(BaseModel):
    deleted: str = Field(description="the prediction id")
