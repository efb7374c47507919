"""Convert the authors' fine-tuned DiffewS UNet into a DiffewS pipeline folder.

    python -m pipeline_diffews.convert_official --official DIR --base DIR --output DIR

`--official`: a fine-tuned UNet folder (config.json + diffusion_pytorch_model.safetensors or .bin, holding
`conv_in_ref.*`), or a folder holding `unet/`. `--base`: a diffusers Stable Diffusion 2.1 folder (vae/,
text_encoder/, tokenizer/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoints import (
    CheckpointError,
    assemble_pipeline,
    check_base_folder,
    command_main,
    find_unet_folder,
    read_state_dict,
    read_unet_config,
    run_command,
)
from .pipeline_diffews import DEFAULT_BASE_MODEL, DiffewSPipeline
from .unet_diffews import DiffewSUNet2DConditionModel


def load_official_unet(official: str | Path) -> DiffewSUNet2DConditionModel:
    """Builds the DiffewS UNet from an official folder, matching weights by parameter name."""
    folder = find_unet_folder(official)
    config = read_unet_config(folder)
    state = read_state_dict(folder)
    if "conv_in_ref.weight" not in state:
        raise CheckpointError(
            f"{folder} has no conv_in_ref weights: it is a plain Stable Diffusion UNet, not a DiffewS checkpoint. "
            "Use `python -m pipeline_diffews.init_from_sd` to start from Stable Diffusion."
        )
    config["in_channels_ref"] = state["conv_in_ref.weight"].shape[1]
    unet = DiffewSUNet2DConditionModel(**config)
    state.setdefault("empty_prompt_embeds", unet.empty_prompt_embeds)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"The weights in {folder} do not match its config.json: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    return unet


def convert(official: str | Path, base: str | Path, output: str | Path, base_model_id: str = DEFAULT_BASE_MODEL) -> DiffewSPipeline:
    """Official UNet + base VAE and empty-prompt embedding -> a saved DiffewS pipeline folder at `output`."""
    base = check_base_folder(base)
    pipe = assemble_pipeline(load_official_unet(official), base, base_model_id)
    pipe.save_pretrained(output)
    return pipe


def main(argv: list[str] | None = None) -> int:
    return command_main(__doc__, "diffews convert-official", add_arguments, run, argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--official", required=True, help="the authors' fine-tuned UNet folder (or a folder with unet/)")
    parser.add_argument("--base", required=True, help="a diffusers Stable Diffusion 2.1 folder")
    parser.add_argument("--output", required=True, help="where to write the DiffewS pipeline folder")
    parser.add_argument("--base-model-id", default=DEFAULT_BASE_MODEL, help="Hub id of the base, for the model card")


def run(args: argparse.Namespace) -> int:
    return run_command(
        lambda: convert(args.official, args.base, args.output, args.base_model_id), args.output, "Wrote DiffewS pipeline to"
    )


if __name__ == "__main__":
    sys.exit(main())
