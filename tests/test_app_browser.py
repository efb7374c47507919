"""The demo page in headless Chromium (Debian's `chromium` package, driven by Playwright).

Paints a stroke on the first example image, uploads an image to segment, clicks Segment, waits for the overlay,
loads a one-click example and saves a screenshot. Skipped only when Chromium or Playwright is missing; set
DIFFEWS_REQUIRE_BROWSER=1 (as CI should) to turn that skip into a failure.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path

import PIL.Image
import pytest

from tests.test_app import running_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
VIEWPORT = {"width": 1400, "height": 1200}


def _require_browser():
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright package is not installed"
    if missing is None and not os.path.isfile(CHROMIUM):
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing:
        if os.environ.get("DIFFEWS_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)


@pytest.fixture
def page(saved_pipeline, tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    with running_app(saved_pipeline) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_selector("#support-1")
            yield page
        finally:
            browser.close()


def test_paint_upload_segment_in_the_browser(page, tmp_path):
    # An error a person can make shows up in the page, as a message.
    page.click("#segment-button")
    toast = page.locator(".toast-body").filter(has_text="Add at least one example image")
    toast.first.wait_for()

    # Upload the example image, paint a stroke over its middle.
    page.locator("#support-1 input[type=file]").set_input_files(str(ROOT / "examples/balloons/support_1.png"))
    page.wait_for_selector("#support-1 button[aria-label='Brush']")
    page.wait_for_timeout(500)
    canvas = page.locator("#support-1 canvas").last.bounding_box()
    x, y = canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2
    page.mouse.move(x - 60, y)
    page.mouse.down()
    for step in range(1, 13):
        page.mouse.move(x - 60 + 10 * step, y + 2 * step)
    page.mouse.up()

    # Upload one image to segment, then segment.
    page.locator("#queries input[type=file]").set_input_files(str(ROOT / "examples/balloons/query_1.png"))
    page.wait_for_selector("#queries img")
    page.click("#segment-button")

    overlay = page.locator("#overlays img").first
    overlay.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
    status = page.inner_text("#status")
    assert "Segmented 1 image" in status
    area = float(re.search(r"mask area ([0-9.]+)%", status).group(1))
    assert 0 < area < 20  # the painted stroke, not the whole image
    link = page.locator("#mask-files a[href*='query_1_mask.png']").first.get_attribute("href")
    download = page.request.get(link)
    assert download.headers["content-type"] == "image/png"
    with PIL.Image.open(io.BytesIO(download.body())) as mask:
        assert mask.size == PIL.Image.open(ROOT / "examples/balloons/query_1.png").size  # the query's own size

    # One click loads an example (its example image with the object painted, two images to segment).
    page.locator("table tbody tr").filter(has_text="relative").nth(2).click()
    page.click("#segment-button")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('Segmented 2 images')")
    assert "Examples: 1" in page.inner_text("#status")
    assert page.locator("#overlays img").count() >= 2

    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    with PIL.Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width == VIEWPORT["width"] and image.height >= VIEWPORT["height"]
