#!/usr/bin/env python
"""Scores a DiffewS pipeline with the HSNet few-shot protocol (the paper's evaluation).

    python train/evaluate.py --pretrained DIR --dataset coco20i --data-root /data/coco --fold 0 --shots 1 \\
        --output results.json
    accelerate launch --num_processes 4 train/evaluate.py ...   # same numbers, 4 GPUs

The episodes are HSNet's (PASCAL-5i, COCO-20i, FSS-1000; Matcher's for LVIS-92i): the sequence HSNet's loaders draw
from its split files with `np.random.seed(0)` (1000 per fold; FSS-1000: every test image once; LVIS-92i: 2300). IoU
pooled per class over its episodes, mIoU = mean over all the fold's classes, FB-IoU = mean of the pooled background
and foreground IoU (x100). Masks by the pipeline's rule (default: the authors' 8-bit rule). Scored at 512 x 512 with
the ground truth nearest-resized, as the paper, or at each image's own size with `--resolution original`.
See docs/evaluation.md.

Every design of the paper's design space is scored the same way (the saved pipeline runs its own design).
`--support-token-sampling` samples the shots' keys/values of each layer down to one shot's token count (the paper's
one-to-N-shots inference, seeded by --seed); `--num-inference-steps` / `--ensemble-size` set the multi-step designs'
sampling (default: the pipeline's).

`--multiclass` scores label maps instead (one process): each episode is a query and `--shots` supports with label maps
of the fold's test classes, all segmented in one call; semantic segmentation's mIoU pooled over the queries, and the
seconds per query of one K-class call against K one-class calls. See docs/multiclass_camvid.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python train/evaluate.py` from anywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from pipeline_diffews import DiffewSImageProcessor, ModelNotFoundError, load_pipeline, resolve_model  # noqa: E402
from pipeline_diffews.official import OFFICIAL_MODELS  # noqa: E402
from pipeline_diffews.segment import sampling_options  # noqa: E402
from train.data import SOURCES, EvaluationEpisodes, MulticlassEpisodes, build_source, collate_episodes  # noqa: E402
from train.data.episodes import PROTOCOLS, EpisodeSpec  # noqa: E402
from train.data.registry import ROOTLESS_SOURCES  # noqa: E402
from train.metrics import FewShotSegmentationMetric, SemanticSegmentationIoU  # noqa: E402
from train.model_card import update_model_card  # noqa: E402
from train.results_io import format_multiclass_table, format_table, run_settings, write_results  # noqa: E402
from train.source_options import add_source_option_argument  # noqa: E402

DEFAULT_SPLITS = {"fss1000": "test"}  # every other source is scored on its "val" split


def resolution_arg(value: str) -> int | str:
    if value == "original":
        return value
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"must be a positive integer or 'original', got {value!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--pretrained", required=True, help="DiffewS pipeline folder, Hub repo, or official name (incontext, "
                                          "coco-fold0..3: downloaded and converted the first time).")
    a("--dataset", required=True, choices=sorted(set(SOURCES) - {"incontext"}))
    a("--data-root", default=None, help="The dataset's folder (synthetic: none).")
    a("--fold", type=int, default=None, help="Score the fold's test classes (default: every class).")
    a("--shots", type=int, required=True, help="Supports per episode.")
    a("--episodes", type=int, default=None,
      help="Episodes (default: the protocol's: HSNet's 1000 per fold, FSS-1000 every test image once, LVIS-92i 2300).")
    a("--episode-protocol", choices=PROTOCOLS, default="hsnet",
      help="hsnet (default): the reference loaders' episodes (HSNet's; Matcher's for LVIS-92i). distinct: class and "
           "query uniform, supports all different (not a paper's sequence).")
    a("--seed", type=int, default=0, help="numpy seed of the episode sequence (HSNet: 0).")
    a("--save-episodes", default=None, metavar="FILE",
      help="Write the scored episodes (index, class, query, supports), gathered from every process, as JSON.")
    a("--split", default=None, help="Dataset split (default: val; test for fss1000).")
    a("--resolution", type=resolution_arg, default=512,
      help="Process and score at R x R (ground truth nearest-resized; the paper: 512), or 'original': process at "
           "the pipeline's processing_resolution and score each query at its own size.")
    a("--threshold-mode", choices=("relative", "absolute"), default=None, help="Default: the pipeline's (relative).")
    a("--threshold", type=float, default=None, help="Default: the pipeline's (0.25).")
    a("--threshold-precision", choices=("8bit", "full"), default=None,
      help="Default: the pipeline's (8bit: the authors' rule, the decoded map truncated to 8 bits before the "
           "threshold). full: threshold the full-precision map.")
    a("--batch-size", type=int, default=1, help="Episodes per UNet call.")
    a("--support-token-sampling", action="store_true",
      help="Sample the shots' keys/values of each layer down to one shot's token count (random, seeded by --seed): "
           "the paper's inference with more shots than training had.")
    a("--num-inference-steps", type=int, default=None,
      help="Steps of the multi-step designs (mi2m, mn2m; default: the pipeline's).")
    a("--ensemble-size", type=int, default=None, help="mn2m: predictions per query, combined (default: the pipeline's).")
    a("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
      help="Default: float16 on GPU, else float32.")
    a("--num-workers", type=int, default=2, help="Data loader workers per process.")
    a("--output", default=None, help="Write the results here as JSON (default: print them).")
    a("--update-model-card", action="store_true", help="Add the results to --pretrained's README.md model-index.")
    a("--model-name", default=None, help="Model name of the model-index (default: the card's, else the folder's).")
    a("--cpu", action="store_true", help="Run on CPU (several processes: accelerate launch --multi_gpu).")
    a("--multiclass", action="store_true",
      help="Score K-class label maps: each episode is a query and --shots supports with label maps of the fold's "
           "test classes, segmented in one call; mIoU over classes pooled over the query images, and the seconds "
           "per query of one K-class call against K one-class calls. --episodes: default every image once.")
    a("--no-single-class-baseline", dest="single_class_baseline", action="store_false",
      help="With --multiclass: skip the K one-class calls (no timing comparison, no baseline mIoU).")
    add_source_option_argument(p)
    args = p.parse_args(argv)
    if args.data_root is None and args.dataset not in ROOTLESS_SOURCES:
        p.error(f"--data-root is required for --dataset {args.dataset}")
    if args.shots < 1 or (args.episodes is not None and args.episodes < 1) or args.batch_size < 1:
        p.error("--shots, --episodes and --batch-size must be >= 1")
    for name in ("num_inference_steps", "ensemble_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.update_model_card and not (Path(args.pretrained).is_dir() or args.pretrained in OFFICIAL_MODELS):
        p.error("--update-model-card needs --pretrained to be a local pipeline folder")
    args.split = args.split or DEFAULT_SPLITS.get(args.dataset, "val")
    return args


def check_multiclass_args(args: argparse.Namespace) -> None:
    """`--multiclass` runs in one process and writes its results to --output only."""
    unsupported = [flag for flag, name in (("--update-model-card", "update_model_card"),
                                           ("--save-episodes", "save_episodes")) if getattr(args, name, None)]
    if unsupported:
        raise ValueError(f"--multiclass does not support {' and '.join(unsupported)}: its results are in --output.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--multiclass runs in one process (its timings compare calls side by side): "
                         "run `python train/evaluate.py --multiclass ...`, not `accelerate launch`.")


# ---------------------------------------------------------------------------------------------- setup (both modes)


def evaluation_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """--dtype, else float16 on GPU and float32 otherwise."""
    return getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))


def load_evaluated_pipeline(args: argparse.Namespace, device: torch.device):
    """The pipeline under test (`load_pipeline`: folder, Hub id or official name) on `device`, no progress bar."""
    return load_pipeline(args.pretrained, dtype=evaluation_dtype(args, device), device=device)


def call_options(resolution: int | str, threshold_mode=None, threshold=None, threshold_precision=None,
                 **sampling) -> dict:
    """The pipeline arguments of a scored call: process at R x R (or the pipeline's resolution for "original", masks
    then at each query's size), the mask rule, numpy outputs; `sampling` (`sampling_options`) as given."""
    original = resolution == "original"
    return dict(processing_resolution=None if original else resolution, match_input_resolution=original,
                threshold_mode=threshold_mode, threshold=threshold, threshold_precision=threshold_precision,
                output_type="np", **sampling)


def design_settings(args: argparse.Namespace, pipe) -> dict:
    """What a results file records of the design and its sampling."""
    design = getattr(pipe, "design", None)
    return {"design": design.to_dict() if design is not None else None,
            "support_token_sampling": bool(args.support_token_sampling),
            "num_inference_steps": args.num_inference_steps or pipe.config.get("num_inference_steps"),
            "ensemble_size": args.ensemble_size or pipe.config.get("ensemble_size")}


def scored_truth(labels: np.ndarray, resolution: int | str) -> np.ndarray:
    """The ground truth as scored: `labels` itself for "original", else nearest-resized to R x R."""
    return labels if resolution == "original" else resize_ground_truth(labels, resolution)


def resize_ground_truth(mask: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W] (0 / 1 / 255 ignore, or a label map) -> [size, size], nearest as HSNet's
    `F.interpolate(mode="nearest")`."""
    resized = F.interpolate(torch.from_numpy(np.asarray(mask, dtype=np.uint8))[None, None].float(), size=(size, size))
    return resized[0, 0].to(torch.uint8).numpy()


@torch.no_grad()
def score_episodes(pipe, loader, metric, resolution: int | str, threshold_mode=None, threshold=None, progress=True,
                   threshold_precision=None, scored=None, sampling: dict | None = None):
    """Runs the pipeline on every episode of `loader` (batches of `Episode`s) and adds each to `metric`; appends the
    `EpisodeSpec` of each scored episode to the list `scored` when given. `sampling`: `sampling_options`."""
    call = call_options(resolution, threshold_mode, threshold, threshold_precision, **(sampling or {}))
    for episodes in tqdm(loader, desc="episodes", disable=not progress):
        out = pipe(
            [e.query_image for e in episodes],
            support_images=[e.support_images for e in episodes],
            support_masks=[e.support_masks for e in episodes],
            batch_size=len(episodes),
            **call,
        )
        for episode, mask in zip(episodes, out.masks):
            metric.update(mask, scored_truth(episode.query_mask, resolution), episode.class_id)
        if scored is not None:
            scored.extend(EpisodeSpec(e.class_id, e.query_key, tuple(e.support_keys)) for e in episodes)


def fold_scores(scores: dict, class_ids) -> dict:
    """HSNet's mIoU: the mean over all the fold's `class_ids`, a class without an episode counting 0 (its union is 0,
    and HSNet divides by max(union, 1)). `scores` is `FewShotSegmentationMetric.compute()`'s; FB-IoU is unchanged (the
    pooled sums of a class without episodes are 0)."""
    per_class = {int(c): scores["per_class"].get(int(c), 0.0) for c in class_ids}
    return {**scores, "per_class": per_class, "miou": float(np.mean(list(per_class.values())))}


def episode_records(scored, indices) -> list[dict]:
    """JSON records of the scored episodes of one process: `indices` are their positions in the whole sequence."""
    return [{"index": int(i), "class_id": spec.class_id, "query": spec.query_key, "supports": list(spec.support_keys)}
            for i, spec in zip(indices, scored)]


def evaluate_one_class(args, accelerator, source, pipe) -> tuple[dict, list[dict]]:
    """HSNet's protocol over this process's shard of the episodes: the results (pooled over every process) and the
    records of the scored episodes (every process's with --save-episodes)."""
    # The whole sequence is drawn here, in one pass, identically in every process; each process then scores its shard.
    episodes = EvaluationEpisodes(source, shots=args.shots, num_episodes=args.episodes, seed=args.seed,
                                  protocol=args.episode_protocol)
    # Disjoint shards without padding: no episode is counted twice, whatever the number of processes.
    shard = episodes.shard(accelerator.process_index, accelerator.num_processes)
    loader = torch.utils.data.DataLoader(
        shard, batch_size=args.batch_size, collate_fn=collate_episodes, num_workers=args.num_workers
    )
    metric = FewShotSegmentationMetric(num_classes=source.num_classes).to(accelerator.device)
    scored = []
    score_episodes(pipe, loader, metric, args.resolution, args.threshold_mode, args.threshold,
                   progress=accelerator.is_local_main_process, threshold_precision=args.threshold_precision,
                   scored=scored, sampling=sampling_options(args, pipe))
    scores = fold_scores(metric.compute(), episodes.class_ids)  # compute() sums the counts of every process
    records = episode_records(scored, shard.indices)
    if args.save_episodes and accelerator.num_processes > 1:
        records = gather_object(records)
    results = {
        "miou": scores["miou"],
        "fb_iou": scores["fb_iou"],
        "per_class": {source.class_names[c]: v for c, v in scores["per_class"].items()},
        "episodes": scores["episodes"],
        **run_settings(args, pipe),
        **design_settings(args, pipe),
        "episode_protocol": args.episode_protocol,
        "episode_reference": episodes.plan.reference if episodes.plan is not None else None,
        "processes": accelerator.num_processes,
    }
    return results, records


# ---------------------------------------------------------------------------------------------- several classes


def merge_class_masks(masks: np.ndarray, probabilities: np.ndarray, labels: list[int]) -> np.ndarray:
    """The pipeline's label-map rule: a pixel takes the label of the likeliest class among those whose mask holds it,
    else 0. masks: bool [K, H, W]; probabilities: float [K, H, W]; labels: the K labels -> uint8 [H, W]."""
    merged = DiffewSImageProcessor.merge_classes(torch.from_numpy(masks), torch.from_numpy(probabilities), list(labels))
    return merged.numpy().astype(np.uint8)


def timed(fn):
    """`(fn(), seconds)`, GPU work included."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def segment_classes(pipe, episode, call: dict, single_class: bool):
    """Segments one `MulticlassEpisode` in one K-class call and, with `single_class`, in K one-class calls.

    Returns (label map of the K-class call, its seconds, merged label map of the one-class calls or None, their
    seconds or None); label maps uint8 in the episode's labels.
    """
    out, multi_seconds = timed(lambda: pipe(
        episode.query_image, support_images=episode.support_images, support_masks=episode.support_labels,
        multiclass=True, **call,
    ))
    if not single_class:
        return out.label_maps[0], multi_seconds, None, None
    masks, probabilities, single_seconds = [], [], 0.0
    for label in episode.shown:
        shots = [i for i, m in enumerate(episode.support_labels) if (m == label).any()]
        single, seconds = timed(lambda: pipe(
            episode.query_image, support_images=[episode.support_images[i] for i in shots],
            support_masks=[episode.support_labels[i] == label for i in shots], multiclass=False, **call,
        ))
        masks.append(single.masks[0])
        probabilities.append(single.probabilities[0])
        single_seconds += seconds
    merged = merge_class_masks(np.stack(masks), np.stack(probabilities), episode.shown)
    return out.label_maps[0], multi_seconds, merged, single_seconds


def evaluate_multiclass(args, source, pipe, device: torch.device) -> dict:
    """Several classes per call (one process): each `MulticlassEpisodes` episode segmented in one K-class call and,
    unless --no-single-class-baseline, in K one-class calls merged by the pipeline's rule; semantic segmentation's
    IoU of both (`SemanticSegmentationIoU`) and their seconds per query (the first episode is run once untimed)."""
    episodes = MulticlassEpisodes(source, args.shots, args.episodes, args.seed)
    loader = torch.utils.data.DataLoader(episodes, batch_size=1, collate_fn=collate_episodes,
                                         num_workers=args.num_workers)
    call = {**call_options(args.resolution, args.threshold_mode, args.threshold, args.threshold_precision,
                           **sampling_options(args, pipe)),
            "batch_size": args.batch_size}  # classes per UNet pass
    num_labels = len(source.class_ids) + 1
    multi_metric, single_metric = SemanticSegmentationIoU(num_labels), SemanticSegmentationIoU(num_labels)
    multi_seconds, single_seconds, classes_per_episode = [], [], []
    segment_classes(pipe, episodes[0], call, args.single_class_baseline)  # first calls pay one-time costs: untimed
    for (episode,) in tqdm(loader, desc="episodes"):
        truth = scored_truth(episode.query_labels, args.resolution)
        labels, seconds, merged, baseline_seconds = segment_classes(pipe, episode, call, args.single_class_baseline)
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
        **design_settings(args, pipe),
        "batch_size": args.batch_size,
        "device": device.type,
        "dtype": str(evaluation_dtype(args, device)).replace("torch.", ""),
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
    return results


# ---------------------------------------------------------------------------------------------- run


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.multiclass:
        check_multiclass_args(args)
    args.pretrained = resolve_model(args.pretrained)  # an official name: downloaded once (processes wait on a lock)
    accelerator = Accelerator(cpu=args.cpu)
    with accelerator.main_process_first():
        source = build_source(args.dataset, args.data_root, args.split, args.fold, "test", **dict(args.source_option))
    pipe = load_evaluated_pipeline(args, accelerator.device)
    if args.multiclass:
        results, records = evaluate_multiclass(args, source, pipe, accelerator.device), []
    else:
        results, records = evaluate_one_class(args, accelerator, source, pipe)
    if accelerator.is_main_process:
        print(format_multiclass_table(results) if args.multiclass else format_table(results))
        write_results(results, args.output)
        if args.save_episodes:
            Path(args.save_episodes).parent.mkdir(parents=True, exist_ok=True)
            Path(args.save_episodes).write_text(json.dumps(sorted(records, key=lambda r: r["index"]), indent=1) + "\n")
        if args.update_model_card:
            path = update_model_card(args.pretrained, results, model_name=args.model_name, pipe=pipe)
            print(f"Model card updated: {path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ModelNotFoundError as error:  # one line, no traceback: the model named cannot be loaded
        sys.exit(f"error: --pretrained {error}")
