"""``POST /admin/adapt`` and the adapt job (``service/adapt.py``) against a real ``bentoml serve``
on real photos: the bootstrap cannot be adapted (no training embeddings), a retrained version is
adapted to blurred photos and judged on labelled blurred photos of its domain, the adapted version
serves, is retrained and rolled back like any other; without labels of the domain it is kept
inactive unless forced; bad input gets a 4xx that says what to fix and starts nothing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.adapt import MIN_TARGET_IMAGES
from tests.support.admin import AUTH, STORAGE_ENV, upload, wait_for_version
from tests.support.corruptions import corrupt_bytes
from tests.support.server import Server, serving, start_server, wait_for_job, wait_until

LABELLED, JUDGES, TARGETS = 20, 16, 20  # per class: clean labelled, labelled blurred, unlabelled blurred


@pytest.fixture(scope="module")
def photos(hymenoptera: Path) -> dict[str, list[Path]]:
    return {label: sorted((hymenoptera / label).iterdir()) for label in ("ants", "bees")}


def blurred(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(p.stem + ".jpg", corrupt_bytes(p.read_bytes(), "blur", "strong", fmt="JPEG")) for p in paths]


@pytest.fixture(scope="module")
def targets(photos: dict[str, list[Path]]) -> list[tuple[str, bytes]]:
    """Unlabelled blurred photos: the new domain."""
    start = LABELLED + JUDGES
    return blurred(photos["ants"][start:start + TARGETS] + photos["bees"][start:start + TARGETS])


@pytest.fixture(scope="module")
def server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("adapt")
    shutil.copytree(bootstrapped_home, root / "home")
    with serving(root / "home", root / "serve.log", STORAGE_ENV) as running:
        yield running


@pytest.fixture
def admin(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        yield http


def adapt(http: httpx.Client, images: list[tuple[str, bytes]], **fields: Any) -> httpx.Response:
    return http.post("/admin/adapt", data={k: str(v).lower() if isinstance(v, bool) else str(v)
                                           for k, v in fields.items()},
                     files=[("images", image) for image in images])


def refused(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert all(word in message for word in words), message
    return message


def test_the_bootstrap_model_cannot_be_adapted_it_has_no_training_embeddings(
    admin: httpx.Client, targets: list[tuple[str, bytes]]
) -> None:
    refused(adapt(admin, targets), 422, "v1", "no training embeddings", "retrain it")
    assert admin.get("/admin/models").json()["active"] == "v1"


def test_an_adapted_version_is_judged_on_its_domain_serves_retrains_and_rolls_back(
    admin: httpx.Client, photos: dict[str, list[Path]], targets: list[tuple[str, bytes]]
) -> None:
    for label in ("ants", "bees"):
        assert upload(admin, label, photos[label][:LABELLED]).status_code == 200
    retrained = wait_for_job(admin, admin.post("/admin/retrain").json()["id"], timeout=180)
    assert (retrained["state"], retrained["version"]) == ("succeeded", "v2"), retrained
    for label in ("ants", "bees"):  # labelled photos of the new domain, tagged with it
        judges = blurred(photos[label][LABELLED:LABELLED + JUDGES])
        stored = admin.post("/admin/labels", data={"label": label, "domain": "blurry"},
                            files=[("images", judge) for judge in judges])
        assert stored.status_code == 200, stored.text
    assert admin.get("/admin/labels").json()["domains"] == {"blurry": {"ants": JUDGES, "bees": JUDGES}}

    # any accuracy passes (tolerance 1): this checks what the gate was told, not what the blur did
    started = adapt(admin, targets, domain="blurry", tolerance=1.0)
    assert started.status_code == 202, started.text
    assert (started.json()["kind"], started.json()["parent"]) == ("adapt", "v2")
    job = wait_for_job(admin, started.json()["id"], timeout=180)
    assert (job["state"], job["version"]) == ("succeeded", "v3"), job
    metrics = job["metrics"]
    assert metrics["method"] == "diagonal" and metrics["target_images"] == 2 * TARGETS
    assert metrics["candidate"]["judged_on"] == metrics["active"]["judged_on"] == 2 * JUDGES
    assert f"on {2 * JUDGES} labelled images of domain 'blurry'" in metrics["gate"]
    assert metrics["embeddings_computed"] == 2 * (TARGETS + JUDGES)  # the targets and the judges, once
    wait_for_version(admin, "v3", timeout=30)
    v3 = next(v for v in admin.get("/admin/models").json()["versions"] if v["version"] == "v3")
    assert v3["parent"] == "v2" and v3["strategy"] == "adapt-diagonal", v3

    # retrained like any other: from v3, on the store's labels
    again = wait_for_job(admin, admin.post("/admin/retrain", json={"force": True}).json()["id"], timeout=180)
    assert (again["state"], again["parent"], again["version"]) == ("succeeded", "v3", "v4"), again
    wait_for_version(admin, "v4", timeout=30)
    # and rolled back like any other
    assert admin.post("/admin/models/v3/activate").json() == {"active": "v3"}
    wait_for_version(admin, "v3", timeout=30)


def test_without_labels_of_the_domain_the_adapted_version_is_kept_inactive_unless_forced(
    admin: httpx.Client, targets: list[tuple[str, bytes]]
) -> None:
    active = admin.get("/admin/models").json()["active"]
    job = wait_for_job(admin, adapt(admin, targets, domain="night", method="coral").json()["id"], timeout=180)
    assert job["state"] == "rejected" and job["metrics"]["method"] == "coral", job
    assert "no labelled images of domain 'night' to compare on" in job["metrics"]["gate"]
    assert "set force" in job["metrics"]["gate"]
    assert admin.get("/admin/models").json()["active"] == active  # kept, inactive
    forced = wait_for_job(admin, adapt(admin, targets, force=True).json()["id"], timeout=180)
    assert forced["state"] == "succeeded" and forced["metrics"]["gate"].endswith("(forced)"), forced
    assert forced["metrics"]["embeddings_cached"] == 2 * TARGETS  # the first adaptation computed them
    wait_for_version(admin, forced["version"], timeout=30)


def test_bad_input_gets_a_4xx_that_says_what_to_fix_and_starts_no_job(
    server: Server, admin: httpx.Client, targets: list[tuple[str, bytes]]
) -> None:
    before = admin.get("/admin/models").json()
    few = targets[:MIN_TARGET_IMAGES - 1]
    refused(adapt(admin, few), 422, f"{MIN_TARGET_IMAGES - 1} unlabelled image", f"at least {MIN_TARGET_IMAGES}")
    refused(adapt(admin, few + few[:1]), 422, "duplicates count once")  # the same bytes twice are one image
    corrupt = [*targets[:MIN_TARGET_IMAGES], ("broken.jpg", b"\xff\xd8\xff not really a jpeg")]
    message = refused(adapt(admin, corrupt), 422, "broken.jpg")
    assert "image" in message
    refused(adapt(admin, targets, method="mean"), 422, "method")
    refused(adapt(admin, targets, domain="a/b"), 422, "domain")
    refused(adapt(admin, targets, tolerance=2), 422, "tolerance")
    refused(adapt(admin, []), 400)
    assert httpx.post(f"{server.url}/admin/adapt", files=[("images", targets[0])]).status_code == 401
    assert admin.get("/admin/models").json() == before  # nothing registered, nothing activated


def test_without_an_active_version_adaptation_is_refused(tmp_path: Path, targets: list[tuple[str, bytes]]) -> None:
    empty = start_server(tmp_path / "home", tmp_path / "serve.log", STORAGE_ENV)
    try:
        wait_until(empty, "/livez")
        with httpx.Client(base_url=empty.url, timeout=60, headers=AUTH) as http:
            refused(adapt(http, targets), 422, "no active model version", "bootstrap")
    finally:
        empty.stop()

