#!/usr/bin/env python
"""Does DiffewS learn? A tiny DiffewS trained from scratch on CamVid on a CPU budget, against two controls.

    python benchmarks/learning_camvid.py --data-root /work/shared/data/camvid --output-dir runs/learning_camvid

1. Trains a tiny VAE (`AutoencoderKL`, scale factor 4) on CamVid training images and binary masks of the fold's
   training classes (`benchmarks/tiny_vae.py`).
2. Builds a tiny DiffewS pipeline (a `DiffewSUNet2DConditionModel` of 3.1M parameters and that VAE) and trains it with
   `train/train.py` on the fold's training classes (train split), 1 shot per episode, from scratch.
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
import json
import os
import platform
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.tiny_vae import load_camvid_pixels, reconstruction_quality, train_tiny_vae  # noqa: E402
from pipeline_diffews import DiffewSPipeline, DiffewSSupport, DiffewSUNet2DConditionModel  # noqa: E402
from train.data import EvaluationEpisodes, TrainingEpisodes, build_source, collate_episodes  # noqa: E402
from train.episode_batch import EpisodeCollator, EpisodeLatents, diffews_loss, encode_episodes  # noqa: E402
from train.evaluate import resize_ground_truth, score_episodes  # noqa: E402
from train.metrics import FewShotSegmentationMetric  # noqa: E402

# Stable Diffusion's UNet layout (attention in the upper levels and the middle block), scaled down: 3.1M parameters.
TINY_UNET_CONFIG = dict(
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    norm_num_groups=8,
)

ROWS = ("diffews", "query_only", "copy_support_mask")
ROW_TITLES = {
    "diffews": "DiffewS (tiny, trained here)",
    "query_only": "same model trained without supports",
    "copy_support_mask": "copy the support mask onto the query",
}


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


# ---------------------------------------------------------------------- timing


class Stopwatch:
    """Wall and CPU seconds (`time.process_time`: every thread of this process) of a block."""

    def __enter__(self) -> Stopwatch:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu

    def as_dict(self) -> dict:
        return {"wall_s": round(self.wall_s, 1), "cpu_s": round(self.cpu_s, 1)}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------- model


def build_pipeline(vae, resolution: int, seed: int) -> DiffewSPipeline:
    """A randomly initialised tiny DiffewS pipeline around the trained `vae` (random empty-prompt embedding)."""
    torch.manual_seed(seed)
    unet = DiffewSUNet2DConditionModel(sample_size=resolution // 4, **TINY_UNET_CONFIG)
    unet.empty_prompt_embeds = torch.randn(1, 2, TINY_UNET_CONFIG["cross_attention_dim"])
    return DiffewSPipeline(unet=unet, vae=vae, processing_resolution=resolution)


def zero_supports(latents: EpisodeLatents) -> EpisodeLatents:
    """The batch with every support latent (image and mask channels) replaced by zeros."""
    return EpisodeLatents(query=latents.query, target=latents.target, support=torch.zeros_like(latents.support))


@contextmanager
def supports_blanked(enabled: bool = True):
    """While active, `train/train.py` trains on episodes whose supports are zeros (the support-free control)."""
    import train.train as script

    original = script.encode_episodes

    def encode_blank(vae, pixels, sample: bool = False) -> EpisodeLatents:
        return zero_supports(original(vae, pixels, sample=sample))

    if enabled:
        script.encode_episodes = encode_blank
    try:
        yield
    finally:
        script.encode_episodes = original


@torch.no_grad()
def blank_support(pipe: DiffewSPipeline, shots: int, resolution: int) -> DiffewSSupport:
    """The cached support of zero latents that the support-free model was trained with."""
    size = resolution // pipe.vae_scale_factor
    zeros = torch.zeros(1, shots, pipe.unet.config.in_channels_ref, size, size, dtype=pipe.unet.dtype)
    key_values = pipe.unet.encode_support(zeros, pipe.config.timestep)
    return DiffewSSupport(key_values=key_values, num_shots=shots, processing_resolution=resolution)


# ---------------------------------------------------------------------- training


def train_argv(args, pretrained: Path, output_dir: Path, steps: int) -> list[str]:
    """The `train/train.py` command line of one model."""
    return [
        "--pretrained", str(pretrained), "--dataset", "camvid", "--data-root", str(args.data_root),
        "--output-dir", str(output_dir), "--fold", str(args.fold), "--max-steps", str(steps),
        "--batch-size", str(args.batch_size), "--gradient-accumulation-steps", "1",
        "--learning-rate", str(args.learning_rate), "--lr-end", str(args.lr_end), "--max-shots", str(args.max_shots),
        "--resolution", str(args.resolution), "--mixed-precision", "no", "--checkpointing-steps", str(steps + 1),
        "--dataloader-num-workers", "0", "--report-to", "none", "--seed", str(args.seed), "--cpu",
    ]


def reset_accelerate() -> None:
    """Forgets the process-wide Accelerate state, so that each in-process training starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_train_script(argv: list[str], blank: bool) -> None:
    from train.train import main

    reset_accelerate()
    try:
        with supports_blanked(blank):
            code = main(argv)
    finally:
        reset_accelerate()
    if code != 0:
        raise RuntimeError(f"train/train.py exited with {code}: {shlex.join(argv)}")


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
    for step in range(steps + warmup):
        if step == warmup:
            start = time.process_time()
        latents = encode_episodes(vae, collate(episodes.batch(step)))
        loss = diffews_loss(unet, latents, pipe.config.timestep)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return (time.process_time() - start) / steps


# ---------------------------------------------------------------------- evaluation


def episode_loader(episodes: EvaluationEpisodes, batch_size: int):
    return torch.utils.data.DataLoader(episodes, batch_size=batch_size, collate_fn=collate_episodes, num_workers=0)


@torch.no_grad()
def score_query_only(pipe, loader, metric, resolution: int, shots: int) -> None:
    """As `train.evaluate.score_episodes`, with the zero support in place of each episode's supports."""
    support = blank_support(pipe, shots, resolution)
    for episodes in loader:
        out = pipe([e.query_image for e in episodes], support=support, processing_resolution=resolution,
                   match_input_resolution=False, batch_size=len(episodes), output_type="np")
        for episode, mask in zip(episodes, out.masks):
            metric.update(mask, resize_ground_truth(episode.query_mask, resolution), episode.class_id)


def score_copy_baseline(loader, metric, resolution: int) -> None:
    """Predicts the (first) support mask, nearest-resized to the query's scoring size."""
    for episodes in loader:
        for episode in episodes:
            prediction = resize_ground_truth(episode.support_masks[0], resolution) == 1
            metric.update(prediction, resize_ground_truth(episode.query_mask, resolution), episode.class_id)


def evaluate_rows(args, pipelines: dict) -> dict:
    """{row: {"seen": scores, "novel": scores}} on the val split; scores as `FewShotSegmentationMetric.compute`."""
    results = {row: {} for row in ROWS}
    for split_name, mode in (("seen", "train"), ("novel", "test")):
        source = build_source("camvid", args.data_root, "val", args.fold, mode)
        episodes = EvaluationEpisodes(source, shots=args.shots, num_episodes=args.episodes, seed=0)
        for row in ROWS:
            metric = FewShotSegmentationMetric(num_classes=source.num_classes)
            loader = episode_loader(episodes, args.eval_batch_size)
            if row == "diffews":
                score_episodes(pipelines[row], loader, metric, args.resolution, progress=False)
            elif row == "query_only":
                score_query_only(pipelines[row], loader, metric, args.resolution, args.shots)
            else:
                score_copy_baseline(loader, metric, args.resolution)
            scores = metric.compute()
            results[row][split_name] = {
                "miou": round(scores["miou"], 2), "fb_iou": round(scores["fb_iou"], 2), "episodes": scores["episodes"],
                "per_class": {source.class_names[c]: round(v, 2) for c, v in scores["per_class"].items()},
            }
            print(f"{split_name:>5} {row:<18} mIoU {scores['miou']:6.2f}  FB-IoU {scores['fb_iou']:6.2f}", flush=True)
    return results


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
    m = results["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['threads']} thread(s); "
              f"load average {m['load_average']} at the start, {results['load_average_end']} at the end.",
              "", "```", results["command"], "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/learning_camvid.py"] + (sys.argv[1:] if argv is None else list(argv)))
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
            run_train_script(train_argv(args, init_dir, output_dir / row, steps), blank=blank)
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
        "config": {**{k: v for k, v in vars(args).items() if k != "export_pipeline"}, "steps": steps,
                   "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()),
                   "unet_config": TINY_UNET_CONFIG},
        "vae": vae_report,
        "timings": timings,
        "machine": info,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "command": command,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (output_dir / "results.md").write_text(markdown(results))
    print(markdown(results))
    if args.export_pipeline:
        pipelines["diffews"].save_pretrained(args.export_pipeline, safe_serialization=True)
        print(f"Saved the trained pipeline to {args.export_pipeline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
