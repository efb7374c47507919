"""Few-shot episodes -> model tensors, and the DiffewS training loss.

A training batch is a list of B `Episode` objects (see `train.data.episodes`) that all have the same number of shots
N. Each episode keeps its OWN supports: row b of every tensor below belongs to episode b.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline_diffews import DiffewSImageProcessor


@dataclass
class EpisodePixels:
    """Pixels of a batch of B episodes with N shots each, at resolution R (all in [-1, 1]).

    Attributes:
        query: [B, 3, R, R] query images.
        query_mask: [B, 3, R, R] query masks in {-1, 1} (ignore pixels count as background).
        support: [B, N, 3, R, R] support images; `support[b]` are the shots of episode b.
        support_mask: [B, N, 3, R, R] support masks in {-1, 1}.
    """

    query: torch.Tensor
    query_mask: torch.Tensor
    support: torch.Tensor
    support_mask: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> EpisodePixels:
        """Moves every tensor (Accelerate's data loaders call this to place batches)."""
        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in self.__dataclass_fields__}
        return EpisodePixels(**moved)


@dataclass
class EpisodeLatents:
    """VAE latents of a batch (h = R / vae_scale_factor).

    Attributes:
        query: [B, 4, h, w] query image latents (the UNet's `sample`).
        target: [B, 4, h, w] query mask latents; the UNet is trained so that `-output` matches them.
        support: [B, N, 8, h, w] support image latent then mask latent on channels (the UNet's `support_sample`).
    """

    query: torch.Tensor
    target: torch.Tensor
    support: torch.Tensor


def episodes_to_pixels(episodes: Sequence, resolution: int) -> EpisodePixels:
    """Resizes the images (bilinear) and masks (nearest) of B episodes to R x R, as the pipeline does.

    Args:
        episodes: B `Episode` objects with the same number of shots N (PIL RGB images; masks uint8 [H, W] where 1 is
            the object, 0 background and 255 ignore).
        resolution: R.
    """
    if not episodes:
        raise ValueError("`episodes` is empty: a batch needs at least one episode.")
    shots = {len(e.support_images) for e in episodes}
    if len(shots) != 1:
        raise ValueError(f"All episodes of a batch must have the same number of shots, got {sorted(shots)}.")
    if shots == {0}:
        raise ValueError("Every episode needs at least one support image.")
    image = DiffewSImageProcessor.image_to_tensor
    mask = DiffewSImageProcessor.mask_to_tensor

    def binary(m: np.ndarray) -> np.ndarray:
        return np.asarray(m) == 1

    return EpisodePixels(
        query=torch.stack([image(e.query_image.convert("RGB"), resolution) for e in episodes]),
        query_mask=torch.stack([mask(binary(e.query_mask), resolution) for e in episodes]),
        support=torch.stack(
            [torch.stack([image(img.convert("RGB"), resolution) for img in e.support_images]) for e in episodes]
        ),
        support_mask=torch.stack(
            [torch.stack([mask(binary(m), resolution) for m in e.support_masks]) for e in episodes]
        ),
    )


class EpisodeCollator:
    """`collate_fn` for data loaders of `Episode` objects: a list of B episodes -> `EpisodePixels` at resolution R.

    Runs in the loader's workers, so images are decoded and resized off the training process.
    """

    def __init__(self, resolution: int):
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"`resolution` must be a positive integer, got {resolution!r}.")
        self.resolution = resolution

    def __call__(self, episodes: Sequence) -> EpisodePixels:
        return episodes_to_pixels(episodes, self.resolution)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, sample: bool = False, chunk_size: int = 8) -> torch.Tensor:
    """[K, 3, R, R] in [-1, 1] -> [K, 4, R/f, R/f] float32: the VAE posterior mean (or a sample) x scaling factor.

    Encodes `chunk_size` images per VAE call. A sample draws from torch's global generator (saved and restored with
    Accelerate's training state).
    """
    chunks = []
    for part in pixels.split(chunk_size):
        posterior = vae.encode(part.to(device=vae.device, dtype=vae.dtype)).latent_dist
        chunks.append(posterior.sample() if sample else posterior.mode())
    return (torch.cat(chunks) * vae.config.scaling_factor).float()


@torch.no_grad()
def encode_episodes(vae, pixels: EpisodePixels, sample: bool = False) -> EpisodeLatents:
    """Encodes every image and mask of the batch with the frozen VAE (no gradients)."""
    batch, shots = pixels.support.shape[:2]
    flat = torch.cat(
        [pixels.query, pixels.query_mask, pixels.support.flatten(0, 1), pixels.support_mask.flatten(0, 1)]
    )
    latents = encode_latents(vae, flat, sample=sample)
    query, target, support, support_mask = latents.split([batch, batch, batch * shots, batch * shots])
    support = torch.cat([support, support_mask], dim=1).unflatten(0, (batch, shots))
    return EpisodeLatents(query=query, target=target, support=support)


def diffews_loss(unet, latents: EpisodeLatents, timestep: int = 1) -> torch.Tensor:
    """The authors' loss, `MSE(unet_output, -z_query_mask)`, averaged over the batch (float32 scalar).

    One UNet forward runs the support pass (through `conv_in_ref`) and the KV-fused query pass; gradients flow
    through both. `unet` may be wrapped (DDP, DeepSpeed, FSDP): it is only called.
    """
    output = unet(latents.query, timestep, support_sample=latents.support).sample
    return F.mse_loss(output.float(), -latents.target.float())
