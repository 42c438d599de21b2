"""Operators' commands on the state, torch-free (they run in the serving image):

    python -m store copy --from /data [--dry-run] [--json]     # a single-machine home -> the shared deployment
    python -m store prune --keep 5 [--dry-run] [--json]        # old model versions, either backend
    python -m store seed --from /opt/seed                      # the first version, if the state has none

``copy`` writes to the database and object store that ``TRANSFER_SERVE_DATABASE_URL`` and
``TRANSFER_SERVE_OBJECT_STORE`` name; ``prune`` and ``seed`` work on whichever state the
environment names. ``seed`` is how the serving images, which carry no torch, start on an empty
volume (scripts/entrypoint.sh).
Results go to stdout (one JSON object with ``--json``), logs to stderr. Exit status: 0 success,
2 bad input, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models.errors import TransferServeError

from .maintenance import copy_home, prune_versions, seed_registry
from .settings import StoreSettings
from .state import open_state


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m store", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    copy = sub.add_parser("copy", help="copy a single-machine TRANSFER_SERVE_HOME into the shared database and "
                                       "object store (idempotent)")
    copy.add_argument("--from", dest="source", required=True, type=Path, help="the home to copy")
    copy.add_argument("--dry-run", action="store_true", help="say what would be copied; write nothing")
    copy.add_argument("--json", action="store_true")
    prune = sub.add_parser("prune", help="delete old model versions: all but the active one, its history and "
                                         "the newest N")
    prune.add_argument("--keep", required=True, type=int, help="how many of the newest versions to keep")
    prune.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    prune.add_argument("--json", action="store_true")
    seed = sub.add_parser("seed", help="register the active version of a single-machine home (the image's "
                                       "built-in model) if the state has no version yet")
    seed.add_argument("--from", dest="source", required=True, type=Path, help="the home to take the version from")
    return parser


def run(args: argparse.Namespace) -> int:
    settings = StoreSettings()
    if args.command == "copy":
        from .shared import SharedBackend

        if not settings.shared:
            print("error: set TRANSFER_SERVE_DATABASE_URL (and TRANSFER_SERVE_OBJECT_STORE) to the deployment to "
                  "copy into", file=sys.stderr)
            return 2
        if not (args.source / "transfer-serve.db").is_file() and not (args.source / "versions").is_dir():
            print(f"error: {args.source} holds no transfer-serve state (no transfer-serve.db, no versions/)",
                  file=sys.stderr)
            return 2
        summary = copy_home(args.source.resolve(), SharedBackend(settings), dry_run=args.dry_run)
        print(json.dumps(summary.as_dict()) if args.json else summary.describe())
    elif args.command == "prune":
        if args.keep < 0:
            print("error: --keep must be 0 or more", file=sys.stderr)
            return 2
        deleted = prune_versions(open_state(settings).registry, args.keep, dry_run=args.dry_run)
        if args.json:
            print(json.dumps({"deleted": deleted, "dry_run": args.dry_run}))
        else:
            print(f"{'would delete' if args.dry_run else 'deleted'} {len(deleted)} version(s): "
                  f"{', '.join(deleted) or 'none'}")
    elif args.command == "seed":
        if not (args.source / "versions").is_dir():
            print(f"error: {args.source} holds no model versions (no versions/)", file=sys.stderr)
            return 2
        version = seed_registry(args.source.resolve(), open_state(settings).registry)
        print(f"seeded the state with {version.version}" if version else "the state has a model version already")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return run(args)
    except TransferServeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
