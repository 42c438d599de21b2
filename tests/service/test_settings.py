"""``service/settings.py``, unit level: the settings read from the environment, their defaults
derived from the cores, and bad values refused when the service starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from models.hardware import cpu_count
from service.settings import Settings


def settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


def test_defaults_are_derived_from_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings()
    assert s.workers >= 1
    assert s.inference_workers * s.intra_op_threads <= cpu_count()


def test_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRANSFER_SERVE_HOME", str(tmp_path))
    monkeypatch.setenv("TRANSFER_SERVE_MAX_FILES", "3")
    monkeypatch.setenv("TRANSFER_SERVE_PROVIDERS", "cpu")
    s = Settings()
    assert s.home == tmp_path.resolve() and s.max_files == 3 and s.providers == "cpu"


def test_more_threads_than_cores_is_refused() -> None:
    with pytest.raises(ValidationError, match="exceeds"):
        settings(inference_workers=1, intra_op_threads=cpu_count() + 1)


@pytest.mark.parametrize("field,value", [("providers", "gpu"), ("max_files", 0), ("max_files", 1001),
                                         ("admin_token", "short"), ("max_batch_size", 1)])
def test_bad_values_fail_fast(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        settings(**{field: value})


def test_admin_token_is_secret() -> None:
    s = settings(admin_token="a" * 32)
    assert "a" * 32 not in repr(s) and "a" * 32 not in str(s.model_dump())


def test_the_variant_setting_takes_auto_fp32_int8_or_fp16_only(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setenv("TRANSFER_SERVE_MODEL_VARIANT", "fp32")
    assert Settings(home=tmp_path).model_variant == "fp32"
    monkeypatch.setenv("TRANSFER_SERVE_MODEL_VARIANT", "int8")
    assert Settings(home=tmp_path).model_variant == "int8"
    monkeypatch.setenv("TRANSFER_SERVE_MODEL_VARIANT", "fp16")
    assert Settings(home=tmp_path).model_variant == "fp16"
    monkeypatch.delenv("TRANSFER_SERVE_MODEL_VARIANT")
    assert Settings(home=tmp_path).model_variant == "auto"  # INT8 on CPUs where a version has a checked one
    monkeypatch.setenv("TRANSFER_SERVE_MODEL_VARIANT", "int4")
    with pytest.raises(ValidationError, match="model_variant"):
        Settings(home=tmp_path)


def test_the_open_inference_model_name_is_one_url_path_segment(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    assert Settings(home=tmp_path).oip_model_name == "transfer-serve"
    monkeypatch.setenv("TRANSFER_SERVE_OIP_MODEL_NAME", "flowers_v2.1")
    assert Settings(home=tmp_path).oip_model_name == "flowers_v2.1"
    for name in ("", "a/b", "has space", "-leading", "x" * 65):
        monkeypatch.setenv("TRANSFER_SERVE_OIP_MODEL_NAME", name)
        with pytest.raises(ValidationError):
            Settings(home=tmp_path)
