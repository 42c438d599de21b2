"""A throwaway PostgreSQL 15 server for tests and benchmarks, on 127.0.0.1 and a free port.

Debian's server binaries (``postgresql-15``) refuse to run as root, so the cluster is created and
run as the ``postgres`` user (``runuser``) in a directory that user owns. ``fsync`` is off: the
tests care about behaviour, not durability across a power cut. The server can be stopped and
started again on the same port (the fault tests do that under load).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.net import free_port

BIN = Path(os.environ.get("TRANSFER_SERVE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _as_postgres(*command: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


class PostgresServer:
    def __init__(self) -> None:
        if not (BIN / "initdb").is_file():
            raise RuntimeError(f"PostgreSQL 15 is not installed ({BIN}/initdb missing): apt-get install postgresql-15")
        self.root = Path(tempfile.mkdtemp(prefix="transfer-serve-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        subprocess.run(_as_postgres(str(BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                    "--no-sync", "-E", "UTF8"), check=True, capture_output=True, cwd="/")
        self.start()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run(_as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
                                    "-l", str(self.root / "log"), "-w", "start"),
                       check=True, capture_output=True, cwd="/")

    def stop(self) -> None:
        subprocess.run(_as_postgres(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
                       check=False, capture_output=True, cwd="/")

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
