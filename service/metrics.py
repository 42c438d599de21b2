"""The service's own Prometheus metrics, served with BentoML's at ``/metrics``: how confident the
served model is (a histogram of the top-1 score per model version), what it predicts (a count per
version and label), and what became of the predictions offered for keeping.

A drop in confidence after a deployment is the cheapest early warning that the new version, or the
images it now sees, went wrong: deploy/prometheus/alerts.yaml has alert rules on these (README.md,
"Monitoring").
"""

from __future__ import annotations

import functools
import threading
from typing import Literal

#: Top-1 score buckets: fine near 1, where a healthy classifier's scores pile up.
TOP1_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
#: Distinct ``label`` values per model version before the rest are counted as :data:`OTHER_LABEL`:
#: every value is a time series in Prometheus, and the bootstrap model alone has 1000 labels.
MAX_LABELS_PER_VERSION = 50
OTHER_LABEL = "_other"

KeepOutcome = Literal["kept", "dropped_queue_full", "dropped_storage", "dropped_error"]


class _Metrics:
    """The metric objects, made on first use: BentoML sets ``PROMETHEUS_MULTIPROC_DIR`` in a worker
    after it imports the service module, and prometheus_client picks its multiprocess mode (what
    lets ``/metrics`` add up every worker's values) when it is first imported."""

    def __init__(self) -> None:
        import prometheus_client

        self.top1_score = prometheus_client.Histogram(
            "transfer_serve_top1_score", "Top-1 softmax score of each predicted image, per model version",
            labelnames=["model_version"], buckets=TOP1_BUCKETS)
        self.predicted_labels = prometheus_client.Counter(
            "transfer_serve_predicted_labels",
            f"Images predicted per model version and top-1 label (the first {MAX_LABELS_PER_VERSION} labels seen "
            f"per version and worker; the rest as '{OTHER_LABEL}')", labelnames=["model_version", "label"])
        self.kept_predictions = prometheus_client.Counter(
            "transfer_serve_kept_predictions",
            "Predictions offered for keeping (TRANSFER_SERVE_KEEP_PREDICTIONS), by outcome: kept, or dropped because "
            "the write queue was full, the state could not take the write, or another error",
            labelnames=["outcome"])


@functools.cache
def _metrics() -> _Metrics:
    return _Metrics()


class BoundedLabels:
    """The ``label`` value to report for a prediction: the label itself for the first
    :data:`MAX_LABELS_PER_VERSION` distinct labels of a version, :data:`OTHER_LABEL` after."""

    def __init__(self, limit: int = MAX_LABELS_PER_VERSION) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def __call__(self, version: str, label: str) -> str:
        with self._lock:
            seen = self._seen.setdefault(version, set())
            if label in seen:
                return label
            if len(seen) < self.limit:
                seen.add(label)
                return label
        return OTHER_LABEL


_bounded = BoundedLabels()


def observe_predictions(version: str, results: list[dict[str, object]]) -> None:
    """Count one batch of ``/predict`` results (shaped like :class:`service.predict.Prediction`)."""
    metrics = _metrics()
    histogram = metrics.top1_score.labels(model_version=version)
    for result in results:
        histogram.observe(float(result["score"]))  # type: ignore[arg-type]
        metrics.predicted_labels.labels(model_version=version, label=_bounded(version, str(result["label"]))).inc()


def count_kept(outcome: KeepOutcome, n: int = 1) -> None:
    _metrics().kept_predictions.labels(outcome=outcome).inc(n)
