"""Evaluation results: the run settings every results file records, writing them as JSON (to a file, its folder
made as needed, or to standard output), and their text tables (one class; several classes per call)."""

from __future__ import annotations

import json
from pathlib import Path

from train.model_card import DATASET_TITLES


def write_results(results: dict, output: str | None) -> None:
    """`results` as indented JSON to `output`, or printed when `output` is None."""
    text = json.dumps(results, indent=2)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    else:
        print(text)


def run_settings(args, pipe) -> dict:
    """The settings of an evaluation run that every results file records: data, episodes and the mask rule (the
    pipeline's own where the command line left it unset)."""
    return {
        "shots": args.shots,
        "fold": args.fold,
        "dataset": args.dataset,
        "split": args.split,
        "resolution": args.resolution,
        "seed": args.seed,
        "threshold_mode": args.threshold_mode or pipe.config.threshold_mode,
        "threshold": pipe.config.threshold if args.threshold is None else args.threshold,
        "threshold_precision": args.threshold_precision or pipe.config.get("threshold_precision", "8bit"),
        "pretrained": str(args.pretrained),
    }


def format_table(results: dict) -> str:
    """The one-class results as a text table: IoU per class, mIoU and FB-IoU."""
    title = DATASET_TITLES.get(results["dataset"], results["dataset"])
    fold = "all classes" if results["fold"] is None else f"fold {results['fold']}"
    lines = [f"{title} {fold}, {results['shots']}-shot, {results['episodes']} episodes", f"{'class':<28}{'IoU':>8}"]
    lines += [f"{name:<28}{iou:>8.2f}" for name, iou in results["per_class"].items()]
    lines += [f"{'mIoU':<28}{results['miou']:>8.2f}", f"{'FB-IoU':<28}{results['fb_iou']:>8.2f}"]
    return "\n".join(lines)


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
