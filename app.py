"""DiffewS demo: show the model a few example images with the object painted, and it finds that object in new images;
correct a result, keep it as an example, and take every mask home.

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
    # class_probabilities[i][k]: query i's probability PNG of the legend's class k
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
from pipeline_diffews.official import ModelNotFoundError, load_pipeline, official_names

try:
    import spaces
except ImportError:
    spaces = None

DEFAULT_MODEL_ID = "incontext"  # an official name: pipeline_diffews.resolve_model
MODEL_ENV = "DIFFEWS_MODEL"
EXAMPLE_TABS = 5  # example editors on the page
MAX_SHOTS = 10  # the most examples (supports) a set may hold: the editors' plus those added from corrected results
MAX_QUERIES = 16  # images to segment per request
GPU_DURATION_S = 60
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
THRESHOLD_MODES = ["relative", "absolute"]
SESSION_TTL_S = 3600  # a session's example set and results are dropped this long after its last use

CSS = """
#status, #example-set {min-height: 2.5em}
#overlays .caption-label, #probabilities .caption-label {white-space: normal; overflow: visible; max-width: none}
"""

# Runs once the page loads: before leaving (reload, close, another address) while the hidden #unsaved box says what
# would be lost, the browser asks first.
PAGE_JS = """
() => {
  window.addEventListener("beforeunload", (event) => {
    const unsaved = document.querySelector("#unsaved textarea, #unsaved input");
    if (unsaved && unsaved.value) {
      event.preventDefault();
      event.returnValue = unsaved.value;
    }
  });
}
"""
# After the Download button built the zip: the browser saves it.
DOWNLOAD_JS = """
(file) => {
  if (!file || !file.url) return;
  const link = document.createElement("a");
  link.href = file.url;
  link.download = file.orig_name || "diffews_masks.zip";
  document.body.appendChild(link);
  link.click();
  link.remove();
}
"""

_PIPE = None
_OUTPUTS = {}  # api name -> its output components (files inside JSON are put in a component's cache)


def gpu(duration: int):
    """`spaces.GPU(duration=...)` on Hugging Face Spaces; a no-op elsewhere."""
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


@gpu(duration=GPU_DURATION_S)
def _on_device(task, *args, **kwargs):
    """The only way the model runs (on the GPU lease when there is one): `task(pipeline, *args, **kwargs)`."""
    return task(_PIPE, *args, **kwargs)


def _on_mistake(handle):
    """A decorator: a mistake a person can make (InputError, the pipeline's ValueError/TypeError) in the decorated
    function goes to `handle(message)`, whose return value is then the function's."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (ValueError, TypeError) as error:
                return handle(str(error))

        return wrapper

    return decorate


def _raise_gr_error(message: str):
    """A mistake as Gradio reports it to a client: gr.Error (the client's AppError), no traceback in the log."""
    raise gr.Error(message, print_exception=False)


_user_errors = _on_mistake(_raise_gr_error)  # the endpoints: a mistake is a gr.Error, the client's AppError


def _page_event(message: int, count: int, cleared: dict | None = None):
    """A page event whose mistakes stay where they are: a mistake leaves every one of its `count` outputs as it was
    (gr.skip()) but output `message`, which shows the mistake, and the outputs `cleared` names ({position: value}).
    No exception reaches Gradio, so no other panel is marked."""

    def shown(text: str) -> tuple:
        outputs = [gr.skip()] * count
        outputs[message] = f"⚠️ {text}"
        for position, value in (cleared or {}).items():
            outputs[position] = value
        return tuple(outputs)

    return _on_mistake(shown)


# ---------------------------------------------------------------------------------------------- segmenting


def _check_request(queries, threshold_mode, threshold) -> None:
    if not queries:
        raise InputError("Add at least one image to segment.")
    if len(queries) > MAX_QUERIES:
        raise InputError(f"Segment at most {MAX_QUERIES} images at a time, got {len(queries)}.")
    if threshold_mode not in THRESHOLD_MODES:
        raise InputError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}.")
    if threshold is None or not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f"threshold must be in [0, 1], got {threshold!r}.")


def _segment(support_images, support_masks, queries, threshold_mode, threshold, cached, multiclass, sampling=False):
    """Shared by the page and the endpoints: checks, then the model (the supports encoded unless `cached` holds them;
    `sampling`: support-token sampling). Returns (demo_utils.Segmentation, status line)."""
    demo_utils.check_support_set(support_images, support_masks, MAX_SHOTS)
    _check_request(queries, threshold_mode, threshold)
    result = _on_device(demo_utils.segment, support_images, support_masks, queries, threshold_mode, float(threshold),
                        cached, multiclass=multiclass, support_token_sampling=sampling)
    return result, demo_utils.describe(result, support_masks, cached is not None, _PIPE.device)


def _classes(result, names: dict[int, str], palette):
    """(legend entries, palette of the outputs) of a multi-class result; `names`: `demo_utils.parse_class_names`."""
    colors = demo_utils.class_colors(result.class_ids, palette)
    return demo_utils.legend(result.class_ids, names, colors), demo_utils.output_palette(colors, palette)


def _read_queries(paths, what: str = "Image to segment", session: demo_utils.Session | None = None):
    """Gallery items or files -> (RGB images, file names, file bytes). A file gone from Gradio's upload cache is read
    from `session`'s own copy of the image of that name."""
    paths = [p[0] if isinstance(p, (tuple, list)) else p for p in paths or []]
    images, files = [], []
    for number, path in enumerate(paths, 1):
        stored = session.stored(Path(path).name) if session and not Path(path).is_file() else None
        image, data = stored or (demo_utils.to_rgb(demo_utils.open_image(path, f"{what} {number}")),
                                 Path(path).read_bytes())
        images.append(image)
        files.append(data)
    return images, [Path(p).name for p in paths], files


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
    masks = [read(path, image.size, f"Support mask {i}")
             for i, (path, image) in enumerate(zip(support_masks, images), 1)]
    return images, masks


def _cached_segment(cache, images, masks, queries, threshold_mode, threshold, multiclass):
    """`_segment` with the session's support cache (`demo_utils.SupportCache`)."""
    key = demo_utils.support_key(images, masks, _PIPE.config.processing_resolution)
    result, status = _segment(images, masks, queries, threshold_mode, threshold, cache.get(key), multiclass)
    cache.put(key, result.support)
    return result, status


# ---------------------------------------------------------------------------------------------- the page


def _views(session: demo_utils.Session, palette):
    """The page's result views of a session: overlays and probability maps (with captions; a confirmed result says
    so), and the mask files as the download holds them (`demo_utils.save_masks`)."""
    result, examples = session.result, session.examples
    overlays, heatmaps = [], []
    for index, (query, name) in enumerate(zip(session.queries, session.names)):
        labels = result.labels(index)
        if examples.multiclass:
            shares = ", ".join(
                f"{session.class_names.get(k, f'class {k}')} {100 * (labels == k).mean():.1f}%"
                for k in result.class_ids
            )
        else:
            shares = f"{100 * (labels > 0).mean():.1f}%"
        confirmed = " (confirmed)" if session.confirmed[index] else ""
        overlays.append((demo_utils.overlay(query, labels, palette), f"{name}: {shares}{confirmed}"))
        heatmaps.append((demo_utils.colorize(result.probabilities[index]), name))
    labels = [result.labels(i) for i in range(len(session.queries))]
    files = demo_utils.save_masks(session.names, labels, examples.multiclass, palette, demo_utils.output_folder())
    return overlays, heatmaps, files


def _palette(session: demo_utils.Session) -> list[int]:
    """The output palette of the session's classes (its mask file's palette, else the brush colours)."""
    examples = session.examples
    ids = demo_utils.class_ids_of(examples) or [1]
    return demo_utils.output_palette(demo_utils.class_colors(ids, examples.palette), examples.palette)


def _editor_supports(editor_ids, editors, mask_files):
    """The example editors' shots: (RGB images, uint8 label maps, the palette of their mask files or None)."""
    editor_ids = editor_ids or [None] * EXAMPLE_TABS
    supports, used_files = [], []
    for number, (value, mask_file, ids) in enumerate(zip(editors, mask_files, editor_ids), 1):
        support = demo_utils.support_from_editor(value, number, mask_file, (ids or {}).get("ids"))
        if support is not None:
            supports.append(support)
            if mask_file is not None:
                used_files.append(mask_file)
    palette = next((p for p in map(demo_utils.file_palette, used_files) if p is not None), None)
    palette = palette or next((e["palette"] for e in editor_ids if e and e.get("palette")), None)
    return [s[0] for s in supports], [np.asarray(s[1], np.uint8) for s in supports], palette


def _example_set(examples, images, labels, palette):
    """The example set a Segment uses: the session's `examples` when the editors hold the same shots (or none);
    else a new set of the editors' shots that keeps the shots `examples` holds beyond its editors' ones (added from
    corrected results, or opened). Returns (the set, a note for the status line)."""
    if not images:
        if examples is None:
            raise InputError("Add at least one example image (upload it above) and paint the object in it.")
        return examples, ""
    key = demo_utils.support_key(images, labels, _PIPE.config.processing_resolution)
    if examples is not None and examples.key == key:
        return examples, ""
    new = demo_utils.build_set(images, labels, MAX_SHOTS, key, palette, kept=examples)
    if examples is None or not examples.num_kept:
        return new, ""
    kept = demo_utils.count_of(examples.num_kept, "example")
    return new, f" The examples above changed: the set now holds them and still the {kept} added from corrected " \
                "results or opened before."


def _predict_unconfirmed(examples, queries, confirmed: dict, threshold_mode, threshold, sampling=False):
    """The results of `queries` with the example set: predicted, but for those whose `confirmed` labels (by position)
    stay. Returns (demo_utils.Segmentation, status line). The set's support is encoded when it was not yet."""
    positions = [i for i in range(len(queries)) if i not in confirmed]
    predicted = None
    if positions:
        predicted, status = _segment(examples.images, examples.masks, [queries[i] for i in positions],
                                     threshold_mode, threshold, examples.support, examples.multiclass, sampling)
        examples.support = predicted.support
        if confirmed:
            status += f" Kept the confirmed masks of {demo_utils.count_of(len(confirmed), 'image')}."
    else:
        count = demo_utils.count_of(len(queries), "image")
        status = f"Every image has a confirmed mask ({count}): nothing to predict."
        if examples.support is None:
            examples.support, _ = _on_device(demo_utils.encode_set, examples.images, examples.masks,
                                             examples.multiclass)
    ids = (predicted.class_ids if predicted else demo_utils.class_ids_of(examples)) if examples.multiclass else None
    return demo_utils.combine(len(queries), predicted, positions, confirmed, examples.support, ids), status


def _page_segment(session, editor_ids, editors, mask_files, query_items, threshold_mode, threshold, class_names):
    """The Segment button: the editors' examples (see `_example_set`) segment the gallery's images; an image whose
    mask the person confirmed keeps it (and a confirmed image left out of the gallery stays in the results).
    Returns (session, overlays, heatmaps, mask files, status)."""
    session = session or demo_utils.Session()
    examples, note = _example_set(session.examples, *_editor_supports(editor_ids, editors, mask_files))
    queries, names, files = _read_queries(query_items, session=session)
    _check_request(queries, threshold_mode, threshold)
    confirmed = {}
    if session.result is not None:
        queries, names, files, confirmed = session.carry_confirmed(queries, names, files)
    session.result, status = _predict_unconfirmed(examples, queries, confirmed, threshold_mode, threshold,
                                                  session.support_token_sampling)
    ids = session.result.class_ids
    session.examples, session.editing, session.saved = examples, None, False
    session.queries, session.names, session.files = queries, names, files
    session.confirmed = [i in confirmed for i in range(len(queries))]
    session.class_names = demo_utils.parse_class_names(class_names, ids) if ids else {}
    overlays, heatmaps, mask_paths = _views(session, _palette(session))
    status += note
    if ids:
        entries, _ = _classes(session.result, session.class_names, examples.palette)
        status += "\n\n" + demo_utils.legend_markdown(entries, session.result.label_maps)
    return session, overlays, heatmaps, mask_paths, status


@_user_errors
def segment_page(*args):
    """The page's Segment button without a session: editors and mask files (EXAMPLE_TABS each), query gallery,
    threshold mode, threshold, and optionally the class names text. Returns (overlays, heatmaps, mask files, status).

    One class painted (one brush colour, or a one-class mask file): masks. Several brush colours (or a label-map file
    with several ids): one class per colour, label maps, and the legend in the status.
    """
    editors, mask_files = args[:EXAMPLE_TABS], args[EXAMPLE_TABS : 2 * EXAMPLE_TABS]
    query_items, threshold_mode, threshold, *rest = args[2 * EXAMPLE_TABS :]
    return _page_segment(None, None, editors, mask_files, query_items, threshold_mode, threshold,
                         rest[0] if rest else None)[1:]


def _ready(session: demo_utils.Session) -> tuple:
    """The outputs every change of the session gives besides its views: the example set's line, the download button
    (ready), what a reload would lose (the page warns before leaving while it is not empty)."""
    return demo_utils.describe_set(session.examples, MAX_SHOTS), gr.update(interactive=True), session.unsaved()


@_page_event(message=4, count=8)
def run_segment(session, editor_ids, *args):
    """The page's Segment button: `segment_page`'s inputs after the session and the editors' class ids. Returns
    (session, overlays, heatmaps, mask files, status, the example set's line, the download button, unsaved); a
    mistake shows in the status alone."""
    editors, mask_files = args[:EXAMPLE_TABS], args[EXAMPLE_TABS : 2 * EXAMPLE_TABS]
    query_items, threshold_mode, threshold, class_names = args[2 * EXAMPLE_TABS :]
    session, overlays, heatmaps, files, status = _page_segment(
        session, editor_ids, editors, mask_files, query_items, threshold_mode, threshold, class_names
    )
    return (session, overlays, heatmaps, files, status, *_ready(session))


def set_token_sampling(session, value: bool):
    """The support-token sampling checkbox: the session's setting for its next Segment and Add as example."""
    session = session or demo_utils.Session()
    session.support_token_sampling = bool(value)
    return session


@_page_event(message=2, count=4, cleared={1: None})
def download_zip(session):
    """The Download button: the session's zip (`demo_utils.export_zip`), built now from the session's own copies of
    its images. Returns (session, the zip for the page to download, unsaved, status: only a mistake)."""
    if session is None or (session.result is None and session.examples is None):
        raise InputError("Segment some images first: the download holds their masks.")
    path = demo_utils.export_zip(session, _palette(session), demo_utils.output_folder())
    session.saved = True
    return session, str(path), session.unsaved(), gr.skip()


def open_result(session, evt: gr.SelectData):
    """A click on a result opens it for correction (`correct_result`)."""
    return correct_result(session, evt.index if isinstance(evt.index, int) else evt.index[0])


def _correction(session: demo_utils.Session, index: int) -> tuple[dict, str]:
    """Result `index` in the correction editor: (its editor value, its mask as the layer; the note above it)."""
    ids = session.result.class_ids or [1]
    value = demo_utils.editor_value(session.queries[index], session.result.labels(index), ids)
    shot = session.examples.index_of(session.queries[index]) if session.confirmed[index] else None
    state = f" (confirmed: it is {session.examples.names[shot]} of the example set)" if shot is not None else ""
    note = (f"Correcting **{session.names[index]}**{state}: the brush adds, the eraser removes"
            f"{' (one brush colour per class, in the legend order)' if len(ids) > 1 else ''}; "
            "then press **Add as example**.")
    return value, note


@_page_event(message=3, count=4, cleared={1: None})
def correct_result(session, index: int):
    """Result `index`'s image, with its mask (one brush colour per class) as the layer, for the correction editor.
    Returns (session, the editor value to show: see `_show`, None to clear the editor first, a note)."""
    if session is None or session.result is None:
        raise InputError("Segment some images first.")
    session.editing = index
    value, note = _correction(session, index)
    return session, value, None, note


@_page_event(message=10, count=11, cleared={8: None})
def add_example(session, correction, threshold_mode, threshold):
    """Add as example: the corrected result becomes a shot of the session's example set (the cached support grows by
    that shot alone) and a confirmed result; the images not yet confirmed are segmented again with it, and the next
    of them opens for correction (else the editor empties). Returns the outputs of `run_segment`, then the correction
    editor's pending value, the correction editor (cleared), its note; a mistake shows in the note alone."""
    if session is None or session.result is None or session.editing is None:
        raise InputError("Click a result first, correct its mask, then add it as an example.")
    examples, index = session.examples, session.editing
    image, name = session.queries[index], session.names[index]
    shot = examples.index_of(image)
    if shot is not None:
        raise InputError(f"{name} is already in the example set ({examples.names[shot]}): click another result.")
    if examples.num_shots >= MAX_SHOTS:
        raise InputError(f"The example set holds {examples.num_shots} examples, the most it may hold ({MAX_SHOTS}).")
    ids = session.result.class_ids or [1]
    shown, labels = demo_utils.support_from_editor(correction, examples.num_shots + 1, None, ids) or (None, None)
    if shown is None or shown.size != image.size:
        raise InputError("The correction editor does not hold the result's image: click the result again.")
    unknown = sorted(set(demo_utils.class_ids(labels)) - set(ids))
    if examples.multiclass and unknown:
        raise InputError(
            f"The correction paints {len(unknown)} brush colour{'s' if len(unknown) != 1 else ''} beyond the "
            f"{len(ids)} classes of the example set: paint each class in its colour of the legend."
        )
    mask = labels if examples.multiclass else (labels > 0) & (labels < demo_utils.IGNORE)
    others = [i for i in range(len(session.queries)) if i != index and not session.confirmed[i]]
    if others:
        _check_request([session.queries[i] for i in others], threshold_mode, threshold)
    # The session changes only once the model has run: a failure leaves its example set and results as they were.
    support, seconds = _on_device(demo_utils.extend_support, examples.support, image, mask, examples.multiclass)
    again = _on_device(demo_utils.segment, [*examples.images, image], [*examples.masks, mask],
                       [session.queries[i] for i in others], threshold_mode, float(threshold), support,
                       multiclass=examples.multiclass, support_token_sampling=session.support_token_sampling,
                       ) if others else None
    examples.add(image, mask, support, seconds)
    for position, i in enumerate(others):
        session.result.take(i, again, position)
    session.result.confirm(index, labels)
    session.confirmed[index], session.saved = True, False
    overlays, heatmaps, files = _views(session, _palette(session))
    status = (f"Added {name} as example {examples.num_shots} in {seconds:.2f} s; segmented the other "
              f"{demo_utils.count_of(len(others), 'image')} not yet confirmed again with it.")
    session.editing = session.next_to_correct(index)
    value, note = (None, "Every result is confirmed: click one to see it again.")
    if session.editing is not None:
        value, note = _correction(session, session.editing)
    return (session, overlays, heatmaps, files, status, *_ready(session), value, None, note)


@_page_event(message=3, count=6)
def open_saved_set(session, path):
    """Open a saved set: a zip this page downloaded (or any zip of NAME.png + NAME_mask.png pairs) becomes the
    session's example set, encoded once. Returns (session, the example set's line, the class names text, a note,
    the download button, unsaved); a mistake shows in the note alone."""
    if path is None:
        return (gr.skip(),) * 6
    saved = demo_utils.read_saved_set(path)
    examples = demo_utils.build_set(saved.images, saved.labels, MAX_SHOTS, palette=saved.palette,
                                    names=saved.names, opened=Path(path).name)
    examples.support, seconds = _on_device(demo_utils.encode_set, examples.images, examples.masks,
                                           examples.multiclass)
    session = session or demo_utils.Session()
    session.examples = examples
    names = ", ".join(f"{k}: {n}" for k, n in sorted(saved.class_names.items()))
    note = (f"Opened {Path(path).name}: {demo_utils.count_of(examples.num_shots, 'example')}, encoded in "
            f"{seconds:.2f} s. Drop in images and press **Segment**.")
    set_line, download, unsaved = _ready(session)
    return session, set_line, names or gr.skip(), note, download, unsaved


@_user_errors
def check_mask_file(editor_value, path, number: int):
    """Checks an uploaded mask file against its example image. Returns its uint8 label map [H, W] (None without a
    file)."""
    if path is None:
        return None
    if not editor_value or editor_value.get("background") is None:
        raise InputError(f"Upload example image {number} first, then its mask.")
    height, width = np.asarray(editor_value["background"]).shape[:2]
    labels = demo_utils.read_label_map(path, (width, height), f"The mask file of example {number}")
    ids = demo_utils.class_ids(labels)
    if not ids:
        raise InputError(f"The mask file of example {number} is empty: the object must be white (or painted).")
    area = 100 * ((labels > 0) & (labels < demo_utils.IGNORE)).mean()
    classes = f", {len(ids)} classes: ids {', '.join(map(str, ids))}" if len(ids) > 1 else ""
    gr.Info(f"Example {number}: mask loaded ({area:.1f}% of the image{classes}); edit it with the brush and eraser.")
    return labels


def load_mask_file(editor_value, path, editor_ids, number: int):
    """A mask file uploaded for an example: it becomes the editor's painted layer (one brush colour per class), to be
    edited like strokes. Returns (pending editor value, cleared editor, cleared file, editor class ids). A mistake is
    one warning, and the tab stays as it was."""
    try:
        labels = check_mask_file(editor_value, path, number)
    except gr.Error as error:
        gr.Warning(error.message)
        labels = None
    if labels is None:
        return None, gr.skip(), gr.skip(), gr.skip()
    ids = demo_utils.class_ids(labels)
    editor_ids = list(editor_ids or [None] * EXAMPLE_TABS)
    editor_ids[number - 1] = {"ids": ids, "palette": demo_utils.file_palette(path)}
    return demo_utils.editor_value(demo_utils.editor_image(editor_value), labels, ids), None, None, editor_ids


def _examples() -> list[dict]:
    """The example sets of examples/: per folder its name, example images with painted layers, images to segment."""
    sets = []
    for folder in sorted(p for p in EXAMPLES_DIR.iterdir() if p.is_dir()) if EXAMPLES_DIR.is_dir() else []:
        supports = sorted(folder.glob("support_[0-9].png"))[:EXAMPLE_TABS]
        queries = [str(p) for p in sorted(folder.glob("query_*.png"))]
        if supports and queries:
            sets.append({"name": folder.name, "supports": supports, "queries": queries})
    return sets


def _example_values(example: dict) -> list:
    """The editor values of an example set: each example image with its mask (`<name>_mask.png`) as the layer."""
    values = []
    for support in example["supports"]:
        image = demo_utils.open_image(support, support.name)
        mask = demo_utils.read_mask(support.with_name(f"{support.stem}_mask.png"), image.size, f"{support.stem} mask")
        values.append(demo_utils.editor_value(image, mask))
    return values + [None] * (EXAMPLE_TABS - len(values))


def _show(pending):
    """The second step of showing values in editors: the editors were cleared by the first step (so each places its
    layer over its image, see `demo_utils.editor_value`), now they get `pending` (None: they stay as they are)."""
    return gr.skip() if pending is None else pending


def _file_endpoint(fn, api_name: str, defaults: dict, extra_inputs: list[tuple], outputs: list[tuple]) -> None:
    """A hidden API endpoint that takes files: (support_images, support_masks, queries, *extra_inputs, threshold_mode,
    threshold) -> outputs. `outputs` are (kind, name) pairs, kind "files", "text" or "json"; `extra_inputs` are
    (kind, name, default value) triples. The session's support cache is a gr.State."""
    kinds = {"files": functools.partial(gr.File, file_count="multiple"), "text": gr.Textbox, "json": gr.JSON}
    with gr.Column(visible=False):
        cache = gr.State(None, time_to_live=SESSION_TTL_S)
        inputs = [kinds["files"](label=name) for name in ("support_images", "support_masks", "queries")]
        inputs += [kinds[kind](label=name, value=value) for kind, name, value in extra_inputs]
        inputs += [
            gr.Radio(THRESHOLD_MODES, value=defaults["mode"], label="threshold_mode"),
            gr.Number(value=defaults["threshold"], label="threshold", minimum=0, maximum=1),
        ]
        components = [kinds[kind](label=name) for kind, name in outputs]
        button = gr.Button()

    button.click(fn, [cache, *inputs], [cache, *components], api_name=api_name, concurrency_limit=1,
                 concurrency_id="gpu")
    _OUTPUTS[api_name] = components


@_user_errors
def segment(cache, support_images, support_masks, queries, threshold_mode, threshold):
    """Segments each query image: finds the object marked in the support images' masks.

    Args:
        support_images: 1 to MAX_SHOTS (10) example image files.
        support_masks: one mask file per example image, same size (white object on black, or alpha >= 128).
        queries: 1 to 16 image files to segment.
        threshold_mode: "relative" (probability > threshold x the image's maximum) or "absolute".
        threshold: in [0, 1].

    Returns:
        mask PNG files (L, 0/255, each at its query's size), probability PNG files (L, 0..255), a status line.
        (The session's support cache comes first, in and out: a gr.State, not part of the API.)
    """
    cache = cache or demo_utils.SupportCache()
    images, masks = _read_support_files(support_images, support_masks, demo_utils.read_mask)
    queries, names, _ = _read_queries(queries, "Query")
    result, status = _cached_segment(cache, images, masks, queries, threshold_mode, threshold, False)
    mask_files, probability_files = demo_utils.save_results(names, result.masks, result.probabilities,
                                                            demo_utils.output_folder())
    return cache, mask_files, probability_files, status


@_user_errors
def segment_classes(cache, support_images, support_masks, queries, class_names, threshold_mode, threshold):
    """Segments every class of the support label maps in each query image, in one call.

    Args:
        support_images: 1 to MAX_SHOTS (10) example image files.
        support_masks: one label map per example image, same size: a palette PNG or a grey PNG of class ids
            (0 = background, 1..254 = classes, 255 = ignored); a class may be missing from some examples. A plain
            mask (white on black, or alpha >= 128) is class 1.
        queries: 1 to 16 image files to segment.
        class_names: optional, "road, car" (ids 1, 2, ...) or "1: road, 8: car".
        threshold_mode: "relative" (per class: probability > threshold x its maximum) or "absolute".
        threshold: in [0, 1].

    Returns:
        label map PNG files (mode P, one per query at its size: 0 = background, k = class k; the palette of the first
        palette mask, else the legend's colours), class probability PNG files grouped per query (a list per query,
        one L PNG (0..255) per class in the legend's order), the legend (a list of {"id", "name", "color"}), a plain
        text status line. (The session's support cache comes first, in and out: a gr.State, not part of the API.)
    """
    cache = cache or demo_utils.SupportCache()
    images, labels = _read_support_files(support_images, support_masks, demo_utils.read_label_map)
    palette = next((p for p in map(demo_utils.file_palette, support_masks or []) if p is not None), None)
    queries, names, _ = _read_queries(queries, "Query")
    result, status = _cached_segment(cache, images, labels, queries, threshold_mode, threshold, True)
    entries, out_palette = _classes(result, demo_utils.parse_class_names(class_names, result.class_ids), palette)
    label_files, probability_files = demo_utils.save_label_maps(
        names, result.label_maps, result.class_probabilities, result.class_ids, out_palette,
        demo_utils.output_folder(),
    )
    block = _OUTPUTS["segment_classes"][1]  # files inside JSON are served once they are in the output's cache
    probability_files = [
        [{"path": gr.processing_utils.move_resource_to_block_cache(p, block), "orig_name": Path(p).name,
          "meta": {"_type": "gradio.FileData"}} for p in group]
        for group in probability_files
    ]
    status += " " + demo_utils.legend_text(entries, result.label_maps)
    return cache, label_files, probability_files, entries, status


def model_line(pipe, model: str | None = None) -> str:
    """The header's line on the model: its name (`model`, else its folder's name) and its design in one line."""
    name = model or Path(pipe.name_or_path or "DiffewS").name
    return f"Model: **{name}**, design: {pipe.design.describe()}."


def build_demo(pipe, model: str | None = None) -> gr.Blocks:
    """The page and its endpoints, around a loaded pipeline (`model`: its name on the page, see `model_line`)."""
    global _PIPE
    _PIPE = pipe
    defaults = {"mode": pipe.config.threshold_mode, "threshold": float(pipe.config.threshold)}
    brush_colors = [(color, demo_utils.BRUSH_OPACITY) for color in demo_utils.CLASS_COLORS]

    def image_editor(label: str, elem_id: str, sources=("upload", "clipboard")) -> gr.ImageEditor:
        return gr.ImageEditor(
            label=label,
            type="numpy",
            image_mode="RGBA",
            format="png",
            sources=sources,
            brush=gr.Brush(colors=brush_colors, default_color=brush_colors[0], color_mode="fixed"),
            eraser=gr.Eraser(),
            layers=False,
            transforms=(),
            height=460,
            canvas_size=demo_utils.EDITOR_CANVAS,
            elem_id=elem_id,
        )

    with gr.Blocks(title="DiffewS: few-shot segmentation", delete_cache=(3600, 3600)) as demo:
        session = gr.State(None, time_to_live=SESSION_TTL_S)
        editor_ids = gr.State(None, time_to_live=SESSION_TTL_S)  # per editor: the class ids of a loaded mask file
        pending = gr.State(None, time_to_live=SESSION_TTL_S)  # editor values on their way (see `_show`)
        gr.Markdown(
            "# DiffewS: segment anything you can show\n"
            "Upload an **example image** and paint the object with the brush (or upload its mask). "
            "Add more examples in the other tabs if you like, then drop in the **images to segment**. "
            "DiffewS (NeurIPS 2024) finds the same kind of object in each of them.\n\n"
            "**Correct and teach:** click a result to open it with its mask, fix it with the brush and eraser, and "
            "press **Add as example**: it joins your example set, stays that image's mask, and the images not yet "
            "confirmed are segmented again. **Download** takes every mask, the example set and a COCO file home; "
            "**open** that zip later to go on with the same example set.\n\n"
            "**Several kinds at once:** paint each kind of object in its own brush colour (one colour = one class; "
            "pick it in the brush's palette), or upload a palette mask. Each class gets its colour in the result, "
            "with a legend; name the classes below if you like.\n\n" + model_line(pipe, model)
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                editors, mask_files = [], []
                with gr.Tabs():
                    for i in range(1, EXAMPLE_TABS + 1):
                        with gr.Tab(f"Example {i}"):
                            editor = image_editor(f"Example {i}: paint the object (one brush colour per class)",
                                                  f"support-{i}")
                            with gr.Accordion("…or upload its mask", open=False):
                                mask_file = gr.File(
                                    label="Mask image (white object on black, transparent with the object painted, "
                                          "or a palette PNG with one index per class): it appears above as the "
                                          "painted layer",
                                    file_types=["image"],
                                    elem_id=f"support-mask-{i}",
                                )
                            editors.append(editor)
                            mask_files.append(mask_file)
            with gr.Column(scale=2):
                queries = gr.Gallery(label="Images to segment", type="filepath", file_types=["image"], columns=3,
                                     height=300, object_fit="contain", interactive=True, elem_id="queries")
                with gr.Row():
                    mode = gr.Radio(THRESHOLD_MODES, value=defaults["mode"], label="Threshold mode",
                                    info="relative: × each image's highest score")
                    threshold = gr.Slider(0.0, 1.0, value=defaults["threshold"], step=0.01, label="Threshold")
                sampling = gr.Checkbox(
                    False, label="Sample the examples' tokens (several examples: each layer reads as many support "
                                 "tokens as one example has; seeded)", elem_id="token-sampling",
                )
                class_names = gr.Textbox(
                    label="Class names (optional, for several brush colours)",
                    placeholder="road, car, person  (one per brush colour, in the palette's order; "
                                "or 1: road, 8: car)",
                    elem_id="class-names",
                )
                button = gr.Button("Segment", variant="primary", elem_id="segment-button")
                status = gr.Markdown(elem_id="status")
                example_set = gr.Markdown(demo_utils.describe_set(None, MAX_SHOTS), elem_id="example-set")
                with gr.Row():
                    download = gr.Button("Download masks, examples and COCO (zip)", interactive=False,
                                         elem_id="download")
                    open_set = gr.File(label="Open a saved set (a zip this page downloaded)", file_types=[".zip"],
                                       height=90, elem_id="open-set")
                open_note = gr.Markdown(elem_id="open-set-note")
                download_file = gr.File(visible="hidden", elem_id="download-file")
                unsaved = gr.Textbox(visible="hidden", elem_id="unsaved")  # not empty: warn before leaving the page
        sets = _examples()
        if sets:
            dataset = gr.Dataset(
                components=[gr.Image(render=False), gr.Textbox(render=False)],
                samples=[[str(s["supports"][0]), f"{s['name']}: {len(s['supports'])} example, "
                          f"{len(s['queries'])} images to segment"] for s in sets],
                label="Examples (synthetic scenes, CC0): click one to load it", type="index", elem_id="examples",
            )
        with gr.Row(equal_height=False):
            overlays = gr.Gallery(label="Result (click one to correct it)", columns=2, height=420, format="png",
                                  object_fit="contain", allow_preview=False, elem_id="overlays")
            with gr.Column():
                heatmaps = gr.Gallery(label="Probability", columns=2, height=380, format="png", object_fit="contain",
                                      elem_id="probabilities")
                gr.HTML(demo_utils.color_scale_html(), elem_id="color-scale")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                correction = image_editor("Correct the result: brush adds, eraser removes", "correction", sources=())
            with gr.Column(scale=2):
                correction_note = gr.Markdown("Click a result above to correct it here.", elem_id="correction-note")
                add_button = gr.Button("Add as example", variant="primary", elem_id="add-example")
        results = gr.File(label="Masks (PNG, each at its image's size)", file_count="multiple", elem_id="mask-files")

        # Showing values in editors: clear them first (the first event), then give the values (`_show`).
        for number, (editor, mask_file) in enumerate(zip(editors, mask_files), 1):
            mask_file.upload(
                functools.partial(load_mask_file, number=number), [editor, mask_file, editor_ids],
                [pending, editor, mask_file, editor_ids], api_visibility="private",
            ).then(_show, pending, editor, api_visibility="private")
            editor.upload(lambda ids, n=number: _forget_ids(ids, n), editor_ids, editor_ids, api_visibility="private")
            editor.clear(lambda ids, n=number: _forget_ids(ids, n), editor_ids, editor_ids, api_visibility="private")
        if sets:
            def load_example(index):
                example = sets[index]
                return ([*_example_values(example)], *[None] * (2 * EXAMPLE_TABS), example["queries"],
                        defaults["mode"], defaults["threshold"], "", None)

            dataset.click(
                load_example, dataset,
                [pending, *editors, *mask_files, queries, mode, threshold, class_names, editor_ids],
                api_visibility="private",
            ).then(lambda values: values, pending, editors, api_visibility="private")

        page_outputs = [session, overlays, heatmaps, results, status, example_set, download, unsaved]
        sampling.change(set_token_sampling, [session, sampling], session, api_visibility="private")
        button.click(
            run_segment,
            [session, editor_ids, *editors, *mask_files, queries, mode, threshold, class_names],
            page_outputs,
            api_visibility="private",
            concurrency_limit=1,
            concurrency_id="gpu",
        )
        overlays.select(open_result, session, [session, pending, correction, correction_note],
                        api_visibility="private").then(_show, pending, correction, api_visibility="private")
        add_button.click(add_example, [session, correction, mode, threshold],
                         [*page_outputs, pending, correction, correction_note], api_visibility="private",
                         concurrency_limit=1, concurrency_id="gpu").then(_show, pending, correction,
                                                                         api_visibility="private")
        download.click(download_zip, session, [session, download_file, unsaved, status], api_visibility="private",
                       ).then(None, download_file, None, js=DOWNLOAD_JS)
        open_set.upload(open_saved_set, [session, open_set], [session, example_set, class_names, open_note, download,
                                                              unsaved],
                        api_visibility="private", concurrency_limit=1, concurrency_id="gpu")

        _file_endpoint(segment, "segment", defaults, [],
                       [("files", "masks"), ("files", "probabilities"), ("text", "status")])
        _file_endpoint(segment_classes, "segment_classes", defaults, [("text", "class_names", "")],
                       [("files", "label_maps"), ("json", "class_probabilities"), ("json", "legend"),
                        ("text", "status")])

    demo.queue(max_size=32, default_concurrency_limit=1)
    return demo


def _forget_ids(editor_ids, number: int):
    """An editor got a new image or was cleared: its strokes' colours are classes 1, 2, ... again."""
    editor_ids = list(editor_ids or [None] * EXAMPLE_TABS)
    editor_ids[number - 1] = None
    return editor_ids


def launch(demo: gr.Blocks, **kwargs):
    """`demo.launch` with the page's theme, CSS and script (`PAGE_JS`)."""
    return demo.launch(theme=gr.themes.Soft(), css=CSS, js=PAGE_JS, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DiffewS few-shot segmentation demo.")
    parser.add_argument("--model", default=os.environ.get(MODEL_ENV) or DEFAULT_MODEL_ID,
                        help=f"official name ({official_names()}: downloaded and converted the first time), saved "
                             f"pipeline folder or Hub repo id (default: ${MODEL_ENV}, else {DEFAULT_MODEL_ID})")
    parser.add_argument("--port", type=int, default=None, help="server port (default: Gradio's, 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = "cuda" if _cuda() else "cpu"
    try:
        pipe = load_pipeline(args.model, device=device)
    except Exception as error:  # noqa: BLE001 - any failure to load ends the program with one line
        sys.exit(load_failure(args.model, error))
    launch(build_demo(pipe, args.model), server_port=args.port, share=args.share)


def load_failure(model: str, error: Exception) -> str:
    """The one line that ends the program when `model` cannot be loaded: ModelNotFoundError's message as it is (it
    names the value and why), another error's type and first sentence."""
    message = (str(error).strip().splitlines() or [""])[0]
    names = "an official name"
    if isinstance(error, ModelNotFoundError):
        reason = message.removeprefix(f"{model}: ").rstrip(".")
    else:
        reason = f"{type(error).__name__}: {message.split('. ')[0].rstrip('.')}"
        reason = reason if len(reason) <= 200 else reason[:199] + "…"
        names += f" ({official_names()})"
    return (f"Could not load the DiffewS model {model!r}: {reason}. Pass --model with {names}, a saved pipeline "
            f"folder or a Hub repo id, or set {MODEL_ENV}.")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
