"""``service/admin.py`` (the admin API), real server level: each route end to end against real
``bentoml serve`` processes with the bootstrapped model and the admin token.

- on a server with 2 HTTP and 2 inference workers: access, bad input, hostile labels and file
  names (never used as a path), then, in order, the retrain loop: labels, retrain jobs, the
  promotion gate, hot swap under a stream of predictions, rollback, a job cut short by a restart;
- on the storage server (``conftest.py``): 100 concurrent uploads, many of them the same bytes
  with the same or another label, each distinct image stored exactly once with a consistent label
  history; an image whose shard directory is a file: a 507, all or nothing;
- on a full, then read-only, volume (tmpfs; needs ``mount``, skipped without it; slow): admin
  writes answer 507 with what failed and what to do, nothing is half-written, a retrain job ends
  ``failed`` with the reason, /predict keeps answering, and once fixed everything works again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import shutil
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.admin import (
    AUTH,
    STORAGE_ENV,
    TOKEN,
    assert_507,
    assert_nothing_registered,
    assert_store_consistent,
    failed_retrain,
    predicts,
    server_home,
    sha,
    upload,
    upload_blobs,
    wait_for_version,
)
from tests.support.hostile import HOSTILE_NAMES, PHOTO, PHOTO_JPEG, assert_client_error, post_raw, written_anywhere
from tests.support.images import encode, jpeg_files, noise_png, small_photos
from tests.support.load import Answer, Load
from tests.support.paths import CHELSEA
from tests.support.polling import eventually
from tests.support.server import Server, serving, start_server, wait_for_job, wait_until
from tests.support.volumes import fill, remount_read_only, run_mount, tmpfs

WORKERS = {"TRANSFER_SERVE_WORKERS": "2", "TRANSFER_SERVE_INFERENCE_WORKERS": "2",
           "TRANSFER_SERVE_INTRA_OP_THREADS": "1", "TRANSFER_SERVE_ADMIN_TOKEN": TOKEN}


@pytest.fixture(scope="module")
def admin_server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("admin")
    home = root / "home"
    shutil.copytree(bootstrapped_home, home)
    with serving(home, root / "serve.log", WORKERS) as server:
        yield server


@pytest.fixture
def admin(admin_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=admin_server.url, timeout=60, headers=AUTH) as http:
        yield http


# -- access ---------------------------------------------------------------------------------------

ROUTES = [("GET", "/admin/labels"), ("POST", "/admin/labels"), ("DELETE", "/admin/labels/" + "0" * 64),
          ("POST", "/admin/retrain"), ("GET", "/admin/jobs/x"), ("GET", "/admin/models"),
          ("POST", "/admin/models/v1/activate"), ("GET", "/admin/review"), ("POST", "/admin/feedback"),
          ("DELETE", "/admin/predictions/" + "0" * 32), ("GET", "/admin/predictions/" + "0" * 32 + "/image")]


@pytest.mark.slow
@pytest.mark.parametrize("method,path", ROUTES)
def test_every_admin_route_needs_the_token(admin_server: Server, method: str, path: str) -> None:
    missing = httpx.request(method, admin_server.url + path)
    assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"] == "Bearer"
    wrong = httpx.request(method, admin_server.url + path, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403 and TOKEN not in wrong.text
    basic = httpx.request(method, admin_server.url + path, headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-the-token"}], ids=["missing", "wrong"])
def test_an_upload_without_the_token_is_refused_before_its_body_is_read(admin_server: Server, headers: dict) -> None:
    sent = 0

    def body() -> Iterator[bytes]:  # 256 MiB, under the body limit: only the token check stops it
        nonlocal sent
        chunk = bytes(1 << 20)
        while sent < 256 << 20:
            sent += len(chunk)
            yield chunk

    response = httpx.post(admin_server.url + "/admin/labels", content=body(), timeout=60,
                          headers={**headers, "content-type": "multipart/form-data; boundary=x"})
    assert response.status_code in (401, 403) and "token" in response.json()["error"]
    assert response.headers["connection"] == "close"
    assert sent < 64 << 20, f"the server let an unauthenticated client send {sent >> 20} MiB"


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("label", ["", "a/b", "..", "x" * 65, "caf\u00e9", "\u0430nts", "nul\x00byte", " lead"])
def test_bad_labels_are_422(admin: httpx.Client, hymenoptera: Path, label: str) -> None:
    response = upload(admin, label, jpeg_files(hymenoptera, "ants")[:1])
    assert response.status_code == 422, response.text
    assert "label" in response.json()["error"]


@pytest.mark.slow
def test_bad_uploads(admin: httpx.Client) -> None:
    no_label = admin.post("/admin/labels", files=[("images", ("a.jpg", CHELSEA))])
    assert no_label.status_code == 422 and "label" in no_label.json()["error"]
    junk = admin.post("/admin/labels", data={"label": "cats"},
                      files=[("images", ("ok.jpg", CHELSEA)), ("images", ("notes.txt", b"not an image"))])
    assert junk.status_code == 422 and junk.json()["image"] == 1 and junk.json()["filename"] == "notes.txt"
    empty = admin.post("/admin/labels", data={"label": "cats"}, files=[("images", ("e.jpg", b""))])
    assert empty.status_code == 400
    assert admin.get("/admin/labels").json()["total"] == 0  # nothing stored from a refused request
    malformed = admin.post("/admin/retrain", content=b"{nope", headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    unknown = admin.post("/admin/retrain", json={"bogus": 1})
    assert unknown.status_code == 422
    assert admin.post("/admin/retrain", json={"tolerance": 5}).status_code == 422


@pytest.mark.slow
def test_not_found(admin: httpx.Client) -> None:
    assert admin.get("/admin/jobs/does-not-exist").status_code == 404
    assert admin.post("/admin/models/v99/activate").status_code == 404
    assert admin.post("/admin/models/..%2Fetc/activate").status_code == 404
    assert admin.delete("/admin/labels/" + "a" * 64).status_code == 404
    assert admin.delete("/admin/labels/..%2F..%2Fetc%2Fpasswd").status_code == 404



@pytest.mark.slow
def test_starlette_refusals_are_json(admin: httpx.Client) -> None:
    # Starlette answered these in plain text (found by tests/service/test_openapi.py)
    too_many = admin.post("/admin/labels", data={"label": "cats"},
                          files=[("images", (f"{i}.jpg", b"x")) for i in range(100)])
    assert too_many.status_code == 413 and "100 images" in too_many.json()["error"]  # was a text/plain 400
    unknown = admin.get("/admin/no-such-route")
    assert unknown.status_code == 404 and "/admin/no-such-route" in unknown.json()["error"]
    wrong_method = admin.put("/admin/labels")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET, POST"
    assert wrong_method.json() == {"error": "PUT is not allowed on /admin/labels; it takes GET, POST"}

# -- hostile input: labels and file names never pick a path ----------------------------------------
#
# On the same server as the tests around them, before the retrain loop: each leaves the store as
# it was.


def files_under(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


DATABASE_FILES = {"transfer-serve.db", "transfer-serve.db-wal", "transfer-serve.db-shm"}


@pytest.mark.parametrize("label", [
    "a\\b", "ants/../bees", "/etc", "../../labels", "a\u2215b", "a\uff0fb", "\u202eants", "ants\u200b",
    "bees\u00a0", "\uff41nts", "ants\t", "ants\n", ".",
])
def test_hostile_labels_are_422_and_store_nothing(admin: httpx.Client, admin_server: Server, label: str) -> None:
    home = server_home(admin_server)
    before = files_under(home)
    counts = admin.get("/admin/labels").json()["counts"]
    response = admin.post("/admin/labels", data={"label": label}, files=[("images", ("a.jpg", PHOTO_JPEG))])
    assert_client_error(response, 422, "label")
    assert {p for p in files_under(home) ^ before if p.name not in DATABASE_FILES} == set()
    assert admin.get("/admin/labels").json()["counts"] == counts


def test_a_label_sent_as_a_file_is_400(admin: httpx.Client) -> None:
    response = admin.post("/admin/labels", files=[("label", ("ants", b"ants")), ("images", ("a.jpg", PHOTO_JPEG))])
    assert_client_error(response, 400, "'label' does not take files")


def test_uploaded_files_are_stored_by_content_whatever_their_names(admin: httpx.Client, admin_server: Server) -> None:
    home = server_home(admin_server)
    tag = f"hostile-{uuid.uuid4().hex[:12]}"
    names = [template.format(tag=tag) for template in HOSTILE_NAMES if "{tag}" in template]
    photos = [encode(PHOTO.rotate(i * 7), "JPEG", quality=85) for i in range(len(names))]  # distinct bytes
    before = files_under(home)
    response = post_raw(admin, "/admin/labels", list(zip(names, photos, strict=True)), label="hostile names")
    assert response.status_code == 200, response.text
    stored = response.json()["stored"]
    expected_ids = [hashlib.sha256(data).hexdigest() for data in photos]
    assert [entry["image_id"] for entry in stored] == expected_ids
    for entry in stored:
        assert "/" not in entry["filename"] and "\n" not in entry["filename"]
    new_files = {p for p in files_under(home) - before if p.name not in DATABASE_FILES}
    assert new_files == {Path("labels/images") / i[:2] / i for i in expected_ids}
    for image_id, data in zip(expected_ids, photos, strict=True):
        assert (home / "labels/images" / image_id[:2] / image_id).read_bytes() == data
    assert written_anywhere(tag, home.parent) == []
    for image_id in expected_ids:  # leave the store as it was for the other tests on this server
        assert admin.delete(f"/admin/labels/{image_id}").status_code == 200


@pytest.mark.parametrize("name", ["z" * 300 + ".jpg", "a\x00b.jpg"], ids=["long", "nul"])
def test_unusable_file_names_on_the_admin_api_are_400(admin: httpx.Client, admin_server: Server, name: str) -> None:
    home = server_home(admin_server)
    before = files_under(home)
    response = post_raw(admin, "/admin/labels", [(name, PHOTO_JPEG)], label="cats")
    assert_client_error(response, 400, "image 0", "file name")
    assert {p for p in files_under(home) ^ before if p.name not in DATABASE_FILES} == set()


# -- the retrain loop (tests below run in order on the same server) ------------------------------

@pytest.mark.slow
def test_retrain_needs_enough_data(admin: httpx.Client, hymenoptera: Path) -> None:
    empty = admin.post("/admin/retrain")
    assert empty.status_code == 422 and "no labelled images" in empty.json()["error"]
    assert upload(admin, "ants", jpeg_files(hymenoptera, "ants")[:6]).status_code == 200
    one_class = admin.post("/admin/retrain")
    assert one_class.status_code == 422 and "one class" in one_class.json()["error"]
    assert upload(admin, "bees", jpeg_files(hymenoptera, "bees")[:1]).status_code == 200
    too_few = admin.post("/admin/retrain")
    assert too_few.status_code == 422 and "at least 2" in too_few.json()["error"]


@pytest.mark.slow
def test_upload_dedupes_and_moves(admin: httpx.Client, hymenoptera: Path) -> None:
    photo = jpeg_files(hymenoptera, "bees")[0]
    again = upload(admin, "bees", [photo]).json()["stored"][0]
    assert again["status"] == "unchanged"
    moved = upload(admin, "ants", [photo]).json()["stored"][0]
    assert moved["status"] == "moved" and moved["previous_label"] == "bees"
    assert admin.delete(f"/admin/labels/{moved['image_id']}").status_code == 200
    assert admin.delete(f"/admin/labels/{moved['image_id']}").status_code == 404


def per_image(answers: list[Answer]) -> list[tuple[int | None, str, str]]:
    """(status, model version, label) for each image of each streamed request; a request that
    failed counts as two images of version "?" whose label is what came back."""
    seen: list[tuple[int | None, str, str]] = []
    for answer in list(answers):
        body = json.loads(answer.body) if answer.status == 200 else [{"model_version": "?", "label": answer.body}] * 2
        seen.extend((answer.status, b["model_version"], b["label"]) for b in body)
    return seen


@pytest.mark.slow
def test_retrain_promotes_and_every_worker_swaps_without_errors(
    admin: httpx.Client, admin_server: Server, hymenoptera: Path
) -> None:
    assert upload(admin, "ants", jpeg_files(hymenoptera, "ants")[6:24]).status_code == 200
    assert upload(admin, "bees", jpeg_files(hymenoptera, "bees")[:24]).status_code == 200
    labels = admin.get("/admin/labels").json()
    assert labels["counts"] == {"ants": 24, "bees": 24} and labels["not_in_active_model"] == 48

    # a steady stream of two-image predictions across the swap
    with Load(admin_server.url, [CHELSEA], clients=3, images_per_request=2) as stream:
        started = admin.post("/admin/retrain")
        assert started.status_code == 202, started.text
        job = started.json()
        assert job["state"] in ("queued", "running")
        conflict = admin.post("/admin/retrain")
        assert conflict.status_code == 409 and conflict.json()["job"]["id"] == job["id"]
        done = wait_for_job(admin, job["id"])
        assert done["state"] == "succeeded", done
        assert done["version"] == "v2" and done["progress"] == 1.0
        assert done["metrics"]["candidate"]["accuracy"] >= done["metrics"]["active"]["accuracy"]
        assert done["metrics"]["candidate"]["held_out"] > 0
        # a CPU host serving the default variant (auto): v2 got an INT8 graph calibrated on its own
        # images, kept only if it passed the INT8 gate on the held-out ones
        int8 = done["metrics"]["int8"]
        assert int8["from"] is None and 0 < int8["calibration_images"] <= 48
        assert int8["check_images"] == done["metrics"]["candidate"]["held_out"]
        assert int8["added"] == (int8["accuracy_loss"] <= 0.005)
        assert done["metrics"]["variants"] == (["fp32", "int8"] if int8["added"] else ["fp32"])
        assert wait_for_version(admin, "v2") <= 5.0
        # the streams run on until one of their own requests has been answered after the swap:
        # on a loaded machine those in flight when it happened can take longer than the check
        eventually(lambda: any(v == "v2" for _, v, _ in per_image(stream.answers)), timeout=30, interval=0.05,
                   message="no streamed prediction from v2")
    seen = per_image(stream.answers)
    errors = [s for s in seen if s[0] != 200]
    assert errors == [], errors[:3]
    versions = {v for _, v, _ in seen}
    assert versions <= {"v1", "v2"} and "v2" in versions
    # no mixing: each label belongs to the version that answered
    assert all(label in ("ants", "bees") for _, v, label in seen if v == "v2")
    assert all(label not in ("ants", "bees") for _, v, label in seen if v == "v1")
    assert admin.get("/admin/labels").json()["not_in_active_model"] == 0


@pytest.mark.slow
def test_models_listing_and_rollback(admin: httpx.Client) -> None:
    listing = admin.get("/admin/models").json()
    assert listing["active"] == "v2"
    by_version = {v["version"]: v for v in listing["versions"]}
    assert by_version["v2"]["parent"] == "v1" and by_version["v2"]["labels"] == ["ants", "bees"]
    assert by_version["v2"]["active"] and not by_version["v1"]["active"]
    assert by_version["v1"]["variants"] == ["fp32"] and by_version["v1"]["serves"] == "fp32"
    assert {v["exporter"] for v in listing["versions"]} == {"dynamo"}  # bootstrap's graph, and v2's head in it
    v2_int8 = "int8" in by_version["v2"]["variants"]
    assert by_version["v2"]["serves"] == ("int8" if v2_int8 else "fp32")  # auto, on a CPU host
    assert {replica["variant"] for replica in listing["replicas"]} == {by_version["v2"]["serves"]}
    assert admin.post("/admin/models/v1/activate").json() == {"active": "v1"}
    wait_for_version(admin, "v1")
    assert admin.post("/admin/models/v2/activate").status_code == 200
    wait_for_version(admin, "v2")


@pytest.mark.slow
def test_second_retrain_uses_the_cache_and_keeps_old_classes(admin: httpx.Client, hymenoptera: Path) -> None:
    assert upload(admin, "bees", jpeg_files(hymenoptera, "bees")[24:28]).status_code == 200
    job = wait_for_job(admin, admin.post("/admin/retrain").json()["id"])
    assert job["state"] in ("succeeded", "rejected"), job
    assert job["metrics"]["embeddings_cached"] >= 47 and job["metrics"]["embeddings_computed"] == 4
    assert job["metrics"]["labels"] == ["ants", "bees"]


@pytest.mark.slow
def test_a_job_cut_short_by_a_restart_is_failed_and_the_next_one_succeeds(
    bootstrapped_home: Path, tmp_path: Path, hymenoptera: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(bootstrapped_home, home)
    env = {"TRANSFER_SERVE_ADMIN_TOKEN": TOKEN}
    server = start_server(home, tmp_path / "first.log", env)
    try:
        wait_until(server)
        with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
            upload(http, "ants", jpeg_files(hymenoptera, "ants")[:30])
            upload(http, "bees", jpeg_files(hymenoptera, "bees")[:30])
            job = http.post("/admin/retrain").json()
    finally:
        server.stop()  # stops the whole process group: the job process with it
    server = start_server(home, tmp_path / "second.log", env)
    try:
        wait_until(server)
        with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
            cut = http.get(f"/admin/jobs/{job['id']}").json()
            assert cut["state"] == "failed" and "stopped" in cut["error"], cut
            assert http.get("/admin/models").json()["active"] == "v1"  # nothing half-done went live
            assert http.get("/admin/labels").json()["total"] == 60  # labels survived the restart
            retry = wait_for_job(http, http.post("/admin/retrain").json()["id"])
            assert retry["state"] == "succeeded" and retry["version"] == "v2"
        assert TOKEN not in server.log()
    finally:
        server.stop()


# -- the operator's loop: kept predictions, the review queue, feedback --------------------------------

KEEPING = {**STORAGE_ENV, "TRANSFER_SERVE_KEEP_PREDICTIONS": "1"}


@pytest.fixture(scope="module")
def keeping(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server that keeps every predicted image (2 HTTP workers, so offers come from two keepers)."""
    root = tmp_path_factory.mktemp("keeping")
    shutil.copytree(bootstrapped_home, root / "home")
    with serving(root / "home", root / "serve.log", KEEPING) as server, \
            httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
        yield http


def kept_ids(http: httpx.Client, blobs: list[bytes]) -> list[str]:
    """``POST /predict`` of ``blobs``; the prediction ids, once every one is in the review queue."""
    response = http.post("/predict", files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(blobs)])
    assert response.status_code == 200, response.text
    ids = [result["prediction_id"] for result in response.json()]
    def all_kept() -> bool:
        return all(http.get(f"/admin/predictions/{p}/image").status_code == 200 for p in ids)
    eventually(all_kept, timeout=20)
    return ids


def queue(http: httpx.Client, **params: str | int) -> list[dict]:
    response = http.get("/admin/review", params=params)
    assert response.status_code == 200, response.text
    return response.json()["items"]


def test_kept_predictions_carry_an_unguessable_id_and_their_image_comes_back(
        keeping: httpx.Client, admin: httpx.Client, hymenoptera: Path) -> None:
    photos = small_photos(hymenoptera, "ants", 40, 3)
    ids = kept_ids(keeping, photos)
    assert len(set(ids)) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    image = keeping.get(f"/admin/predictions/{ids[1]}/image")
    assert image.content == photos[1] and image.headers["content-type"] == "image/jpeg"
    assert image.headers["cache-control"] == "no-store" and image.headers["x-content-type-options"] == "nosniff"
    # not kept: a server without TRANSFER_SERVE_KEEP_PREDICTIONS gives no id
    plain = admin.post("/predict", files=[("images", ("a.jpg", photos[0]))])
    assert plain.status_code == 200 and "prediction_id" not in plain.json()[0]


def test_the_review_queue_is_least_certain_first_one_item_per_image(keeping: httpx.Client, hymenoptera: Path) -> None:
    photos = small_photos(hymenoptera, "bees", 40, 6)
    ids = kept_ids(keeping, photos)
    (again,) = kept_ids(keeping, [photos[0]])  # the same bytes again, later: one item
    items = queue(keeping, limit=100)
    listed = [item["prediction_id"] for item in items]
    assert again in listed and ids[0] not in listed  # the newest prediction of those bytes stands for them
    assert len({item["image_id"] for item in items}) == len(items)
    margins = [item["margin"] for item in items]
    assert margins == sorted(margins)
    entropies = [item["entropy"] for item in queue(keeping, limit=100, order="entropy")]
    assert entropies == sorted(entropies, reverse=True)
    first = items[0]
    assert first["top_k"][0]["label"] == first["label"] and first["model_version"] == "v1"
    assert first["margin"] == pytest.approx(first["top_k"][0]["score"] - first["top_k"][1]["score"], abs=1e-5)
    assert len(queue(keeping, limit=2)) == 2
    assert keeping.get("/admin/review").json()["kept"] >= 7


def test_feedback_labels_a_kept_image_as_an_upload_would(keeping: httpx.Client, hymenoptera: Path) -> None:
    photo = small_photos(hymenoptera, "ants", 50, 1)[0]
    (prediction_id,) = kept_ids(keeping, [photo])
    answer = keeping.post("/admin/feedback", json={"prediction_id": prediction_id, "label": "ant"})
    assert answer.status_code == 200, answer.text
    stored = answer.json()["stored"][0]
    assert stored["status"] == "stored" and stored["image_id"] == sha(photo) and answer.json()["counts"]["ant"] >= 1
    assert prediction_id not in [item["prediction_id"] for item in queue(keeping, limit=100)]  # labelled now
    again = keeping.post("/admin/feedback", json={"prediction_id": prediction_id, "label": "ant"}).json()
    assert again["stored"][0]["status"] == "unchanged"
    moved = keeping.post("/admin/feedback", json={"prediction_id": prediction_id, "label": "bee"}).json()
    assert moved["stored"][0]["status"] == "moved" and moved["stored"][0]["previous_label"] == "ant"
    assert keeping.get("/admin/labels").json()["counts"].get("bee", 0) >= 1


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"prediction_id": "0" * 32, "label": "ant"}, 404, "no kept prediction"),
    ({"prediction_id": "../../etc/passwd", "label": "ant"}, 404, "no kept prediction"),
    ({"prediction_id": "KEPT", "label": "a/b"}, 422, "label 'a/b' may only contain"),
    ({"prediction_id": "KEPT", "label": ""}, 422, "the label is empty"),
    ({"prediction_id": "KEPT"}, 422, "label: Field required"),
    ({"label": "ant"}, 422, "prediction_id: Field required"),
    ({"prediction_id": "KEPT", "label": "ant", "domain": "x/y"}, 422, "domain:"),
])
def test_bad_feedback_is_refused_and_stores_nothing(keeping: httpx.Client, hymenoptera: Path, body: dict,
                                                    status: int, words: str) -> None:
    (prediction_id,) = kept_ids(keeping, small_photos(hymenoptera, "ants", 60, 1))
    before = keeping.get("/admin/labels").json()["counts"]
    sent = {key: prediction_id if value == "KEPT" else value for key, value in body.items()}
    answer = keeping.post("/admin/feedback", json=sent)
    assert answer.status_code == status and words in answer.json()["error"], answer.text
    assert keeping.get("/admin/labels").json()["counts"] == before


def test_malformed_feedback_json_is_400_as_on_every_json_route(keeping: httpx.Client) -> None:
    answer = keeping.post("/admin/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "malformed JSON body" in answer.json()["error"], answer.text


def test_deleting_a_kept_prediction_keeps_an_image_another_one_uses(keeping: httpx.Client, hymenoptera: Path) -> None:
    photo = small_photos(hymenoptera, "bees", 60, 1)[0]
    first, second = kept_ids(keeping, [photo, photo])
    deleted = keeping.delete(f"/admin/predictions/{first}")
    assert deleted.status_code == 200 and deleted.json() == {"deleted": first}
    assert keeping.get(f"/admin/predictions/{first}/image").status_code == 404
    assert keeping.get(f"/admin/predictions/{second}/image").content == photo  # the bytes are still used
    assert keeping.delete(f"/admin/predictions/{second}").status_code == 200
    gone = keeping.delete(f"/admin/predictions/{second}")
    assert gone.status_code == 404 and "no kept prediction" in gone.json()["error"]
    assert keeping.get(f"/admin/predictions/{'z' * 32}/image").status_code == 404


@pytest.mark.parametrize(("params", "words"), [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "many"}, "limit"), ({"order": "newest"}, "order"),
])
def test_a_review_query_out_of_range_is_422_naming_the_parameter(keeping: httpx.Client, params: dict,
                                                                  words: str) -> None:
    answer = keeping.get("/admin/review", params=params)
    assert answer.status_code == 422 and words in answer.json()["error"], answer.text


def test_confidence_and_keeping_metrics(keeping: httpx.Client, hymenoptera: Path) -> None:
    kept_ids(keeping, small_photos(hymenoptera, "ants", 70, 2))
    text = keeping.get("/metrics").text
    assert 'transfer_serve_top1_score_bucket{le="0.5",model_version="v1"}' in text, text[:2000]
    assert 'transfer_serve_predicted_labels_total{' in text and 'model_version="v1"' in text
    kept = [line for line in text.splitlines()
            if line.startswith('transfer_serve_kept_predictions_total{outcome="kept"}')]
    assert kept and float(kept[0].split()[-1]) >= 2


# -- storage: uploads under load, a damaged state directory, a full or read-only volume -------------
#
# On the storage server (tests/service/conftest.py), or on servers of their own (slow).


def test_concurrent_uploads_store_each_distinct_image_once(storage_server: Server, storage_admin: httpx.Client,
                                                           hymenoptera: Path) -> None:
    home = server_home(storage_server)
    before = assert_store_consistent(home)
    distinct = small_photos(hymenoptera, "ants", 0, 10) + small_photos(hymenoptera, "bees", 0, 10)
    labels = ["ants", "bees", "wasps"]
    rng = random.Random(6)
    # 100 requests: 85 of one image (each image about 5 times, with a random label of three),
    # 15 of two images, among them the same bytes twice in one request
    plan: list[tuple[str, list[bytes]]] = [(rng.choice(labels), [distinct[i % 20]]) for i in range(85)]
    plan += [(rng.choice(labels), [distinct[i], distinct[(i * 7) % 20]]) for i in range(10)]
    plan += [(rng.choice(labels), [distinct[i], distinct[i]]) for i in range(5)]
    rng.shuffle(plan)

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(plan), max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=storage_server.url, headers=AUTH, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(
                http.post("/admin/labels", data={"label": label},
                          files=[("images", (f"{n}.jpg", blob)) for n, blob in enumerate(blobs)])
                for label, blobs in plan
            ))

    responses = asyncio.run(send_all())
    failed = [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
    assert not failed, f"{len(failed)} of {len(plan)} uploads failed: {failed[:5]}"

    ids = {sha(blob) for blob in distinct}
    stored: Counter[str] = Counter()
    # label flow per image: stored as L (+1 into L), moved A -> B (-1 A, +1 B); what remains is
    # the final label, so a lost or doubled update shows up as a wrong balance
    balance: dict[str, Counter[str]] = defaultdict(Counter)
    tried: dict[str, set[str]] = defaultdict(set)
    for (label, blobs), response in zip(plan, responses, strict=True):
        entries = response.json()["stored"]
        assert [e["image_id"] for e in entries] == [sha(b) for b in blobs]
        for entry in entries:
            image_id = entry["image_id"]
            tried[image_id].add(label)
            assert entry["label"] == label
            if entry["status"] == "stored":
                stored[image_id] += 1
                balance[image_id][label] += 1
            elif entry["status"] == "moved":
                assert entry["previous_label"] != label
                balance[image_id][entry["previous_label"]] -= 1
                balance[image_id][label] += 1
            else:
                assert entry["status"] == "unchanged"
    assert stored == Counter({image_id: 1 for image_id in ids}), "each distinct image is stored exactly once"

    rows = assert_store_consistent(home)
    assert set(rows) == set(before) | ids and len(rows) == len(before) + 20
    for image_id in ids:
        assert rows[image_id] in tried[image_id]
        assert +balance[image_id] == Counter({rows[image_id]: 1}), f"label history of {image_id[:12]} does not add up"
    listing = storage_admin.get("/admin/labels").json()
    assert listing["total"] == len(rows)
    assert listing["counts"] == dict(Counter(rows.values()))
    assert listing["not_in_active_model"] == len(rows)  # the bootstrap model was trained on none


def test_a_file_where_a_directory_should_be(storage_server: Server, storage_admin: httpx.Client,
                                           hymenoptera: Path) -> None:
    """The image's shard directory is a file: the upload is refused with 507, all or nothing;
    other images still store, and once the file is gone the image stores too."""
    home = server_home(storage_server)
    before = assert_store_consistent(home)
    images = home / "labels" / "images"
    candidates = small_photos(hymenoptera, "bees", 10, 30)
    fine = candidates[0]
    blocked = next(b for b in candidates[1:] if not (images / sha(b)[:2]).exists() and sha(b)[:2] != sha(fine)[:2])
    obstacle = images / sha(blocked)[:2]
    obstacle.write_bytes(b"not a directory")
    try:
        message = assert_507(upload_blobs(storage_admin, "wasps", fine, blocked),
                             "storing the labelled images failed", "a file is where a directory should be",
                             "none of the 2 image(s) of this request was stored", "To fix")
        assert TOKEN not in message
        assert assert_store_consistent(home) == before  # the first image's file was removed again
        assert predicts(storage_admin) == "v1"
        assert upload_blobs(storage_admin, "wasps", fine).json()["stored"][0]["status"] == "stored"
    finally:
        obstacle.unlink()
    assert upload_blobs(storage_admin, "wasps", blocked).json()["stored"][0]["status"] == "stored"
    assert assert_store_consistent(home) == {**before, sha(fine): "wasps", sha(blocked): "wasps"}


# -- a full, then read-only, volume (tmpfs; needs mount) --------------------------------------------

@pytest.mark.slow
def test_full_then_read_only_volume(bootstrapped_home: Path, tmp_path: Path, hymenoptera: Path) -> None:
    with tmpfs(tmp_path / "volume", "64m") as volume:
        home = volume / "home"
        shutil.copytree(bootstrapped_home, home)
        with serving(home, tmp_path / "serve.log", STORAGE_ENV) as server, \
                httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as http:
            # 20 a class: with fewer, the job fails its head check before it registers anything
            ants = small_photos(hymenoptera, "ants", 0, 20, max_bytes=150_000)
            assert upload_blobs(http, "ants", *ants).status_code == 200
            bees = small_photos(hymenoptera, "bees", 0, 20, max_bytes=150_000)
            assert upload_blobs(http, "bees", *bees).status_code == 200
            before = assert_store_consistent(home)
            # ~600 kB: more than the room left below, less than 1 MiB (not spooled)
            big = noise_png(450, 450, compress_level=0)

            # room for the job's candidate model (18.6 MB, written to a temporary directory in
            # the state directory) but not for its registered copy: the copy into the model
            # store fails half-way, and no version, complete or not, may be left
            job_filler = fill(volume, "filler-job", leave=26 << 20)
            job = failed_retrain(http)
            assert job["error"].startswith("writing the new model version failed: the state directory is "
                                           "out of space"), job["error"]
            assert "no model version was registered" in job["error"] and job["version"] is None
            assert_nothing_registered(home)
            assert [v["version"] for v in http.get("/admin/models").json()["versions"]] == ["v1"]
            assert predicts(http) == "v1"

            # nearly full: room for the database, not for this image (all or nothing: the small
            # one that fitted is removed again)
            filler = fill(volume, "filler", leave=256 << 10)
            assert_507(upload_blobs(http, "bees", CHELSEA, big), "storing the labelled images failed",
                       "out of space", "No space left on device", "none of the 2 image(s)", "free space")
            assert assert_store_consistent(home) == before
            assert predicts(http) == "v1"

            # completely full: no image file fits, and the database cannot even be opened for a
            # write (SQLite cannot allocate its shared-memory file), so a relabel that writes no
            # file fails too, and so does starting a job
            last = fill(volume, "filler-2", leave=0)
            assert_507(upload_blobs(http, "bees", CHELSEA), "out of space")
            assert_507(upload_blobs(http, "wasps", ants[0]), "storing the labelled image failed", "out of space",
                       "none of the 1 image(s)")
            assert_507(http.post("/admin/retrain"), "starting the retrain job failed", "out of space",
                       "no job was started")
            assert predicts(http) == "v1"
            for path in (job_filler, filler, last):
                path.unlink()
            assert assert_store_consistent(home) == before

            # read-only volume (as with a volume mounted ro, or an fs remounted ro on errors)
            remount_read_only(volume)
            try:
                assert_507(upload_blobs(http, "bees", CHELSEA), "read-only", "none of the 1 image(s)")
                assert_507(http.delete(f"/admin/labels/{next(iter(before))}"), "read-only")
                assert_507(http.post("/admin/retrain"), "starting the retrain job failed", "read-only",
                           "no job was started")
                assert_507(http.get("/admin/labels"), "read-only")
                assert predicts(http) == "v1"
                # a (re)start on the read-only volume serves predictions and says what is wrong
                with serving(home, tmp_path / "serve-ro.log", STORAGE_ENV) as again, \
                        httpx.Client(base_url=again.url, timeout=60, headers=AUTH) as http_again:
                    assert predicts(http_again) == "v1"
                    assert_507(http_again.get("/admin/labels"), "read-only")
                assert "could not check the job history" in (tmp_path / "serve-ro.log").read_text()
            finally:
                remounted = run_mount("-o", "remount,rw", str(volume))
                assert remounted.returncode == 0, remounted.stderr

            # fixed: everything works again
            assert upload_blobs(http, "bees", CHELSEA).json()["stored"][0]["status"] == "stored"
            assert http.get("/admin/labels").json()["total"] == len(before) + 1
            assert predicts(http) == "v1"
        assert_store_consistent(home)
