"""The demo page in headless Chromium (Debian's `chromium` package, driven by Playwright), used as a person does.

Paints a stroke on an uploaded example image and segments; loads a page example at three window sizes and sees its
mask over its object; paints and erases on it and compares the result with the example's true mask (the shipped
few-shot model segments the examples). Skipped only when Chromium or Playwright is missing; set
DIFFEWS_REQUIRE_BROWSER=1 (as CI should) to turn that skip into a failure.
"""

from __future__ import annotations

import re

import numpy as np
import PIL.Image
import pytest

import demo_utils
from tests.browser import (  # noqa: F401 (fewshot_url: a fixture)
    ROOT,
    WINDOWS,
    Editor,
    chromium,
    fetch_image,
    fewshot_url,
    iou,
    load_example,
    mask_link,
    open_page,
    painted,
    require_browser,
    wait_for_status,
)
from tests.test_app import running_app

VIEWPORT = {"width": 1400, "height": 1200}
BALLOONS = ROOT / "examples" / "balloons"


@pytest.fixture
def page(saved_pipeline):
    require_browser()
    with running_app(saved_pipeline) as url, chromium() as browser:
        yield open_page(browser, url, VIEWPORT["width"], VIEWPORT["height"])


@pytest.fixture
def shots(monkeypatch):
    """The support masks each model call got (the page's examples as the server reads them)."""
    calls = []
    segment = demo_utils.segment

    def recording(pipe, support_images, support_masks, *args, **kwargs):
        calls.append([np.asarray(m) for m in support_masks])
        return segment(pipe, support_images, support_masks, *args, **kwargs)

    monkeypatch.setattr(demo_utils, "segment", recording)
    return calls


def test_paint_upload_segment_in_the_browser(page, tmp_path):
    # An error a person can make shows up in the page, as a message.
    page.click("#segment-button")
    wait_for_status(page, "Add at least one example image")

    # Upload the example image, paint a stroke over its middle.
    page.locator("#support-1 input[type=file]").set_input_files(str(BALLOONS / "support_1.png"))
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
    page.locator("#queries input[type=file]").set_input_files(str(BALLOONS / "query_1.png"))
    page.wait_for_selector("#queries img")
    page.click("#segment-button")

    overlay = page.locator("#overlays img").first
    overlay.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=overlay.element_handle())
    status = page.inner_text("#status")
    assert "Segmented 1 image" in status
    area = float(re.search(r"mask area ([0-9.]+)%", status).group(1))
    assert 0 < area < 20  # the painted stroke, not the whole image
    link = mask_link(page, "query_1")
    with fetch_image(page, link) as mask:
        assert mask.size == PIL.Image.open(BALLOONS / "query_1.png").size  # the query's own size

    # One click loads an example (its example image with the object painted, two images to segment).
    load_example(page, "oranges")
    page.click("#segment-button")
    wait_for_status(page, "Segmented 2 images")
    assert "Examples: 1" in page.inner_text("#status")
    assert page.locator("#overlays img").count() >= 2

    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    with PIL.Image.open(screenshot) as image:
        assert image.format == "PNG" and image.width == VIEWPORT["width"] and image.height >= VIEWPORT["height"]


def test_an_example_shows_its_mask_over_its_object_at_any_window_size(fewshot_url, tmp_path):
    with chromium() as browser:
        page = open_page(browser, fewshot_url, *WINDOWS[0])
        for (width, height), name in zip(WINDOWS, ["balloons", "fish", "oranges"]):
            page.set_viewport_size({"width": width, "height": height})
            load_example(page, name)  # after another example (and another window size) but the first
            image = np.asarray(PIL.Image.open(ROOT / "examples" / name / "support_1.png").convert("RGB"))
            mask = np.asarray(PIL.Image.open(ROOT / "examples" / name / "support_1_mask.png")) >= 128
            shown = Editor(page, "support-1", (image.shape[1], image.shape[0])).shown()
            PIL.Image.fromarray(shown).save(tmp_path / f"{name}_{width}x{height}.png")
            assert iou(painted(shown, image), mask) >= 0.8, f"{name} at {width}x{height}: the paint is off its object"
            assert shown[mask].mean(0)[2] > image[mask].mean(0)[2] + 40  # see-through magenta over the object...
            assert np.abs(shown[mask].astype(int) - image[mask]).mean() < 120  # ...that still shows it


def test_paint_and_erase_on_an_example_then_segment_matches_the_truth(fewshot_url, shots, tmp_path):
    mask = np.asarray(PIL.Image.open(BALLOONS / "support_1_mask.png")) >= 128
    height, width = mask.shape
    with chromium() as browser:
        page = open_page(browser, fewshot_url, 1400, 1000)
        load_example(page, "balloons")
        editor = Editor(page, "support-1", (width, height))
        ys, xs = np.nonzero(mask)
        right_edge = (xs.max(), int(ys.mean()))  # a brush dab over the balloon's right edge
        centre = (int(xs.mean()), int(ys.mean()))  # an eraser dab in its middle
        editor.dab("Brush", *right_edge)
        editor.dab("Erase", *centre)
        page.screenshot(path=str(tmp_path / "edited.png"))
        page.click("#segment-button")
        wait_for_status(page, "Segmented 2 images")

        [sent] = shots[-1:]
        [support] = sent
        changed = support != mask
        yy, xx = np.mgrid[0:height, 0:width]
        near = lambda point, radius: (xx - point[0]) ** 2 + (yy - point[1]) ** 2 <= radius**2  # noqa: E731
        assert (support & ~mask & near(right_edge, 30)).sum() > 20  # the brush added paint where it was dabbed...
        assert (~support & mask & near(centre, 30)).sum() > 20  # ...the eraser removed it where it was dabbed...
        assert not (changed & ~near(right_edge, 30) & ~near(centre, 30)).any()  # ...and nothing changed elsewhere

        for number in (1, 2):
            link = mask_link(page, f"query_{number}")
            with fetch_image(page, link) as result:
                truth = np.asarray(PIL.Image.open(BALLOONS / "truth" / f"query_{number}.png")) >= 128
                assert result.size == (truth.shape[1], truth.shape[0])
                assert iou(np.asarray(result) > 0, truth) >= 0.8, f"query_{number}"
        page.screenshot(path=str(tmp_path / "segmented.png"), full_page=True)


def test_an_uploaded_mask_file_is_the_editable_layer_and_captions_show_every_class(fewshot_url, shots, tmp_path):
    image = np.asarray(PIL.Image.open(BALLOONS / "support_1.png").convert("RGB"))
    labels = (np.asarray(PIL.Image.open(BALLOONS / "support_1_mask.png")) >= 128).astype(np.uint8)
    labels[(image[..., 2] > 150) & (image[..., 0] < 80)] = 2  # the blue balloon: class 2
    label_file = PIL.Image.fromarray(labels, "L").convert("P")
    label_file.putpalette([0, 0, 0, 250, 20, 20, 40, 40, 240] + [128] * (768 - 9))
    label_file.save(tmp_path / "labels.png")
    with chromium() as browser:
        page = open_page(browser, fewshot_url, 1024, 768)
        load_example(page, "balloons")
        page.get_by_text("…or upload its mask").first.click()
        page.locator("#support-mask-1 input[type=file]").set_input_files(str(tmp_path / "labels.png"))
        page.locator(".toast-body").filter(has_text="2 classes: ids 1, 2").first.wait_for()
        page.wait_for_timeout(1500)
        editor = Editor(page, "support-1", (image.shape[1], image.shape[0]))
        assert iou(painted(editor.shown(), image), labels > 0) >= 0.8  # both classes drawn over their objects
        blue = np.argwhere(labels == 2).mean(0).astype(int)
        editor.dab("Erase", blue[1], blue[0])  # edited like strokes
        page.fill("#class-names textarea", "red balloon, blue balloon")
        page.click("#segment-button")
        wait_for_status(page, "Segmented 2 images")

        [sent] = shots[-1:]
        changed = sent[0] != labels
        assert changed.any() and (sent[0][changed] == 0).all() and (labels[changed] == 2).all()  # erased class 2 only
        assert np.abs(np.argwhere(changed).mean(0) - blue).max() < 30
        captions = page.eval_on_selector_all(
            "#overlays .caption-label", "els => els.map(e => [e.innerText, e.scrollWidth <= e.clientWidth])"
        )
        assert len(captions) == 2
        for text, fits in captions:
            assert re.search(r"red balloon [0-9.]+%, blue balloon [0-9.]+%", text) and fits
        page.locator("#overlays").screenshot(path=str(tmp_path / "captions.png"))
