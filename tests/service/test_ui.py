"""The operators' page at ``/ui`` (``service/ui.py``, ``service/static/``), real server level.

First its serving, with plain HTTP: the files, their security headers (a Content-Security-Policy
that allows no inline code and no framing), no inline script or style in the HTML, 404 for
anything else, path traversal refused, no token needed. Then the page itself in a real headless
Chromium (Debian's ``chromium`` and ``chromium-driver``; ``scripts/test`` installs them) against a
real ``bentoml serve`` on a copy of the bootstrapped state directory that keeps every prediction:
a wrong token, signing in and out, uploading real photos (file input and drop), a retrain watched
to its end, the review queue (confirm and correct), and a roll back, each checked through the API.
"""

from __future__ import annotations

import functools
import http.client
import json
import re
import shutil
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.ui import CONTENT_SECURITY_POLICY, STATIC
from tests.support.admin import AUTH, STORAGE_ENV, TOKEN, wait_for_version
from tests.support.browser import (
    WAIT_S,
    by_id,
    console,
    open_tab,
    retrain,
    sign_in,
    signed_in,
    start_browser,
    upload_files,
    visible_text,
    wait,
)
from tests.support.images import colour_photo, jpeg_files
from tests.support.polling import eventually
from tests.support.server import Server, serving

RETRAIN_WAIT_S = 240


@pytest.fixture(scope="module")
def ui_server(bootstrapped_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on its own copy of the bootstrapped home (the page retrains and rolls back), with
    the admin token, keeping every predicted image for review."""
    root = tmp_path_factory.mktemp("ui")
    home = root / "home"
    shutil.copytree(bootstrapped_home, home)
    with serving(home, root / "serve.log", {**STORAGE_ENV, "TRANSFER_SERVE_KEEP_PREDICTIONS": "1"}) as server:
        yield server


@pytest.fixture
def admin(ui_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ui_server.url, timeout=60, headers=AUTH) as client:
        yield client


# -- serving the files -----------------------------------------------------------------------------

def test_the_page_and_its_files_are_served_without_a_token(ui_server: Server) -> None:
    with httpx.Client(base_url=ui_server.url, timeout=30) as client:
        slashless = client.get("/ui", follow_redirects=True)  # BentoML's router adds the slash
        assert slashless.status_code == 200 and slashless.url.path == "/ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.text == slashless.text == (STATIC / "index.html").read_text()
        assert client.get("/ui/index.html").text == page.text
        for name, media_type in (("app.js", "text/javascript"), ("app.css", "text/css"),
                                 ("favicon.svg", "image/svg+xml")):
            response = client.get(f"/ui/{name}")
            assert response.status_code == 200, (name, response.text)
            assert response.headers["content-type"].startswith(media_type)
            assert response.content == (STATIC / name).read_bytes()


@pytest.mark.parametrize("path", ["/ui/", "/ui/app.js", "/ui/app.css", "/ui/missing.js"])
def test_every_answer_carries_the_security_headers(ui_server: Server, path: str) -> None:
    response = httpx.get(ui_server.url + path, timeout=30)
    assert response.headers["content-security-policy"] == (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'") == CONTENT_SECURITY_POLICY
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-cache"


class _Markup(HTMLParser):
    """Every start tag of a document, with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_the_page_has_no_inline_script_or_style() -> None:
    """What the policy would block anyway, so that nothing on the page depends on it."""
    markup = _Markup()
    markup.feed((STATIC / "index.html").read_text())
    scripts = [attrs for tag, attrs in markup.tags if tag == "script"]
    assert scripts and all(attrs.get("src") for attrs in scripts), scripts
    assert not [tag for tag, _ in markup.tags if tag == "style"]
    for tag, attrs in markup.tags:
        assert not [name for name in attrs if name.startswith("on")], (tag, attrs)
        assert "style" not in attrs, (tag, attrs)
        assert not str(attrs.get("href", "")).startswith("javascript:"), (tag, attrs)
    # the script puts text in the page through DOM APIs only
    source = (STATIC / "app.js").read_text()
    for sink in (".innerHTML", ".outerHTML", ".insertAdjacentHTML", "document.write", "eval(", "new Function("):
        assert sink not in source, sink


def raw_get(server: Server, path: str) -> tuple[int, bytes]:
    """GET ``path`` exactly as written (httpx would resolve the dot segments first)."""
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize("path", [
    "/ui/nothing-here.js",
    "/ui/static/app.js",
    "/ui/../service/ui.py",
    "/ui/..%2fui.py",
    "/ui/%2e%2e/%2e%2e/pyproject.toml",
    "/ui/..%2f..%2fpyproject.toml",
    "/ui/.%2fapp.js",
    "/ui//etc/passwd",
    "/ui/%2fetc%2fpasswd",
    "/ui/app.js%00.html",
])
def test_anything_but_the_pages_files_is_not_found(ui_server: Server, path: str) -> None:
    status, body = raw_get(ui_server, path)
    assert status == 404, (path, status, body[:200])
    assert b"import" not in body and b"root:" not in body and b"[project]" not in body
    assert "error" in json.loads(body)


def test_only_get_and_head_are_answered(ui_server: Server) -> None:
    assert httpx.head(ui_server.url + "/ui/app.js", timeout=30).status_code == 200
    refused = httpx.delete(ui_server.url + "/ui/app.js", timeout=30)
    assert refused.status_code == 405 and "error" in refused.json()


# -- the page in a real browser ---------------------------------------------------------------------

@pytest.fixture
def browser() -> Iterator[Any]:
    driver = start_browser()
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(driver: Any, allowed: tuple[str, ...] = ()) -> list[str]:
    """The console's warnings and errors (a refused CSP, a script error), less the expected ones."""
    return [m for m in console(driver) if not any(a in m for a in allowed)]


def label_counts_shown(driver: Any) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "#label-counts tbody tr")
    return {row.get_attribute("data-label"): int(row.find_elements(By.TAG_NAME, "td")[1].text) for row in rows}


def test_a_wrong_token_is_refused_visibly_and_the_right_one_signs_in_and_out(ui_server: Server, browser) -> None:
    sign_in(browser, ui_server.url, "not-the-admin-token-000000")
    message = wait(browser, lambda d: visible_text(d, "sign-in-error"), what="the sign-in error")
    assert "wrong admin token" in message
    assert not by_id(browser, "app").is_displayed()
    assert browser.execute_script("return sessionStorage.length") == 0

    signed_in(browser, ui_server.url, TOKEN)
    assert wait(browser, lambda d: visible_text(d, "active-version"), what="the active version") == "active model: v1"
    assert browser.execute_script("return sessionStorage.getItem('transfer-serve.admin-token')") == TOKEN
    assert browser.execute_script("return localStorage.length") == 0 and not browser.get_cookies()
    assert TOKEN not in browser.current_url

    browser.refresh()  # the tab keeps the token for its lifetime
    wait(browser, lambda d: by_id(d, "app").is_displayed(), what="the page after a reload")
    by_id(browser, "sign-out").click()
    wait(browser, lambda d: by_id(d, "sign-in").is_displayed(), what="the sign-in form after signing out")
    assert browser.execute_script("return sessionStorage.getItem('transfer-serve.admin-token')") is None
    assert browser.execute_script("return document.querySelectorAll('#versions .version, #review-grid li').length") == 0
    assert not console_errors(browser, allowed=("403",))


def test_an_operator_uploads_retrains_reviews_and_rolls_back(
    ui_server: Server, admin: httpx.Client, browser, hymenoptera: Path
) -> None:
    from selenium.webdriver.common.by import By

    ants, bees = jpeg_files(hymenoptera, "ants"), jpeg_files(hymenoptera, "bees")
    signed_in(browser, ui_server.url, TOKEN)

    # upload: one class through the file input (the keyboard's way), the other dropped
    open_tab(browser, "upload")
    upload_files(browser, "ants", ants[:20])
    upload_files(browser, "bees", bees[:20], drop=True)
    assert not browser.find_elements(By.ID, "test-drop-carrier")
    wait(browser, lambda d: label_counts_shown(d) == {"ants": 20, "bees": 20}, what="the label counts")
    assert admin.get("/admin/labels").json()["counts"] == {"ants": 20, "bees": 20}
    statuses = {s.text for s in browser.find_elements(By.CSS_SELECTOR, "#upload-list .status")}
    assert statuses == {"stored"}, statuses
    names = {n.text for n in browser.find_elements(By.CSS_SELECTOR, "#upload-list .name")}
    assert names == {p.name for p in ants[:20] + bees[:20]}

    # an upload without a label is refused before it is sent
    by_id(browser, "upload-label").clear()
    by_id(browser, "upload-files").send_keys(str(ants[20]))
    assert "label" in wait(browser, lambda d: visible_text(d, "notice"), what="the missing-label notice")

    # retrain: the job's progress is shown until it ends, and the new version goes live
    open_tab(browser, "train")
    wait(browser, lambda d: "40 labelled images" in by_id(d, "train-summary").text, what="the labelled images")
    state = retrain(browser, timeout=RETRAIN_WAIT_S)
    assert state == "succeeded", by_id(browser, "job-result").text
    assert re.fullmatch(r"[0-9a-f]{32}", by_id(browser, "job-id").text)
    assert float(by_id(browser, "job-progress").get_attribute("value")) == 1.0
    assert by_id(browser, "job-result").text == "v2 is trained and active."
    assert "held-out images" in by_id(browser, "job-metrics").text
    wait(browser, lambda d: by_id(d, "active-version").text == "active model: v2", what="v2 in the header")
    assert admin.get("/admin/models").json()["active"] == "v2"
    assert not by_id(browser, "retrain").get_attribute("disabled")

    # versions: v2's metrics (its confusion matrix on the held-out images) beside v1
    open_tab(browser, "versions")
    v2 = wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, ".version[data-version=v2]"), what="v2's card")
    assert v2.find_element(By.CLASS_NAME, "badge").text == "active"
    assert "held-out images" in v2.text
    candidate = admin.get("/admin/models").json()["versions"][1]["metrics"]["candidate"]
    table = v2.find_element(By.CSS_SELECTOR, "table.confusion")
    cells = [int(td.text) for td in table.find_elements(By.CSS_SELECTOR, "tbody td")]
    assert sum(cells) == candidate["held_out"] > 0 and len(cells) == 4  # ants and bees
    assert sum(int(td.text) for td in table.find_elements(By.CSS_SELECTOR, "td.diagonal")) == round(
        candidate["accuracy"] * candidate["held_out"])

    review_through_the_page(browser, admin, ants[60:63] + bees[60:63])

    # roll back to v1 from the page
    open_tab(browser, "versions")
    wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, "button[data-version=v1]"), what="v1's button").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".version[data-version=v1] .badge"),
         what="v1 shown as active")
    assert admin.get("/admin/models").json()["active"] == "v1"
    assert by_id(browser, "active-version").text == "active model: v1"
    assert "v1 is now active" in by_id(browser, "notice").text

    # the token never left the tab's storage and the Authorization header
    urls = browser.execute_script("return [location.href, ...performance.getEntries().map(e => e.name)]")
    assert urls and not [u for u in urls if TOKEN in u], urls
    assert browser.execute_script("return localStorage.length") == 0 and not browser.get_cookies()
    assert not console_errors(browser), console(browser)


def review_through_the_page(browser: Any, admin: httpx.Client, photos: list[Path]) -> None:
    """Kept predictions of photos the model has not seen: one confirmed with Enter, one corrected
    by typing the other label, one labelled with the key 2, one discarded with Delete; each leaves
    the grid, and the three labelled ones are in the label store."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    wait_for_version(admin, "v2", timeout=30)  # every worker answers with v2 (its labels: ants, bees)
    predicted = admin.post("/predict", files=[("images", (p.name, p.read_bytes())) for p in photos])
    assert predicted.status_code == 200, predicted.text
    kept = {item["prediction_id"]: item for item in predicted.json() if item.get("prediction_id")}
    assert len(kept) == len(photos), predicted.json()
    before = admin.get("/admin/labels").json()["counts"]

    def listed() -> set[str]:
        return {item["prediction_id"] for item in admin.get("/admin/review", params={"limit": 100}).json()["items"]}

    eventually(lambda: set(kept) <= listed(), timeout=WAIT_S, message="the kept predictions not in the review queue")
    open_tab(browser, "review")  # loads the grid

    def card(prediction_id: str) -> Any:
        return browser.find_element(By.CSS_SELECTOR, f".card[data-prediction-id='{prediction_id}']")


    first, second, third, fourth = list(kept)[:4]

    def gone(prediction_id: str) -> Callable[[Any], bool]:
        return lambda d: not d.find_elements(By.CSS_SELECTOR, f".card[data-prediction-id='{prediction_id}']")

    def image_shown(prediction_id: str) -> str | bool:  # fetched with the token, shown as a blob: URL
        image = card(prediction_id).find_element(By.TAG_NAME, "img")
        src = str(image.get_attribute("src"))
        loaded = browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)
        return src.startswith("blob:") and loaded and src

    blobs: dict[str, str] = {}
    for prediction_id in kept:
        blobs[prediction_id] = wait(browser, functools.partial(lambda p, _: image_shown(p), prediction_id),
                                    what="a kept image shown")
    assert card(first).find_element(By.CLASS_NAME, "label").text == kept[first]["label"]
    assert card(first).find_element(By.CLASS_NAME, "score").text.endswith("%")

    # confirm: focus the card, Enter
    confirmed = kept[first]["label"]
    card(first).send_keys(Keys.ENTER)
    wait(browser, gone(first), what="the confirmed card gone")
    assert f"Confirmed '{confirmed}'" in by_id(browser, "notice").text

    # correct: type the other label
    corrected = "bees" if kept[second]["label"] == "ants" else "ants"
    card(second).find_element(By.CLASS_NAME, "other-label").send_keys(corrected, Keys.ENTER)
    wait(browser, gone(second), what="the corrected card gone")
    assert f"Corrected to '{corrected}'" in by_id(browser, "notice").text

    # correct with a key: 2 is the second of its top labels
    second_choice = kept[third]["top_k"][1]["label"]
    card(third).send_keys("2")
    wait(browser, gone(third), what="the card labelled with a key gone")

    # discard: Delete
    card(fourth).send_keys(Keys.DELETE)
    wait(browser, gone(fourth), what="the discarded card gone")
    assert admin.get(f"/admin/predictions/{fourth}/image").status_code == 404

    after = admin.get("/admin/labels").json()["counts"]
    expected = dict(before)
    for label in (confirmed, corrected, second_choice):
        expected[label] = expected.get(label, 0) + 1
    assert after == expected, (before, after)
    assert not {first, second, third, fourth} & listed()
    assert set(kept) - {first, second, third, fourth} <= listed()
    # the reviewed cards' blob: URLs were revoked with them; the others' still load (as images:
    # the policy's connect-src does not let fetch() read blob: URLs)
    loads = ("return await Promise.all(arguments[0].map(u => new Promise(done => {"
             "const i = new Image(); i.onload = () => done(true); i.onerror = () => done(false); i.src = u; })))")
    reviewed = [blobs[p] for p in (first, second, third, fourth)]
    assert browser.execute_script(loads, reviewed) == [False] * 4
    rest = [blobs[p] for p in kept if p not in (first, second, third, fourth)]
    assert browser.execute_script(loads, rest) == [True] * len(rest)


def test_a_hostile_file_name_is_shown_as_text_not_markup(ui_server: Server, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    hostile = tmp_path / '<img src=x onerror="document.title=\'pwned\'">.jpg'
    hostile.write_bytes(colour_photo((180, 40, 200), seed=4242))  # bytes no other test uploads
    signed_in(browser, ui_server.url, TOKEN)
    open_tab(browser, "upload")
    upload_files(browser, "ants", [hostile])
    names = [n.text for n in browser.find_elements(By.CSS_SELECTOR, "#upload-list .name")]
    assert hostile.name in names, names
    assert not browser.find_elements(By.CSS_SELECTOR, "#upload-list img")
    assert browser.title != "pwned"
