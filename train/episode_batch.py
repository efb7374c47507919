"""Few-shot episodes -> model tensors, and the DiffewS training loss, for any design of the paper's design space.

A training batch is a list of B `Episode` objects (see `train.data.episodes`) that all have the same number of shots
N. Each episode keeps its OWN supports: row b of every tensor below belongs to episode b.

The design's pieces come from the package, as the pipeline uses them: the support input
(`DiffewSDesign.support_pixels` / `support_sample` / `support_tokens`), the target picture
(`DiffewSImageProcessor.target_pixels`) and the generation's training inputs (`generation_diffews.training_inputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from pipeline_diffews import DiffewSImageProcessor
from pipeline_diffews.design_diffews import DiffewSDesign, image_encoder_tokens
from pipeline_diffews.generation_diffews import training_inputs


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
        query: [B, 4, h, w] query image latents.
        target: [B, 4, h, w] latents of the query's target picture (the mask, white on black, by default); with the
            one-step generation the UNet is trained so that `-output` matches them.
        support: the UNet's `support_sample`: [B, N, C, h, w] support latents (by default C = 8, image latent then
            mask latent), or [B, N, T, D] image-encoder tokens for the tokenized interaction.
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


@dataclass
class TrainingDesign:
    """What training needs of a pipeline's design: the record, the multi-step scheduler and the image encoder."""

    design: DiffewSDesign = field(default_factory=DiffewSDesign)
    scheduler: object | None = None
    image_encoder: object | None = None
    feature_extractor: object | None = None

    @classmethod
    def of(cls, pipe) -> "TrainingDesign":
        return cls(pipe.design, pipe.scheduler, pipe.image_encoder, pipe.feature_extractor)


@torch.no_grad()
def encode_episodes(vae, pixels: EpisodePixels, sample: bool = False, design: TrainingDesign | None = None
                    ) -> EpisodeLatents:
    """Encodes every image and mask of the batch with the frozen VAE (and image encoder; no gradients)."""
    design = design or TrainingDesign()
    record = design.design
    batch, shots = pixels.support.shape[:2]
    target = DiffewSImageProcessor.target_pixels(pixels.query, pixels.query_mask, record.target)
    support, support_mask = pixels.support.flatten(0, 1), pixels.support_mask.flatten(0, 1)
    picture, mask_picture = record.support_pixels(support, support_mask)
    pictures = [] if record.is_tokenized else [picture] + ([] if mask_picture is None else [mask_picture])
    latents = encode_latents(vae, torch.cat([pixels.query, target, *pictures]), sample=sample)
    query, target, *picture_latents = latents.split([batch, batch] + [batch * shots] * len(pictures))
    if record.is_tokenized:
        def encode(p):
            return image_encoder_tokens(design.image_encoder, design.feature_extractor, p).float()

        support_input = record.support_tokens(encode, support, support_mask)
    else:
        mask_latent = picture_latents[1] if mask_picture is not None else None
        support_input = record.support_sample(picture_latents[0], mask_latent, support_mask.to(latents.device))
    return EpisodeLatents(query=query, target=target, support=support_input.unflatten(0, (batch, shots)))


def diffews_loss(unet, latents: EpisodeLatents, timestep: int = 1, design: TrainingDesign | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """The design's loss, averaged over the batch (float32 scalar): by default the authors' `MSE(unet_output,
    -z_query_mask)`; `mi2m`/`mn2m` regress the v-prediction target at a random timestep (`generator`, else torch's
    global generator).

    One UNet forward runs the support side (at `timestep`) and the query pass; gradients flow through both. `unet`
    may be wrapped (DDP, DeepSpeed, FSDP): it is only called.
    """
    design = design or TrainingDesign()
    model_input, step, target = training_inputs(
        design.design.generation, latents.query, latents.target, timestep, design.scheduler, generator
    )
    output = unet(model_input, step, support_sample=latents.support, support_timestep=timestep).sample
    return F.mse_loss(output.float(), target.float())
