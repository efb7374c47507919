"""The demo as a labelling tool in headless Chromium, used as a person does: correct a result, add it as an example,
download the zip; two browser sessions at once keep their own example sets. Uses the shipped few-shot model.

Skipped only when Chromium or Playwright is missing; DIFFEWS_REQUIRE_BROWSER=1 turns that skip into a failure.
"""

from __future__ import annotations

import json
import re
import zipfile

import numpy as np
import PIL.Image

from tests import browser as web
from tests.browser import fewshot_url  # noqa: F401 (a fixture)


def segment_example(page, name: str) -> None:
    web.load_example(page, name)
    page.click("#segment-button")
    web.wait_for_status(page, "Segmented 2 images")


def result_mask(page, stem: str) -> np.ndarray:
    link = page.locator(f"#mask-files a[href*='{stem}_mask.png']").first.get_attribute("href")
    with web.fetch_image(page, link) as mask:
        return np.asarray(mask) > 0


def test_correct_a_result_add_it_as_an_example_and_download(fewshot_url, tmp_path):
    with web.chromium() as browser:
        page = web.open_page(browser, fewshot_url)
        segment_example(page, "balloons")
        assert "Example set: 1 example" in page.inner_text("#example-set")
        before = result_mask(page, "query_1")

        page.locator("#overlays img").first.click()  # open the first result for correction
        web.wait_for_status(page, "Correcting query_1.png", "#correction-note")
        page.wait_for_timeout(1500)
        query = np.asarray(PIL.Image.open(web.FEWSHOT_MODEL.parent / "balloons" / "query_1.png").convert("RGB"))
        editor = web.Editor(page, "correction", (query.shape[1], query.shape[0]))
        assert web.iou(web.painted(editor.shown(), query), before) >= 0.8  # the result's mask, over its object
        editor.dab("Brush", 40, 40)  # add a patch of sky...
        ys, xs = np.nonzero(before)
        editor.dab("Erase", int(xs.mean()), int(ys.mean()))  # ...and take a bite out of the balloon
        page.screenshot(path=str(tmp_path / "correction.png"))
        page.click("#add-example")
        status = web.wait_for_status(page, "Added query_1.png as example 2")
        assert "segmented the other 1 image again" in status
        set_line = page.inner_text("#example-set")
        assert "2 examples" in set_line and "2 shots cached" in set_line
        seconds = float(re.search(r"Adding the last one took ([0-9.]+) s", set_line).group(1))
        assert 0 < seconds < 60

        after = result_mask(page, "query_1")  # the corrected mask is now the result
        assert after[40, 40] and not before[40, 40]
        assert not after[int(ys.mean()), int(xs.mean())]
        assert ((after != before).sum()) < 0.1 * after.size  # only what was touched changed

        with page.expect_download() as download:
            page.click("#download")
        path = tmp_path / "masks.zip"
        download.value.save_as(path)
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            coco = json.loads(archive.read("annotations.json"))
            with archive.open("masks/query_1.png") as file:
                np.testing.assert_array_equal(np.asarray(PIL.Image.open(file)) > 0, after)
            with archive.open("examples/example_2.png") as file:  # the corrected image is the set's second example
                np.testing.assert_array_equal(np.asarray(PIL.Image.open(file).convert("RGB")), query)
        assert {"examples/example_1.png", "examples/example_1_mask.png", "examples/example_2.png",
                "examples/example_2_mask.png", "images/query_1.png", "images/query_2.png", "masks/query_2.png"} <= names
        assert [c["name"] for c in coco["categories"]] == ["object"] and len(coco["images"]) == 2
        page.screenshot(path=str(tmp_path / "added.png"), full_page=True)


def test_two_browser_sessions_keep_their_own_example_sets(fewshot_url):
    with web.chromium() as browser:
        first, second = web.open_page(browser, fewshot_url), web.open_page(browser, fewshot_url)
        segment_example(first, "balloons")
        first.locator("#overlays img").first.click()
        web.wait_for_status(first, "Correcting query_1.png", "#correction-note")
        first.wait_for_timeout(1500)
        first.click("#add-example")
        web.wait_for_status(first, "2 examples", "#example-set")

        segment_example(second, "fish")  # the other session: its own example, not the first one's two
        assert "Examples: 1 " in second.inner_text("#status")
        assert "Example set: 1 example" in second.inner_text("#example-set")

        first.click("#segment-button")  # the first session still holds its two examples, cached
        status = web.wait_for_status(first, "reused from the cache")
        assert "Examples: 2 " in status
