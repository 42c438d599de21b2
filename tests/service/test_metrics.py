"""service/metrics.py: the bound on label values per model version (unit). What ``/metrics``
serves is checked against a real server in test_admin.py (the operator's loop)."""

from __future__ import annotations

from service.metrics import OTHER_LABEL, BoundedLabels


def test_labels_past_the_limit_of_a_version_are_reported_as_other() -> None:
    bounded = BoundedLabels(limit=2)
    assert [bounded("v1", label) for label in ("ant", "bee", "wasp", "ant", "bee")] == \
        ["ant", "bee", OTHER_LABEL, "ant", "bee"]


def test_each_version_has_its_own_limit() -> None:
    bounded = BoundedLabels(limit=1)
    assert bounded("v1", "ant") == "ant" and bounded("v1", "bee") == OTHER_LABEL
    assert bounded("v2", "bee") == "bee" and bounded("v2", "ant") == OTHER_LABEL
