"""An S3 API server for tests and benchmarks: moto's standalone server (``moto[server]``, the only
S3-compatible server installable here; deployments use MinIO or AWS S3), on 127.0.0.1 and a free
port. It keeps objects in memory: stopping it loses them, which the fault tests rely on only to
make the store unreachable, never to read old objects back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.support.net import free_port
from tests.support.polling import eventually

#: the credentials moto accepts; what boto3 needs in the environment of every process that uses it
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a process needs to use this server through boto3."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def start(self) -> None:
        moto = Path(sys.executable).with_name("moto_server")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def answers() -> bool:
            try:
                httpx.get(self.endpoint, timeout=1)
            except httpx.TransportError:
                return False
            return True

        try:
            eventually(answers, timeout=30, interval=0.1)
        except TimeoutError:
            raise RuntimeError(f"moto_server did not start: {self.log_path.read_text()[-2000:]}") from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        self.process = None

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **{
            "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]}).create_bucket(Bucket=name)
