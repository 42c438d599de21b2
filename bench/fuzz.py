"""Long property-based fuzzing run of the whole HTTP API from the OpenAPI document the service
serves (the bounded run is ``tests/service/test_openapi.py``; both use ``tests/support/fuzzing.py``):

    .venv/bin/python -m bench.fuzz --max-examples 500 --seed 1

It serves the service as shipped (plus any ``--service-env``) with an admin token on a throwaway
copy of a state directory (bootstrapped when ``--home`` is not given: the destructive admin
routes, retrain, activate and delete, are fuzzed too), uploads a few labelled photos so retrain
jobs really start, then fuzzes every operation with ``--max-examples`` valid and as many invalid
inputs, and runs ``--stateful-examples`` linked sequences. It prints, per operation, the requests
made, the status codes seen and the distinct failures (5xx; a status code, content type or body
the document does not declare), each with a curl command that reproduces it. Exit status 1 if
there was any failure.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import DEFAULT_IMAGES, Progress, install_sigterm_handler, serving, state_home
from tests.support.fuzzing import file_fields_get, fuzz, real_images, upload_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-examples", type=int, default=200,
                        help="generated requests per operation, for each of valid and invalid inputs (default 200)")
    parser.add_argument("--stateful-examples", type=int, default=50,
                        help="linked sequences of up to 6 calls: upload -> delete, retrain -> job, "
                             "models -> activate (default 50; 0 skips them)")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed of the per-operation runs (default 0)")
    parser.add_argument("--home", type=Path, default=None,
                        help="state directory to copy (never fuzzed in place); default: bootstrap a fresh one")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="labelled photo folder (one subfolder per class): real uploads among the garbage")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="service setting, e.g. TRANSFER_SERVE_MAX_FILES=8 (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure and failure to this file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the server log here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    progress = Progress()
    token = secrets.token_urlsafe(24)
    env = dict(item.split("=", 1) for item in args.service_env)
    env["TRANSFER_SERVE_ADMIN_TOKEN"] = token
    max_file_bytes = int(env.get("TRANSFER_SERVE_MAX_FILE_BYTES", 10 * 1024 * 1024))
    classes = sorted(p for p in args.images.iterdir() if p.is_dir())[:2]
    labelled: dict[str, Sequence[bytes]] = {c.name: [p.read_bytes() for p in sorted(c.glob("*.jpg"))[:3]]
                                            for c in classes}
    photos = real_images([args.images], per_dir=8, max_bytes=max_file_bytes)
    work = Path(tempfile.mkdtemp(prefix="transfer-serve-fuzz-"))
    log_dir = args.log_dir or work
    try:
        with state_home(args.home, progress) as source:
            home = work / "home"
            shutil.copytree(source, home)
            progress(f"serving on a copy of {source}")
            with serving("service.service:TransferServe", home, log_dir, env=env) as server:
                progress(f"fuzzing {server.url}: {args.max_examples} valid + {args.max_examples} invalid "
                         f"inputs per operation, {args.stateful_examples} linked sequences, seed {args.seed}")
                with file_fields_get(upload_bytes(photos)):
                    report = fuzz(server.url, {"Authorization": f"Bearer {token}"}, max_examples=args.max_examples,
                                  seed=args.seed, stateful_examples=args.stateful_examples, labelled=labelled,
                                  progress=progress)
                server_log = server.log()
    finally:
        if args.log_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    failures = report.failures()
    print(report.table())
    print(f"\n{len(report.operations)} operations, {report.requests} requests, {report.server_errors} 5xx, "
          f"{len(failures)} distinct failure(s); {progress.elapsed:.0f} s")
    for failure in failures:
        print(f"\n{failure}")
    tracebacks = server_log.count("Traceback")
    if tracebacks:
        print(f"\nthe server logged {tracebacks} traceback(s) (BentoML logs one for every request its own "
              "validation refuses with a 400; see --log-dir)")
    if args.json:
        args.json.write_text(json.dumps({
            "config": {"max_examples": args.max_examples, "stateful_examples": args.stateful_examples,
                       "seed": args.seed, "service_env": {k: v for k, v in env.items() if "TOKEN" not in k}},
            "requests": report.requests, "server_errors": report.server_errors,
            "operations": {label: {"requests": s.requests, "statuses": dict(sorted(s.statuses.items())),
                                   "failures": s.failures} for label, s in sorted(report.operations.items())},
        }, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
