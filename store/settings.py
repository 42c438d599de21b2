"""Where state lives, read from the environment: the settings every process that opens the
stores shares (the service, its retrain jobs, the CLIs).

With no configuration everything is in one directory, ``TRANSFER_SERVE_HOME`` (SQLite + files).
``TRANSFER_SERVE_DATABASE_URL`` (Postgres) and ``TRANSFER_SERVE_OBJECT_STORE`` (a shared
directory or an S3 bucket) make several replicas share one deployment's state. The database URL
holds a password: it is a secret, never logged or echoed in an error.

The service's own settings (:class:`service.settings.Settings`) extend this class, so one
environment configures both, and :func:`store.state.open_state` reads nothing else.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path("~/.transfer-serve")
DATABASE_SCHEMES = ("postgresql", "postgres")
OBJECT_STORE_SCHEMES = ("file", "s3")


def default_replica_id() -> str:
    """This host's name and the service's port (``PORT``, as the container sets it; 3000 is
    BentoML's default)."""
    return f"{socket.gethostname()}:{os.environ.get('PORT', '3000')}"


class StoreSettings(BaseSettings):
    """Environment variable = ``TRANSFER_SERVE_`` + field name in capitals (``home`` is
    ``TRANSFER_SERVE_HOME``)."""

    # hide_input_in_errors: a bad value is named by its variable, never echoed (the database URL
    # holds a password, the admin token is one)
    model_config = SettingsConfigDict(env_prefix="TRANSFER_SERVE_", extra="ignore", hide_input_in_errors=True)

    home: Path = Field(DEFAULT_HOME, description="state directory; with a database and an object store, only "
                       "this replica's local copies of model versions, job logs and scratch files")
    database_url: SecretStr | None = Field(
        None, description="unset: SQLite in the home; postgresql://user:pass@host:port/db?sslmode=...: shared "
        "state in Postgres (URL parameters are passed through to libpq)")
    object_store: str | None = Field(
        None, description="unset: files in the home; file:///path: a directory every replica mounts; "
        "s3://bucket/prefix: an S3-compatible store (boto3, the standard AWS_* variables, AWS_ENDPOINT_URL "
        "included)")
    replica_id: str = Field(default_factory=default_replica_id, min_length=1, max_length=200,
                            description="this replica's name in GET /admin/models (default: host name and port)")
    job_lease_s: float = Field(30.0, ge=1.0, le=3600.0,
                               description="a retrain job renews its lease this often x 3; when its replica dies, "
                                           "any replica fails the job once the lease has run out")

    @field_validator("home")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        parts = urlsplit(v.get_secret_value())
        if parts.scheme not in DATABASE_SCHEMES:
            # the URL holds a password: the message names only its scheme
            raise ValueError(f"TRANSFER_SERVE_DATABASE_URL must start with postgresql:// (it starts with "
                             f"{parts.scheme or 'no scheme'}://); leave it unset for SQLite in TRANSFER_SERVE_HOME")
        if not parts.hostname and "host=" not in parts.query:
            raise ValueError("TRANSFER_SERVE_DATABASE_URL names no host: postgresql://user:password@host:5432/db")
        return v

    @field_validator("object_store")
    @classmethod
    def _object_store(cls, v: str | None) -> str | None:
        if not v:
            return None
        parts = urlsplit(v)
        if parts.scheme not in OBJECT_STORE_SCHEMES:
            raise ValueError(f"TRANSFER_SERVE_OBJECT_STORE must be file:///path or s3://bucket/prefix, not {v!r}")
        if parts.scheme == "s3" and not parts.netloc:
            raise ValueError(f"TRANSFER_SERVE_OBJECT_STORE {v!r} names no bucket: s3://bucket/prefix")
        if parts.scheme == "file" and (parts.netloc or not parts.path.startswith("/")):
            raise ValueError(f"TRANSFER_SERVE_OBJECT_STORE {v!r} must be an absolute path: file:///path")
        return v

    @model_validator(mode="after")
    def _object_store_needs_a_database(self) -> StoreSettings:
        if self.object_store and self.database_url is None:
            raise ValueError("TRANSFER_SERVE_OBJECT_STORE is set but TRANSFER_SERVE_DATABASE_URL is not: replicas "
                             "sharing an object store need a shared database too (set both, or neither)")
        return self

    @property
    def shared(self) -> bool:
        """Whether state lives in a database and an object store shared by replicas."""
        return self.database_url is not None

    def redacted_database_url(self) -> str | None:
        """The database URL without its password, for logs."""
        if self.database_url is None:
            return None
        parts = urlsplit(self.database_url.get_secret_value())
        netloc = parts.netloc.rsplit("@", 1)
        host = netloc[-1]
        user = netloc[0].split(":", 1)[0] + "@" if len(netloc) == 2 else ""
        return f"{parts.scheme}://{user}{host}{parts.path}"
