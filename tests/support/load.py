"""The one HTTP load generator, for the tests and the benchmarks: ``clients`` concurrent clients,
each sending ``POST /predict`` requests back to back, every answer recorded with when it was sent
and received, its status and body, and whether it was a well-formed prediction.

Run it in an event loop (``await load.run(total=..., until=..., stop=...)``), as the benchmarks
do, or as a context manager, which runs it in a thread of its own until the block ends, as the
tests do::

    with Load(server.url, [photo], clients=4) as load:
        ...  # kill something, activate something
    assert all(answer.status == 200 for answer in load.answers)

Times are :func:`time.perf_counter` seconds. Requests in flight when the load stops are awaited,
so a server never sees a connection dropped by the load generator itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class ImageFile:
    """One upload: its file name, bytes, content type (None: httpx's default) and, for images
    read from a labelled folder, the folder's name."""

    name: str
    data: bytes
    content_type: str | None = None
    label: str = ""

    def as_file(self) -> tuple[str, bytes] | tuple[str, bytes, str]:
        return (self.name, self.data) if self.content_type is None else (self.name, self.data, self.content_type)


@dataclass
class Answer:
    """One request: when it was sent and answered, the HTTP status (None: no answer at all), the
    answer's text (or ``"ExceptionType: message"`` when there was none) and, unless it was a 200
    with one well-formed prediction per image sent, what was wrong."""

    sent: float
    done: float
    status: int | None
    body: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def latency_ms(self) -> float:
        return (self.done - self.sent) * 1000


def valid_prediction(body: Any, images: int = 1) -> bool:
    """``body`` is what ``POST /predict`` promises for ``images`` images."""
    return (isinstance(body, list) and len(body) == images
            and all(isinstance(r, dict) and {"label", "score", "top_k", "model_version"} <= r.keys() for r in body))


class Protocol(typing.Protocol):
    """Another request format than /predict's multipart (the Open Inference Protocol's: bench/)."""

    def encode(self, images: list[ImageFile]) -> tuple[bytes, dict[str, str]]: ...

    def valid(self, response: httpx.Response, images: int) -> bool: ...


class Load:
    """``clients`` clients sending ``POST route`` back to back, ``images_per_request`` consecutive
    images of ``images`` in each (client *i* starts at image ``i * len(images) // clients``, so
    the clients are spread over the list). With ``pre_encode``, each request body is encoded
    once, before the load starts, and sent as it is: the load generator then spends its share
    of the cores on sending and reading, not on encoding the same bytes again."""

    def __init__(self, url: str, images: Sequence[ImageFile | bytes], *, clients: int, images_per_request: int = 1,
                 route: str = "/predict", pre_encode: bool = False, timeout: float = 120,
                 protocol: Protocol | None = None) -> None:
        if clients < 1 or images_per_request < 1 or not images:
            raise ValueError("clients >= 1, images_per_request >= 1 and at least one image are required")
        self.url = url
        self.images = [i if isinstance(i, ImageFile) else ImageFile("photo.jpg", i) for i in images]
        self.clients = clients
        self.images_per_request = images_per_request
        self.route = route
        self.timeout = timeout
        self.protocol = protocol
        self.started = time.perf_counter()
        self.sent = 0
        self.answers: list[Answer] = []  # in the order they came
        self._bodies = [self._encode(first) for first in range(len(self.images))] if pre_encode else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _group(self, first: int) -> list[ImageFile]:
        return [self.images[(first + k) % len(self.images)] for k in range(self.images_per_request)]

    def _encode(self, first: int) -> tuple[bytes, dict[str, str]]:
        if self.protocol is not None:
            return self.protocol.encode(self._group(first))
        request = httpx.Request("POST", self.url, files=[("images", i.as_file()) for i in self._group(first)])
        return request.read(), {"Content-Type": request.headers["Content-Type"]}

    @property
    def answered(self) -> int:
        return len(self.answers)

    def successes_sent_after(self, moment: float) -> int:
        """Answers with status 200 to requests sent at or after ``moment`` (perf_counter)."""
        return sum(a.status == 200 and a.sent >= moment for a in list(self.answers))

    async def run(self, *, total: int | None = None, until: float | None = None,
                  stop: Callable[[], bool] | None = None) -> None:
        """Send until ``total`` requests have been sent, the clock passes ``until``, or ``stop()``
        is true (whichever comes first; none given: until :meth:`__exit__`), then await the
        requests in flight."""
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=self.timeout) as client:
            await asyncio.gather(*(self._client(client, index, total, until, stop) for index in range(self.clients)))

    async def _client(self, client: httpx.AsyncClient, index: int, total: int | None, until: float | None,
                      stop: Callable[[], bool] | None) -> None:
        position = index * max(1, len(self.images) // self.clients)
        while True:
            sent = time.perf_counter()
            if (self._stop.is_set() or (stop is not None and stop()) or (total is not None and self.sent >= total)
                    or (until is not None and sent >= until)):
                return
            self.sent += 1
            first = position % len(self.images)
            position += self.images_per_request
            status, body, problem = None, "", None
            try:
                if self.protocol is not None:
                    content, headers = self._bodies[first] if self._bodies is not None else self._encode(first)
                    response = await client.post(self.route, content=content, headers=headers)
                elif self._bodies is not None:
                    content, headers = self._bodies[first]
                    response = await client.post(self.route, content=content, headers=headers)
                else:
                    files = [("images", i.as_file()) for i in self._group(first)]
                    response = await client.post(self.route, files=files)
                status, body = response.status_code, response.text
                if status != 200:
                    problem = f"HTTP {status}: {body[:300]}"
                elif self.protocol is not None:
                    if not self.protocol.valid(response, self.images_per_request):
                        problem = f"HTTP 200 with an unexpected body: {body[:300]}"
                elif not valid_prediction(response.json(), self.images_per_request):
                    problem = f"HTTP 200 with an unexpected body: {body[:300]}"
            except (httpx.HTTPError, ValueError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                body = body or problem
            self.answers.append(Answer(sent, time.perf_counter(), status, body, problem))

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=asyncio.run, args=(self.run(),), name="load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=150)
