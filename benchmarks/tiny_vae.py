"""A tiny `AutoencoderKL` (the class of Stable Diffusion's VAE, scale factor 4) trained on CamVid images and masks.

DiffewS encodes images and binary masks with one VAE and decodes its mask prediction with it, so the tiny VAE of the
learning benchmark learns both: each batch holds CamVid training images and binary masks of the fold's training
classes (the held-out classes are never shown), all resized to R x R as the pipeline does, randomly flipped.

    vae, report = train_tiny_vae(load_camvid_pixels(root, "train", fold=0, resolution=64), steps=1500)

Loss: pixel MSE of the reconstruction (posterior sample) plus a small KL term. The `scaling_factor` is then set to
1 / std of the latents (posterior means of images and masks), so that the UNet sees unit-variance latents as in
Stable Diffusion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from benchmarks.common import Stopwatch
from pipeline_diffews import DiffewSImageProcessor
from train.data import build_source

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=[16, 32, 64],
    layers_per_block=1,
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=1.0,
)


@dataclass
class CamVidPixels:
    """CamVid images and binary class masks at R x R, as the pipeline feeds them to the VAE.

    Attributes:
        images: [N, 3, R, R] float in [-1, 1] (bilinear resize of every image of the split).
        masks: [M, 3, R, R] float in {-1, 1} (nearest resize; one mask per (image, class) pair of the classes served).
        class_ids: [M] class id of each mask.
    """

    images: torch.Tensor
    masks: torch.Tensor
    class_ids: torch.Tensor


def load_camvid_pixels(root, split: str, fold: int | None, resolution: int, mode: str = "train") -> CamVidPixels:
    """Every image of a CamVid split and the mask of every class it holds, among the classes of (`fold`, `mode`)."""
    source = build_source("camvid", root, split, fold, mode)
    keys = sorted({key for c in source.class_ids for key in source.images_of_class(c)})
    to_image, to_mask = DiffewSImageProcessor.image_to_tensor, DiffewSImageProcessor.mask_to_tensor
    images = torch.stack([to_image(source.load_image(key), resolution) for key in keys])
    masks, class_ids = [], []
    for c in source.class_ids:
        for key in source.images_of_class(c):
            masks.append(to_mask(source.load_mask(key, c) == 1, resolution))
            class_ids.append(c)
    return CamVidPixels(images, torch.stack(masks), torch.tensor(class_ids))


def tiny_vae(seed: int = 0, resolution: int = 64) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": resolution})


def _batch(data: CamVidPixels, size: int, generator: torch.Generator) -> torch.Tensor:
    """`size` // 2 images and `size` - `size` // 2 masks drawn at random, each flipped left-right with p = 0.5."""
    images = data.images[torch.randint(len(data.images), (size // 2,), generator=generator)]
    masks = data.masks[torch.randint(len(data.masks), (size - size // 2,), generator=generator)]
    batch = torch.cat([images, masks])
    flip = torch.rand(size, generator=generator) < 0.5
    batch[flip] = batch[flip].flip(-1)
    return batch


def train_tiny_vae(
    data: CamVidPixels,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log_every: int = 100,
) -> tuple[AutoencoderKL, dict]:
    """Trains `tiny_vae(seed)` for `steps` AdamW steps (cosine decay to 0); returns it in eval mode and a report.

    The report holds the final losses, the time taken and the scaling factor that was set.
    """
    if steps < 1:
        raise ValueError(f"`steps` must be >= 1, got {steps}")
    vae = tiny_vae(seed, data.images.shape[-1]).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    with Stopwatch() as watch:
        for step in range(1, steps + 1):
            pixels = _batch(data, batch_size, generator)
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
            mse = F.mse_loss(reconstruction, pixels)
            kl = posterior.kl().mean()
            loss = mse + kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            if log_every and (step % log_every == 0 or step == steps):
                print(f"vae step {step}/{steps}: mse {mse.item():.4f} kl {kl.item():.1f}", flush=True)
        vae.eval().requires_grad_(False)
        scaling = set_scaling_factor(vae, data)
    report = {
        "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "kl_weight": kl_weight,
        "final_mse": mse.item(), "scaling_factor": scaling, "parameters": sum(p.numel() for p in vae.parameters()),
        "wall_s": watch.wall_s, "cpu_s": watch.cpu_s,
    }
    return vae, report


@torch.no_grad()
def set_scaling_factor(vae: AutoencoderKL, data: CamVidPixels, samples: int = 512) -> float:
    """Sets `vae.config.scaling_factor` to 1 / std of the posterior means of images and masks; returns it."""
    pixels = torch.cat([data.images[:samples // 2], data.masks[:: max(1, len(data.masks) // (samples // 2))]])
    latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in pixels.split(64)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    return scaling


@torch.no_grad()
def reconstruction_quality(vae: AutoencoderKL, data: CamVidPixels) -> dict:
    """How well `vae` round-trips `data` (posterior mean, as the pipeline encodes).

    Returns `image_psnr` (dB, on [-1, 1] images) and `mask_iou` (x100, IoU pooled over all masks of the reconstructed
    mask thresholded at 0 against the true mask), plus `mask_iou_per_class` {class id: pooled IoU}.
    """

    def roundtrip(pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample for x in pixels.split(64)])

    images = roundtrip(data.images).clamp(-1, 1)
    mse = F.mse_loss(images, data.images).item()
    truth = data.masks[:, 0] > 0
    predicted = roundtrip(data.masks).mean(1) > 0
    inter = (truth & predicted).flatten(1).sum(1)
    union = (truth | predicted).flatten(1).sum(1)
    per_class = {}
    for c in data.class_ids.unique().tolist():
        pick = data.class_ids == c
        per_class[int(c)] = 100.0 * inter[pick].sum().item() / max(union[pick].sum().item(), 1)
    return {
        "image_psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
        "mask_iou": 100.0 * inter.sum().item() / max(union.sum().item(), 1),
        "mask_iou_per_class": per_class,
    }
