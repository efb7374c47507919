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

BALLOONS = web.FEWSHOT_MODEL.parent / "balloons"


def segment_example(page, name: str) -> None:
    web.load_example(page, name)
    page.click("#segment-button")
    web.wait_for_status(page, "Segmented 2 images")


def result_mask(page, stem: str) -> np.ndarray:
    with web.fetch_image(page, web.mask_link(page, stem)) as mask:
        return np.asarray(mask) > 0


def download(page, path) -> zipfile.ZipFile:
    """Clicks Download and saves the zip at `path`."""
    with page.expect_download() as started:
        page.click("#download")
    started.value.save_as(path)
    return zipfile.ZipFile(path)


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
        assert "segmented the other 1 image not yet confirmed again" in status
        set_line = page.inner_text("#example-set")
        assert "2 examples" in set_line and "2 shots cached" in set_line
        seconds = float(re.search(r"Adding the last one took ([0-9.]+) s", set_line).group(1))
        assert 0 < seconds < 60

        after = result_mask(page, "query_1")  # the corrected mask is now the result
        assert after[40, 40] and not before[40, 40]
        assert not after[int(ys.mean()), int(xs.mean())]
        assert ((after != before).sum()) < 0.1 * after.size  # only what was touched changed

        with download(page, tmp_path / "masks.zip") as archive:
            names = set(archive.namelist())
            coco = json.loads(archive.read("annotations.json"))
            with archive.open("masks/query_1.png") as file:
                np.testing.assert_array_equal(np.asarray(PIL.Image.open(file)) > 0, after)
            with archive.open("examples/example_2.png") as file:  # the corrected image is the set's second example
                np.testing.assert_array_equal(np.asarray(PIL.Image.open(file).convert("RGB")), query)
        assert {"examples/example_1.png", "examples/example_1_mask.png", "examples/example_2.png",
                "examples/example_2_mask.png", "images/query_1.png", "images/query_2.png", "masks/query_2.png",
                "annotations_polygons.json", "data.yaml", "labels/query_1.txt", "labels/query_2.txt"} <= names
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


def test_the_page_keeps_a_sessions_work_warns_before_leaving_and_opens_it_again(fewshot_url, tmp_path):
    PIL.Image.new("L", (20, 10)).save(tmp_path / "small_mask.png")
    with web.chromium() as browser:
        page = web.open_page(browser, fewshot_url)
        asked = []  # the dialogs the browser opened: "beforeunload" when leaving would lose work
        page.on("dialog", lambda dialog: (asked.append(dialog.type), dialog.dismiss()))

        # A mask of the wrong size: one warning, no error badge anywhere.
        page.locator("#support-1 input[type=file]").set_input_files(str(BALLOONS / "support_1.png"))
        page.wait_for_selector("#support-1 button[aria-label='Brush']")
        page.wait_for_timeout(1500)  # the editor holds the image
        page.get_by_text("…or upload its mask").first.click()
        page.locator("#support-mask-1 input[type=file]").set_input_files(str(tmp_path / "small_mask.png"))
        page.locator(".toast-body").filter(has_text="a mask must have the size of its image").first.wait_for()
        assert web.error_badges(page) == 0

        segment_example(page, "balloons")
        page.locator("#overlays img").first.click()
        web.wait_for_status(page, "Correcting query_1.png", "#correction-note")
        page.wait_for_timeout(1500)
        web.Editor(page, "correction", PIL.Image.open(BALLOONS / "query_1.png").size).dab("Brush", 40, 40)
        page.click("#add-example")
        web.wait_for_status(page, "Correcting query_2.png", "#correction-note")  # on to the next result
        confirmed = result_mask(page, "query_1")
        assert confirmed[40, 40]
        page.wait_for_timeout(1500)
        page.click("#add-example")  # query_2 as it was predicted
        web.wait_for_status(page, "Every result is confirmed", "#correction-note")
        page.locator("#overlays img").first.click()
        web.wait_for_status(page, "it is example_2 of the example set", "#correction-note")
        page.wait_for_timeout(1500)
        page.click("#add-example")  # again: said where the button is, and nothing else changes
        web.wait_for_status(page, "query_1.png is already in the example set", "#correction-note")
        assert web.error_badges(page) == 0 and "Added query_2.png as example 3" in page.inner_text("#status")

        page.click("#segment-button")  # both confirmed: nothing is predicted again
        web.wait_for_status(page, "Every image has a confirmed mask (2 images)")
        np.testing.assert_array_equal(result_mask(page, "query_1"), confirmed)

        page.evaluate("() => { location.reload(); }")  # unsaved work: the browser asks first (and stays)
        page.wait_for_timeout(1000)
        assert asked == ["beforeunload"] and "3 examples" in page.inner_text("#example-set")
        with download(page, tmp_path / "set.zip") as archive:
            with archive.open("masks/query_1.png") as file:
                np.testing.assert_array_equal(np.asarray(PIL.Image.open(file)) > 0, confirmed)
        page.wait_for_function("() => !document.querySelector('#unsaved textarea').value")
        page.reload()  # everything downloaded: it does not ask
        page.wait_for_selector("#open-set")
        assert asked == ["beforeunload"]

        page.locator("#open-set input[type=file]").set_input_files(str(tmp_path / "set.zip"))
        web.wait_for_status(page, "opened from set.zip", "#example-set")
        assert "3 examples" in page.inner_text("#example-set") and "3 shots cached" in page.inner_text("#example-set")
        page.locator("#queries input[type=file]").set_input_files(str(BALLOONS / "query_2.png"))
        page.wait_for_selector("#queries img")
        page.click("#segment-button")  # the example tabs are empty: the opened set segments
        status = web.wait_for_status(page, "Segmented 1 image")
        assert "Examples: 3 " in status and "reused from the cache" in status

