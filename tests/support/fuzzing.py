"""Property-based fuzzing of the HTTP API from the OpenAPI document the service itself serves at
``/docs.json`` (schemathesis generates the requests, Hypothesis drives it), shared by the bounded
test (``tests/service/test_openapi.py``) and the long run (``python -m bench.fuzz``).

Every operation in the document is fuzzed with valid (positive) and invalid (negative) inputs,
then the linked operations (upload -> delete, retrain -> job, models -> activate) are chained by
schemathesis' state machine. Each response must pass four checks: no 5xx other than a declared
503/507, a status code the document declares for the route, the declared content type, and a body
that matches the declared schema. File fields get mostly garbage (random bytes, truncated and
bit-flipped images, a PDF, a zip, a decompression bomb) and some real photos. Failures are
collected, not raised, so one run reports every distinct failure with a curl command that
reproduces it.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.errors
import requests
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st

from tests.support.paths import SAMPLES


def _checks() -> list[Any]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# -- what file fields receive ---------------------------------------------------------------------

def _encoded(image: Any, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def real_images(photo_dirs: Sequence[Path] = (), per_dir: int = 4, max_bytes: int = 300_000) -> list[bytes]:
    """Real photos (the two samples and the smallest few of each folder, all under ``max_bytes``)
    and one of them re-encoded in the other accepted formats."""
    from PIL import Image

    photos = [(SAMPLES / name).read_bytes() for name in ("chelsea.jpg", "coffee.jpg")]
    for folder in photo_dirs:
        files = sorted((p for p in folder.rglob("*.jpg") if p.stat().st_size <= max_bytes),
                       key=lambda p: p.stat().st_size)
        photos += [p.read_bytes() for p in files[:per_dir]]
    small = Image.open(io.BytesIO(photos[0])).reduce(4)
    photos += [_encoded(small, fmt) for fmt in ("PNG", "GIF", "WEBP", "BMP", "TIFF")]
    photos.append(_encoded(small.convert("L"), "PNG"))  # greyscale
    return [p for p in photos if len(p) <= max_bytes]


def _bomb() -> bytes:
    """A 1-bit PNG of 8000 x 8000 pixels in a few KB: over any sane pixel limit."""
    from PIL import Image

    return _encoded(Image.new("1", (8000, 8000)), "PNG")


def upload_bytes(photos: Sequence[bytes]) -> st.SearchStrategy[bytes]:
    """Bytes for a file field: mostly garbage, some real images."""
    from schemathesis.core.file_samples import FILE_SAMPLES  # 1-pixel PNG/JPEG/GIF/WebP, a PDF, a zip

    real = st.sampled_from(list(photos))
    truncated = st.tuples(real, st.floats(0.0, 0.95)).map(lambda t: t[0][: int(len(t[0]) * t[1])])

    def flip(t: tuple[bytes, int, int]) -> bytes:
        data, position, value = t
        position %= len(data)
        return data[:position] + bytes([value]) + data[position + 1:]

    flipped = st.tuples(real, st.integers(0, 2**31), st.integers(0, 255)).map(flip)
    return st.one_of(
        st.binary(min_size=1, max_size=4096),
        st.binary(min_size=1, max_size=4096),
        truncated,
        flipped,
        st.sampled_from(list(FILE_SAMPLES.values()) + [_bomb(), b""]),
        real,
    )


@contextlib.contextmanager
def file_fields_get(strategy: st.SearchStrategy[bytes]) -> Iterator[None]:
    """Generate ``format: binary`` values (the multipart file parts) from ``strategy`` for the
    block; schemathesis' own generator is back afterwards."""
    import schemathesis
    from schemathesis.specs.openapi.formats import unregister_string_format

    schemathesis.openapi.format("binary", strategy)
    try:
        yield
    finally:
        unregister_string_format("binary")


# -- the run --------------------------------------------------------------------------------------

@dataclass
class OperationStats:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)  # "check: title (status)" -> curl command


@dataclass
class FuzzReport:
    operations: dict[str, OperationStats] = field(default_factory=lambda: defaultdict(OperationStats))

    def record(self, case: Any, response: Any, failures: Sequence[Any], base_url: str) -> None:
        stats = self.operations[case.operation.label]
        stats.requests += 1
        stats.statuses[response.status_code] += 1
        for failure in failures:
            key = f"{failure.title} ({response.status_code})"
            if key not in stats.failures:
                body = response.text[:300] if hasattr(response, "text") else ""
                stats.failures[key] = f"{failure.message.strip()[:500]}\n    response: {body}\n    " \
                                      f"{case.as_curl_command(base_url=base_url)[:1500]}"

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.operations.values())

    @property
    def server_errors(self) -> int:
        return sum(n for s in self.operations.values() for status, n in s.statuses.items() if status >= 500)

    def failures(self) -> list[str]:
        return [f"{label}: {key}\n    {detail}" for label, s in sorted(self.operations.items())
                for key, detail in s.failures.items()]

    def table(self) -> str:
        lines = [f"{'operation':44} {'requests':>8}  {'failures':>8}  statuses"]
        for label, s in sorted(self.operations.items()):
            statuses = " ".join(f"{code}:{n}" for code, n in sorted(s.statuses.items()))
            lines.append(f"{label:44} {s.requests:8d}  {len(s.failures):8d}  {statuses}")
        lines.append(f"{'all':44} {self.requests:8d}  {sum(len(s.failures) for s in self.operations.values()):8d}"
                     f"  5xx: {self.server_errors}")
        return "\n".join(lines)


def _validate(case: Any, response: Any) -> list[Any]:
    try:
        case.validate_response(response, checks=_checks())
    except BaseExceptionGroup as group:
        return list(group.exceptions)
    except AssertionError as failure:
        return [failure]
    return []


def _raised_by_hypothesis(exc: BaseException) -> bool:
    traceback = exc.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_globals.get("__name__", "").startswith("hypothesis.")


def _settings(max_examples: int, step_count: int | None = None) -> hypothesis.settings:
    extra: dict[str, Any] = {"stateful_step_count": step_count} if step_count else {}
    # No shrinking (failures are recorded, not raised), no example database in the working tree.
    return hypothesis.settings(max_examples=max_examples, deadline=None, database=None, derandomize=False,
                               phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                               print_blob=False, **extra)


def load_schema(base_url: str) -> Any:
    import schemathesis

    schema = schemathesis.openapi.from_url(f"{base_url}/docs.json", timeout=30)
    schema.config.update(base_url=base_url)
    return schema


def fuzz(base_url: str, headers: dict[str, str], *, max_examples: int, seed: int, stateful_examples: int = 0,
         labelled: dict[str, Sequence[bytes]] | None = None, report: FuzzReport | None = None,
         progress: Any = None) -> FuzzReport:
    """Fuzz every operation of the document served at ``base_url`` with ``max_examples`` positive
    and as many negative cases each, and run ``stateful_examples`` linked sequences. ``labelled``
    photos (label -> images) are uploaded first, so that retrain jobs really start."""
    from schemathesis import GenerationMode

    schema = load_schema(base_url)
    results = report if report is not None else FuzzReport()
    session = requests.Session()
    for label, photos in (labelled or {}).items():  # data a retrain can use, so that it is not always a 422
        response = session.post(f"{base_url}/admin/labels", headers=headers, data={"label": label},
                                files=[("images", (f"{i}.jpg", photo)) for i, photo in enumerate(photos)], timeout=60)
        response.raise_for_status()

    def exercise(case: Any) -> Any:
        response = case.call(session=session, headers=headers, timeout=60)
        results.record(case, response, _validate(case, response), base_url)
        return response

    def fuzz_operation(operation: Any) -> None:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if progress:
                progress(f"{operation.label} ({mode.value})")

            @hypothesis.seed(seed)
            @_settings(max_examples)
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                exercise(case)

            try:
                run()
            except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                pass

    scenarios = 0

    class Links(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            nonlocal scenarios
            scenarios += 1

        def call(self, case: Any, **kwargs: Any) -> Any:
            return case.call(session=session, headers=headers, timeout=60, **kwargs)

        def validate_response(self, response: Any, case: Any, *args: Any, **kwargs: Any) -> None:
            results.record(case, response, _validate(case, response), base_url)

    # Label uploads come last: the labels the fuzzer invents hold one image each, and a store with
    # such a label refuses every retrain (422), which would leave the retrain paths (a job, its
    # state, a 409 while it runs, the version it activates) unexplored.
    operations = [result.ok() for result in schema.get_all_operations()]
    uploads = [operation for operation in operations if operation.label == "POST /admin/labels"]
    for operation in operations:
        if operation not in uploads:
            fuzz_operation(operation)
    if stateful_examples:
        if progress:
            progress("linked operations (stateful)")
        # The server's state changes under the state machine, so a replay Hypothesis makes can draw
        # differently (Flaky): that ends a run, and another one (not seeded) goes on, as
        # schemathesis' own runner does.
        for _ in range(20):
            if scenarios >= stateful_examples:
                break
            try:
                Links.run(settings=_settings(stateful_examples - scenarios, step_count=6))
                break
            except hypothesis.errors.Flaky:
                continue
            except AssertionError as exc:  # Hypothesis asserts on some inconsistent replays
                if not _raised_by_hypothesis(exc):
                    raise
    for operation in uploads:
        fuzz_operation(operation)
    session.close()
    return results
