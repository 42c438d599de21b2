"""The model spec: everything needed to use a model version, stored beside its ONNX file.

A spec is the one source of truth for labels and preprocessing. Training writes it when it
registers a version; the service and the evaluation path read it back and never hard-code
input size, mean/std or resize parameters.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos"]

#: Names of the ONNX graph's input and outputs; part of the model contract.
ONNX_INPUT = "input"
ONNX_LOGITS = "logits"
ONNX_EMBEDDING = "embedding"
SPEC_FILENAME = "spec.json"


class PreprocessConfig(BaseModel):
    """How an image becomes the network's input tensor (timm's data config, made explicit)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_size: int = Field(224, ge=1, le=4096, description="side of the square centre crop")
    crop_pct: float = Field(0.875, gt=0.0, le=1.0)
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in v):
            raise ValueError("std values must be positive")
        return v

    @property
    def resize_size(self) -> int:
        """Shorter side after resizing, before the centre crop (timm: floor(size / crop_pct))."""
        return math.floor(self.input_size / self.crop_pct)


class ModelSpec(BaseModel):
    """Labels, preprocessing and backbone identity of one model version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    labels: tuple[str, ...] = Field(min_length=2, description="class names, in logit order")
    preprocess: PreprocessConfig = PreprocessConfig()
    backbone: str = Field(min_length=1, description="timm model name of the backbone")
    backbone_fingerprint: str = Field(
        min_length=16, description="sha256 of the backbone weights: embeddings are comparable "
        "between versions only when this matches"
    )
    embedding_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _labels_unique(self) -> ModelSpec:
        seen: set[str] = set()
        dupes = [label for label in self.labels if label in seen or seen.add(label)]  # type: ignore[func-returns-value]
        if dupes:
            raise ValueError(f"labels must be unique; repeated: {sorted(set(dupes))}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelSpec:
        return cls.model_validate_json(text)
