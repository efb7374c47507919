"""Initialise an untrained DiffewS pipeline from Stable Diffusion 2.1, the starting point of training.

    python -m pipeline_diffews.init_from_sd --base DIR --output DIR
    python -m pipeline_diffews.init_from_sd --base DIR --output DIR --generation mi2m --beta-start 0.0272 --beta-end 0.384
    python -m pipeline_diffews.init_from_sd --base DIR --output DIR --interaction tokenized_cross_attention \\
        --mask-injection attention_mask --image-encoder DIR/image_encoder

The UNet keeps Stable Diffusion's weights; `conv_in_ref` starts as `conv_in` repeated over the 8 input channels and
halved, with `conv_in`'s bias. The design options (default: DiffewS's) are the paper's design space and are saved
in the pipeline's configs: a 4-channel `conv_in_ref` (every injection but `concat`) starts as a copy of `conv_in`;
`mn2m`'s 8-channel `conv_in` as `conv_in` repeated and halved (Marigold); `mi2m` and `mn2m` get a DDIM scheduler
(`--beta-start`/`--beta-end`, default Stable Diffusion's 0.00085 / 0.012); the tokenized interaction has no
`conv_in_ref` but the image encoder of `--image-encoder` and a `support_token_proj` from its token width to the
cross-attention width.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusers import UNet2DConditionModel

from .checkpoints import (
    CheckpointError,
    add_design_arguments,
    assemble_pipeline,
    check_base_folder,
    command_main,
    design_components,
    design_from_options,
    find_unet_folder,
    load_image_encoder,
    read_state_dict,
    read_unet_config,
    run_command,
)
from .design_diffews import DiffewSDesign
from .pipeline_diffews import DEFAULT_BASE_MODEL, DiffewSPipeline


def init_from_sd(base: str | Path, output: str | Path, base_model_id: str = DEFAULT_BASE_MODEL,
                 design: DiffewSDesign | None = None, beta_start: float | None = None, beta_end: float | None = None,
                 image_encoder: str | Path | None = None) -> DiffewSPipeline:
    """Writes an untrained DiffewS pipeline of `design` (default: DiffewS's) to `output` and returns it.

    `image_encoder`: a saved `CLIPVisionModelWithProjection` folder, for the tokenized interaction only.
    """
    design = design or DiffewSDesign()
    if image_encoder is not None and design.interaction != "tokenized_cross_attention":
        raise CheckpointError(
            f"--image-encoder is used by the tokenized_cross_attention interaction only, not {design.interaction}."
        )
    base = check_base_folder(base)
    encoder, processor = load_image_encoder(image_encoder) if image_encoder is not None else (None, None)
    folder = find_unet_folder(base / "unet")
    config = read_unet_config(folder)
    config.pop("in_channels_ref", None)
    stock = UNet2DConditionModel(**config)
    state = {k: v for k, v in read_state_dict(folder).items() if not k.startswith("conv_in_ref.")}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"The UNet weights in {folder} do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    components = design_components(stock, design, image_encoder=encoder, feature_extractor=processor,
                                   beta_start=beta_start, beta_end=beta_end)
    pipe = assemble_pipeline(components.pop("unet"), base, base_model_id, **components)
    pipe.save_pretrained(output)
    return pipe


def main(argv: list[str] | None = None) -> int:
    return command_main(__doc__, "diffews init-from-sd", add_arguments, run, argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="a diffusers Stable Diffusion 2.1 folder (unet/, vae/, text_encoder/, tokenizer/)")
    parser.add_argument("--output", required=True, help="where to write the DiffewS pipeline folder")
    parser.add_argument("--base-model-id", default=DEFAULT_BASE_MODEL, help="Hub id of the base, for the model card")
    add_design_arguments(parser, default_help="default: DiffewS's")


def run(args: argparse.Namespace) -> int:
    def build():
        design = design_from_options(None, interaction=args.interaction, mask_injection=args.mask_injection,
                                     target=args.target, generation=args.generation)
        return init_from_sd(args.base, args.output, args.base_model_id, design, args.beta_start, args.beta_end,
                            args.image_encoder)

    return run_command(build, args.output, "Wrote untrained DiffewS pipeline to")


if __name__ == "__main__":
    sys.exit(main())
