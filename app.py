"""DiffewS demo: show the model a few example images with the object painted, and it finds that object in new images.

Run `python app.py [--model NAME_DIR_OR_REPO] [--port PORT] [--share]`; the model can also be named by DIFFEWS_MODEL.
The default is the authors' in-context model (`incontext`), downloaded and converted on the first start.
The endpoint `/segment` takes files, for `gradio_client`:

    from gradio_client import Client, handle_file
    masks, probabilities, status = Client(url).predict(
        support_images=[handle_file("cat.jpg")], support_masks=[handle_file("cat_mask.png")],
        queries=[handle_file("a.jpg")], threshold_mode="relative", threshold=0.25, api_name="/segment")

Several classes at once through `/segment_classes`: each support mask is a label map (a palette PNG, or a grey PNG of
class ids; 0 = background, 255 = ignored), and each query gets an index PNG with one id per pixel:

    label_maps, class_probabilities, legend, status = Client(url).predict(
        support_images=[handle_file("street.jpg")], support_masks=[handle_file("street_labels.png")],
        queries=[handle_file("a.jpg")], class_names="1: road, 2: car", threshold_mode="relative", threshold=0.25,
        api_name="/segment_classes")
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

DEFAULT_MODEL_ID = "incontext"  # an official name: pipeline_diffews.resolve_model
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
def _run_pipeline(support_images, support_masks, queries, threshold_mode, threshold, support, multiclass=False):
    """The only function that runs the model (on the GPU lease when there is one)."""
    return demo_utils.segment(
        _PIPE, support_images, support_masks, queries, threshold_mode, threshold, support, multiclass=multiclass
    )


def _segment(support_images, support_masks, queries, names, threshold_mode, threshold, classes=None):
    """Shared by the page, `/segment` and `/segment_classes`: checks, cache lookup, model, result files.

    support_masks: bool masks (one class), or uint8 label maps with `classes` = (names text, palette or None): then
    every class is segmented and the files are index PNGs and per-class probabilities.
    Returns (result, files, status, legend entries or None).
    """
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
    multiclass = classes is not None
    result = _run_pipeline(support_images, support_masks, queries, threshold_mode, float(threshold), cached, multiclass)
    _CACHE.put(key, result.support)

    status = demo_utils.describe(result, support_masks, cached is not None, _PIPE.device)
    if not multiclass:
        files = demo_utils.save_results(names, result.masks, result.probabilities, demo_utils.output_folder())
        return result, files, status, None
    names_text, palette = classes
    colors = demo_utils.class_colors(result.class_ids, palette)
    entries = demo_utils.legend(result.class_ids, demo_utils.parse_class_names(names_text, result.class_ids), colors)
    files = demo_utils.save_label_maps(
        names, result.label_maps, result.class_probabilities, result.class_ids,
        demo_utils.output_palette(colors, palette), demo_utils.output_folder(),
    )
    return result, files, status + "\n\n" + demo_utils.legend_markdown(entries, result.label_maps), entries


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


def _read_support_files(support_images, support_masks, read) -> tuple[list, list[np.ndarray]]:
    """The endpoints' support files -> (RGB images, masks), each mask read by `read(path, image size, what)`."""
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
    masks = [read(path, image.size, f"Support mask {i}") for i, (path, image) in enumerate(zip(support_masks, images), 1)]
    return images, masks


@_user_errors
def segment_page(*args):
    """The page's Segment button: editors and mask files (MAX_SHOTS each), query gallery, threshold mode, threshold,
    and optionally the class names text.

    One class painted (one brush colour, or a one-class mask file): masks as before. Several brush colours (or a
    label-map file with several ids): one class per colour, label maps, and the legend in the status.
    """
    editors, mask_files = args[:MAX_SHOTS], args[MAX_SHOTS : 2 * MAX_SHOTS]
    query_items, threshold_mode, threshold, *rest = args[2 * MAX_SHOTS :]
    class_names = rest[0] if rest else None
    supports = [demo_utils.support_from_editor(v, i, m) for i, (v, m) in enumerate(zip(editors, mask_files), 1)]
    used_files = [m for v, m in zip(editors, mask_files) if v and v.get("background") is not None and m is not None]
    supports = [s for s in supports if s is not None]
    if not supports:
        raise InputError("Add at least one example image (upload it above) and paint the object in it.")
    queries, names = _read_queries(query_items)
    images, labels = [s[0] for s in supports], [s[1] for s in supports]
    ids = sorted({k for m in labels for k in demo_utils.class_ids(m)})
    palette = next((p for p in map(demo_utils.file_palette, used_files) if p is not None), None)
    colors = demo_utils.class_colors(ids, palette)
    if len(ids) <= 1:  # one class: bool masks, the one-class call
        masks = [(m > 0) & (m < demo_utils.IGNORE) for m in labels]
        result, (mask_paths, _), status, _ = _segment(images, masks, queries, names, threshold_mode, threshold)
        color = {1: colors[ids[0]]} if ids else None
        overlays = [
            (demo_utils.overlay(query, mask, colors=color), f"{name}: {100 * mask.mean():.1f}%")
            for query, mask, name in zip(queries, result.masks, names)
        ]
    else:
        result, (mask_paths, _), status, entries = _segment(
            images, labels, queries, names, threshold_mode, threshold, classes=(class_names, palette)
        )
        overlays = [
            (demo_utils.overlay(query, labels, colors=colors),
             f"{name}: " + ", ".join(f"{e['name']} {100 * (labels == e['id']).mean():.1f}%" for e in entries))
            for query, labels, name in zip(queries, result.label_maps, names)
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
    images, masks = _read_support_files(support_images, support_masks, demo_utils.read_mask)
    queries, names = _read_queries(queries, "Query")
    _, (mask_files, probability_files), status, _ = _segment(images, masks, queries, names, threshold_mode, threshold)
    return mask_files, probability_files, status


@_user_errors
def segment_classes(support_images, support_masks, queries, class_names, threshold_mode, threshold):
    """Segments every class of the support label maps in each query image, in one call.

    Args:
        support_images: 1 to 5 example image files.
        support_masks: one label map per example image, same size: a palette PNG or a grey PNG of class ids
            (0 = background, 1..254 = classes, 255 = ignored); a class may be missing from some examples. A plain
            mask (white on black, or alpha > 0) is class 1.
        queries: 1 to 16 image files to segment.
        class_names: optional, "road, car" (ids 1, 2, ...) or "1: road, 8: car".
        threshold_mode: "relative" (per class: probability > threshold x its maximum) or "absolute".
        threshold: in [0, 1].

    Returns:
        label map PNG files (mode P, one per query at its size: 0 = background, k = class k; the palette of the first
        palette mask, else the legend's colours), class probability PNG files (L, 0..255; per query, one per class
        in the legend's order), the legend (a list of {"id", "name", "color"}), a status line.
    """
    images, labels = _read_support_files(support_images, support_masks, demo_utils.read_label_map)
    palette = next((p for p in map(demo_utils.file_palette, support_masks or []) if p is not None), None)
    queries, names = _read_queries(queries, "Query")
    _, (label_files, probability_files), status, entries = _segment(
        images, labels, queries, names, threshold_mode, threshold, classes=(class_names, palette)
    )
    return label_files, probability_files, entries, status


@_user_errors
def check_mask_file(editor_value, path, number: int):
    """Checks an uploaded mask file against its example image as soon as it arrives."""
    if path is None:
        return
    if not editor_value or editor_value.get("background") is None:
        raise InputError(f"Upload example image {number} first, then its mask.")
    height, width = np.asarray(editor_value["background"]).shape[:2]
    labels = demo_utils.read_label_map(path, (width, height), f"The mask file of example {number}")
    ids = demo_utils.class_ids(labels)
    if not ids:
        raise InputError(f"The mask file of example {number} is empty: the object must be white (or painted).")
    area = 100 * ((labels > 0) & (labels < demo_utils.IGNORE)).mean()
    classes = f", {len(ids)} classes: ids {', '.join(map(str, ids))}" if len(ids) > 1 else ""
    gr.Info(f"Example {number}: mask loaded ({area:.1f}% of the image{classes}); it replaces painted strokes.")


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


def _file_endpoint(fn, api_name: str, defaults: dict, extra_inputs: list[tuple], outputs: list[tuple]) -> None:
    """A hidden API endpoint that takes files: (support_images, support_masks, queries, *extra_inputs, threshold_mode,
    threshold) -> outputs. `outputs` are (kind, name) pairs, kind "files", "text" or "json"; `extra_inputs` are
    (kind, name, default value) triples."""
    kinds = {"files": functools.partial(gr.File, file_count="multiple"), "text": gr.Textbox, "json": gr.JSON}
    with gr.Column(visible=False):
        inputs = [kinds["files"](label=name) for name in ("support_images", "support_masks", "queries")]
        inputs += [kinds[kind](label=name, value=value) for kind, name, value in extra_inputs]
        inputs += [
            gr.Radio(THRESHOLD_MODES, value=defaults["mode"], label="threshold_mode"),
            gr.Number(value=defaults["threshold"], label="threshold", minimum=0, maximum=1),
        ]
        components = [kinds[kind](label=name) for kind, name in outputs]
        button = gr.Button()
    button.click(fn, inputs, components, api_name=api_name, concurrency_limit=1, concurrency_id="gpu")


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
            "DiffewS (NeurIPS 2024) finds the same kind of object in each of them.\n\n"
            "**Several kinds at once:** paint each kind of object in its own brush colour (one colour = one class; "
            "pick it in the brush's palette), or upload a palette mask. Each class gets its colour in the result, "
            "with a legend; name the classes below if you like."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                editors, mask_files = [], []
                with gr.Tabs():
                    for i in range(1, MAX_SHOTS + 1):
                        with gr.Tab(f"Example {i}"):
                            editor = gr.ImageEditor(
                                label=f"Example {i}: paint the object (one brush colour per class)",
                                type="numpy",
                                image_mode="RGBA",
                                format="png",
                                sources=("upload", "clipboard"),
                                brush=gr.Brush(colors=list(demo_utils.CLASS_COLORS), color_mode="fixed"),
                                eraser=gr.Eraser(),
                                layers=False,
                                transforms=(),
                                height=460,
                                elem_id=f"support-{i}",
                            )
                            with gr.Accordion("…or upload its mask", open=False):
                                mask_file = gr.File(
                                    label="Mask image (white object on black, transparent with the object painted, "
                                          "or a palette PNG with one index per class)",
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
                class_names = gr.Textbox(
                    label="Class names (optional, for several brush colours)",
                    placeholder="road, car, person  (one per brush colour, in the palette's order; or 1: road, 8: car)",
                    elem_id="class-names",
                )
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
            [*editors, *mask_files, queries, mode, threshold, class_names],
            [overlays, heatmaps, results, status],
            api_visibility="private",
            concurrency_limit=1,
            concurrency_id="gpu",
        )

        _file_endpoint(segment, "segment", defaults, [],
                       [("files", "masks"), ("files", "probabilities"), ("text", "status")])
        _file_endpoint(segment_classes, "segment_classes", defaults, [("text", "class_names", "")],
                       [("files", "label_maps"), ("files", "class_probabilities"), ("json", "legend"), ("text", "status")])

    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch` with the page's theme and CSS."""
    return demo.launch(theme=gr.themes.Soft(), css=CSS, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DiffewS few-shot segmentation demo.")
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL_ID,
                        help="official name (incontext, coco-fold0..3), saved pipeline folder or Hub repo id "
                             f"(default: ${MODEL_ENV}, else {DEFAULT_MODEL_ID})")
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
            f"Pass --model with an official name, a saved pipeline folder or a Hub repo id, or set {MODEL_ENV}."
        )
    launch(build_demo(pipe), server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
