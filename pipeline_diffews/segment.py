"""`diffews segment`: segment every image of a folder, glob or video with one set of examples.

    diffews segment --model incontext --support cat.jpg --support-mask cat.png --input photos/ --output masks/
    diffews segment --model incontext --support-dir examples/ --input photos/ --output masks/ --format coco
    diffews segment --model incontext --support-dir examples/ --input photos/ --output masks/ --format yolo

Several classes at once: a label map as `--support-mask` (a palette PNG, or a grayscale PNG of class ids below 128;
0 = background, 255 = ignored) gives per image an index PNG with the support's palette, and OUTPUT/classes.json maps
each id to its name (`--classes road,car,person`) and colour. `--format` adds the annotations of the still images
(`formats.annotation_files`): `coco` OUTPUT/annotations.json (RLE masks), `coco-polygons`
OUTPUT/annotations_polygons.json (polygons), `yolo` a YOLO segmentation dataset in OUTPUT/yolo/ (data.yaml, labels/,
and images/ holding the inputs, hard-linked where the file system allows, else copied).

The supports are encoded once; the queries run in batches. With `accelerate launch -m pipeline_diffews segment ...`
the batches are dealt out to the processes in turn, so every image is in the same batch as in a one-process run and
the outputs are the same.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .coco import category_name
from .formats import ANNOTATION_FORMATS, annotation_files
from .formats import check_available as check_format_available
from .image_processor_diffews import DiffewSImageProcessor, load_mask, read_support_set
from .inputs import InputError, VideoFrameReader, discover, find_support_pairs, iter_video_frames, read_image
from .official import ModelNotFoundError, load_pipeline, official_names, resolve_model
from .outputs import OutputConflictError, VideoJob, WorkItem, make_plan
from .writers import (link_or_copy, mask_to_image, overlay, overlay_classes, save_json, save_png, write_bytes,
                      write_video)
from .yolo import IMAGES_FOLDER

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CLASSES_FILE = "classes.json"
YOLO_FOLDER = "yolo"  # OUTPUT/yolo/: the YOLO dataset of --format yolo
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME_DIR_OR_REPO",
                        help=f"an official model ({official_names()}: downloaded and converted the first time), a "
                             "saved DiffewS pipeline folder, or a Hub repository id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--support", action="append", default=[], metavar="IMAGE",
                        help="an example image; repeat for several shots, each followed by its --support-mask")
    parser.add_argument("--support-mask", action="append", default=[], metavar="MASK",
                        help="the mask of the object in the preceding --support (white/alpha/non-zero = object), or a "
                             "label map of class ids (0 = background, 255 = ignored): a palette PNG, or a grayscale "
                             "PNG whose ids are below 128, with several ids or an id other than 1")
    parser.add_argument("--support-dir", default=None, metavar="DIR",
                        help="a folder of examples as the demo exports them: NAME.png + NAME_mask.png pairs (any "
                             "number, any image extensions); its shots come before those of --support")
    parser.add_argument("--multiclass", action="store_true",
                        help="read every mask as a label map of class ids, even one the rule above reads as a binary "
                             "mask (a single class 1, or ids from 128 on)")
    parser.add_argument("--classes", type=_class_names, default=None, metavar="NAMES",
                        help="names of the classes, for OUTPUT/classes.json and the annotations of --format: "
                             "'road,car,person' names ids 1, 2, 3; '2=car,7=person' names chosen ids; with binary "
                             "masks one name, the object's")
    parser.add_argument("--format", choices=("png", *ANNOTATION_FORMATS), default="png",
                        help="png: a mask PNG per image (default). Also the still images' annotations (video frames "
                             "are not listed): coco: OUTPUT/annotations.json, a COCO dataset (RLE masks, one "
                             "annotation per image and class); coco-polygons: OUTPUT/annotations_polygons.json, the "
                             "same as polygons (one per piece, holes joined by zero-width cuts); yolo: OUTPUT/yolo/, a "
                             "YOLO segmentation dataset (data.yaml, images/, labels/ with one line per piece)")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="image(s), video(s), folder(s) (searched recursively) or quoted glob pattern(s)")
    parser.add_argument("--output", required=True, help="output folder; masks mirror the inputs' relative paths")
    parser.add_argument("--overlay", action="store_true",
                        help="also write overlays (OUTPUT/overlays/...; for a video, an overlay video)")
    parser.add_argument("--batch-size", type=_positive_int, default=4, help="queries per UNet call (default 4)")
    parser.add_argument("--resume", action="store_true", help="skip inputs whose outputs already exist")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights' dtype (default float32; float16 or bfloat16 are faster on GPUs)")
    parser.add_argument("--device", type=_device_name, default=None,
                        help="cpu, cuda, cuda:1, mps... (default: each process's Accelerate device, else cpu)")
    parser.add_argument("--threshold", type=_fraction, default=None,
                        help="in [0, 1] (default: the model's, its config's `threshold`; the run's first line says "
                             "the value used)")
    parser.add_argument("--threshold-mode", choices=("relative", "absolute"), default=None,
                        help="relative: probability > threshold x the image's maximum; absolute: probability > "
                             "threshold (default: the model's, its config's `threshold_mode`)")
    parser.add_argument("--processing-resolution", type=_positive_int, default=None,
                        help="square size the model sees (default: the model's, its config's "
                             "`processing_resolution`)")
    parser.add_argument("--support-token-sampling", action="store_true",
                        help="sample the examples' keys/values of each layer down to one example's token count (the "
                             "paper's inference with more examples than training had; random, seeded by --seed)")
    parser.add_argument("--num-inference-steps", type=_positive_int, default=None,
                        help="steps of a multi-step model (mi2m, mn2m designs; default: the model's)")
    parser.add_argument("--ensemble-size", type=_positive_int, default=None,
                        help="mn2m design: predictions per image, combined (default: the model's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of --support-token-sampling and of a noise-to-mask model's noise (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _device_name(text: str) -> str:
    try:
        torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from error
    return text


def _class_names(text: str) -> dict[int, str]:
    """`road,car` -> {1: "road", 2: "car"}; `2=car,7=person` -> {2: "car", 7: "person"}."""
    entries = [entry.strip() for entry in text.split(",")]
    if any("=" in entry for entry in entries):
        names = {}
        for entry in entries:
            key, _, name = entry.partition("=")
            if not key.strip().isdigit() or not 1 <= int(key) <= 254:
                raise argparse.ArgumentTypeError(f"{entry!r}: expected ID=NAME with an id in 1..254")
            names[int(key)] = name.strip()
    else:
        names = dict(enumerate(entries, start=1))
    if not all(names.values()) or len(names) > 254:
        raise argparse.ArgumentTypeError(f"expected 1 to 254 non-empty names separated by commas, got {text!r}")
    return names


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def prepare_support(pipe, images: list, masks: list, args: argparse.Namespace) -> tuple:
    """The support every batch reads: (its classes, the call's support arguments, the processing resolution).

    Encoded once (`encode_support`), or, for a design whose support side depends on the query (`qkv_fusion`), read
    and checked once (`read_support_set`) and passed with every batch.
    """
    multiclass = True if args.multiclass else None
    if pipe.design.cacheable:
        support = pipe.encode_support(images, masks, processing_resolution=args.processing_resolution,
                                      multiclass=multiclass, batch_size=args.batch_size)
        return support, {"support": support}, support.processing_resolution
    support_set = read_support_set(images, masks, multiclass)
    resolution = args.processing_resolution or pipe.config.processing_resolution
    return support_set, {"support_images": images, "support_masks": masks, "multiclass": multiclass}, resolution


@dataclass
class Counts:
    """What one process did. `written_videos`: relative paths of videos that got new mask frames."""

    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    written_videos: set[str] = field(default_factory=set)


def run(args: argparse.Namespace) -> int:
    """Runs `diffews segment`. Returns the exit code: 0, 1 when some inputs failed, 2 for a usage error."""
    from accelerate import PartialState

    state = PartialState(cpu=_wants_cpu(args.device))
    device = _device(args.device, state)
    say = print if state.is_main_process else _silent

    # 1. Inputs and outputs (every process makes the same plan)
    try:
        pairs = support_pairs(args.support, args.support_mask, args.support_dir)
        support_images = [_read_support(image, "--support", read_image) for image, _ in pairs]
        support_masks = [_read_support(mask, "--support-mask", load_mask) for _, mask in pairs]
        sources = []
        for path in args.input:
            sources += discover(path, exclude=args.output)
        plan = make_plan(sources, args.output, args.overlay)
        if args.format != "png":
            check_format_available([args.format])
    except (InputError, OutputConflictError, ImportError) as error:
        return _usage_error(state, error)

    counts = Counts(failures=list(plan.failures) if state.is_main_process else [])
    pending = [item for item in plan.items if not (args.resume and item.is_done())]
    if state.is_main_process:
        counts.skipped = len(plan.items) - len(pending)
    state.wait_for_everyone()  # every process has looked at the outputs before any is written

    # 2. The model and the support cache (one support pass)
    start = time.perf_counter()
    load_error = None
    with state.main_process_first():  # an official model is downloaded once, a Hub repository fetched once
        try:
            model = resolve_model(args.model)
            pipe = load_pipeline(model, DTYPES[args.dtype], device, args.revision)
        except ModelNotFoundError as error:  # one line that names the value
            load_error = InputError(f"--model {error}")
        except Exception as error:  # noqa: BLE001 - a missing client, a broken config, a failed download...
            load_error = InputError(f"--model {args.model}: cannot load it ({type(error).__name__}: {error}).")
    if load_error is not None:
        return _usage_error(state, load_error)
    try:
        support, support_call, resolution = prepare_support(pipe, support_images, support_masks, args)
        rendering = Rendering.of(support, pipe)
        categories = class_categories(support, args.classes)
        if rendering.palette is not None and state.is_main_process:
            save_json(class_table(support, rendering.palette, args.classes), Path(args.output) / CLASSES_FILE)
    except (ValueError, TypeError) as error:
        return _usage_error(state, name_support_files(error, pairs))
    call = {**support_call, "processing_resolution": resolution, "threshold": args.threshold,
            "threshold_mode": args.threshold_mode, "output_type": "np", **sampling_options(args, pipe)}
    classes = f", {len(support.class_ids)} class(es)" if support.class_ids is not None else ""
    threshold = pipe.config.threshold if args.threshold is None else args.threshold
    say(f"Model {model} on {device} ({args.dtype}), {len(support_images)} shot(s){classes}, "
        f"{len(plan.items)} image(s) to segment, {len(pending)} pending, {state.num_processes} process(es); "
        f"threshold {threshold:g} ({args.threshold_mode or pipe.config.threshold_mode}), processing resolution "
        f"{resolution}.")

    # 3. Queries: batches dealt out to the processes in turn
    batches = [pending[i : i + args.batch_size] for i in range(0, len(pending), args.batch_size)]
    mine = batches[state.process_index :: state.num_processes]
    work_start = time.perf_counter()
    _segment_batches(pipe, call, mine, counts, args.overlay, rendering,
                     show_progress=state.is_main_process and not args.no_progress)
    state.wait_for_everyone()
    work_seconds = time.perf_counter() - work_start

    # 4. Videos: each process assembles its share once all frames are written
    totals = _gather(state, counts)
    for video in plan.videos[state.process_index :: state.num_processes]:
        _finish_video(video, totals, args.resume, counts, rendering)
    totals = _gather(state, counts)
    if args.format != "png" and state.is_main_process:
        _write_annotations(plan.items, rendering, categories, Path(args.output), args.format, totals)

    say(_summary(totals, work_seconds, time.perf_counter() - start, state.num_processes))
    if state.is_main_process and totals.failures:
        print(f"{len(totals.failures)} input(s) failed:", file=sys.stderr)
        for name, reason in totals.failures:
            print(f"  {name}: {reason}", file=sys.stderr)
    return EXIT_SOME_FAILED if totals.failures else EXIT_OK


def sampling_options(args: argparse.Namespace, pipe) -> dict:
    """The pipeline arguments of --support-token-sampling, --num-inference-steps and --ensemble-size (those given),
    with a generator seeded by --seed when any is given or the model generates in several steps (also used by
    `train/evaluate.py`, whose options have the same names)."""
    options = {"num_inference_steps": args.num_inference_steps, "ensemble_size": args.ensemble_size}
    options = {k: v for k, v in options.items() if v is not None}
    if args.support_token_sampling:
        options["support_token_sampling"] = True
    if options or getattr(getattr(pipe, "design", None), "generation", "oi2m") != "oi2m":
        options["generator"] = torch.Generator().manual_seed(args.seed)
    return options


def _silent(*args, **kwargs) -> None:
    pass


def _usage_error(state, error: Exception) -> int:
    if state.is_main_process:
        print(f"error: {error}", file=sys.stderr)
    return EXIT_USAGE


def _wants_cpu(device: str | None) -> bool:
    """Accelerate only starts CPU processes as a group (gloo) when asked for the CPU."""
    if device is not None:
        return torch.device(device).type == "cpu"
    return not torch.cuda.is_available()


def _device(device: str | None, state) -> torch.device:
    if device is None:
        return state.device
    requested = torch.device(device)
    if requested.type == state.device.type and requested.index is None:
        return state.device  # "cuda" under accelerate launch: each process its own GPU
    return requested


def support_pairs(images: list[str], masks: list[str], folder: str | None) -> list[tuple[str | Path, str | Path]]:
    """The shots as (image path, mask path): those of `--support-dir` (`find_support_pairs`), then the --support /
    --support-mask pairs. Raises InputError when the counts differ or there is no shot."""
    if len(images) != len(masks):
        raise InputError(
            f"Got {len(images)} --support but {len(masks)} --support-mask: give one mask per support image."
        )
    pairs = list(find_support_pairs(folder)) if folder is not None else []
    pairs += zip(images, masks)
    if not pairs:
        raise InputError("No examples: give --support IMAGE --support-mask MASK (repeatable) or --support-dir DIR.")
    return pairs


def name_support_files(error: Exception, pairs: list[tuple[str | Path, str | Path]]) -> Exception:
    """The error with the pipeline's names of the shots (`support_images[k]`, `support_masks[k]`, in backquotes or
    not) replaced by their files, as `support_pairs` lists them: `examples/cat_mask.png is all background: ...`."""

    def file_name(match: re.Match) -> str:
        index = int(match.group(2))
        if index >= len(pairs):
            return match.group(0)
        return str(pairs[index][0 if match.group(1) == "images" else 1])

    message = re.sub(r"`?support_(images|masks)\[(\d+)\]`?", file_name, str(error))
    return error if message == str(error) else type(error)(message)


def _read_support(path: str, argument: str, reader):
    try:
        return reader(path)
    except Exception as error:
        raise InputError(f"{argument} {path}: cannot read it ({type(error).__name__}: {error}).") from error


@dataclass(frozen=True)
class Rendering:
    """How results become files: binary masks (`palette` None) or label maps as index PNGs with `palette`."""

    palette: list[int] | None = None

    @classmethod
    def of(cls, support, pipe) -> Rendering:
        """Label maps for a multi-class support (its palette, else the pipeline's default one); else binary masks."""
        if support.class_ids is None:
            return cls()
        return cls(support.palette or pipe.image_processor.default_palette())

    def results(self, output) -> list[np.ndarray]:
        """A pipeline output's per-query results: bool masks [H, W] or uint8 label maps [H, W]."""
        return output.masks if self.palette is None else output.label_maps

    def mask_image(self, result: np.ndarray) -> PIL.Image.Image:
        if self.palette is None:
            return mask_to_image(result)
        return DiffewSImageProcessor.label_map_to_image(result, self.palette)

    def overlay_image(self, image: PIL.Image.Image, result: np.ndarray) -> PIL.Image.Image:
        return overlay(image, result) if self.palette is None else overlay_classes(image, result, self.palette)

    def read(self, path: Path) -> np.ndarray:
        """A mask PNG written by this command -> its result (bool [H, W], or the class ids uint8 [H, W])."""
        with PIL.Image.open(path) as mask:
            return np.asarray(mask.convert("L")) >= 128 if self.palette is None else np.asarray(mask)


def class_categories(support, names: dict[int, str] | None) -> list[tuple[int, str]]:
    """(class id, name) of each class the results hold, for COCO: a multi-class support's ids named by `--classes`,
    the support's own names, else `class_ID`; for binary masks class 1, named by `--classes` or `object`."""
    if support.class_ids is None:
        if names is not None and set(names) != {1}:
            raise ValueError(
                f"--classes names {len(names)} class(es) but the support masks are binary (one object): give one "
                "name, or label maps with class ids."
            )
        return [(1, category_name(1, (names or {}).get(1), multiclass=False))]
    given = dict(zip(support.class_ids, support.class_names or []))
    return [(c, category_name(c, (names or given).get(c), multiclass=True)) for c in support.class_ids]


def _write_annotations(items: list[WorkItem], rendering: Rendering, categories: list[tuple[int, str]], output: Path,
                       annotation_format: str, totals: Counts) -> None:
    """The annotations of `--format` from the masks written (still images only), read back so that they say what the
    masks say: OUTPUT/annotations.json, OUTPUT/annotations_polygons.json, or OUTPUT/yolo/ with the images beside."""
    done = [item for item in items if item.frame is None and item.mask_path.exists()]
    entries = [(item.source.relative.as_posix(), rendering.read(item.mask_path).astype(np.uint8)) for item in done]
    root = output / YOLO_FOLDER if annotation_format == "yolo" else output
    path = root
    try:
        for relative, content in annotation_files(entries, categories, [annotation_format]).items():
            path = root / relative
            write_bytes(content, path)
        if annotation_format == "yolo":
            for item in done:
                path = root / IMAGES_FOLDER / item.source.relative
                link_or_copy(item.source.path, path)
    except Exception as error:  # noqa: BLE001 - a missing library or a disk error: reported like a failed output
        totals.failures.append((path.relative_to(output).as_posix() or ".",
                                f"cannot write it: {type(error).__name__}: {error}"))


def class_table(support, palette: list[int], names: dict[int, str] | None) -> dict:
    """The contents of OUTPUT/classes.json: {"0": background, "id": {"name", "color": [r, g, b]}} for each class."""
    given = dict(zip(support.class_ids, support.class_names or []))
    if names is not None:
        unnamed = [c for c in support.class_ids if c not in names]
        if unnamed:
            raise ValueError(
                f"--classes names no class {unnamed[0]}: the support label maps hold classes {support.class_ids}."
            )
        given = names
    table = {"0": {"name": "background", "color": palette[0:3]}}
    for class_id in support.class_ids:
        table[str(class_id)] = {"name": given.get(class_id), "color": palette[3 * class_id : 3 * class_id + 3]}
    return table


def _segment_batches(pipe, call: dict, batches: list[list[WorkItem]], counts: Counts, with_overlay: bool,
                     rendering: Rendering, show_progress: bool) -> None:
    """Reads batch k + 1 on a thread while batch k runs, and writes the PNGs on two more threads."""
    from tqdm.auto import tqdm

    reader = _BatchReader()
    progress = tqdm(total=sum(len(b) for b in batches), unit="img", desc="segment", disable=not show_progress,
                    dynamic_ncols=True)
    writes: list[tuple[WorkItem, Future]] = []
    with ThreadPoolExecutor(1) as loader, ThreadPoolExecutor(2) as writer:
        upcoming = loader.submit(reader.read, batches[0]) if batches else None
        for index in range(len(batches)):
            loaded, failures = upcoming.result()
            upcoming = loader.submit(reader.read, batches[index + 1]) if index + 1 < len(batches) else None
            counts.failures += failures
            if loaded:
                output = pipe([image for _, image in loaded], batch_size=len(loaded), **call)
                for (item, image), result in zip(loaded, rendering.results(output)):
                    writes.append((item, writer.submit(_write_outputs, item, image, result, with_overlay, rendering)))
            progress.update(len(batches[index]))
            writes = _collect(writes, counts, keep=4 * len(batches[index]))
        _collect(writes, counts, keep=0)
    reader.close()
    progress.close()


def _collect(writes: list[tuple[WorkItem, Future]], counts: Counts, keep: int) -> list[tuple[WorkItem, Future]]:
    """Waits for the oldest writes until at most `keep` are in flight, and counts them."""
    while len(writes) > keep:
        item, future = writes.pop(0)
        try:
            future.result()
        except Exception as error:  # noqa: BLE001 - a write error (disk full, permissions) fails that input only
            counts.failures.append((item.name, f"cannot write {item.mask_path}: {type(error).__name__}: {error}"))
            continue
        counts.done += 1
        if item.frame is not None:
            counts.written_videos.add(item.source.relative.as_posix())
    return writes


def _write_outputs(item: WorkItem, image: PIL.Image.Image, result, with_overlay: bool, rendering: Rendering) -> None:
    save_png(rendering.mask_image(result), item.mask_path)
    if with_overlay and item.overlay_path is not None:
        save_png(rendering.overlay_image(image, result), item.overlay_path)


class _BatchReader:
    """Reads the images of a batch; keeps the current video open, as a process's frames come in increasing order."""

    def __init__(self):
        self.video: VideoFrameReader | None = None

    def read(self, batch: list[WorkItem]) -> tuple[list[tuple[WorkItem, PIL.Image.Image]], list[tuple[str, str]]]:
        loaded, failures = [], []
        for item in batch:
            try:
                loaded.append((item, self._read(item)))
            except Exception as error:  # noqa: BLE001 - an unreadable file is reported and skipped
                failures.append((item.name, f"cannot read it: {type(error).__name__}: {error}"))
        return loaded, failures

    def _read(self, item: WorkItem) -> PIL.Image.Image:
        if item.frame is None:
            return read_image(item.source.path)
        if self.video is None or self.video.path != item.source.path:
            self.close()
            self.video = VideoFrameReader(item.source.path)
        return self.video.frame(item.frame)

    def close(self) -> None:
        if self.video is not None:
            self.video.close()
        self.video = None


def _finish_video(video: VideoJob, totals: Counts, resume: bool, counts: Counts, rendering: Rendering) -> None:
    """Writes the mask video (and overlay video) from the frame masks when they are all there."""
    name = video.source.relative.as_posix()
    frames = video.frame_paths()
    if any(failure_name.startswith(name + "#") for failure_name, _ in totals.failures):
        counts.failures.append((name, f"some frames failed: {video.mask_video} not written"))
        return
    changed = name in totals.written_videos or not resume
    targets = [video.mask_video] + ([video.overlay_video] if video.overlay_video is not None else [])
    if not changed and all(path.exists() for path in targets):
        return
    try:
        write_video((rendering.mask_image(rendering.read(path)) for path in frames), video.mask_video, video.info.fps)
        if video.overlay_video is not None:
            pairs = zip(iter_video_frames(video.source.path), frames)
            overlays = (rendering.overlay_image(image, rendering.read(path)) for image, path in pairs)
            write_video(overlays, video.overlay_video, video.info.fps)
    except Exception as error:  # noqa: BLE001 - a video that cannot be written is reported like a failed input
        counts.failures.append((name, f"cannot write its videos: {type(error).__name__}: {error}"))


def _gather(state, counts: Counts) -> Counts:
    """The counts of all processes, summed (every process gets the totals)."""
    if state.num_processes == 1:
        return Counts(counts.done, counts.skipped, list(counts.failures), set(counts.written_videos))
    from accelerate.utils import gather_object

    totals = Counts()
    for part in gather_object([counts]):
        totals.done += part.done
        totals.skipped += part.skipped
        totals.failures += part.failures
        totals.written_videos |= part.written_videos
    totals.failures.sort()
    return totals


def _summary(totals: Counts, work_seconds: float, total_seconds: float, num_processes: int) -> str:
    rate = totals.done / work_seconds if work_seconds > 0 else 0.0
    return (
        f"Segmented {totals.done} image(s), skipped {totals.skipped} already written, {len(totals.failures)} failed; "
        f"{work_seconds:.1f} s ({rate:.2f} images/s) on {num_processes} process(es), {total_seconds:.1f} s in all."
    )
