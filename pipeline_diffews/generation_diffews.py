"""The generation processes of the design space (paper section 4.4, appendix A.2): how a mask latent is produced.

- `oi2m` (DiffewS): one UNet step at the constant timestep from the query's image latent; the authors' scheduler has
  alpha_bar = 0 with v-prediction, so the clean latent is `-output` and no scheduler is needed.
- `mi2m`: the image latent plays the noise of a DDIM schedule: training mixes it into the mask latent,
  `z_t = sqrt(a_t) z_mask + sqrt(1 - a_t) z_image`, the UNet predicts v; inference starts from the image latent and
  steps to the mask latent with `DDIMScheduler` (deterministic).
- `mn2m` (Marigold): Gaussian noise to mask latent; the UNet reads the image latent beside the noisy mask latent (8
  channels); training uses annealed multi-resolution noise, inference plain noise from `generator`, several members
  of an ensemble reduced by their median or mean (in the pipeline, on the probability maps).

The scheduler is diffusers' `DDIMScheduler` (`design_diffews.make_scheduler`): its `set_timesteps`, `step`,
`add_noise` and `get_velocity` are the whole schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ENSEMBLE_REDUCTIONS = ("median", "mean")
DEFAULT_MULTISTEP_STEPS = 10


def check_generation_config(design, ensemble_reduction: str, num_inference_steps: int | None) -> None:
    """Refuses a pipeline config whose generation settings its design cannot use."""
    if ensemble_reduction not in ENSEMBLE_REDUCTIONS:
        raise ValueError(f"`ensemble_reduction` must be one of {ENSEMBLE_REDUCTIONS}, got {ensemble_reduction!r}.")
    if not design.is_multistep and num_inference_steps not in (None, 1):
        raise ValueError(
            f"The oi2m generation takes one step: `num_inference_steps` must be None or 1, got {num_inference_steps!r}."
        )


def generation_options(design, config, num_inference_steps, ensemble_size, generator, support_token_sampling) -> dict:
    """A call's generation settings, checked against `design`; None takes the pipeline `config`'s default."""
    steps = num_inference_steps if num_inference_steps is not None else config.get("num_inference_steps")
    if steps is None:
        steps = DEFAULT_MULTISTEP_STEPS if design.is_multistep else 1
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {steps!r}.")
    if not design.is_multistep and steps != 1:
        raise ValueError(f"The oi2m generation takes one step: `num_inference_steps` must be 1, got {steps}.")
    members = ensemble_size if ensemble_size is not None else config.get("ensemble_size", 1)
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"`ensemble_size` must be a positive integer, got {members!r}.")
    if members > 1 and design.generation != "mn2m":
        raise ValueError(
            f"`ensemble_size` > 1 needs random draws: only the mn2m generation has them, not {design.generation}."
        )
    if not isinstance(support_token_sampling, bool):
        raise ValueError(f"`support_token_sampling` must be True or False, got {support_token_sampling!r}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"`generator` must be a torch.Generator, got {type(generator).__name__}.")
    return {"num_inference_steps": steps, "ensemble_size": members, "generator": generator,
            "support_token_sampling": support_token_sampling,
            "ensemble_reduction": config.get("ensemble_reduction", "median")}


def generate(
    generation: str,
    unet_step: Callable[[torch.Tensor, torch.Tensor | int], torch.Tensor],
    image_latents: torch.Tensor,
    timestep: int,
    scheduler=None,
    num_inference_steps: int = 1,
    generator: torch.Generator | list | None = None,
) -> torch.Tensor:
    """The clean mask latents [B, 4, h, w] of queries whose image latents are `image_latents` [B, 4, h, w].

    unet_step(sample, t) -> the UNet's output [B, 4, h, w] for the input `sample` at timestep t (the support is
    bound inside). `timestep` is the one step of `oi2m`; `scheduler`, `num_inference_steps` those of `mi2m`/`mn2m`;
    `generator` draws `mn2m`'s starting noise.
    """
    if generation == "oi2m":
        return -unet_step(image_latents, timestep)  # v-prediction with alpha_bar = 0: x0 = -v
    scheduler.set_timesteps(num_inference_steps, device=image_latents.device)
    # A steep schedule (the paper's MI2M betas (0.0272, 0.384)) underflows alpha_bar to 0 in float32 from some step
    # on; DDIM's variance of two such steps is then 0 / 0, NaN even with eta = 0. The smallest normal float keeps it 0
    # and changes no prediction (sqrt(1e-38) x sample is below float32's resolution of the other term).
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.clamp_min(torch.finfo(torch.float32).tiny)
    if generation == "mi2m":
        sample = image_latents
    else:
        from diffusers.utils.torch_utils import randn_tensor

        sample = randn_tensor(image_latents.shape, generator=generator, device=image_latents.device,
                              dtype=image_latents.dtype)
    clean = None
    for t in scheduler.timesteps:
        model_input = sample if generation == "mi2m" else torch.cat([image_latents, sample], dim=1)
        step = scheduler.step(unet_step(model_input, t), t, sample)
        sample, clean = step.prev_sample, step.pred_original_sample
    return clean


def training_inputs(
    generation: str,
    image_latents: torch.Tensor,
    target_latents: torch.Tensor,
    timestep: int,
    scheduler=None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | int, torch.Tensor]:
    """(UNet input, timestep(s), the output to regress) of a training batch.

    image_latents, target_latents: [B, 4, h, w] (the query image's, and its target picture's). `oi2m`: the image
    latent at `timestep`, regressing `-z_target` (the authors' loss). `mi2m`/`mn2m`: a timestep per query drawn
    uniformly from the scheduler's training range (`generator`, else torch's global generator), the mixed or noisy
    latent, and the v-prediction target `scheduler.get_velocity`.
    """
    if generation == "oi2m":
        return image_latents, timestep, -target_latents
    device = image_latents.device
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (image_latents.shape[0],), generator=generator,
                      device=generator.device if generator is not None else "cpu").to(device)
    if generation == "mi2m":
        noise = image_latents
    else:
        noise = multi_resolution_noise(target_latents, t.float() / steps, generator=generator)
    noisy = scheduler.add_noise(target_latents, noise, t)
    target = scheduler.get_velocity(target_latents, noise, t)
    model_input = noisy if generation == "mi2m" else torch.cat([image_latents, noisy], dim=1)
    return model_input, t, target


def multi_resolution_noise(
    like: torch.Tensor, annealing: torch.Tensor, strength: float = 0.9, generator: torch.Generator | None = None,
    max_levels: int = 6,
) -> torch.Tensor:
    """Annealed multi-resolution noise (Marigold's training noise) of the shape of `like` [B, C, h, w].

    Gaussian noise plus coarser Gaussian noise upsampled bilinearly: level i is drawn at the size divided by r^i
    (r uniform in [2, 4), drawn once per call), weighted (strength x annealing)^i with `annealing` [B] in [0, 1]
    (t / T); the sum is scaled to unit standard deviation.
    """
    gen_device = generator.device if generator is not None else "cpu"

    def gaussian(*shape):
        return torch.randn(shape, generator=generator, device=gen_device).to(like.device, torch.float32)

    batch, channels, height, width = like.shape
    weight = (strength * annealing.to(like.device, torch.float32)).reshape(-1, 1, 1, 1)
    noise = gaussian(batch, channels, height, width)
    ratio = float(torch.rand(1, generator=generator, device=gen_device)) * 2 + 2
    for level in range(1, max_levels + 1):
        size = (max(1, int(height / ratio**level)), max(1, int(width / ratio**level)))
        coarse = torch.nn.functional.interpolate(gaussian(batch, channels, *size), size=(height, width),
                                                 mode="bilinear", align_corners=False)
        noise = noise + coarse * weight**level
        if min(size) == 1:
            break
    return (noise / noise.std()).to(like.dtype)


def reduce_ensemble(maps: torch.Tensor, ensemble_size: int, reduction: str) -> torch.Tensor:
    """[E * B, C, H, W] maps of E members (member-major) -> [B, C, H, W], their per-pixel median or mean."""
    if ensemble_size == 1:
        return maps
    members = maps.reshape(ensemble_size, -1, *maps.shape[1:])
    return members.median(dim=0).values if reduction == "median" else members.mean(dim=0)
