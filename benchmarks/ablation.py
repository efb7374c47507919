#!/usr/bin/env python
"""The paper's ablations in one command: every design it compares, trained alike from the same weights, then scored.

    python -m benchmarks.ablation --output-dir runs/ablation --output benchmarks/results/ablation_tiny.json \\
        --page docs/ablation.md                                      # the tiny scale, on a CPU
    python -m benchmarks.ablation --preset paper --pretrained diffews-init --image-encoder DIR/image_encoder \\
        --dataset coco20i --data-root /data/coco --fold 0 --output-dir runs/ablation_coco \\
        --output ablation_coco.json --page ablation_coco.md             # the paper's protocol, on a GPU

1. The initial pipeline: `--pretrained` (for the paper's protocol a Stable Diffusion 2.1 init from
   `python -m pipeline_diffews.init_from_sd`), or, by default, the tiny DiffewS of `benchmarks/tiny_diffews.py`
   (random 3.1M-parameter UNet, `--seed`) around the tiny VAE of `--vae-from` (default: the shipped
   `examples/tiny-fewshot-pipeline`, trained on generated scenes). The tokenized designs read the image encoder of
   `--image-encoder`; at the tiny scale a random, frozen 2-layer `CLIPVisionModelWithProjection` (`--seed`) is made.
2. Each design of `DESIGNS` (the paper's Figures 2-4 and Tables 4-5; `--designs` picks some) is trained by
   `train/train.py` from that same pipeline with the design's options (`--interaction`, `--mask-injection`,
   `--target`, `--generation`, `--beta-start` / `--beta-end`, `--image-encoder`): train.py adapts the pipeline to the
   design, so every design starts from the same weights and trains the same steps with the same seed and episodes.
3. Each trained pipeline is scored by `train/evaluate.py` (HSNet's protocol: episodes from numpy seed 0, IoU pooled
   per class): 1 shot, 5 shots, and 5 shots with support-token sampling; DiffewS's design also at the thresholds of
   the paper's Table 3, and at 1 shot on a second draw of episodes (`--seed` + 1), the spread of the draw.
   The tiny scale scores the held-out kinds of the generated scenes (val split, `--dataset synthetic`).
4. Writes the results (`--output`, JSON: every cell with its wall and CPU seconds, the machine, the command) and a
   page (`--page`, Markdown) laid out like the paper's figures and tables, the paper's published numbers beside, and
   which of the paper's orderings held. `--render FILE` writes the page again from a results file.

`--preset tiny` (default) and `--preset paper` set the training and scoring defaults of each scale (see
`PRESETS`); every option given on the command line wins. A design already scored in `--output-dir` (its
`cells.json`) is read back, not run again, so an interrupted run continues where it stopped; a design trained but
not scored (its `training.json` and pipeline, without `cells.json`) is scored again without training.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, Stopwatch, command_line, load_average, machine, machine_summary, \
    repo_relative, write_json
from benchmarks.tiny_diffews import build_pipeline, reset_accelerate, run_train_script
from pipeline_diffews.design_diffews import PAPER_DESIGNS, DiffewSDesign

TINY_VAE = REPO_ROOT / "examples" / "tiny-fewshot-pipeline"


@dataclass(frozen=True)
class Design:
    """One trained design of the ablations: `PAPER_DESIGNS`' name, its design and MI2M beta range, a title."""

    name: str
    design: DiffewSDesign
    betas: tuple[float, float] | None
    title: str

    @property
    def tokenized(self) -> bool:
        return self.design.is_tokenized

    @property
    def folder(self) -> str:
        return self.name.replace(":", "_").replace("+", "_")

    def train_options(self) -> list[str]:
        """The `train/train.py` options of the design (every choice, DiffewS's included)."""
        argv = []
        for key, value in self.design.to_dict().items():
            argv += [f"--{key.replace('_', '-')}", value]
        if self.betas is not None:
            argv += ["--beta-start", str(self.betas[0]), "--beta-end", str(self.betas[1])]
        return argv


TITLES = {
    "kv_fusion+concat": "KV fusion + concatenation (DiffewS)",
    "kv_fusion+multiply": "KV fusion + multiplication (RGB)",
    "kv_fusion+add": "KV fusion + addition",
    "kv_fusion+attention_mask": "KV fusion + attention mask",
    "tokenized_cross_attention+concat": "tokenized cross-attention + concatenation",
    "tokenized_cross_attention+multiply": "tokenized cross-attention + multiplication",
    "tokenized_cross_attention+add": "tokenized cross-attention + addition",
    "tokenized_cross_attention+attention_mask": "tokenized cross-attention + attention mask",
    "kv_fusion+multiply_latent": "KV fusion + multiplication (latent)",
    "qkv_fusion+concat": "QKV fusion + concatenation",
    "target:real_foreground": "target: real foreground on black",
    "target:black_foreground": "target: black foreground on the image",
    "target:mask_on_image": "target: the mask added on the image",
    "mn2m": "MN2M (noise to mask, Marigold)",
    "mi2m:0.00085-0.012": "MI2M, betas (0.00085, 0.012)",
    "mi2m:0.0272-0.384": "MI2M, betas (0.0272, 0.384)",
}
DESIGNS = tuple(Design(name, design, betas, TITLES.get(name, name)) for name, (design, betas) in PAPER_DESIGNS.items())
DESIGNS_BY_NAME = {d.name: d for d in DESIGNS}
DIFFEWS = "kv_fusion+concat"
KV = {i: "kv_fusion+" + i for i in ("concat", "multiply", "add", "attention_mask", "multiply_latent")}
TCA = {i: "tokenized_cross_attention+" + i for i in ("concat", "multiply", "add", "attention_mask")}
TARGET_ROWS = [DIFFEWS, "target:real_foreground", "target:black_foreground", "target:mask_on_image"]
MI2M_LOW, MI2M_HIGH, MN2M, QKV = "mi2m:0.00085-0.012", "mi2m:0.0272-0.384", "mn2m", "qkv_fusion+concat"

# Table 3 of the paper: DiffewS scored at these thresholds (1 shot).
THRESHOLDS = {"relative": (0.20, 0.25, 0.30, 0.35, 0.40), "absolute": (0.10, 0.15, 0.20, 0.25, 0.30)}
# The cells scored for every design: (name, shots, support-token sampling).
CELLS = (("1-shot", 1, False), ("5-shot", 5, False), ("5-shot sampled", 5, True))

PRESETS = {
    # The tiny model on a CPU: generated scenes, every design the same small budget (docs/ablation.md).
    "tiny": dict(dataset="synthetic", steps=150, batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-3,
                 lr_end=1e-5, resolution=64, episodes=150, eval_batch_size=16, max_shots=1, num_inference_steps=5),
    # The paper's ablation protocol (COCO-20i fold 0, one GPU, effective batch 4, 10k steps, lr 1e-5).
    "paper": dict(dataset="coco20i", steps=10_000, batch_size=1, gradient_accumulation_steps=4, learning_rate=1e-5,
                  lr_end=1e-7, resolution=512, episodes=None, eval_batch_size=4, max_shots=1, num_inference_steps=None),
}

# What the paper publishes (COCO-20i fold 0, 1 shot, mIoU): design name -> value; the figures without values in
# the text are listed in `UNPUBLISHED`.
PUBLISHED = {
    MN2M: 15.2, MI2M_LOW: 19.9, MI2M_HIGH: 43.2,
    KV["multiply_latent"]: 32.14, KV["multiply"]: 33.12,
    DIFFEWS: 46.64, QKV: 46.61,
}
PUBLISHED_THRESHOLDS = {
    "relative": (47.56, 47.69, 47.48, 47.40, 47.11),
    "absolute": (46.64, 47.21, 46.91, 46.53, 46.00),
}
# Table 6 (in-context model, COCO-20i): 5 shots without and with support-token sampling; 10 shots likewise.
PUBLISHED_SAMPLING = {"5-shot": (72.2, 74.7), "10-shot": (70.1, 73.4)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=sorted(PRESETS), default="tiny", help="Training and scoring defaults (see PRESETS).")
    a("--output-dir", help="Trained pipelines, per-design cells and evaluation files go here.")
    a("--output", help="Write the results as JSON here.")
    a("--page", help="Write the Markdown page here.")
    a("--render", metavar="FILE", help="Only write --page from this results file (nothing runs).")
    a("--note", action="append", default=[],
      help="With --render: a note on the run, added to the results file and the page (repeatable).")
    a("--designs", nargs="+", choices=[d.name for d in DESIGNS], default=None, help="Run these designs (default: all).")
    a("--pretrained", help="Initial pipeline (default at the tiny scale: the tiny DiffewS built here).")
    a("--image-encoder", metavar="DIR",
      help="CLIPVisionModelWithProjection folder of the tokenized designs (default at the tiny scale: a random tiny one).")
    a("--vae-from", default=str(TINY_VAE), help="Pipeline folder whose VAE the tiny DiffewS uses.")
    a("--dataset", help="Training and scoring data source (tiny: synthetic; paper: coco20i).")
    a("--data-root", default=None, help="The dataset's folder (synthetic: none).")
    a("--fold", type=int, default=None, help="Train on the fold's training classes, score its test classes.")
    for name, kind in (("steps", int), ("batch-size", int), ("gradient-accumulation-steps", int),
                       ("learning-rate", float), ("lr-end", float), ("resolution", int), ("episodes", int),
                       ("eval-batch-size", int), ("max-shots", int), ("num-inference-steps", int)):
        a(f"--{name}", type=kind, default=None, help="Default: the preset's.")
    a("--no-thresholds", dest="thresholds", action="store_false", help="Skip the threshold rows (Table 3).")
    a("--seed", type=int, default=0, help="Seed of the initial weights and of every training.")
    a("--jobs", type=int, default=1, help="Designs run side by side in this many processes (same results).")
    a("--threads", type=int, default=1, help="torch threads per process.")
    a("--cpu", action="store_true", help="Train and score on the CPU (default where there is no GPU).")
    args = p.parse_args(argv)
    if args.render:
        if not args.page:
            p.error("--render needs --page")
        return args
    if not args.output_dir:
        p.error("--output-dir is required")
    given = {k for k in PRESETS[args.preset] if getattr(args, k) is not None}
    for key, value in PRESETS[args.preset].items():
        if key not in given:
            setattr(args, key, value)
    if args.pretrained is None and args.preset != "tiny":
        p.error("--preset paper needs --pretrained (a pipeline from python -m pipeline_diffews.init_from_sd)")
    if args.data_root is None and args.dataset != "synthetic":
        p.error(f"--data-root is required for --dataset {args.dataset}")
    args.designs = args.designs or [d.name for d in DESIGNS]
    if any(DESIGNS_BY_NAME[n].tokenized for n in args.designs) and args.image_encoder is None and args.pretrained:
        p.error("the tokenized designs need --image-encoder DIR (or leave them out with --designs)")
    args.cpu = args.cpu or not torch.cuda.is_available()
    return args


# ---------------------------------------------------------------------- setup


def tiny_image_encoder(folder: Path, resolution: int, seed: int) -> Path:
    """A random 2-layer `CLIPVisionModelWithProjection` (width 32, patches of resolution / 8) in `folder/image_encoder`
    and its `CLIPImageProcessor` in `folder/feature_extractor`, as diffusers' IP-Adapter repositories lay them out."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=resolution, patch_size=resolution // 8, projection_dim=32)
    CLIPVisionModelWithProjection(config).save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution}) \
        .save_pretrained(folder / "feature_extractor")
    return folder / "image_encoder"


def initial_pipeline(args, output_dir: Path) -> tuple[Path, Path | None]:
    """The pipeline every design starts from, and the image encoder of the tokenized designs."""
    if args.pretrained:
        return Path(args.pretrained), Path(args.image_encoder) if args.image_encoder else None
    init = output_dir / "init"
    if not (init / "model_index.json").is_file():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae")
        build_pipeline(vae, args.resolution, args.seed).save_pretrained(init)
    encoder = Path(args.image_encoder) if args.image_encoder else output_dir / "clip" / "image_encoder"
    if not args.image_encoder and not (encoder / "config.json").is_file():
        tiny_image_encoder(output_dir / "clip", args.resolution, args.seed)
    return init, encoder


# ---------------------------------------------------------------------- one design


def data_options(args) -> list[str]:
    """The data options of `train/train.py` and `train/evaluate.py`: the dataset, its folder and fold (the generated
    scenes: their seed)."""
    data = ["--dataset", args.dataset]
    if args.data_root:
        data += ["--data-root", str(args.data_root)]
    if args.fold is not None:
        data += ["--fold", str(args.fold)]
    if args.dataset == "synthetic":
        data += ["--source-option", f"seed={args.seed}"]
    return data


def train_argv(args, design: Design, pretrained: Path, image_encoder: Path | None, output_dir: Path) -> list[str]:
    """The `train/train.py` command line of one design."""
    argv = [*data_options(args), "--pretrained", str(pretrained), "--output-dir", str(output_dir),
            "--max-steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--gradient-accumulation-steps", str(args.gradient_accumulation_steps),
            "--learning-rate", str(args.learning_rate), "--lr-end", str(args.lr_end),
            "--max-shots", str(args.max_shots), "--resolution", str(args.resolution), "--seed", str(args.seed),
            "--report-to", "none", "--checkpointing-steps", str(min(args.steps + 1, 2000)),
            *design.train_options()]
    if design.tokenized:
        argv += ["--image-encoder", str(image_encoder)]
    if args.cpu:
        argv += ["--cpu", "--mixed-precision", "no", "--dataloader-num-workers", "0"]
    return argv


def evaluate_argv(args, pretrained: Path, output: Path, shots: int, sampled: bool, seed: int = 0,
                  threshold: tuple[str, float] | None = None, multistep: bool = False) -> list[str]:
    """The `train/evaluate.py` command line of one cell (`multistep`: the design takes --num-inference-steps)."""
    argv = ["--pretrained", str(pretrained), *data_options(args), "--shots", str(shots),
            "--resolution", str(args.resolution), "--batch-size", str(args.eval_batch_size), "--seed", str(seed),
            "--output", str(output)]
    if args.episodes is not None:
        argv += ["--episodes", str(args.episodes)]
    if sampled:
        argv.append("--support-token-sampling")
    if threshold is not None:
        argv += ["--threshold-mode", threshold[0], "--threshold", str(threshold[1])]
    if multistep and args.num_inference_steps is not None:
        argv += ["--num-inference-steps", str(args.num_inference_steps)]
    if args.cpu:
        argv += ["--cpu", "--num-workers", "0"]
    return argv


def run_evaluation(argv: list[str]) -> dict:
    """`train/evaluate.py` with `argv` in this process: {"miou", "fb_iou", "episodes", "wall_s", "cpu_s", ...}."""
    from train.evaluate import main

    reset_accelerate()
    with Stopwatch() as watch:
        code = main(argv)
    reset_accelerate()
    if code != 0:
        raise RuntimeError(f"train/evaluate.py exited with {code}")
    output = Path(argv[argv.index("--output") + 1])
    results = json.loads(output.read_text())
    return {"miou": round(results["miou"], 2), "fb_iou": round(results["fb_iou"], 2),
            "episodes": results["episodes"], **watch.as_dict(),
            "num_inference_steps": results.get("num_inference_steps"), "ensemble_size": results.get("ensemble_size")}


@torch.no_grad()
def score_other_class_supports(args, folder: Path, multistep: bool) -> dict:
    """1-shot mIoU of the trained pipeline in `folder` when each query of the 1-shot cell's episodes gets the support of
    the next episode of another class: a design that reads its support falls here, one that ignores it does not."""
    from dataclasses import replace

    from pipeline_diffews import DiffewSPipeline
    from train.data import EvaluationEpisodes, build_source, collate_episodes
    from train.evaluate import fold_scores, score_episodes
    from train.metrics import FewShotSegmentationMetric

    options = {"seed": args.seed} if args.dataset == "synthetic" else {}
    source = build_source(args.dataset, args.data_root, "val", args.fold, "test", **options)
    episodes = EvaluationEpisodes(source, shots=1, num_episodes=args.episodes, seed=0)
    items = [episodes[i] for i in range(len(episodes))]
    swapped = []
    for i, episode in enumerate(items):
        other = next(items[(i + k) % len(items)] for k in range(1, len(items))
                     if items[(i + k) % len(items)].class_id != episode.class_id)
        swapped.append(replace(episode, support_images=other.support_images, support_masks=other.support_masks))
    device = "cpu" if args.cpu else "cuda"
    pipe = DiffewSPipeline.from_pretrained(folder, dtype=torch.float32 if args.cpu else torch.float16).to(device)
    pipe.set_progress_bar_config(disable=True)
    sampling = {"generator": torch.Generator().manual_seed(0)} if multistep else {}
    if multistep and args.num_inference_steps is not None:
        sampling["num_inference_steps"] = args.num_inference_steps
    metric = FewShotSegmentationMetric(num_classes=source.num_classes).to(device)
    loader = torch.utils.data.DataLoader(swapped, batch_size=args.eval_batch_size, collate_fn=collate_episodes)
    with Stopwatch(device) as watch:
        score_episodes(pipe, loader, metric, args.resolution, progress=False, sampling=sampling)
    scores = fold_scores(metric.compute(), episodes.class_ids)
    return {"miou": round(scores["miou"], 2), "fb_iou": round(scores["fb_iou"], 2), "episodes": scores["episodes"],
            **watch.as_dict()}


def run_design(args, name: str, pretrained: Path, image_encoder: Path | None, output_dir: Path) -> dict:
    """Trains and scores one design in this process (its cells are also kept in `output_dir/name/cells.json`)."""
    torch.set_num_threads(args.threads)
    design = DESIGNS_BY_NAME[name]
    folder = output_dir / design.folder
    record_file = folder / "cells.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    training_file = folder / "training.json"
    if training_file.is_file() and (folder / "model_index.json").is_file():  # trained already: scored again
        record = {**json.loads(training_file.read_text()), "cells": {}}
    else:
        argv = train_argv(args, design, pretrained, image_encoder, folder)
        with Stopwatch() as watch:
            run_train_script(argv, blank=False)
        record = {"design": name, "title": design.title, "training": watch.as_dict(),
                  "train_command": command_line_of("train/train.py", argv)}
        write_json(training_file, record)
        record["cells"] = {}
    evaluations = folder / "evaluations"
    multistep = design.design.is_multistep
    for cell, shots, sampled in CELLS:
        record["cells"][cell] = run_evaluation(evaluate_argv(
            args, folder, evaluations / f"{cell.replace(' ', '_')}.json", shots, sampled, multistep=multistep))
    record["cells"]["1-shot, other class's support"] = score_other_class_supports(args, folder, multistep)
    if name == DIFFEWS:
        record["cells"]["1-shot, second draw"] = run_evaluation(
            evaluate_argv(args, folder, evaluations / "1-shot_seed1.json", 1, False, seed=1))
        if args.thresholds:
            record["thresholds"] = {
                mode: {f"{value:.2f}": run_evaluation(evaluate_argv(
                    args, folder, evaluations / f"1-shot_{mode}_{value:.2f}.json", 1, False, threshold=(mode, value)))
                    for value in values}
                for mode, values in THRESHOLDS.items()}
    record["evaluate_command"] = command_line_of("train/evaluate.py", evaluate_argv(
        args, folder, evaluations / "5-shot_sampled.json", 5, True, multistep=multistep))
    write_json(record_file, record)
    print(f"{name}: {json.dumps({k: v['miou'] for k, v in record['cells'].items()})}", flush=True)
    return record


def command_line_of(script: str, argv: list[str]) -> str:
    """`python SCRIPT ARGV` with absolute paths written relative to the repository root."""
    return command_line("x", argv).replace("python -m x", f"python {script}", 1)


def git_commit() -> str | None:
    """The repository's commit the run started from (None outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_now(fn, *args) -> Future:
    future = Future()
    future.set_result(fn(*args))
    return future


# ---------------------------------------------------------------------- orderings


def miou(results: dict, name: str, cell: str = "1-shot") -> float | None:
    record = results["designs"].get(name)
    return None if record is None else record["cells"][cell]["miou"]


def draw_spread(results: dict) -> float | None:
    """How much DiffewS's 1-shot mIoU moves between two draws of as many episodes (seed 0 and seed 1)."""
    cells = results["designs"].get(DIFFEWS, {}).get("cells", {})
    if "1-shot, second draw" not in cells:
        return None
    return round(abs(cells["1-shot"]["miou"] - cells["1-shot, second draw"]["miou"]), 2)


def orderings(results: dict) -> list[dict]:
    """The paper's orderings, each with whether it held here (None where a design was not run), its margin (the
    smallest difference among the pairs it orders) and whether that margin is within the spread of the draw."""
    checks = []
    spread = draw_spread(results)

    def check(claim: str, source: str, names: list[str], pairs: list[tuple[str, str]], strict: bool = True) -> None:
        values = {n: miou(results, n) for n in names}
        entry = {"claim": claim, "paper": source, "values": values, "held": None}
        if all(v is not None for v in values.values()):
            margin = round(min(values[a] - values[b] for a, b in pairs), 2)
            entry.update(held=margin > 0 if strict else margin >= 0, margin=margin,
                         within_draw=spread is not None and abs(margin) <= spread)
        checks.append(entry)

    def best(winner: str, others: list[str]) -> list[tuple[str, str]]:
        return [(winner, other) for other in others]

    for injection in ("concat", "multiply", "add", "attention_mask"):
        check(f"KV fusion above tokenized cross-attention with {injection}", "Figure 2",
              [KV[injection], TCA[injection]], best(KV[injection], [TCA[injection]]))
    kv_rows = [KV[i] for i in ("concat", "multiply", "add", "attention_mask")]
    check("concatenation the best injection with KV fusion", "Figure 2", kv_rows, best(DIFFEWS, kv_rows[1:]))
    tca_rows = [TCA[i] for i in ("attention_mask", "concat", "multiply", "add")]
    check("attention mask the best injection with tokenized cross-attention", "Figure 2", tca_rows,
          best(tca_rows[0], tca_rows[1:]))
    check("white foreground the best target", "Figure 3", TARGET_ROWS, best(DIFFEWS, TARGET_ROWS[1:]))
    generation_rows = [DIFFEWS, MI2M_HIGH, MI2M_LOW, MN2M]
    check("OI2M the best generation", "Figure 4", generation_rows, best(DIFFEWS, generation_rows[1:]))
    check("MI2M (0.0272, 0.384) above MI2M (0.00085, 0.012) above MN2M (43.2 > 19.9 > 15.2)", "Figure 4",
          generation_rows[1:], [(MI2M_HIGH, MI2M_LOW), (MI2M_LOW, MN2M)])
    check("multiplication on the image above multiplication on the latent (33.12 > 32.14)", "Table 4",
          [KV["multiply"], KV["multiply_latent"]], best(KV["multiply"], [KV["multiply_latent"]]))
    check("KV fusion at least as good as QKV fusion (46.64 vs 46.61)", "Table 5", [DIFFEWS, QKV],
          [(DIFFEWS, QKV)], strict=False)
    def gains(cell: str, baseline: str) -> dict:
        return {n: round(miou(results, n, cell) - miou(results, n, baseline), 2)
                for n, r in results["designs"].items() if cell in r["cells"] and baseline in r["cells"]}

    def counted(values: dict) -> str:
        clear = "" if spread is None else f", {sum(g > spread for g in values.values())} by more than the draw's spread"
        return f"{sum(g > 0 for g in values.values())} of {len(values)} designs{clear}"

    sampling = gains("5-shot sampled", "5-shot")
    if sampling:
        checks.append({"claim": "support-token sampling raises 5-shot mIoU (72.2 -> 74.7)", "paper": "Table 6",
                       "values": sampling, "held": counted(sampling)})
    reading = {n: -g for n, g in gains(OTHER, "1-shot").items()}
    if reading:
        checks.append({"claim": "the design reads its support: 1-shot mIoU above that with another class's support",
                       "paper": "(here only)", "values": reading, "held": counted(reading)})
    thresholds = results["designs"].get(DIFFEWS, {}).get("thresholds")
    if thresholds:
        for mode, paper_best in (("relative", "0.25"), ("absolute", "0.15")):
            values = {k: v["miou"] for k, v in thresholds[mode].items()}
            ours = max(values, key=values.get)
            checks.append({"claim": f"{mode} threshold best at {paper_best}", "paper": "Table 3", "values": values,
                           "held": ours == paper_best, "best_here": ours})
    return checks


# ---------------------------------------------------------------------- page


def fmt(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


OTHER = "1-shot, other class's support"


def design_rows(results: dict, names: list[str], published: dict | None = None) -> list[str]:
    """Table rows: design, our mIoU (1 shot, 1 shot with another class's support, 5 shots, 5 shots sampled), the
    paper's value, the wall minutes of the training and of the scoring."""
    rows = []
    for name in names:
        record = results["designs"].get(name)
        design = DESIGNS_BY_NAME[name]
        paper = (published or {}).get(name, PUBLISHED.get(name))
        paper_text = fmt(paper, 2) if paper is not None else "not in the text"
        if record is None:
            rows.append(f"| {design.title} | not run | | | | {paper_text} | |")
            continue
        cells = record["cells"]
        scoring = sum(c["cpu_s"] for c in cells.values()) / 60
        other = cells.get(OTHER, {}).get("miou")
        rows.append(f"| {design.title} | {fmt(cells['1-shot']['miou'])} | {fmt(other)} | "
                    f"{fmt(cells['5-shot']['miou'])} | {fmt(cells['5-shot sampled']['miou'])} | {paper_text} | "
                    f"{record['training']['cpu_s'] / 60:.1f} + {scoring:.1f} |")
    return rows


TABLE_HEAD = ["| design | 1-shot | 1-shot, another class's support | 5-shot | 5-shot, sampled | paper (1-shot) | "
              "CPU minutes: train + score |", "|---|---:|---:|---:|---:|---:|---:|"]


def markdown(results: dict) -> str:
    cfg = results["config"]
    scale = ("tiny" if cfg["preset"] == "tiny" else "paper")
    held = orderings(results)
    lines = ["# The paper's ablations, run", ""]
    if scale == "tiny":
        lines += [
            "Every design the paper compares, trained from the same initial weights with the same budget and seed "
            "by `train/train.py` and scored by `train/evaluate.py`, at the tiny scale a CPU allows: the 3.1M-parameter "
            "UNet of `benchmarks/tiny_diffews.py` (random initialisation, seed "
            f"{cfg['seed']}) around the tiny VAE of `{cfg['vae_from']}`, trained on generated episodes "
            f"(`--dataset synthetic`, training kinds) for {cfg['steps']} steps of {cfg['batch_size']} one-shot "
            f"episodes at {cfg['resolution']} x {cfg['resolution']} (AdamW, learning rate {cfg['learning_rate']:g} "
            f"to {cfg['lr_end']:g}), scored on the held-out kinds (val split; {cfg['episodes']} episodes per cell, "
            "HSNet's draw from numpy seed 0). The tokenized designs read a random, frozen 2-layer CLIP image encoder "
            "(the paper's reads the pretrained OpenCLIP ViT-H/14); only its projection into the cross-attention and "
            "the UNet learn.",
            "",
            "**This table is evidence that every design trains and reads its support, not a claim about Stable "
            "Diffusion 2.1**: the paper starts from a generative model pretrained on billions of images and trains "
            "10k steps of real photographs; here a random UNet learns for minutes. The paper's numbers (COCO-20i "
            "fold 0, 1 shot, mIoU) stand beside ours for their order, not their size.",
        ]
    else:
        lines += [f"The paper's ablation protocol: `{cfg['pretrained']}`, `--dataset {cfg['dataset']}` fold "
                  f"{cfg['fold']}, {cfg['steps']} steps of {cfg['batch_size']} x {cfg['gradient_accumulation_steps']} "
                  f"episodes, learning rate {cfg['learning_rate']:g} to {cfg['lr_end']:g}, {cfg['resolution']} px."]
    spread = results["designs"].get(DIFFEWS, {}).get("cells", {})
    if "1-shot, second draw" in spread:
        lines += ["", f"Spread of the episode draw: DiffewS scores {fmt(spread['1-shot']['miou'])} at 1 shot on "
                  f"HSNet's draw (seed 0) and {fmt(spread['1-shot, second draw']['miou'])} on a second draw (seed 1) "
                  "of as many episodes; differences of that size between designs are within the draw."]
    lines += ["", "Columns: mIoU x100 (IoU pooled per class, mean over the held-out classes) at 1 shot; at 1 shot with "
              "each query given the support of another class (the next episode of another class: a design that reads "
              "its support falls there); at 5 shots; at 5 shots with support-token sampling (each layer's support "
              "keys/values sampled down to one shot's count); the paper's published value; CPU minutes of the "
              "training and of all the design's scoring (one thread each; the wall minutes, longer on the shared "
              "machine, are in the results file).", ""]

    lines += ["## Figure 2: interaction x injection of the support mask", "", *TABLE_HEAD,
              *design_rows(results, [KV[i] for i in ("concat", "multiply", "add", "attention_mask")]),
              *design_rows(results, [TCA[i] for i in ("concat", "multiply", "add", "attention_mask")]), "",
              "The paper gives Figure 2 as bars without values in the text; it says: KV fusion (its \"FSA\") above "
              "tokenized cross-attention (\"TCA\"), concatenation best with KV fusion, the attention mask best with "
              "the tokenized interaction.", ""]
    lines += ["## Figure 3: the form of the query's target", "", *TABLE_HEAD,
              *design_rows(results, TARGET_ROWS), "",
              "Figure 3's bars have no values in the text; the paper finds the white foreground best.", ""]
    lines += ["## Figure 4: the generation process", "", *TABLE_HEAD,
              *design_rows(results, [DIFFEWS, MI2M_HIGH, MI2M_LOW, MN2M], {DIFFEWS: None}), "",
              "The paper gives MN2M 15.2, MI2M 19.9 and 43.2 (its two beta ranges); OI2M is the best, its value not in "
              "the text."]
    steps = {n: results["designs"][n]["cells"]["1-shot"].get("num_inference_steps")
             for n in (MI2M_LOW, MI2M_HIGH, MN2M) if n in results["designs"]}
    if steps:
        lines += ["", "Inference steps of the multi-step designs (`--num-inference-steps`; the paper does not state "
                  "its counts): " + ", ".join(f"{TITLES.get(n, n)} {s}" for n, s in steps.items()) + "."]
    lines += ["", "## Table 3: the threshold (DiffewS, 1 shot)", ""]
    thresholds = results["designs"].get(DIFFEWS, {}).get("thresholds")
    if thresholds:
        for mode in ("relative", "absolute"):
            values = THRESHOLDS[mode]
            lines += [f"| {mode} threshold | " + " | ".join(f"{v:.2f}" for v in values) + " |",
                      "|---|" + "---:|" * len(values),
                      "| here | " + " | ".join(fmt(thresholds[mode][f"{v:.2f}"]["miou"]) for v in values) + " |",
                      "| paper | " + " | ".join(f"{v:.2f}" for v in PUBLISHED_THRESHOLDS[mode]) + " |", ""]
    else:
        lines += ["Not run (`--no-thresholds`).", ""]
    lines += ["## Table 4: multiplication on the image or on the latent", "", *TABLE_HEAD,
              *design_rows(results, [KV["multiply"], KV["multiply_latent"]]), ""]
    lines += ["## Table 5: KV fusion or QKV fusion", "", *TABLE_HEAD,
              *design_rows(results, [DIFFEWS, QKV]), ""]
    lines += ["## Support-token sampling (Table 6)", "",
              "The paper's in-context model on COCO-20i: 5 shots 72.2 without, 74.7 with; 10 shots 70.1 and 73.4. "
              "Here the `5-shot, sampled` column of every table above, for designs trained with one shot per "
              "episode.", ""]
    spread = draw_spread(results)
    lines += ["## The paper's orderings here", "",
              "Each ordering of the paper checked on the 1-shot column; \"within the draw\" where the smallest difference "
              f"it needs is no larger than the spread of the episode draw ({fmt(spread, 2)}: DiffewS's 1-shot mIoU on two "
              "draws of as many episodes). The last two rows count the designs whose sampled 5-shot score is above "
              "their plain 5-shot one, and whose 1-shot score is above their score with another class's support "
              "(the gains in mIoU points).", "",
              "| paper | ordering | held here | values (1-shot mIoU) |", "|---|---|---|---|"]
    for c in held:
        verdict = {True: "yes", False: "**no**", None: "not run"}.get(c["held"], c["held"])
        if c.get("within_draw"):
            verdict += f" (margin {c['margin']:g}: within the draw)"
        values = ", ".join(f"{k} {v:g}" for k, v in c["values"].items() if v is not None)
        lines.append(f"| {c['paper']} | {c['claim']} | {verdict} | {values} |")
    if results.get("notes"):
        lines += ["", "## Notes on this run", "", *[f"- {note}" for note in results["notes"]]]
    lines += ["", "## Time and machine", ""]
    total = sum(r["training"]["wall_s"] + sum(c["wall_s"] for c in r["cells"].values())
                + sum(t["wall_s"] for m in r.get("thresholds", {}).values() for t in m.values())
                for r in results["designs"].values())
    cpu_total = sum(r["training"]["cpu_s"] + sum(c["cpu_s"] for c in r["cells"].values())
                    + sum(t["cpu_s"] for m in r.get("thresholds", {}).values() for t in m.values())
                    for r in results["designs"].values())
    lines += [f"{len(results['designs'])} designs; the CPU minutes of each are in the tables (threshold rows: "
              f"{sum(t['cpu_s'] for m in thresholds.values() for t in m.values()) / 60:.1f})." if thresholds else
              f"{len(results['designs'])} designs.",
              f"All designs together: {cpu_total / 60:.0f} CPU minutes, {total / 60:.0f} wall minutes of their "
              f"processes, {results['jobs']} process(es) side by side; the run took {results['wall_s'] / 60:.0f} "
              "wall minutes.",
              f"Machine: {machine_summary(results['machine'])} per process; load average "
              f"{results['machine'].get('load_average_at_start')} at the start, {results['load_average_end']} at the "
              "end (other jobs shared the cores).", "", "```", results["command"], "```", "",
              "Each design's `train/train.py` and `train/evaluate.py` command lines are in the results file "
              f"(`{results.get('output', 'the --output file')}`).", ""]
    return "\n".join(wrapped(lines))


def wrapped(lines: list[str], width: int = 119) -> list[str]:
    """Prose lines wrapped at `width` (tables, headings and code blocks as they are)."""
    import textwrap

    out, code = [], False
    for line in lines:
        if line.startswith("```"):
            code = not code
        if code or line.startswith(("|", "#", "```")) or len(line) <= width:
            out.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        out.append(textwrap.fill(line, width, subsequent_indent=indent, break_long_words=False,
                                 break_on_hyphens=False))
    return out


# ---------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads(Path(args.render).read_text())
        if args.note:
            results["notes"] = [*results.get("notes", []), *args.note]
            write_json(args.render, results)
        results["orderings"] = orderings(results)
        Path(args.page).write_text(markdown(results))
        return 0
    torch.set_num_threads(args.threads)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    info, start, commit = machine(), time.perf_counter(), git_commit()
    command = command_line("benchmarks.ablation", argv)
    pretrained, image_encoder = initial_pipeline(args, output_dir)

    pool = (ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn"))
            if args.jobs > 1 else None)
    submit = pool.submit if pool else run_now
    # The slowest designs first, so that the processes finish together.
    order = sorted(args.designs, key=lambda n: not DESIGNS_BY_NAME[n].design.is_multistep)
    runs = {name: submit(run_design, args, name, pretrained, image_encoder, output_dir) for name in order}
    designs = {name: runs[name].result() for name in args.designs}
    if pool:
        pool.shutdown()

    config = {k: repo_relative(v) for k, v in vars(args).items() if k not in ("render", "output", "page")}
    results = {"config": config, "designs": designs, "machine": info, "load_average_end": load_average(),
               "commit": commit,
               "wall_s": round(time.perf_counter() - start, 1), "jobs": args.jobs, "command": command,
               "output": repo_relative(args.output) if args.output else None}
    results["orderings"] = orderings(results)
    if args.output:
        write_json(args.output, results)
    if args.page:
        Path(args.page).parent.mkdir(parents=True, exist_ok=True)
        Path(args.page).write_text(markdown(results))
    for check in results["orderings"]:
        print(f"{check['paper']}: {check['claim']}: {check['held']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
