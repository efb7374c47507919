"""Driving the demo page in headless Chromium (Debian's `chromium` package, through Playwright), as a person does.

Skipped only when Chromium or Playwright is missing; set DIFFEWS_REQUIRE_BROWSER=1 (as CI should) to turn that skip into
a failure.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

ROOT = Path(__file__).resolve().parent.parent
FEWSHOT_MODEL = ROOT / "examples" / "tiny-fewshot-pipeline"  # segments the page's examples (IoU >= 0.8)
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
WINDOWS = [(1024, 768), (1400, 1000), (1920, 1080)]


def require_browser():
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


@pytest.fixture(scope="module")
def fewshot_url():
    """The demo served with the shipped few-shot model (which segments the page's examples)."""
    from tests.test_app import running_app

    require_browser()
    with running_app(FEWSHOT_MODEL) as url:
        yield url


@contextlib.contextmanager
def chromium():
    """A headless Chromium browser."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, width: int = 1400, height: int = 1000):
    """A page of the demo at `url` in a new browser context (a session of its own: its own cookies and storage), in a
    window of width x height, ready."""
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#support-1")
    return page


def load_example(page, name: str) -> None:
    """Clicks the page example `name` and waits until its example image is drawn with its mask."""
    page.locator("#examples").get_by_text(name).first.click()
    page.wait_for_function("() => document.querySelectorAll('#queries img').length >= 2")
    page.wait_for_timeout(1500)  # the editor draws the image, then the layer


class Editor:
    """An image editor of the page (`#<elem_id>`) showing an image of `size` (W, H): image pixels <-> page points."""

    def __init__(self, page, elem_id: str, size: tuple[int, int]):
        self.page, self.root, self.size = page, f"#{elem_id}", size
        page.locator(self.root).scroll_into_view_if_needed()
        self.box = page.locator(f"{self.root} canvas").first.bounding_box()
        zoom = re.search(r"(\d+)%", page.inner_text(self.root)).group(1)
        self.scale = int(zoom) / 100  # the editor fits the image and centres it in its canvas

    def point(self, x: float, y: float) -> tuple[float, float]:
        """Image pixel (x, y) -> page point."""
        return (self.box["x"] + self.box["width"] / 2 + (x - self.size[0] / 2) * self.scale,
                self.box["y"] + self.box["height"] / 2 + (y - self.size[1] / 2) * self.scale)

    def dab(self, tool: str, x: float, y: float) -> None:
        """One short stroke at image pixel (x, y) with `tool` ("Brush" or "Erase")."""
        self.page.click(f"{self.root} button[aria-label='{tool}']")
        px, py = self.point(x, y)
        self.page.mouse.move(px, py)
        self.page.mouse.down()
        for step in range(1, 4):
            self.page.mouse.move(px + step, py + step)
        self.page.mouse.up()
        self.page.wait_for_timeout(300)

    def shown(self) -> np.ndarray:
        """What the page shows of the image: RGB [H, W, 3] uint8 at the image's size."""
        x0, y0 = self.point(0, 0)
        x1, y1 = self.point(*self.size)
        png = self.page.screenshot(clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
        return np.asarray(PIL.Image.open(io.BytesIO(png)).convert("RGB").resize(self.size, PIL.Image.BILINEAR))


def painted(shown: np.ndarray, image: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """bool [H, W]: where the page shows paint over `image` (RGB [H, W, 3]): its colour moved away from the image's."""
    return np.abs(shown.astype(np.int16) - image.astype(np.int16)).sum(-1) > threshold


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def wait_for_status(page, text: str, selector: str = "#status") -> str:
    page.wait_for_function(
        "([selector, text]) => document.querySelector(selector).innerText.includes(text)", arg=[selector, text]
    )
    return page.inner_text(selector)


def fetch_image(page, href: str) -> PIL.Image.Image:
    response = page.request.get(href)
    assert response.headers["content-type"] == "image/png"
    return PIL.Image.open(io.BytesIO(response.body()))


def mask_link(page, stem: str) -> str:
    """The address of result `stem`'s mask file in the page's mask list (`<stem>.png`, as the download names it)."""
    return page.locator(f"#mask-files a[href$='/{stem}.png']").first.get_attribute("href")


def error_badges(page) -> int:
    """How many components the page marks with Gradio's error badge (an event that raised)."""
    return page.locator("[data-testid='status-tracker'] .error").count()

