"""Initialise an untrained DiffewS pipeline from Stable Diffusion 2.1, the starting point of training.

    python -m pipeline_diffews.init_from_sd --base DIR --output DIR

The UNet keeps Stable Diffusion's weights; `conv_in_ref` starts as `conv_in` repeated over the 8 input channels and
halved, with `conv_in`'s bias.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusers import UNet2DConditionModel

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


def init_from_sd(base: str | Path, output: str | Path, base_model_id: str = DEFAULT_BASE_MODEL) -> DiffewSPipeline:
    base = check_base_folder(base)
    folder = find_unet_folder(base / "unet")
    config = read_unet_config(folder)
    config.pop("in_channels_ref", None)
    stock = UNet2DConditionModel(**config)
    state = {k: v for k, v in read_state_dict(folder).items() if not k.startswith("conv_in_ref.")}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"The UNet weights in {folder} do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    pipe = assemble_pipeline(DiffewSUNet2DConditionModel.from_unet(stock), base, base_model_id)
    pipe.save_pretrained(output)
    return pipe


def main(argv: list[str] | None = None) -> int:
    return command_main(__doc__, "diffews init-from-sd", add_arguments, run, argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="a diffusers Stable Diffusion 2.1 folder (unet/, vae/, text_encoder/, tokenizer/)")
    parser.add_argument("--output", required=True, help="where to write the DiffewS pipeline folder")
    parser.add_argument("--base-model-id", default=DEFAULT_BASE_MODEL, help="Hub id of the base, for the model card")


def run(args: argparse.Namespace) -> int:
    return run_command(
        lambda: init_from_sd(args.base, args.output, args.base_model_id), args.output, "Wrote untrained DiffewS pipeline to"
    )


if __name__ == "__main__":
    sys.exit(main())
