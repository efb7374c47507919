#!/usr/bin/env python
"""Does DiffewS learn? A tiny DiffewS trained from scratch on CamVid on a CPU budget, against two controls.

    python -m benchmarks.learning_camvid --data-root ../shared/data/camvid --output-dir runs/learning_camvid

`--data-root` is the CamVid folder (train/ and val/, each with images/ and labels/).

1. Trains a tiny VAE (`AutoencoderKL`, scale factor 4) on CamVid training images and binary masks of the fold's
   training classes (`benchmarks/tiny_vae.py`).
2. Builds a tiny DiffewS pipeline (a `DiffewSUNet2DConditionModel` of 3.1M parameters and that VAE,
   `benchmarks/tiny_diffews.py`) and trains it with `train/train.py` on the fold's training classes (train split),
   1 shot per episode, from scratch.
3. Trains the same model for the same number of steps WITHOUT supports: every support latent (image and mask) is
   replaced by zeros, in training and evaluation alike, so it can only guess the class from the query.
4. Scores, with `train/evaluate.py`'s protocol (HSNet episodes from numpy seed 0, pooled per-class IoU), on the val
   split: the fold's training classes ("seen") and held-out classes ("novel", fold 0: Sky, Pavement, Car), for the
   DiffewS model, the support-free model, and the baseline that copies the support mask onto the query.
5. Writes `results.json` and `results.md` (tables, timings, the command) to `--output-dir`.

The training budget is CPU time of this process (all its threads), so that other work on a shared machine does not
change the result: `--minutes` per model is turned into a number of steps by timing a few steps first (or pass
`--steps`). Both models get the same steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import (
    Stopwatch,
    command_line,
    load_average,
    machine,
    machine_summary,
    repo_relative,
    train_argv,
    write_json,
)
from benchmarks.tiny_diffews import (
    ROW_TITLES,
    ROWS,
    TINY_UNET_CONFIG,
    build_pipeline,
    camvid_scores,
    run_train_script,
)
from benchmarks.tiny_vae import load_camvid_pixels, reconstruction_quality, train_tiny_vae
from pipeline_diffews import DiffewSPipeline
from train.data import TrainingEpisodes, build_source
from train.episode_batch import EpisodeCollator, diffews_loss, encode_episodes

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data-root", required=True, help="CamVid folder (train/ and val/, each with images/ and labels/).")
    a("--output-dir", required=True, help="Pipelines, results.json and results.md go here.")
    a("--fold", type=int, default=0, help="CamVid fold (0: novel classes Sky, Pavement, Car).")
    a("--resolution", type=int, default=64, help="Training, processing and scoring resolution (multiple of 16).")
    a("--minutes", type=float, default=12.0, help="CPU minutes of training per model (turned into steps).")
    a("--steps", type=int, default=None, help="Training steps per model (overrides --minutes).")
    a("--vae-steps", type=int, default=500, help="Training steps of the tiny VAE (batches of 16).")
    a("--batch-size", type=int, default=8, help="Episodes per training step.")
    a("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (from scratch: far above the 1e-5 "
                                                        "of fine-tuning Stable Diffusion).")
    a("--lr-end", type=float, default=1e-5, help="Learning rate at the last step (linear decay).")
    a("--max-shots", type=int, default=1, help="Shots per training episode are drawn in 1..max_shots.")
    a("--shots", type=int, default=1, help="Shots per evaluation episode.")
    a("--episodes", type=int, default=300, help="Evaluation episodes for seen and for novel classes.")
    a("--eval-batch-size", type=int, default=16, help="Episodes per pipeline call in the evaluation.")
    a("--threads", type=int, default=1, help="torch threads (1 is the fastest per CPU second on a busy machine).")
    a("--seed", type=int, default=0, help="Seed of the initial weights and of the training episodes.")
    a("--export-pipeline", default=None, help="Also save the trained DiffewS pipeline (safetensors) here.")
    args = p.parse_args(argv)
    if args.resolution % 16 or args.resolution < 16:
        p.error(f"--resolution must be a positive multiple of 16 (VAE factor 4 x UNet factor 4), got {args.resolution}")
    for name in ("vae_steps", "batch_size", "max_shots", "shots", "episodes", "eval_batch_size", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    return args


# ---------------------------------------------------------------------- training


def camvid_train_argv(args, pretrained: Path, output_dir: Path, steps: int) -> list[str]:
    """The `train/train.py` command line of one model: CamVid, the fold's training classes."""
    data = ["--dataset", "camvid", "--data-root", str(args.data_root), "--fold", str(args.fold)]
    return train_argv(pretrained, output_dir, steps, data, batch_size=args.batch_size,
                      learning_rate=args.learning_rate, lr_end=args.lr_end, max_shots=args.max_shots,
                      resolution=args.resolution, seed=args.seed)


def seconds_per_step(args, pretrained: Path, steps: int = 8, warmup: int = 2) -> float:
    """CPU seconds of one training step of `train/train.py` (data, VAE encoding, UNet forward, backward, AdamW).

    Times `steps` steps after `warmup` with the functions `train/train.py` runs, on the same episodes.
    """
    pipe = DiffewSPipeline.from_pretrained(pretrained, dtype=torch.float32)
    unet, vae = pipe.unet.train(), pipe.vae.eval()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, weight_decay=1e-2)
    source = build_source("camvid", args.data_root, "train", args.fold, "train")
    episodes = TrainingEpisodes(source, max_shots=args.max_shots, batch_size=args.batch_size, seed=args.seed,
                                num_steps=steps + warmup)
    collate = EpisodeCollator(args.resolution)

    def train_step(step: int) -> None:
        latents = encode_episodes(vae, collate(episodes.batch(step)))
        loss = diffews_loss(unet, latents, pipe.config.timestep)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(warmup):
        train_step(step)
    with Stopwatch() as watch:
        for step in range(warmup, warmup + steps):
            train_step(step)
    return watch.cpu_s / steps


# ---------------------------------------------------------------------- evaluation


def evaluate_rows(args, pipelines: dict) -> dict:
    """{row: {"seen": scores, "novel": scores}} on the val split; scores as `tiny_diffews.scores_of`."""
    return {row: camvid_scores(row, pipelines.get(row), args.data_root, args.fold, args.shots, args.episodes,
                               args.eval_batch_size, args.resolution) for row in ROWS}


# ---------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    cfg, t = results["config"], results["timings"]
    lines = [
        f"CamVid fold {cfg['fold']}, val split, {cfg['shots']}-shot, {cfg['episodes']} episodes each for seen and "
        f"novel classes, scored at {cfg['resolution']} x {cfg['resolution']}.",
        "",
        "| model | seen mIoU | seen FB-IoU | novel mIoU | novel FB-IoU |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        r = results["rows"][row]
        lines.append(f"| {ROW_TITLES[row]} | {r['seen']['miou']:.1f} | {r['seen']['fb_iou']:.1f} | "
                     f"{r['novel']['miou']:.1f} | {r['novel']['fb_iou']:.1f} |")
    lines += ["", "Per-class IoU:", "", "| class | " + " | ".join(ROW_TITLES[r] for r in ROWS) + " |",
              "|---|" + "---:|" * len(ROWS)]
    for split_name in ("seen", "novel"):
        for name in results["rows"]["diffews"][split_name]["per_class"]:
            cells = " | ".join(f"{results['rows'][r][split_name]['per_class'][name]:.1f}" for r in ROWS)
            lines.append(f"| {name} ({split_name}) | {cells} |")
    vae = results["vae"]
    lines += [
        "",
        f"Training: {cfg['steps']} steps of {cfg['batch_size']} episodes per model "
        f"({cfg['unet_parameters'] / 1e6:.1f}M-parameter UNet, learning rate {cfg['learning_rate']:g} -> "
        f"{cfg['lr_end']:g}); VAE: {vae['steps']} steps of {vae['batch_size']} "
        f"({vae['parameters'] / 1e6:.2f}M parameters; val round trip: mask IoU {vae['val_roundtrip']['mask_iou']:.1f}, "
        f"image PSNR {vae['val_roundtrip']['image_psnr']:.1f} dB).",
        "",
        "| phase | CPU minutes | wall minutes |",
        "|---|---:|---:|",
    ]
    for phase, v in t.items():
        lines.append(f"| {phase} | {v['cpu_s'] / 60:.1f} | {v['wall_s'] / 60:.1f} |")
    lines += ["", f"Machine: {machine_summary(results['machine'])}; load average "
              f"{results['machine'].get('load_average_at_start')} at the start, {results['load_average_end']} at the "
              "end.", "", "```", results["command"], "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = command_line("benchmarks.learning_camvid", argv)
    info, timings = machine(), {}

    with Stopwatch() as watch:
        train_pixels = load_camvid_pixels(args.data_root, "train", args.fold, args.resolution)
        vae, vae_report = train_tiny_vae(train_pixels, steps=args.vae_steps, batch_size=16, seed=args.seed)
        vae_report["val_roundtrip"] = reconstruction_quality(
            vae, load_camvid_pixels(args.data_root, "val", None, args.resolution, mode="test"))
    timings["VAE"] = watch.as_dict()

    init_dir = output_dir / "init"
    pipe = build_pipeline(vae, args.resolution, args.seed)
    pipe.save_pretrained(init_dir)
    steps = args.steps
    if steps is None:
        per_step = seconds_per_step(args, init_dir)
        steps = max(1, int(args.minutes * 60 / per_step))
        print(f"{per_step:.3f} CPU s per step: {steps} steps in {args.minutes:g} CPU minutes", flush=True)

    for row, blank in (("diffews", False), ("query_only", True)):
        with Stopwatch() as watch:
            run_train_script(camvid_train_argv(args, init_dir, output_dir / row, steps), blank=blank)
        timings[f"training: {ROW_TITLES[row]}"] = watch.as_dict()
        print(f"trained {row}: {watch.as_dict()}", flush=True)

    pipelines = {}
    for row in ("diffews", "query_only"):
        pipelines[row] = DiffewSPipeline.from_pretrained(output_dir / row, dtype=torch.float32)
        pipelines[row].set_progress_bar_config(disable=True)
    with Stopwatch() as watch:
        rows = evaluate_rows(args, pipelines)
    timings["evaluation (all rows)"] = watch.as_dict()

    results = {
        "rows": rows,
        "config": {**{k: repo_relative(v) for k, v in vars(args).items() if k != "export_pipeline"}, "steps": steps,
                   "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
                   "unet_config": TINY_UNET_CONFIG},
        "vae": vae_report,
        "timings": timings,
        "machine": info,
        "load_average_end": load_average(),
        "command": command,
    }
    write_json(output_dir / "results.json", results)
    (output_dir / "results.md").write_text(markdown(results))
    print(markdown(results))
    if args.export_pipeline:
        pipelines["diffews"].save_pretrained(args.export_pipeline, safe_serialization=True)
        print(f"Saved the trained pipeline to {args.export_pipeline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
