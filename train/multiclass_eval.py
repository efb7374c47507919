"""Several classes per image: K-class episodes, the semantic-segmentation mIoU, and the cost of one K-class call.

`train/evaluate.py --multiclass` runs `evaluate_multiclass`. An episode is a query image and N support images of the
same split, each with a label map of the fold's test classes (label k + 1 = the k-th test class, 0 = anything else,
255 = ignored). The classes of an episode are the test classes shown in at least one support; the pipeline segments
all of them in one call (a label map per query). Query pixels of a test class no support shows are background for
that episode (the model was not asked for it).

Accounting is semantic segmentation's: one confusion matrix over (background + test classes), pooled over every query
image, IoU_c = TP / (TP + FP + FN); a class the query lacks still costs false positives where it is predicted. mIoU =
mean IoU over the test classes with a non-empty union. The same episodes are also segmented with K one-class calls
(one per class, each with the shots showing it), merged into a label map by the pipeline's rule, and both ways are
timed side by side (seconds per query), so benefit and cost are both numbers.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassConfusionMatrix
from tqdm.auto import tqdm

from pipeline_diffews import DiffewSPipeline
from train.data import build_source
from train.data.base import FewShotSource
from train.results_io import run_settings, write_results

IGNORE = 255


def add_multiclass_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `--multiclass` mode (the other options of train/evaluate.py keep their meaning)."""
    parser.add_argument(
        "--multiclass", action="store_true",
        help="Score K-class label maps: each episode is a query and --shots supports with label maps of the fold's "
             "test classes, segmented in one call; mIoU over classes pooled over the query images, and the seconds "
             "per query of one K-class call against K one-class calls. --episodes: default every image once.",
    )
    parser.add_argument(
        "--no-single-class-baseline", dest="single_class_baseline", action="store_false",
        help="With --multiclass: skip the K one-class calls (no timing comparison, no baseline mIoU).",
    )


# ---------------------------------------------------------------------------------------------- episodes


@dataclass
class MulticlassEpisode:
    """One K-class episode.

    query_image: RGB. query_labels: uint8 [H, W] (0 background, k + 1 = class_ids[k], 255 ignored; classes shown by
    no support are 0). support_images: N RGB images. support_labels: N uint8 label maps, same coding, each at its
    image's size. class_ids: the source's class ids of labels 1..len(class_ids) (the fold's test classes).
    """

    query_key: str
    query_image: Image.Image
    query_labels: np.ndarray
    support_keys: list[str]
    support_images: list[Image.Image]
    support_labels: list[np.ndarray]
    class_ids: list[int]

    @property
    def shown(self) -> list[int]:
        """The labels (1..K) shown in at least one support, ascending."""
        values = np.unique(np.concatenate([np.unique(m) for m in self.support_labels]))
        return [int(v) for v in values if 0 < v < IGNORE]


def label_map(source: FewShotSource, key: str, class_ids: list[int]) -> np.ndarray:
    """uint8 [H, W] of image `key`: k + 1 where class_ids[k] is, 255 where the source ignores, else 0."""
    labels = None
    for k, class_id in enumerate(class_ids):
        mask = source.load_mask(key, class_id)  # uint8: 1 the class, 0 other, 255 ignored
        if labels is None:
            labels = np.where(mask == IGNORE, IGNORE, 0).astype(np.uint8)
        labels[mask == 1] = k + 1
    return labels


def draw_episodes(source: FewShotSource, shots: int, num_episodes: int | None, seed: int) -> list[tuple[str, list[str]]]:
    """(query key, support keys) per episode, from numpy seed `seed`.

    The images holding at least one of the source's classes, in a seeded order: every one once as the query when
    `num_episodes` is None (repeating the order when more are asked for); supports drawn uniformly among the other
    images, all different.
    """
    keys = sorted({key for c in source.class_ids for key in source.images_of_class(c)})
    if len(keys) <= shots:
        raise ValueError(f"{len(keys)} images hold the classes {list(source.class_ids)}: need more than --shots {shots}")
    rng = np.random.RandomState(seed)
    count = len(keys) if num_episodes is None else num_episodes
    order = []
    while len(order) < count:
        order += [keys[i] for i in rng.permutation(len(keys))]
    episodes = []
    for query in order[:count]:
        others = [k for k in keys if k != query]
        episodes.append((query, [others[i] for i in rng.choice(len(others), shots, replace=False)]))
    return episodes


def load_episode(source: FewShotSource, query: str, supports: list[str]) -> MulticlassEpisode:
    """Reads the images and label maps of one episode; query pixels of classes no support shows become 0."""
    class_ids = list(source.class_ids)
    support_labels = [label_map(source, key, class_ids) for key in supports]
    query_labels = label_map(source, query, class_ids)
    shown = np.zeros(IGNORE + 1, bool)
    for labels in support_labels:
        shown[labels] = True
    shown[0] = shown[IGNORE] = True
    query_labels[~shown[query_labels]] = 0
    return MulticlassEpisode(
        query_key=query,
        query_image=source.load_image(query),
        query_labels=query_labels,
        support_keys=list(supports),
        support_images=[source.load_image(key) for key in supports],
        support_labels=support_labels,
        class_ids=class_ids,
    )


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """uint8 label map [H, W] -> [size, size], nearest (as the one-class evaluation resizes its ground truth)."""
    resized = F.interpolate(torch.from_numpy(np.asarray(labels, np.uint8))[None, None].float(), size=(size, size))
    return resized[0, 0].to(torch.uint8).numpy()


# ---------------------------------------------------------------------------------------------- metric


class SemanticSegmentationIoU:
    """Per-class IoU from one confusion matrix pooled over all images (torchmetrics' MulticlassConfusionMatrix).

    Args:
        num_labels: K + 1 (label 0 = background, 1..K = classes); label 255 is ignored.
    """

    def __init__(self, num_labels: int):
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2 (background + classes), got {num_labels!r}")
        self.num_labels = num_labels
        self.matrix = MulticlassConfusionMatrix(num_classes=num_labels, ignore_index=IGNORE)
        self.images = 0

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """prediction: integer label map [H, W] in 0..K. truth: uint8 [H, W] in 0..K or 255 (ignored)."""
        prediction, truth = np.asarray(prediction), np.asarray(truth)
        if prediction.shape != truth.shape or prediction.ndim != 2:
            raise ValueError(f"prediction and truth must be label maps [H, W] of one shape, got {prediction.shape} "
                             f"and {truth.shape}")
        for name, labels in (("prediction", prediction), ("truth", truth)):
            bad = (labels >= self.num_labels) & (labels != IGNORE) | (labels < 0)
            if bad.any():
                raise ValueError(f"{name} holds labels {np.unique(labels[bad]).tolist()} outside 0..{self.num_labels - 1}")
        if (prediction == IGNORE).any():
            raise ValueError("prediction must not hold the ignore label 255")
        self.matrix.update(torch.from_numpy(prediction.astype(np.int64)).flatten(),
                           torch.from_numpy(truth.astype(np.int64)).flatten())
        self.images += 1

    def compute(self) -> dict:
        """{"iou": [IoU of label 0..K] (x100, NaN for an empty union), "miou": mean over labels 1..K that have a
        union (x100), "background_iou", "images"}."""
        matrix = self.matrix.compute().double()  # [truth, prediction]
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1) * 100, torch.tensor(float("nan")))
        classes = iou[1:][union[1:] > 0]
        return {
            "iou": iou.tolist(),
            "miou": float(classes.mean()) if classes.numel() else float("nan"),
            "background_iou": float(iou[0]),
            "images": self.images,
        }


def merge_class_masks(masks: np.ndarray, probabilities: np.ndarray, labels: list[int]) -> np.ndarray:
    """The pipeline's label-map rule: a pixel takes the label of the likeliest class among those whose mask holds it,
    else 0. masks: bool [K, H, W]; probabilities: float [K, H, W]; labels: the K labels -> uint8 [H, W]."""
    best = np.where(masks, probabilities, -1.0).argmax(0)
    return np.where(masks.any(0), np.asarray(labels, np.uint8)[best], 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- run


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def segment_episode(pipe, episode: MulticlassEpisode, call: dict, single_class: bool):
    """Segments one episode in one K-class call and, with `single_class`, in K one-class calls.

    Returns (label map of the K-class call, its seconds, merged label map of the one-class calls or None, their
    seconds or None); label maps uint8 in the episode's labels.
    """
    out, multi_seconds = _timed(lambda: pipe(
        episode.query_image, support_images=episode.support_images, support_masks=episode.support_labels,
        multiclass=True, **call,
    ))
    if not single_class:
        return out.label_maps[0], multi_seconds, None, None
    masks, probabilities, single_seconds = [], [], 0.0
    for label in episode.shown:
        shots = [i for i, m in enumerate(episode.support_labels) if (m == label).any()]
        single, seconds = _timed(lambda: pipe(
            episode.query_image, support_images=[episode.support_images[i] for i in shots],
            support_masks=[episode.support_labels[i] == label for i in shots], multiclass=False, **call,
        ))
        masks.append(single.masks[0])
        probabilities.append(single.probabilities[0])
        single_seconds += seconds
    merged = merge_class_masks(np.stack(masks), np.stack(probabilities), episode.shown)
    return out.label_maps[0], multi_seconds, merged, single_seconds


def evaluate_multiclass(args: argparse.Namespace) -> dict:
    """Runs the K-class evaluation described in the module docstring with train/evaluate.py's arguments; prints the
    table, writes `args.output` (JSON) when given. Returns the results."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    unsupported = [flag for flag, name in (("--update-model-card", "update_model_card"),
                                           ("--save-episodes", "save_episodes")) if getattr(args, name, None)]
    if unsupported:
        raise ValueError(f"--multiclass does not support {' and '.join(unsupported)}: its results are in --output.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--multiclass runs in one process (its timings compare calls side by side): "
                         "run `python train/evaluate.py --multiclass ...`, not `accelerate launch`.")
    source = build_source(args.dataset, args.data_root, args.split, args.fold, "test", **dict(args.source_option))
    episodes = draw_episodes(source, args.shots, args.episodes, args.seed)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = getattr(torch, args.dtype or ("float16" if device == "cuda" else "float32"))
    pipe = DiffewSPipeline.from_pretrained(args.pretrained, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    original = args.resolution == "original"
    call = dict(
        processing_resolution=None if original else args.resolution, match_input_resolution=original,
        threshold_mode=args.threshold_mode, threshold=args.threshold, threshold_precision=args.threshold_precision,
        batch_size=args.batch_size, output_type="np",
    )
    num_labels = len(source.class_ids) + 1
    multi_metric, single_metric = SemanticSegmentationIoU(num_labels), SemanticSegmentationIoU(num_labels)
    multi_seconds, single_seconds, classes_per_episode = [], [], []
    warm = load_episode(source, *episodes[0])
    segment_episode(pipe, warm, call, args.single_class_baseline)  # first calls pay one-time costs: not timed
    for query, supports in tqdm(episodes, desc="episodes"):
        episode = load_episode(source, query, supports)
        truth = episode.query_labels if original else resize_labels(episode.query_labels, args.resolution)
        labels, seconds, merged, baseline_seconds = segment_episode(pipe, episode, call, args.single_class_baseline)
        multi_metric.update(labels, truth)
        multi_seconds.append(seconds)
        classes_per_episode.append(len(episode.shown))
        if merged is not None:
            single_metric.update(merged, truth)
            single_seconds.append(baseline_seconds)

    names = [source.class_names[c] for c in source.class_ids]
    scores = multi_metric.compute()
    results = {
        "mode": "multiclass",
        "miou": scores["miou"],
        "per_class": dict(zip(names, scores["iou"][1:])),
        "background_iou": scores["background_iou"],
        "seconds_per_query": {"one_multiclass_call": float(np.mean(multi_seconds))},
        "classes_per_episode": float(np.mean(classes_per_episode)),
        "episodes": len(episodes),
        **run_settings(args, pipe),
        "batch_size": args.batch_size,
        "device": device,
        "dtype": str(dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
    }
    if single_seconds:
        single_scores = single_metric.compute()
        results["single_class_calls"] = {
            "miou": single_scores["miou"],
            "per_class": dict(zip(names, single_scores["iou"][1:])),
            "background_iou": single_scores["background_iou"],
        }
        results["seconds_per_query"]["single_class_calls"] = float(np.mean(single_seconds))
        results["seconds_per_query"]["speedup"] = float(np.mean(single_seconds) / np.mean(multi_seconds))
    print(format_multiclass_table(results))
    write_results(results, args.output)
    return results


def format_multiclass_table(results: dict) -> str:
    """The results as a text table: IoU per class for the K-class call (and the K one-class calls), then the cost."""
    single = results.get("single_class_calls")
    fold = "all classes" if results["fold"] is None else f"fold {results['fold']}"
    lines = [
        f"{results['dataset']} {results['split']} {fold}, {results['shots']}-shot, {results['episodes']} episodes "
        f"({results['classes_per_episode']:.2f} classes each), several classes per call",
        f"{'class':<20}{'K-class call':>14}" + (f"{'K one-class':>14}" if single else ""),
    ]
    rows = [(name, iou, single["per_class"][name] if single else None) for name, iou in results["per_class"].items()]
    rows += [("background", results["background_iou"], single["background_iou"] if single else None),
             ("mIoU (classes)", results["miou"], single["miou"] if single else None)]
    for name, iou, other in rows:
        lines.append(f"{name:<20}{iou:>14.2f}" + (f"{other:>14.2f}" if other is not None else ""))
    cost = results["seconds_per_query"]
    line = f"{'s / query':<20}{cost['one_multiclass_call']:>14.4f}"
    if "single_class_calls" in cost:
        line += f"{cost['single_class_calls']:>14.4f}   (one K-class call is {cost['speedup']:.2f}x faster)"
    return "\n".join(lines + [line])
