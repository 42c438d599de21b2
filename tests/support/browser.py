"""A real headless Chromium on the operators' page (``/ui``), for its tests and for
``scripts/ui-screenshots``: Debian's ``chromium`` and ``chromium-driver`` (``scripts/test``
installs them), driven through Selenium with Selenium Manager kept offline, and the few steps
every use of the page takes (sign in, open a tab, wait with a deadline)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: the longest a page change may take (a click's API call, a poll of the API)
WAIT_S = 20


def start_browser(width: int = 1280, height: int = 900) -> Any:
    """A headless Chromium of ``width`` x ``height`` pixels (a ``selenium`` WebDriver); quit it."""
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        raise RuntimeError(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install chromium chromium-driver "
                           "(scripts/test installs them)")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager: never look for a browser or driver online
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # --no-sandbox: Chromium's sandbox cannot start as root or inside most containers
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-first-run", "--disable-extensions", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def wait(driver: Any, condition: Callable[[Any], Any], timeout: float = WAIT_S, what: str = "") -> Any:
    """What ``condition(driver)`` returns once it is truthy; a ``TimeoutException`` naming
    ``what`` (and the console's errors) after ``timeout`` seconds."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # an element replaced while the condition looked at it: look again
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(
        condition, message=f"{what} (not within {timeout:g} s); console: {console(driver)}")


def console(driver: Any) -> list[str]:
    """The browser console's warnings and errors since the last call (a script error, a request
    the Content-Security-Policy refused, a failed fetch)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def by_id(driver: Any, element_id: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def visible_text(driver: Any, element_id: str) -> str | bool:
    """The element's text once it is shown and not empty, else False (a :func:`wait` condition)."""
    element = by_id(driver, element_id)
    return bool(element.is_displayed()) and str(element.text)


def sign_in(driver: Any, url: str, token: str) -> None:
    """Open the page of the server at ``url`` and submit ``token``."""
    driver.get(url + "/ui/")
    field = wait(driver, lambda d: by_id(d, "token"), what="the sign-in form")
    field.clear()
    field.send_keys(token)
    by_id(driver, "sign-in-button").click()


def signed_in(driver: Any, url: str, token: str) -> None:
    """:func:`sign_in`, then wait for the signed-in page."""
    sign_in(driver, url, token)
    wait(driver, lambda d: by_id(d, "app").is_displayed(), what="the signed-in page")


def open_tab(driver: Any, name: str) -> None:
    """Show the tab ``name`` (review, upload, train, versions)."""
    by_id(driver, f"tab-{name}").click()
    wait(driver, lambda d: by_id(d, f"panel-{name}").is_displayed(), what=f"the {name} tab")


def upload_files(driver: Any, label: str, paths: list[Path], *, drop: bool = False, timeout: float = 60) -> None:
    """Upload ``paths`` labelled ``label`` on the Upload tab (shown): through the drop zone's
    file input, or (``drop``) dropped on the zone, and wait until all are stored."""
    field = by_id(driver, "upload-label")
    field.clear()
    field.send_keys(label)
    if drop:
        drop_files(driver, "drop-zone", paths)
    else:
        by_id(driver, "upload-files").send_keys("\n".join(str(p) for p in paths))
    done = f"'{label}': {len(paths)}/{len(paths)} done: {len(paths)} stored"
    wait(driver, lambda d: by_id(d, "upload-summary").text.startswith(done), timeout=timeout,
         what=f"the upload of {len(paths)} '{label}' photos; summary: {by_id(driver, 'upload-summary').text!r}")


def drop_files(driver: Any, target_id: str, paths: list[Path]) -> None:
    """Drop real files on an element: a file input added for the purpose takes the paths (what
    WebDriver can do), then a ``drop`` event carries its files to the target, as a drag from the
    desktop would."""
    carrier = driver.execute_script(
        "const input = document.createElement('input'); input.type = 'file'; input.multiple = true;"
        "input.id = 'test-drop-carrier'; document.body.append(input); return input;")
    carrier.send_keys("\n".join(str(p) for p in paths))
    driver.execute_script(
        "const carrier = document.getElementById('test-drop-carrier');"
        "const data = new DataTransfer(); for (const f of carrier.files) data.items.add(f);"
        "const target = document.getElementById(arguments[0]);"
        "for (const type of ['dragenter', 'dragover', 'drop'])"
        "  target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));"
        "carrier.remove();", target_id)


def retrain(driver: Any, timeout: float = 240) -> str:
    """Start a retrain on the Train tab (shown) and return the job's final state once the page
    shows it."""
    by_id(driver, "retrain").click()
    wait(driver, lambda d: by_id(d, "job").is_displayed(), what="the job panel")
    final = ("succeeded", "rejected", "failed")
    return str(wait(driver, lambda d: by_id(d, "job-state").text in final and by_id(d, "job-state").text,
                    timeout=timeout, what="the retrain job's end"))
