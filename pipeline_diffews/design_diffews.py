"""The design record: the four choices the DiffewS paper compares (sections 4.1-4.4), and the support input each makes.

- `interaction` (4.1): how the query reads the supports. `kv_fusion` (DiffewS): every self-attention layer of the
  query attends over its own keys/values and the shots'. `qkv_fusion`: the supports also attend over the query's, so
  the support side depends on the query and cannot be cached. `tokenized_cross_attention`: no fusion; a CLIP image
  encoder turns the support into tokens that replace the empty prompt in every cross-attention layer.
- `mask_injection` (4.2): how the support's mask enters. `concat` (DiffewS): image and mask latents side by side
  through the 8-channel `conv_in_ref`. `multiply`: the image times its mask before the encoder. `multiply_latent`:
  the image latent times the mask resized to the latent grid. `add`: `0.5 image + 0.5 mask` before the encoder.
  `attention_mask`: the query's attention to support tokens outside the mask is removed (the mask resized by nearest
  to each layer's grid; with the tokenized interaction, to the encoder's patch grid).
- `target` (4.3): the picture the query's prediction is trained to be. `white_foreground` (DiffewS): the mask, white
  on black. `real_foreground`: the image inside the mask, black outside. `black_foreground`: black inside, the image
  outside. `mask_on_image`: `0.5 image + 0.5 mask`.
- `generation` (4.4): `oi2m` (DiffewS): one UNet step from the image latent. `mi2m`: several deterministic DDIM steps
  from the image latent to the mask latent (the image latent plays the noise). `mn2m`: Marigold's noise to mask, the
  UNet reading the image latent beside the noisy mask latent.

Every combination of the paper's is valid except `multiply_latent` with the tokenized interaction (it has no latent).
This module has no model code: the UNet reads `interaction` and `mask_injection` from its config, the image
processor owns the pixel operations, `generation_diffews.py` the generation processes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

INTERACTIONS = ("kv_fusion", "qkv_fusion", "tokenized_cross_attention")
MASK_INJECTIONS = ("concat", "multiply", "multiply_latent", "add", "attention_mask")
TARGETS = ("white_foreground", "real_foreground", "black_foreground", "mask_on_image")
GENERATIONS = ("oi2m", "mi2m", "mn2m")
OPTIONS = {"interaction": INTERACTIONS, "mask_injection": MASK_INJECTIONS, "target": TARGETS, "generation": GENERATIONS}
# The paper's two beta ranges for MI2M (appendix A.2); MN2M uses Stable Diffusion's own schedule, the first range.
MI2M_BETA_RANGES = ((0.00085, 0.012), (0.0272, 0.384))


@dataclass(frozen=True)
class DiffewSDesign:
    """One point of the paper's design space; the defaults are DiffewS's choices.

    Saved in the UNet's config (`design`), so a saved pipeline runs its design with no argument; a config without
    it (pipelines saved before the record existed) reads as the default.
    """

    interaction: str = "kv_fusion"
    mask_injection: str = "concat"
    target: str = "white_foreground"
    generation: str = "oi2m"

    def __post_init__(self):
        for name, allowed in OPTIONS.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"design: `{name}` must be one of {allowed}, got {value!r}.")
        if self.interaction == "tokenized_cross_attention" and self.mask_injection == "multiply_latent":
            raise ValueError(
                "design: `multiply_latent` needs a support latent, which `tokenized_cross_attention` does not have; "
                "with it use one of ('concat', 'multiply', 'add', 'attention_mask')."
            )

    @classmethod
    def from_dict(cls, values: dict | None) -> "DiffewSDesign":
        """The design of a config entry; None or {} is the default. Unknown keys are refused with their names."""
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"design: unknown keys {unknown}; expected some of {list(OPTIONS)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line, e.g. `kv_fusion + concat, white_foreground target, oi2m (DiffewS)`."""
        text = f"{self.interaction} + {self.mask_injection}, {self.target} target, {self.generation}"
        return text + (" (DiffewS)" if self.is_default else "")

    @property
    def is_default(self) -> bool:
        return self == DiffewSDesign()

    @property
    def is_tokenized(self) -> bool:
        return self.interaction == "tokenized_cross_attention"

    @property
    def cacheable(self) -> bool:
        """Whether a support can be encoded once for any query (not with `qkv_fusion`)."""
        return self.interaction != "qkv_fusion"

    @property
    def is_multistep(self) -> bool:
        return self.generation != "oi2m"

    @property
    def support_channels(self) -> int:
        """Channels of the support latent that enters `conv_in_ref`: 8 for `concat`, else 4 (0: tokenized)."""
        if self.is_tokenized:
            return 0
        return 8 if self.mask_injection == "concat" else 4

    @property
    def query_channels(self) -> int:
        """Channels of the query's UNet input: 8 for `mn2m` (image latent, noisy mask latent), else 4."""
        return 8 if self.generation == "mn2m" else 4

    # ------------------------------------------------------------------ the support input

    def support_pixels(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What of one support goes through the encoder (the VAE, or CLIP for the tokenized interaction).

        image: [..., 3, R, R] in [-1, 1]; mask: [..., 3, R, R] in {-1, 1} (white object on black).
        Returns (picture, mask picture or None): `concat` encodes both; `multiply` and `add` one picture holding
        both; `multiply_latent` and `attention_mask` the image alone (the mask is applied after the encoder).
        """
        object_ = (mask[..., :1, :, :] > 0).to(image.dtype)
        if self.mask_injection == "concat":
            return image, mask
        if self.mask_injection == "multiply":  # I * M in [0, 1]: black outside the mask
            return (image + 1) * object_ - 1, None
        if self.mask_injection == "add":  # 0.5 I + 0.5 M in [0, 1]
            return ((image + 1) / 2 + object_) - 1, None
        return image, None

    def support_sample(self, latent: torch.Tensor, mask_latent: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        """The UNet's `support_sample` of shots: [..., C, h, w].

        latent: [..., 4, h, w] latent of `support_pixels`' first picture; mask_latent: that of its mask picture (for
        `concat`); mask: [..., 3, R, R] in {-1, 1}. C = 8 for `concat` (image then mask latent), 5 for
        `attention_mask` (image latent, then the object mask at the latent grid in {0, 1}, which the UNet turns into
        attention biases), else 4.
        """
        if self.mask_injection == "concat":
            return torch.cat([latent, mask_latent], dim=-3)
        if self.mask_injection in ("multiply_latent", "attention_mask"):
            grid = mask_grid(mask, latent.shape[-2:]).to(latent.dtype)
            return latent * grid if self.mask_injection == "multiply_latent" else torch.cat([latent, grid], dim=-3)
        return latent

    def support_tokens(self, encode, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The UNet's `support_sample` of shots for the tokenized interaction: [K, T', D] (+ 1 flag with
        `attention_mask`).

        encode: pictures [K, 3, R, R] in [-1, 1] -> tokens [K, T, D] (`image_encoder_tokens`); image, mask: [K, 3, R, R]
        as in `support_pixels`. `concat` puts the mask picture's tokens after the image's (T' = 2 T); `attention_mask`
        appends to each token a flag, 1 inside the mask (the class token always), 0 outside.
        """
        picture, mask_picture = self.support_pixels(image, mask)
        tokens = encode(picture)
        if mask_picture is not None:
            tokens = torch.cat([tokens, encode(mask_picture)], dim=-2)
        if self.mask_injection == "attention_mask":
            tokens = torch.cat([tokens, patch_flags(mask, tokens.shape[-2]).to(tokens)[..., None]], dim=-1)
        return tokens


def check_components(design: DiffewSDesign, unet_config, scheduler, image_encoder, feature_extractor) -> None:
    """Refuses a pipeline whose components miss what `design` needs or whose UNet does not take its inputs."""
    if design.is_multistep and scheduler is None:
        raise ValueError(
            f"The {design.generation} generation needs a `scheduler` (a DDIMScheduler: "
            "pipeline_diffews.design_diffews.make_scheduler)."
        )
    if design.is_tokenized and (image_encoder is None or feature_extractor is None):
        raise ValueError(
            "The tokenized_cross_attention interaction needs the `image_encoder` (CLIPVisionModelWithProjection) "
            "and `feature_extractor` (CLIPImageProcessor) components."
        )
    query, support = unet_config.in_channels, unet_config.get("in_channels_ref", 8)
    if query != design.query_channels or support != design.support_channels:
        raise ValueError(
            f"The UNet takes {query} query and {support} support channels, the design ({design.describe()}) "
            f"{design.query_channels} and {design.support_channels}: build it with "
            "DiffewSUNet2DConditionModel.from_unet(unet, design=...)."
        )


def mask_grid(mask: torch.Tensor, size) -> torch.Tensor:
    """[..., C, R, R] mask in {-1, 1} -> [..., 1, h, w] in {0, 1}: the object, nearest-resized to `size` (h, w)."""
    lead = mask.shape[:-3]
    flat = (mask.reshape(-1, *mask.shape[-3:])[:, :1] > 0).float()
    return F.interpolate(flat, size=tuple(size), mode="nearest").reshape(*lead, 1, *size)


def make_scheduler(generation: str, beta_start: float | None = None, beta_end: float | None = None,
                   beta_schedule: str = "scaled_linear"):
    """The DDIM scheduler of a multi-step generation (None for `oi2m`).

    v-prediction, `trailing` timesteps (the last step starts at the noisiest level) and `set_alpha_to_one` (the last
    step lands on the clean latent), as Marigold. Defaults: Stable Diffusion's betas (0.00085, 0.012); the paper's
    second MI2M range is (0.0272, 0.384) (`MI2M_BETA_RANGES`).
    """
    if generation not in GENERATIONS:
        raise ValueError(f"`generation` must be one of {GENERATIONS}, got {generation!r}.")
    if generation == "oi2m":
        if beta_start is not None or beta_end is not None:
            raise ValueError("`beta_start`/`beta_end` set the schedule of `mi2m` and `mn2m`; `oi2m` has no schedule.")
        return None
    from diffusers import DDIMScheduler

    start = MI2M_BETA_RANGES[0][0] if beta_start is None else beta_start
    end = MI2M_BETA_RANGES[0][1] if beta_end is None else beta_end
    if not 0 < start <= end < 1:
        raise ValueError(f"the beta range must satisfy 0 < beta_start <= beta_end < 1, got ({start}, {end}).")
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=beta_schedule,
        prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=True, steps_offset=0,
        timestep_spacing="trailing",
    )


def patch_flags(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """[K, 3, R, R] masks in {-1, 1} -> [K, tokens] flags of a ViT's tokens (the class token, then a square grid of
    patches): 1 for the class token and the patches whose centre-nearest mask pixel is the object, else 0."""
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise ValueError(f"{tokens} image-encoder tokens are not a class token and a square grid of patches.")
    grid = mask_grid(mask, (side, side)).flatten(1)
    return torch.cat([torch.ones_like(grid[:, :1]), grid], dim=1)


def image_encoder_tokens(image_encoder, feature_extractor, pixels: torch.Tensor) -> torch.Tensor:
    """Pictures [K, 3, R, R] in [-1, 1] -> CLIP tokens [K, T, D]: every token of the last layer (class token and
    patches) through the vision tower's final norm and `visual_projection`, D = `projection_dim` (1024 for SD 2.1's
    OpenCLIP ViT-H/14, the cross-attention width).

    The pictures are resized to the feature extractor's crop size (bicubic, antialiased; a square picture needs no
    crop) and normalised by its mean and standard deviation, as `CLIPImageProcessor` does.
    """
    crop = feature_extractor.crop_size  # {"height", "width"} (a dict, or transformers' SizeDict), or an int
    if isinstance(crop, int):
        size = (crop, crop)
    else:
        size = tuple(int(crop[k] if isinstance(crop, dict) else getattr(crop, k)) for k in ("height", "width"))
    mean = torch.tensor(feature_extractor.image_mean, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(feature_extractor.image_std, device=pixels.device).view(1, -1, 1, 1)
    pictures = F.interpolate((pixels.float() + 1) / 2, size=size, mode="bicubic", antialias=True, align_corners=False)
    pictures = ((pictures.clamp(0, 1) - mean) / std).to(image_encoder.device, image_encoder.dtype)
    hidden = image_encoder.vision_model(pixel_values=pictures).last_hidden_state
    return image_encoder.visual_projection(image_encoder.vision_model.post_layernorm(hidden))


def _paper_designs() -> dict[str, tuple[DiffewSDesign, tuple[float, float] | None]]:
    """name -> (design, MI2M beta range or None): every design the paper's Figures 2-4 and Tables 4-5 compare."""
    designs = {}
    for interaction in ("kv_fusion", "tokenized_cross_attention"):  # Figure 2
        for injection in ("concat", "multiply", "add", "attention_mask"):
            designs[f"{interaction}+{injection}"] = (DiffewSDesign(interaction, injection), None)
    designs["kv_fusion+multiply_latent"] = (DiffewSDesign(mask_injection="multiply_latent"), None)  # Table 4
    designs["qkv_fusion+concat"] = (DiffewSDesign(interaction="qkv_fusion"), None)  # Table 5
    for target in TARGETS[1:]:  # Figure 3
        designs[f"target:{target}"] = (DiffewSDesign(target=target), None)
    designs["mn2m"] = (DiffewSDesign(generation="mn2m"), None)  # Figure 4
    for beta_range in MI2M_BETA_RANGES:
        designs[f"mi2m:{beta_range[0]}-{beta_range[1]}"] = (DiffewSDesign(generation="mi2m"), beta_range)
    return designs


PAPER_DESIGNS = _paper_designs()
