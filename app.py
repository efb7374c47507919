"""DiffewS demo: show the model a few example images with the object painted, and it finds that object in new images.

Run `python app.py [--model DIR_OR_REPO] [--port PORT] [--share]`; the model can also be named by DIFFEWS_MODEL.
The endpoint `/segment` takes files, for `gradio_client`:

    from gradio_client import Client, handle_file
    masks, probabilities, status = Client(url).predict(
        support_images=[handle_file("cat.jpg")], support_masks=[handle_file("cat_mask.png")],
        queries=[handle_file("a.jpg")], threshold_mode="relative", threshold=0.25, api_name="/segment")
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import gradio as gr
import numpy as np

import demo_utils
from demo_utils import InputError

try:
    import spaces
except ImportError:
    spaces = None

DEFAULT_MODEL_ID = "diffews/diffews-incontext"
MODEL_ENV = "DIFFEWS_MODEL"
MAX_SHOTS = 5  # example images (supports) per request
MAX_QUERIES = 16  # images to segment per request
GPU_DURATION_S = 60
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
THRESHOLD_MODES = ["relative", "absolute"]

CSS = """
#status {min-height: 2.5em}
"""

_PIPE = None
_CACHE = demo_utils.SupportCache(max_items=8)


def gpu(duration: int):
    """`spaces.GPU(duration=...)` on Hugging Face Spaces; a no-op elsewhere."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


@gpu(duration=GPU_DURATION_S)
def _run_pipeline(support_images, support_masks, queries, threshold_mode, threshold, support):
    """The only function that runs the model (on the GPU lease when there is one)."""
    return demo_utils.segment(_PIPE, support_images, support_masks, queries, threshold_mode, threshold, support)


def _segment(support_images, support_masks, queries, names, threshold_mode, threshold):
    """Shared by the page and `/segment`: checks, cache lookup, model, result files. Returns (result, files, status)."""
    demo_utils.check_support_set(support_images, support_masks, MAX_SHOTS)
    if not queries:
        raise InputError("Add at least one image to segment.")
    if len(queries) > MAX_QUERIES:
        raise InputError(f"Segment at most {MAX_QUERIES} images at a time, got {len(queries)}.")
    if threshold_mode not in THRESHOLD_MODES:
        raise InputError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}.")
    if threshold is None or not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold!r}.")

    key = demo_utils.support_key(support_images, support_masks, _PIPE.config.processing_resolution)
    cached = _CACHE.get(key)
    result = _run_pipeline(support_images, support_masks, queries, threshold_mode, float(threshold), cached)
    _CACHE.put(key, result.support)

    files = demo_utils.save_results(names, result.masks, result.probabilities, demo_utils.output_folder())
    status = demo_utils.describe(result, support_masks, cached is not None, _PIPE.device)
    return result, files, status


def _user_errors(fn):
    """Turns the mistakes a person can make (InputError, and the pipeline's ValueError/TypeError) into gr.Error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError) as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


def _read_queries(paths, what: str = "Image to segment"):
    paths = [p[0] if isinstance(p, (tuple, list)) else p for p in paths or []]
    images = [demo_utils.to_rgb(demo_utils.open_image(p, f"{what} {i}")) for i, p in enumerate(paths, 1)]
    return images, [Path(p).name for p in paths]


@_user_errors
def segment_page(*args):
    """The page's Segment button: editors and mask files (MAX_SHOTS each), query gallery, threshold mode, threshold."""
    editors, mask_files = args[:MAX_SHOTS], args[MAX_SHOTS : 2 * MAX_SHOTS]
    query_items, threshold_mode, threshold = args[2 * MAX_SHOTS :]
    supports = [demo_utils.support_from_editor(v, i, m) for i, (v, m) in enumerate(zip(editors, mask_files), 1)]
    supports = [s for s in supports if s is not None]
    if not supports:
        raise InputError("Add at least one example image (upload it above) and paint the object in it.")
    queries, names = _read_queries(query_items)
    result, (mask_paths, _), status = _segment(
        [s[0] for s in supports], [s[1] for s in supports], queries, names, threshold_mode, threshold
    )
    overlays = [
        (demo_utils.overlay(query, mask), f"{name}: {100 * mask.mean():.1f}%")
        for query, mask, name in zip(queries, result.masks, names)
    ]
    heatmaps = [(demo_utils.colorize(p), n) for p, n in zip(result.probabilities, names)]
    return overlays, heatmaps, mask_paths, status


@_user_errors
def segment(support_images, support_masks, queries, threshold_mode, threshold):
    """Segments each query image: finds the object marked in the support images' masks.

    Args:
        support_images: 1 to 5 example image files.
        support_masks: one mask file per example image, same size (white object on black, or alpha > 0).
        queries: 1 to 16 image files to segment.
        threshold_mode: "relative" (probability > threshold x the image's maximum) or "absolute".
        threshold: in [0, 1].

    Returns:
        mask PNG files (L, 0/255, each at its query's size), probability PNG files (L, 0..255), a status line.
    """
    support_images = support_images or []
    support_masks = support_masks or []
    if len(support_images) != len(support_masks):
        raise InputError(
            f"Got {len(support_images)} support images but {len(support_masks)} masks: pass one mask per image."
        )
    images = [
        demo_utils.to_rgb(demo_utils.open_image(path, f"Support image {i}"))
        for i, path in enumerate(support_images, 1)
    ]
    masks = [
        demo_utils.read_mask(path, image.size, f"Support mask {i}")
        for i, (path, image) in enumerate(zip(support_masks, images), 1)
    ]
    queries, names = _read_queries(queries, "Query")
    _, (mask_files, probability_files), status = _segment(images, masks, queries, names, threshold_mode, threshold)
    return mask_files, probability_files, status


@_user_errors
def check_mask_file(editor_value, path, number: int):
    """Checks an uploaded mask file against its example image as soon as it arrives."""
    if path is None:
        return
    if not editor_value or editor_value.get("background") is None:
        raise InputError(f"Upload example image {number} first, then its mask.")
    height, width = np.asarray(editor_value["background"]).shape[:2]
    mask = demo_utils.read_mask(path, (width, height), f"The mask file of example {number}")
    if not mask.any():
        raise InputError(f"The mask file of example {number} is empty: the object must be white (or painted).")
    gr.Info(f"Example {number}: mask loaded ({100 * mask.mean():.1f}% of the image); it replaces painted strokes.")


def _examples(threshold_mode: str, threshold: float) -> list[list]:
    """One row per folder of examples/: editor values (background + painted layer), no mask files, the queries."""
    rows = []
    for folder in sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_dir()) if EXAMPLES_DIR.is_dir() else []:
        supports = sorted(folder.glob("support_[0-9].png"))[:MAX_SHOTS]
        queries = [str(p) for p in sorted(folder.glob("query_*.png"))]
        if not supports or not queries:
            continue
        editors = [
            {"background": str(s), "layers": [str(s.with_name(f"{s.stem}_paint.png"))], "composite": None}
            for s in supports
        ]
        editors += [None] * (MAX_SHOTS - len(editors))
        rows.append(editors + [None] * MAX_SHOTS + [queries, threshold_mode, threshold])
    return rows


def build_demo(pipe) -> gr.Blocks:
    """The page and its endpoints, around a loaded pipeline."""
    global _PIPE
    _PIPE = pipe
    defaults = {"mode": pipe.config.threshold_mode, "threshold": float(pipe.config.threshold)}

    with gr.Blocks(title="DiffewS: few-shot segmentation", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# DiffewS: segment anything you can show\n"
            "Upload an **example image** and paint the object with the brush (or upload its mask). "
            "Add more examples in the other tabs if you like, then drop in the **images to segment**. "
            "DiffewS (NeurIPS 2024) finds the same kind of object in each of them."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                editors, mask_files = [], []
                with gr.Tabs():
                    for i in range(1, MAX_SHOTS + 1):
                        with gr.Tab(f"Example {i}"):
                            editor = gr.ImageEditor(
                                label=f"Example {i}: paint the object",
                                type="numpy",
                                image_mode="RGBA",
                                format="png",
                                sources=("upload", "clipboard"),
                                brush=gr.Brush(colors=["#ff0066"], color_mode="fixed"),
                                eraser=gr.Eraser(),
                                layers=False,
                                transforms=(),
                                height=460,
                                elem_id=f"support-{i}",
                            )
                            with gr.Accordion("…or upload its mask", open=False):
                                mask_file = gr.File(
                                    label="Mask image (white object on black, or transparent with the object painted)",
                                    file_types=["image"],
                                    elem_id=f"support-mask-{i}",
                                )
                            mask_file.upload(
                                functools.partial(check_mask_file, number=i), [editor, mask_file], None,
                                api_visibility="private",
                            )
                            editors.append(editor)
                            mask_files.append(mask_file)
            with gr.Column(scale=2):
                queries = gr.Gallery(
                    label="Images to segment",
                    type="filepath",
                    file_types=["image"],
                    columns=3,
                    height=300,
                    interactive=True,
                    elem_id="queries",
                )
                with gr.Row():
                    mode = gr.Radio(THRESHOLD_MODES, value=defaults["mode"], label="Threshold mode",
                                    info="relative: × each image's highest score")
                    threshold = gr.Slider(0.0, 1.0, value=defaults["threshold"], step=0.01, label="Threshold")
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                status = gr.Markdown(elem_id="status")
        with gr.Row(equal_height=False):
            overlays = gr.Gallery(label="Result", columns=3, height=380, format="png", elem_id="overlays")
            heatmaps = gr.Gallery(label="Probability", columns=3, height=380, format="png", elem_id="probabilities")
        results = gr.File(label="Masks (PNG, each at its image's size)", file_count="multiple", elem_id="mask-files")

        rows = _examples(defaults["mode"], defaults["threshold"])
        if rows:
            gr.Examples(rows, inputs=[*editors, *mask_files, queries, mode, threshold],
                        label="Examples (synthetic scenes, CC0)")

        button.click(
            segment_page,
            [*editors, *mask_files, queries, mode, threshold],
            [overlays, heatmaps, results, status],
            api_visibility="private",
            concurrency_limit=1,
            concurrency_id="gpu",
        )

        with gr.Column(visible=False):  # the inputs and outputs of /segment, which takes files
            api_inputs = [
                gr.File(file_count="multiple", label="support_images"),
                gr.File(file_count="multiple", label="support_masks"),
                gr.File(file_count="multiple", label="queries"),
                gr.Radio(THRESHOLD_MODES, value=defaults["mode"], label="threshold_mode"),
                gr.Number(value=defaults["threshold"], label="threshold", minimum=0, maximum=1),
            ]
            api_outputs = [
                gr.File(file_count="multiple", label="masks"),
                gr.File(file_count="multiple", label="probabilities"),
                gr.Textbox(label="status"),
            ]
            api_button = gr.Button()
        api_button.click(
            segment, api_inputs, api_outputs, api_name="segment", concurrency_limit=1, concurrency_id="gpu"
        )

    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch` with the page's theme and CSS."""
    return demo.launch(theme=gr.themes.Soft(), css=CSS, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DiffewS few-shot segmentation demo.")
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL_ID,
                        help=f"saved pipeline folder or Hub repo id (default: ${MODEL_ENV}, else {DEFAULT_MODEL_ID})")
    parser.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        pipe = demo_utils.load_pipeline(args.model)
    except Exception as error:  # noqa: BLE001 - any failure to load ends the program with one line
        reason = (str(error).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
        reason = reason if len(reason) <= 200 else reason[:199] + "…"
        sys.exit(
            f"Could not load the DiffewS model {args.model!r} ({type(error).__name__}: {reason}). "
            f"Pass --model with a saved pipeline folder or a Hub repo id, or set {MODEL_ENV}."
        )
    launch(build_demo(pipe), server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
