"""The status page where keys are set (the hardened app), in headless Chromium: without a key
it says the status is refused; with an inference key it shows the models read-only, the event
stream is refused (admin only), so it polls, and a command says 403; with an admin key the
event stream is live (EventSource passes the key as `?api_key=`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.hardened import ADMIN_KEY, API_KEY, EMB
from tests.integration.test_status_page import CHROMIUM, row

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def use_key(page: Any, key: str) -> None:
    page.fill("#key", key)
    page.click("#save-key")


def test_the_page_follows_the_keys(hardened_url: str, browser: Any) -> None:
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(hardened_url + "/")
    page.locator("#gpus .err", has_text="status refused (401)").wait_for()

    use_key(page, API_KEY)  # an inference key reads the status, nothing more
    row(page, EMB).wait_for()
    page.wait_for_function("document.querySelector('#conn').classList.contains('polling')")
    row(page, EMB).locator('button[data-action="offload"]').click()
    refused = page.locator("#messages .refused").first
    refused.wait_for()
    assert "offload refused (403)" in refused.inner_text() and "inference key" in refused.inner_text()

    use_key(page, ADMIN_KEY)
    page.wait_for_function("document.querySelector('#conn').classList.contains('live')")
    row(page, EMB).locator('button[data-action="offload"]').click()
    page.locator("#messages .ok", has_text=f"offload {EMB}").first.wait_for()
    stored = page.evaluate("localStorage.getItem('gpu-serve-key')")
    assert stored == ADMIN_KEY
    page.close()
