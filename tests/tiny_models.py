"""Tiny randomly initialised components of the real classes, and checkpoint folders in the real layouts.

Shapes follow diffusers' own `get_dummy_components`: a 2-level UNet (32, 64 channels), a 2-level VAE (scale factor 2)
and a 2-layer CLIP text encoder with a 32-dim output. Nothing is downloaded.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from pipeline_diffews import DiffewSPipeline, DiffewSUNet2DConditionModel

RESOLUTION = 64  # processing resolution of the tiny pipelines (latents 32 x 32)

UNET_CONFIG = dict(
    block_out_channels=(32, 64),
    layers_per_block=2,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)

VAE_CONFIG = dict(
    block_out_channels=[32, 64],
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.18215,
)


def random_image(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """A random RGB image [h, w]."""
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def random_box_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A bool mask [h, w] holding one box of a third of each side, at a random place in the top-left quarter."""
    mask = np.zeros((h, w), dtype=bool)
    top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[top : top + h // 3, left : left + w // 3] = True
    return mask


@contextmanager
def input_batch_sizes(module: torch.nn.Module):
    """Yields the list of the batch sizes of every call of `module` while the context lasts (a forward hook on the
    real layer)."""
    sizes = []
    handle = module.register_forward_hook(lambda layer, args, output: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


def tiny_unet(seed: int = 0) -> DiffewSUNet2DConditionModel:
    torch.manual_seed(seed)
    unet = DiffewSUNet2DConditionModel(**UNET_CONFIG)
    unet.empty_prompt_embeds = torch.randn(1, 2, UNET_CONFIG["cross_attention_dim"])
    return unet


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def tiny_pipeline(seed: int = 0) -> DiffewSPipeline:
    pipe = DiffewSPipeline(unet=tiny_unet(seed), vae=tiny_vae(seed + 1), processing_resolution=RESOLUTION)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_image_encoder(seed: int = 0):
    """A 2-layer CLIP vision tower with projection (32 px pictures, 8 px patches: 17 tokens of 32) and its
    processor: the tokenized interaction's `image_encoder` and `feature_extractor`."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=32, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPVisionModelWithProjection(config), processor


def tiny_design_pipeline(design, seed: int = 0, beta_range: tuple[float, float] | None = None,
                         num_inference_steps: int | None = None) -> DiffewSPipeline:
    """A tiny pipeline of `design` (a `DiffewSDesign` or dict): the UNet of `tiny_unet(seed)` adapted by
    `from_unet`, with the scheduler and image encoder the design needs."""
    from pipeline_diffews.design_diffews import DiffewSDesign, make_scheduler

    design = design if isinstance(design, DiffewSDesign) else DiffewSDesign.from_dict(design)
    components = {}
    if design.is_tokenized:
        components["image_encoder"], components["feature_extractor"] = tiny_image_encoder(seed + 2)
    torch.manual_seed(seed + 3)
    unet = DiffewSUNet2DConditionModel.from_unet(
        tiny_unet(seed), design=design.to_dict(), support_token_dim=32 if design.is_tokenized else None
    )
    scheduler = make_scheduler(design.generation, *(beta_range or (None, None)))
    pipe = DiffewSPipeline(unet=unet, vae=tiny_vae(seed + 1), scheduler=scheduler, processing_resolution=RESOLUTION,
                           num_inference_steps=num_inference_steps if design.is_multistep else None, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    tiny_pipeline(seed).save_pretrained(folder)
    return Path(folder)


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer with a minimal BPE vocabulary (the empty prompt only needs BOS and EOS)."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for i, char in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[char] = 2 + i
        vocab[char + "</w>"] = 28 + i
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


def write_sd_base(folder: str | Path, seed: int = 0) -> Path:
    """A Stable Diffusion folder in diffusers' layout: unet/, vae/, text_encoder/, tokenizer/ (tiny, random)."""
    folder = Path(folder)
    torch.manual_seed(seed)
    UNet2DConditionModel(**UNET_CONFIG).save_pretrained(folder / "unet")
    tiny_vae(seed + 1).save_pretrained(folder / "vae")
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=60, projection_dim=32, max_position_embeddings=77,
    )
    CLIPTextModel(text_config).save_pretrained(folder / "text_encoder")
    write_tokenizer(folder / "tokenizer")
    return folder


def write_official_unet(folder: str | Path, seed: int = 0, weights: str = "safetensors", with_ref_config: bool = True) -> Path:
    """A fine-tuned UNet folder as the authors released it: their class name, an old diffusers version, conv_in_ref.*.

    The weights are random (stock UNet weights plus conv_in_ref [320 -> here 32, 8, 3, 3]).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    state = {k: v.contiguous() for k, v in unet.state_dict().items()}
    state["conv_in_ref.weight"] = torch.randn(UNET_CONFIG["block_out_channels"][0], 8, 3, 3) * 0.05
    state["conv_in_ref.bias"] = torch.randn(UNET_CONFIG["block_out_channels"][0]) * 0.05
    config = dict(unet.config)
    config.update({"_class_name": "MyUNet2DConditionModel", "_diffusers_version": "0.25.0", "_name_or_path": "/data/ckpt"})
    config.pop("_use_default_values", None)
    if with_ref_config:
        config["in_channels_ref"] = 8
    (folder / "config.json").write_text(json.dumps(config, default=list))
    if weights == "safetensors":
        save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return folder
