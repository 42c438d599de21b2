"""Object stores for the immutable files of a shared deployment: labelled images (by content
hash) and model version files. Two kinds behind one interface: a directory every replica mounts
(``file:///path``) and an S3-compatible bucket (``s3://bucket/prefix``, through boto3 with the
standard ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` included: MinIO, Ceph, AWS S3).

Keys are relative paths (``images/ab/<sha256>``, ``versions/v3/model.onnx``). A store that cannot
be reached raises :class:`~store.errors.StoreUnavailable`; a write a mounted directory cannot take
raises the ``OSError`` that :func:`~store.errors.storage_failure` explains.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import StoreUnavailable
from ..files import write_atomic

_CHUNK = 1 << 20


class ObjectNotFound(LookupError):
    """No object has that key."""


class ObjectStore(ABC):
    """Immutable objects by key."""

    description: str  #: what it is, for messages (never holds a secret)

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` (the same bytes again is harmless)."""

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key``."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectNotFound` if there is none."""

    @abstractmethod
    def download(self, key: str, path: Path) -> None:
        """Write the object to ``path``; :class:`ObjectNotFound` if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object if it exists."""

    @abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix``, sorted."""

    def sha256(self, key: str) -> str:
        """The object's SHA-256, read back from the store (how a write is verified)."""
        return hashlib.sha256(self.get(key)).hexdigest()


def open_object_store(url: str | None, home: Path) -> ObjectStore:
    """The store ``url`` names (``TRANSFER_SERVE_OBJECT_STORE``); None: ``home/objects``."""
    if url is None:
        return FileObjectStore(home / "objects")
    parts = urlsplit(url)
    if parts.scheme == "file":
        return FileObjectStore(Path(parts.path))
    return S3ObjectStore(parts.netloc, parts.path.strip("/"))


class FileObjectStore(ObjectStore):
    """Objects as files under ``root`` (a local directory, or one every replica mounts)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = f"the object store directory {self.root}"

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or ".." in Path(key).parts:
            raise ValueError(f"{key!r} is not an object key")
        return self.root / key

    def _check_root(self) -> None:
        # an unmounted shared directory must not be mistaken for an empty store
        if not self.root.is_dir():
            raise StoreUnavailable(self.description, "it does not exist or is not mounted")

    def put(self, key: str, data: bytes) -> None:
        self._check_root()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, 0o644)

    def put_file(self, key: str, path: Path) -> None:
        self._check_root()
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(path, tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        self._check_root()
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def download(self, key: str, path: Path) -> None:
        self._check_root()
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError as exc:
            if not self._path(key).exists():
                raise ObjectNotFound(key) from None
            raise exc

    def exists(self, key: str) -> bool:
        self._check_root()
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._check_root()
        self._path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        self._check_root()
        files = (p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))
        keys = (str(p.relative_to(self.root)) for p in files)
        return sorted(key for key in keys if key.startswith(prefix))

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        try:
            with self._path(key).open("rb") as fh:
                while block := fh.read(_CHUNK):
                    digest.update(block)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        return digest.hexdigest()


class S3ObjectStore(ObjectStore):
    """Objects in an S3-compatible bucket under ``prefix``. Timeouts are short and retries few,
    so that a store that cannot be reached fails a request in seconds (503), not minutes."""

    def __init__(self, bucket: str, prefix: str, client: Any = None) -> None:
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.description = f"the object store s3://{bucket}/{prefix}"
        self._client = client

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", config=Config(
                connect_timeout=3, read_timeout=20, retries={"max_attempts": 2, "mode": "standard"}))
        return self._client

    @contextlib.contextmanager
    def _reaching(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise ObjectNotFound(key) from None
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                raise StoreUnavailable(self.description, code or f"HTTP {status}") from exc
            raise
        except BotoCoreError as exc:  # no connection, a timeout, a closed connection
            raise StoreUnavailable(self.description, type(exc).__name__) from exc

    def put(self, key: str, data: bytes) -> None:
        with self._reaching(key):
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)

    def put_file(self, key: str, path: Path) -> None:
        with self._reaching(key):
            self.client.upload_file(str(path), self.bucket, self.prefix + key)

    def get(self, key: str) -> bytes:
        with self._reaching(key):
            return bytes(self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read())

    def download(self, key: str, path: Path) -> None:
        with self._reaching(key):
            self.client.download_file(self.bucket, self.prefix + key, str(path))

    def exists(self, key: str) -> bool:
        try:
            with self._reaching(key):
                self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        with self._reaching(key):
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def keys(self, prefix: str) -> list[str]:
        found: list[str] = []
        with self._reaching(prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=self.prefix + prefix):
                found += [item["Key"][len(self.prefix):] for item in page.get("Contents", [])]
        return sorted(found)

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self._reaching(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"]
            for block in iter(lambda: body.read(_CHUNK), b""):
                digest.update(block)
        return digest.hexdigest()
