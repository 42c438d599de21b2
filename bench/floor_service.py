"""The per-request floor for ``bench/predict_bench.py``: a BentoML service with the real
service's ``POST /predict`` contract (multipart ``images``, ``top_k``) that reads the uploads and
answers a fixed, well-formed prediction, without decoding or running anything.

Its CPU per request (plus the load generator's) is what HTTP, multipart parsing, BentoML's
request handling and the JSON answer cost before any image work: what any service with this
contract pays on top of the in-process limit's decoding and inference.

    TRANSFER_SERVE_HOME=<state dir> bentoml serve bench.floor_service:Floor --port 3000
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

_ANSWER = [{"label": "ant", "score": 1.0, "top_k": [{"label": "ant", "score": 1.0}], "model_version": "v0"}]


@bentoml.service(name="floor", workers=1, traffic={"timeout": 60})
class Floor:
    """Reads the uploads, answers without looking at them."""

    @bentoml.api(route="/predict")
    async def predict(self, images: list[Path], top_k: int = 5) -> list[dict]:
        from starlette.responses import JSONResponse

        for path in images:
            path.read_bytes()  # as the service reads each upload once
        return JSONResponse(_ANSWER * len(images))  # type: ignore[return-value]
