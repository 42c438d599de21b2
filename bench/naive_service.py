"""A naive baseline for ``bench/predict_bench.py``: the active model behind one BentoML service
that decodes and runs one image per onnxruntime call, in the request's own thread (BentoML runs
a synchronous API in one thread by default, so requests are served one at a time), with no
batching and no split between HTTP and inference work. The session uses every core and the
provider the service would pick (CPU unless ``TRANSFER_SERVE_PROVIDERS`` asks for a GPU).

Serve (from the repository root, so ``bench`` is importable)::

    TRANSFER_SERVE_HOME=<state dir> bentoml serve bench.naive_service:Naive --port 3000

It answers ``POST /predict`` with the same JSON as the real service. It is a yardstick, not a
service: no upload limits, and a bad image is a 500.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

with bentoml.importing():
    from service.predict import Prediction


@bentoml.service(name="naive", workers=1, traffic={"timeout": 60})
class Naive:
    """One image, one inference call."""

    def __init__(self) -> None:
        import onnxruntime as ort

        from models.hardware import cpu_count
        from service.providers import session_providers
        from service.settings import get_settings
        from store.state import open_state

        settings = get_settings()
        active = open_state(settings).registry.active()
        if active is None:
            raise RuntimeError("no active model version: run `python -m training bootstrap`")
        self.version = active.version
        self.spec = active.spec
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_count()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # The service's provider choice (CPU unless TRANSFER_SERVE_PROVIDERS asks for a GPU), so
        # that on a GPU host the baseline runs where the service does.
        providers = session_providers(settings)
        self.session = ort.InferenceSession(
            str(active.onnx_path), options,
            providers=[name for name, _ in providers], provider_options=[opts for _, opts in providers],
        )

    @bentoml.api(route="/predict")
    def predict(self, images: list[Path], top_k: int = 5) -> list[Prediction]:
        from models.onnx_io import softmax
        from models.preprocess import decode_and_crop, normalise_crops
        from models.spec import ONNX_INPUT, ONNX_LOGITS
        from service.predict import build_predictions

        results: list[dict] = []
        for path in images:
            crop = decode_and_crop(path.read_bytes(), self.spec.preprocess)  # as the service does
            batch = normalise_crops(crop[None], self.spec.preprocess)
            (logits,) = self.session.run([ONNX_LOGITS], {ONNX_INPUT: batch})
            results += build_predictions(softmax(logits), self.spec.labels, top_k, self.version)
        return results  # type: ignore[return-value]
