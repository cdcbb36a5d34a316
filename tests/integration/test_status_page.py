"""The status page in a real headless Chromium (Debian's `chromium`, driven by Playwright):
every model shows, load shows a progress bar and then `gpu`, offload shows `cpu`, an edited
timeout reaches `/gpu/status`. A screenshot goes to `artifacts/status-page.png` (ignored)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.operator_app import EMBED, SLOW, operator_args

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


@pytest.fixture(scope="module")
def url(deploy: Callable[[dict[str, Any]], str]) -> str:
    return deploy(operator_args())


@pytest.fixture(scope="module")
def page(url: str) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: `make test` installs it (SYSTEM_PACKAGES), or apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        pg = browser.new_page(viewport={"width": 1400, "height": 900})
        pg.set_default_timeout(90_000)
        yield pg
        browser.close()


def row(page: Any, model: str) -> Any:
    return page.locator(f'tr[data-model="{model}"]').first


def status_rows(url: str, model: str) -> list[dict[str, Any]]:
    return [m for m in httpx.get(f"{url}/gpu/status", timeout=10).json()["models"] if m["model"] == model]


def test_the_page_shows_and_steers_every_model(url: str, page: Any) -> None:
    page.goto(url + "/")
    for m in operator_args()["models"]:
        row(page, m["id"]).wait_for()
    assert page.locator("#conn").inner_text() in ("live (event stream)", "polling every 1 s")
    page.wait_for_function("document.querySelector('#conn').classList.contains('live')")
    page.locator(".gpu .bar").first.wait_for()

    # Load: the progress bar shows while the load is in flight, then the state is gpu.
    if status_rows(url, SLOW)[0]["state"] != "unloaded":
        httpx.post(f"{url}/gpu/release", json={"model": SLOW}, timeout=60)
    row(page, SLOW).locator('button[data-action="load"]').click()
    row(page, SLOW).locator(".progress").wait_for(timeout=120_000)
    text = row(page, SLOW).locator(".progress-text").inner_text()
    assert text.startswith("load ") and " s" in text
    row(page, SLOW).locator(".state-gpu").wait_for(timeout=120_000)
    assert row(page, SLOW).locator(".progress").count() == 0
    # Our model now has its own segment in its GPU's memory bar.
    page.locator(f'.bar span[title^="{SLOW}:"]').wait_for()

    # Offload: cpu.
    row(page, SLOW).locator('button[data-action="offload"]').click()
    row(page, SLOW).locator(".state-cpu").wait_for()
    page.locator("#messages .ok", has_text="offload").first.wait_for()

    # Edit a timeout in place: /gpu/status follows.
    field = row(page, EMBED).locator('input[data-field="release_timeout_s"]')
    field.fill("4321")
    field.press("Enter")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and status_rows(url, EMBED)[0]["release_timeout_s"] != 4321:
        time.sleep(0.2)
    assert status_rows(url, EMBED)[0]["release_timeout_s"] == 4321
    page.wait_for_function(
        f"document.querySelector('tr[data-model=\"{EMBED}\"] input[data-field=\"release_timeout_s\"]').value == '4321'"
    )
    # The events panel shows the transitions the stream carried.
    page.locator("#events div", has_text=f"{SLOW}: loading → gpu").first.wait_for()

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
