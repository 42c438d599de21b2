"""``service/jobs.py``, unit level: whether a retrain can run at all (enough labelled images, a
parent version to start from), and how a job's process exit is told."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from models.retrain import RetrainRefused
from service.jobs import exit_reason, retrainable_parent
from store.state import open_state
from tests.support.images import colour_photos
from tests.support.models import tiny_spec, write_tiny_onnx
from tests.support.stores import add_labelled


@pytest.mark.parametrize(
    "stored,message",
    [({}, "no labelled images"), ({"red": 1, "blue": 3}, "at least 2"), ({"red": 3}, None)],
)
def test_check_retrainable(colour_home: Path, stored: dict[str, int], message: str | None) -> None:
    for label, n in stored.items():
        add_labelled(colour_home, label, colour_photos(label, n))
    state = open_state(home=colour_home)
    if message is None:  # one stored class is fine: v1's own embeddings bring the other
        assert retrainable_parent(state.registry, state.labels).version == "v1"
    else:
        with pytest.raises(RetrainRefused, match=message):
            retrainable_parent(state.registry, state.labels)


def test_a_single_class_with_no_parent_data_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    state = open_state(home=home)
    state.registry.register(
        onnx_file=write_tiny_onnx(tmp_path / "t.onnx"), spec=tiny_spec(("red", "blue")), metrics={},
        embeddings=np.zeros((0, 3), np.float32), embedding_targets=np.zeros(0, np.int64),
        parent=None, dataset_fingerprint=None,
    )
    add_labelled(home, "green", colour_photos("green", 4))
    with pytest.raises(RetrainRefused, match="one class"):
        retrainable_parent(state.registry, state.labels)


def test_exit_reasons_name_the_signal() -> None:
    assert "SIGKILL" in exit_reason(-signal.SIGKILL) and "stopped" in exit_reason(-signal.SIGTERM)
    assert "status 3" in exit_reason(3)
