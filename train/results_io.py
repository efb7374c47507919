"""Evaluation results: the run settings every results file records, and writing them as JSON (to a file, its folder
made as needed, or to standard output)."""

from __future__ import annotations

import json
from pathlib import Path


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
