"""The tiny DiffewS of the learning benchmarks, its support-free control, and how both are scored.

Shared by `benchmarks.learning_camvid` and `benchmarks.learning_synthetic` (the VAE is trained by
`benchmarks.tiny_vae`):

- `build_pipeline`: a randomly initialised 3.1M-parameter `DiffewSUNet2DConditionModel` (Stable Diffusion's UNet
  layout, scaled down) around a trained tiny VAE;
- `run_train_script`: `train/train.py` in this process, optionally on blanked supports (`supports_blanked`: every
  support latent replaced by zeros), which trains the support-free control;
- `scored_metric` / `camvid_scores`: the HSNet protocol of `train/evaluate.py` (pooled per-class IoU) for the three
  rows of `ROWS`: the model, the support-free model (with the zero support it was trained with), and copying the
  support mask onto the query.
"""

from __future__ import annotations

import shlex
from contextlib import contextmanager

import torch

from pipeline_diffews import DiffewSPipeline, DiffewSSupport, DiffewSUNet2DConditionModel
from train.data import EvaluationEpisodes, build_source, collate_episodes
from train.episode_batch import EpisodeLatents
from train.evaluate import resize_ground_truth, score_episodes
from train.metrics import FewShotSegmentationMetric

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

    def encode_blank(vae, pixels, sample: bool = False, design=None) -> EpisodeLatents:
        return zero_supports(original(vae, pixels, sample=sample, design=design))

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


def reset_accelerate() -> None:
    """Forgets the process-wide Accelerate state, so that each in-process training starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_train_script(argv: list[str], blank: bool) -> None:
    """`train/train.py` with `argv` (see `benchmarks.common.train_argv`) in this process; `blank`: on zero supports."""
    from train.train import main

    reset_accelerate()
    try:
        with supports_blanked(blank):
            code = main(argv)
    finally:
        reset_accelerate()
    if code != 0:
        raise RuntimeError(f"train/train.py exited with {code}: {shlex.join(argv)}")


# ---------------------------------------------------------------------- scoring


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


def scored_metric(row: str, pipe, episodes: EvaluationEpisodes, batch_size: int, resolution: int,
                  shots: int) -> FewShotSegmentationMetric:
    """The metric after scoring one row of `ROWS` on `episodes` (`pipe` is unused by "copy_support_mask")."""
    metric = FewShotSegmentationMetric(num_classes=episodes.source.num_classes)
    loader = episode_loader(episodes, batch_size)
    if row == "diffews":
        score_episodes(pipe, loader, metric, resolution, progress=False)
    elif row == "query_only":
        score_query_only(pipe, loader, metric, resolution, shots)
    elif row == "copy_support_mask":
        score_copy_baseline(loader, metric, resolution)
    else:
        raise ValueError(f"`row` must be one of {ROWS}, got {row!r}")
    return metric


def scores_of(metric: FewShotSegmentationMetric, class_names: list[str] | None = None) -> dict:
    """{"miou", "fb_iou" (x100, 2 decimals), "episodes"}, and "per_class" IoU by name when `class_names` is given."""
    scores = metric.compute()
    result = {"miou": round(scores["miou"], 2), "fb_iou": round(scores["fb_iou"], 2), "episodes": scores["episodes"]}
    if class_names is not None:
        result["per_class"] = {class_names[c]: round(v, 2) for c, v in scores["per_class"].items()}
    return result


def camvid_scores(row: str, pipe, data_root, fold: int, shots: int, num_episodes: int, batch_size: int,
                  resolution: int) -> dict:
    """{"seen": scores, "novel": scores} (`scores_of` with per-class IoU) of one row on CamVid's val split: the
    fold's training classes and its held-out classes, `num_episodes` episodes each from numpy seed 0."""
    results = {}
    for split_name, mode in (("seen", "train"), ("novel", "test")):
        source = build_source("camvid", data_root, "val", fold, mode)
        episodes = EvaluationEpisodes(source, shots=shots, num_episodes=num_episodes, seed=0)
        metric = scored_metric(row, pipe, episodes, batch_size, resolution, shots)
        results[split_name] = scores_of(metric, source.class_names)
        print(f"camvid {split_name:>5} {row:<18} mIoU {results[split_name]['miou']:6.2f}  "
              f"FB-IoU {results[split_name]['fb_iou']:6.2f}", flush=True)
    return results
