#!/usr/bin/env python
"""Few-shot from generated episodes: a tiny DiffewS trained on `--dataset synthetic`, scored on held-out kinds.

    python -m benchmarks.learning_synthetic --output-dir runs/learning_synthetic \\
        --camvid-root ../shared/data/camvid --export-pipeline examples/tiny-fewshot-pipeline

The defaults are the settings of the shipped `examples/tiny-fewshot-pipeline` (`docs/learning_synthetic.md`);
`--camvid-root` is the CamVid folder (train/ and val/, each with images/ and labels/).

1. Trains a tiny VAE (`benchmarks/tiny_vae.py`, scale factor 4) on generated training scenes and the masks of their
   kinds (held-out kinds never shown).
2. Builds the tiny DiffewS of `benchmarks/tiny_diffews.py` (3.1M-parameter UNet, as `benchmarks/learning_camvid.py`) around it and trains it with
   `train/train.py --dataset synthetic` (training kinds, train split), and the same model for the same steps WITHOUT
   supports (every support latent replaced by zeros, in training and evaluation).
3. Scores, with `train/evaluate.py`'s protocol (episodes from numpy seed 0, pooled per-class IoU), on the val split's
   held-out kinds at 1 and 5 shots: the model, the support-free model and copying the support mask onto the query;
   and the model on the val split's training kinds (seen kinds, other scenes), 1 shot.
4. Segments the demo's examples (`examples/<set>/`, true query masks in `truth/`) with each set's supports: IoU per
   query at the query's own size, as the demo shows it.
5. With `--camvid-root`: scores the trained model on CamVid fold 0's seen and novel classes as
   `benchmarks/learning_camvid.py` does, then fine-tunes it on CamVid fold 0 (`--camvid-steps`, same settings) on
   CamVid episodes only, and with `--camvid-mix-share` of the episodes drawn from the generated training kinds
   (`train/train.py --mix-dataset synthetic`); the support-free twin gets the same mixed fine-tune without supports.
   Scores them all beside the recorded from-scratch figures of `benchmarks/learning_camvid.py`.
6. Writes `results.json` and `results.md` to `--output-dir`.

Budgets are steps, so a run is reproducible (fixed seeds, 1 thread, float32); CPU and wall times are reported.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from benchmarks.common import (
    REPO_ROOT,
    Stopwatch,
    command_line,
    load_average,
    machine,
    machine_summary,
    repo_relative,
    write_json,
)
from benchmarks.common import train_argv as train_command
from benchmarks.tiny_diffews import (
    ROW_TITLES,
    ROWS,
    build_pipeline,
    camvid_scores,
    run_train_script,
    scored_metric,
    scores_of,
)
from benchmarks.tiny_vae import CamVidPixels, reconstruction_quality, train_tiny_vae
from pipeline_diffews import DiffewSImageProcessor, DiffewSPipeline
from train.data import EvaluationEpisodes, build_source

EXAMPLES_DIR = REPO_ROOT / "examples"
CAMVID_RECORD = REPO_ROOT / "benchmarks" / "results" / "learning_camvid.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--output-dir", required=True, help="Pipelines, results.json and results.md go here.")
    a("--resolution", type=int, default=64, help="Training, processing and scoring resolution (multiple of 16).")
    a("--steps", type=int, default=800, help="Training steps per model (DiffewS and its support-free twin).")
    a("--vae-steps", type=int, default=400, help="Training steps of the tiny VAE (batches of 16).")
    a("--vae-scenes", type=int, default=1200, help="Generated training scenes the VAE learns from.")
    a("--vae-from", default=None,
      help="Use the VAE of this pipeline folder (e.g. <output-dir>/init of an earlier run with the same --seed, "
           "--vae-steps and --vae-scenes, which trained the same weights) instead of training it again.")
    a("--batch-size", type=int, default=8, help="Episodes per training step.")
    a("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (from scratch).")
    a("--lr-end", type=float, default=1e-5, help="Learning rate at the last step (linear decay).")
    a("--max-shots", type=int, default=1, help="Shots per training episode are drawn in 1..max_shots.")
    a("--shots", type=int, nargs="+", default=[1, 5], help="Shots of the held-out evaluations.")
    a("--episodes", type=int, default=300, help="Evaluation episodes per row and shot count.")
    a("--eval-batch-size", type=int, default=16, help="Episodes per pipeline call in the evaluation.")
    a("--threads", type=int, default=1, help="torch threads (1 is the fastest per CPU second on a busy machine).")
    a("--jobs", type=int, default=2, help="Trainings run side by side in this many processes (same results).")
    a("--seed", type=int, default=0, help="Seed of the initial weights, the generated scenes and training episodes.")
    a("--examples-dir", default=str(EXAMPLES_DIR), help="Demo example sets to score (each with truth/ masks).")
    a("--camvid-root", default=None, help="CamVid folder: also fine-tune on CamVid fold 0 and score it.")
    a("--camvid-steps", type=int, default=400, help="Fine-tuning steps on CamVid.")
    a("--camvid-learning-rate", type=float, default=5e-4, help="AdamW learning rate of the CamVid fine-tune.")
    a("--camvid-mix-share", type=float, default=0.5,
      help="Share of generated-episode steps in the second CamVid fine-tune (0: run only the CamVid-only one).")
    a("--export-pipeline", default=None, help="Also save the trained DiffewS pipeline (safetensors) here.")
    args = p.parse_args(argv)
    if args.resolution % 16 or args.resolution < 16:
        p.error(f"--resolution must be a positive multiple of 16 (VAE factor 4 x UNet factor 4), got {args.resolution}")
    for name in ("steps", "vae_steps", "vae_scenes", "batch_size", "max_shots", "episodes", "eval_batch_size",
                 "threads", "jobs", "camvid_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.shots) < 1:
        p.error(f"--shots must all be >= 1, got {args.shots}")
    if not 0 <= args.camvid_mix_share < 1:
        p.error(f"--camvid-mix-share must be in [0, 1), got {args.camvid_mix_share}")
    return args


# ---------------------------------------------------------------------- data


def synthetic_pixels(count: int, resolution: int, seed: int, split: str = "train", mode: str = "train") -> CamVidPixels:
    """Images and kind masks of `count` generated scenes, at `resolution` as the pipeline feeds them to the VAE.

    Scene i is scene i // kinds of kind i % kinds; every kind of a scene gives a mask (target and distractors).
    Returns images [count, 3, R, R] in [-1, 1] and masks [M, 3, R, R] in {-1, 1} with their class ids.
    """
    source = build_source("synthetic", None, split, None, mode, seed=seed)
    to_image, to_mask = DiffewSImageProcessor.image_to_tensor, DiffewSImageProcessor.mask_to_tensor
    images, masks, class_ids = [], [], []
    for i in range(count):
        kind = source.class_ids[i % len(source.class_ids)]
        key = f"{split}/{kind}/{i // len(source.class_ids)}"
        images.append(to_image(source.load_image(key), resolution))
        for c in source.scene_kinds(key)[0]:
            mask = source.load_mask(key, c)
            if mask.any():
                masks.append(to_mask(mask == 1, resolution))
                class_ids.append(c)
    return CamVidPixels(torch.stack(images), torch.stack(masks), torch.tensor(class_ids))


def train_argv(args, pretrained: Path, output_dir: Path, steps: int, dataset: str = "synthetic",
               mix_share: float = 0.0) -> list[str]:
    """The `train/train.py` command line of one model (synthetic training kinds, or CamVid fold 0 with `mix_share` of
    the episodes from the synthetic training kinds)."""
    data = (["--dataset", "synthetic", "--source-option", f"seed={args.seed}"] if dataset == "synthetic"
            else ["--dataset", "camvid", "--data-root", str(args.camvid_root), "--fold", "0"])
    if mix_share:
        data += ["--mix-dataset", "synthetic", "--mix-share", str(mix_share), "--mix-source-option", f"seed={args.seed}"]
    learning_rate = args.learning_rate if dataset == "synthetic" else args.camvid_learning_rate
    return train_command(pretrained, output_dir, steps, data, batch_size=args.batch_size, learning_rate=learning_rate,
                         lr_end=args.lr_end, max_shots=args.max_shots, resolution=args.resolution, seed=args.seed)


class FineTune(NamedTuple):
    start: str  # the trained model fine-tuned: a row of `ROWS`
    mix_share: float  # share of generated episodes in the fine-tune


def camvid_fine_tunes(args) -> dict[str, FineTune]:
    """`{output folder: FineTune}` of the CamVid fine-tunes to run: the model on CamVid episodes only; with
    `--camvid-mix-share`, the model and its support-free twin (still without supports) on mixed episodes."""
    runs = {"camvid_finetuned": FineTune("diffews", 0.0)}
    if args.camvid_mix_share:
        runs["camvid_finetuned_mixed"] = FineTune("diffews", args.camvid_mix_share)
        runs["query_only_camvid_finetuned_mixed"] = FineTune("query_only", args.camvid_mix_share)
    return runs


def timed_training(argv: list[str], blank: bool, threads: int) -> dict:
    """Runs `train/train.py` with `argv` in this process (see `run_train_script`); its wall and CPU seconds."""
    torch.set_num_threads(threads)
    with Stopwatch() as watch:
        run_train_script(argv, blank=blank)
    return watch.as_dict()


def run_now(fn, *args) -> Future:
    """`fn(*args)` in this process, as a finished `Future` (the `--jobs 1` stand-in for a process pool)."""
    future = Future()
    future.set_result(fn(*args))
    return future


# ---------------------------------------------------------------------- scoring


def score_row(row: str, pipe, episodes: EvaluationEpisodes, args, shots: int) -> dict:
    """mIoU / FB-IoU of one row (`ROWS`) on `episodes`."""
    return scores_of(scored_metric(row, pipe, episodes, args.eval_batch_size, args.resolution, shots))


def evaluate_synthetic(args, pipelines: dict) -> dict:
    """{"held_out": {"<k>-shot": {row: scores}}, "seen": {"1-shot": {"diffews": scores}}} on the val split."""
    results = {"held_out": {}, "seen": {}}
    held_out = build_source("synthetic", None, "val", None, "test", seed=args.seed)
    for shots in args.shots:
        episodes = EvaluationEpisodes(held_out, shots=shots, num_episodes=args.episodes, seed=0)
        results["held_out"][f"{shots}-shot"] = {
            row: score_row(row, pipelines.get(row), episodes, args, shots) for row in ROWS}
        print(f"held-out {shots}-shot: {results['held_out'][f'{shots}-shot']}", flush=True)
    seen = build_source("synthetic", None, "val", None, "train", seed=args.seed)
    episodes = EvaluationEpisodes(seen, shots=1, num_episodes=args.episodes, seed=0)
    results["seen"]["1-shot"] = {row: score_row(row, pipelines.get(row), episodes, args, 1) for row in ROWS}
    print(f"seen 1-shot: {results['seen']['1-shot']}", flush=True)
    return results


def example_sets(folder) -> dict[str, dict]:
    """{set name: {"supports": [(image, mask)], "queries": [(name, image, true mask)]}} of the demo's example folders.

    Each set folder holds `support_<i>.png` and `support_<i>_mask.png`, `query_<j>.png` and `truth/query_<j>.png`
    (true masks: L, 255 = object). Folders without supports, queries or true masks are skipped.
    """
    sets = {}
    for path in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        supports = sorted(path.glob("support_[0-9].png"))
        queries = sorted(path.glob("query_*.png"))
        if not supports or not queries or not all((path / "truth" / q.name).is_file() for q in queries):
            continue

        def read(p: Path, mode: str) -> Image.Image:
            with Image.open(p) as im:
                return im.convert(mode)

        sets[path.name] = {
            "supports": [(read(s, "RGB"), np.asarray(read(s.with_name(f"{s.stem}_mask.png"), "L")) >= 128)
                         for s in supports],
            "queries": [(q.name, read(q, "RGB"), np.asarray(read(path / "truth" / q.name, "L")) >= 128)
                        for q in queries],
        }
    return sets


@torch.no_grad()
def score_examples(pipe, folder) -> dict[str, dict[str, float]]:
    """{set: {query file: IoU in [0, 1]}}: each set's queries segmented with all its supports, at the query's size."""
    results = {}
    for name, example in example_sets(folder).items():
        images = [image for image, _ in example["supports"]]
        masks = [mask for _, mask in example["supports"]]
        support = pipe.encode_support(images, masks)
        results[name] = {}
        for query_name, image, truth in example["queries"]:
            predicted = pipe(image, support=support, output_type="np").masks[0]
            inter, union = np.logical_and(predicted, truth).sum(), np.logical_or(predicted, truth).sum()
            results[name][query_name] = round(float(inter / max(union, 1)), 3)
    return results


def evaluate_camvid(args, pipe, row: str = "diffews") -> dict:
    """Seen and novel classes of CamVid fold 0 (val, 1 shot), as `benchmarks/learning_camvid.py` scores them; `row`
    "query_only" scores a support-free model with the zero support it was trained with."""
    return camvid_scores(row, pipe, args.camvid_root, 0, 1, args.episodes, args.eval_batch_size, args.resolution)


# ---------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"Generated scenes, val split, held-out kinds (purple or star), {cfg['episodes']} episodes per row, scored at "
        f"{cfg['resolution']} x {cfg['resolution']}; mIoU / FB-IoU x100.", "",
        "| model | " + " | ".join(f"{k} mIoU | {k} FB-IoU" for k in results["synthetic"]["held_out"]) + " |",
        "|---|" + "---:|---:|" * len(results["synthetic"]["held_out"]),
    ]
    for row in ROWS:
        cells = " | ".join(f"{v[row]['miou']:.1f} | {v[row]['fb_iou']:.1f}"
                           for v in results["synthetic"]["held_out"].values())
        lines.append(f"| {ROW_TITLES[row]} | {cells} |")
    seen = results["synthetic"]["seen"]["1-shot"]
    lines += ["", "Training kinds, val scenes, 1-shot: " + ", ".join(
        f"{ROW_TITLES[row]} {seen[row]['miou']:.1f}" for row in ROWS) + " mIoU.", "",
        "Demo examples (IoU at the query's size, all the set's supports):", "",
        "| set | query | IoU |", "|---|---|---:|"]
    for name, queries in results["examples"].items():
        lines += [f"| {name} | {q} | {iou:.3f} |" for q, iou in queries.items()]
    if "camvid" in results:
        c = results["camvid"]
        lines += ["", f"CamVid fold 0, val, 1-shot, {cfg['episodes']} episodes each (fine-tunes: {cfg['camvid_steps']} "
                  "steps from the generated-scenes model; the from-scratch rows: "
                  "`benchmarks/results/learning_camvid.json`, as recorded there):", "", "| model | seen mIoU | novel mIoU |",
                  "|---|---:|---:|"]
        for row, title in camvid_row_titles(cfg).items():
            if row in c:
                lines.append(f"| {title} | {c[row]['seen']['miou']:.1f} | {c[row]['novel']['miou']:.1f} |")
        for row, r in c.get("from_scratch", {}).items():
            lines.append(f"| from scratch on CamVid: {ROW_TITLES[row]} | {r['seen']['miou']:.1f} | "
                         f"{r['novel']['miou']:.1f} |")
    timings = [f"| {phase} | {t['cpu_s'] / 60:.1f} | {t['wall_s'] / 60:.1f} |"
               for phase, t in results["timings"].items()]
    machine_line = (f"Machine: {machine_summary(results['machine'])} per process; load average "
                    f"{results['machine'].get('load_average_at_start')} at the start, {results['load_average_end']} "
                    "at the end.")
    return "\n".join([*lines, "", "| phase | CPU minutes | wall minutes |", "|---|---:|---:|", *timings, "",
                      machine_line, "", "```", results["command"], "```", ""])


def camvid_row_titles(cfg: dict) -> dict[str, str]:
    return {
        "pretrained": "generated pretraining, no CamVid fine-tune",
        "camvid_finetuned": "generated pretraining + CamVid fine-tune (CamVid episodes only)",
        "camvid_finetuned_mixed": (f"generated pretraining + CamVid fine-tune, "
                                   f"{cfg.get('camvid_mix_share', 0):.0%} generated episodes mixed in"),
        "query_only_camvid_finetuned_mixed": ("its support-free twin, the same mixed fine-tune without supports"),
    }


def camvid_record() -> dict:
    """The rows of the recorded from-scratch CamVid run (seen / novel mIoU), if the record is there."""
    if not CAMVID_RECORD.is_file():
        return {}
    rows = json.loads(CAMVID_RECORD.read_text())["rows"]
    return {row: {s: {"miou": rows[row][s]["miou"]} for s in ("seen", "novel")} for row in rows}


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = command_line("benchmarks.learning_synthetic", argv)
    info, timings = machine(), {}

    with Stopwatch() as watch:
        if args.vae_from:
            vae = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae").eval().requires_grad_(False)
            vae_report = {"loaded_from": repo_relative(args.vae_from), "steps": args.vae_steps, "scaling_factor":
                          vae.config.scaling_factor, "parameters": sum(p.numel() for p in vae.parameters())}
        else:
            pixels = synthetic_pixels(args.vae_scenes, args.resolution, args.seed)
            vae, vae_report = train_tiny_vae(pixels, steps=args.vae_steps, batch_size=16, seed=args.seed)
        vae_report["val_roundtrip"] = reconstruction_quality(
            vae, synthetic_pixels(max(1, args.vae_scenes // 5), args.resolution, args.seed, "val", "test"))
        vae_report["val_roundtrip"].pop("mask_iou_per_class")
    timings["VAE"] = watch.as_dict()
    print(f"VAE: {vae_report}", flush=True)

    init_dir = output_dir / "init"
    pipe = build_pipeline(vae, args.resolution, args.seed)
    pipe.save_pretrained(init_dir)
    # Each training runs in its own process (CPU times are those of that process); `--jobs` of them at a time.
    pool = (ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))
            if args.jobs > 1 else None)
    submit = pool.submit if pool else run_now
    runs = {row: submit(timed_training, train_argv(args, init_dir, output_dir / row, args.steps), blank,
                             args.threads) for row, blank in (("diffews", False), ("query_only", True))}
    for row, run in runs.items():
        timings[f"training: {ROW_TITLES[row]}"] = run.result()
        print(f"trained {row}: {timings[f'training: {ROW_TITLES[row]}']}", flush=True)
    camvid_runs = {}
    if args.camvid_root:  # fine-tuned in the background while the generated episodes are scored
        for row, tune in camvid_fine_tunes(args).items():
            argv = train_argv(args, output_dir / tune.start, output_dir / row, args.camvid_steps, "camvid",
                              tune.mix_share)
            camvid_runs[row] = submit(timed_training, argv, tune.start == "query_only", args.threads)

    pipelines = {}
    for row in ("diffews", "query_only"):
        pipelines[row] = DiffewSPipeline.from_pretrained(output_dir / row, dtype=torch.float32)
        pipelines[row].set_progress_bar_config(disable=True)
    results = {}
    with Stopwatch() as watch:
        results["synthetic"] = evaluate_synthetic(args, pipelines)
        results["examples"] = score_examples(pipelines["diffews"], args.examples_dir)
    timings["evaluation (generated episodes and demo examples)"] = watch.as_dict()
    print(f"examples: {results['examples']}", flush=True)

    if args.camvid_root:
        with Stopwatch() as watch:
            results["camvid"] = {"pretrained": evaluate_camvid(args, pipelines["diffews"])}
            for row, tune in camvid_fine_tunes(args).items():
                timings[f"CamVid fine-tune: {row}"] = camvid_runs[row].result()
                finetuned = DiffewSPipeline.from_pretrained(output_dir / row, dtype=torch.float32)
                finetuned.set_progress_bar_config(disable=True)
                results["camvid"][row] = evaluate_camvid(args, finetuned, tune.start)
            results["camvid"]["from_scratch"] = camvid_record()
        timings["CamVid evaluation"] = watch.as_dict()
    if pool:
        pool.shutdown()

    results.update({
        "config": {**{k: repo_relative(v) for k, v in vars(args).items() if k != "export_pipeline"},
                   "unet_parameters": sum(p.numel() for p in pipe.unet.parameters())},
        "vae": vae_report,
        "timings": timings,
        "machine": info,
        "load_average_end": load_average(),
        "command": command,
    })
    if args.export_pipeline:
        pipelines["diffews"].save_pretrained(args.export_pipeline, safe_serialization=True)
    report = markdown(results)
    write_json(output_dir / "results.json", results)
    (output_dir / "results.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
