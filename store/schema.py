"""Schema versions, for both backends' databases: a migration is the step from one version to
the next, and a database newer than the code is refused rather than misread."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.errors import TransferServeError


@dataclass(frozen=True)
class Migration:
    """The step from schema version ``version - 1`` to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...]


class SchemaTooNewError(TransferServeError):
    """The database was written by a newer release of transfer-serve than this one."""


def check_numbering(migrations: Sequence[Migration]) -> int:
    """The newest version; ValueError unless the steps are numbered 1, 2, 3, ... in order."""
    if [m.version for m in migrations] != list(range(1, len(migrations) + 1)):
        raise ValueError("migrations must be numbered 1, 2, 3, ... in order")
    return len(migrations)


def apply_missing(conn: Any, migrations: Sequence[Migration], current: int, where: str) -> list[int]:
    """Run the steps from schema version ``current`` to the newest on ``conn`` (inside the caller's
    transaction); returns the versions applied. ``where`` names the database for the error of a
    schema newer than this code."""
    latest = check_numbering(migrations)
    if current > latest:
        raise SchemaTooNewError(
            f"{where} has schema version {current}, newer than the {latest} this release knows: it was written by "
            "a newer transfer-serve. Run that release, or restore a backup made before the upgrade")
    applied = []
    for migration in migrations[current:]:
        for statement in migration.statements:
            conn.execute(statement)
        applied.append(migration.version)
    return applied
