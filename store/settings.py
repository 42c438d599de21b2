"""Where state lives, read from the environment: the settings every process that opens the
stores shares (the service, its retrain jobs, the training CLI).

The service's own settings (:class:`service.settings.Settings`) extend this class, so one
environment configures both, and :func:`store.state.open_state` reads nothing else.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path("~/.transfer-serve")


class StoreSettings(BaseSettings):
    """Environment variable = ``TRANSFER_SERVE_`` + field name in capitals (``home`` is
    ``TRANSFER_SERVE_HOME``)."""

    model_config = SettingsConfigDict(env_prefix="TRANSFER_SERVE_", extra="ignore")

    home: Path = Field(DEFAULT_HOME, description="state directory: model versions, labels, database")

    @field_validator("home")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser().resolve()
