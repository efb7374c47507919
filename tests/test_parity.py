"""Parity with the authors' inference, written here independently of the package.

The reference loads the authors'-format checkpoint into a STOCK diffusers UNet plus a separate `conv_in_ref`, runs
each shot through the UNet on its own, records K/V with its own processor, and attends with explicit softmax
attention over [query, shot 1, ..., shot N]. The text embedding comes from the base text encoder, the way the
released inference computes it (empty prompt, no padding).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from pipeline_diffews.checkpoints import read_state_dict, read_unet_config
from pipeline_diffews.convert_official import convert
from tests.tiny_models import RESOLUTION, random_box_mask, random_image, write_official_unet


class ReferenceKVProcessor:
    """Self-attention that records (mode "record") or appends (mode "fuse") support K/V; explicit softmax."""

    def __init__(self, name, bank):
        self.name, self.bank = name, bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if encoder_hidden_states is None:
            if self.bank["mode"] == "record":
                self.bank["kv"].setdefault(self.name, []).append((k, v))
            elif self.bank["mode"] == "fuse":
                shots = self.bank["kv"][self.name]
                k = torch.cat([k] + [sk for sk, _ in shots], dim=1)
                v = torch.cat([v] + [sv for _, sv in shots], dim=1)
        b, heads = q.shape[0], attn.heads
        d = q.shape[-1] // heads
        q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
        weights = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(d), dim=-1)
        out = (weights @ v.float()).permute(0, 2, 1, 3).reshape(b, -1, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


class AuthorsReference:
    """The released inference, step by step, for one query and N shots."""

    def __init__(self, official_unet_folder, base_folder):
        config = read_unet_config(official_unet_folder)
        config.pop("in_channels_ref")
        self.unet = UNet2DConditionModel(**config).eval()
        state = read_state_dict(official_unet_folder)
        self.conv_in_ref = torch.nn.Conv2d(8, self.unet.config.block_out_channels[0], 3, padding=1)
        self.conv_in_ref.load_state_dict({"weight": state.pop("conv_in_ref.weight"), "bias": state.pop("conv_in_ref.bias")})
        self.unet.load_state_dict(state)
        self.bank = {"mode": "off", "kv": {}}
        self.unet.set_attn_processor({n: ReferenceKVProcessor(n, self.bank) for n in self.unet.attn_processors})
        self.vae = AutoencoderKL.from_pretrained(base_folder, subfolder="vae").eval()
        tokenizer = CLIPTokenizer.from_pretrained(base_folder, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(base_folder, subfolder="text_encoder")
        with torch.no_grad():
            self.text = text_encoder(tokenizer([""], return_tensors="pt").input_ids)[0]

    def _pixels(self, image):
        arr = np.asarray(image.convert("RGB").resize((RESOLUTION, RESOLUTION), Image.BILINEAR), dtype=np.float32)
        return torch.from_numpy(arr).permute(2, 0, 1)[None] / 255.0 * 2 - 1

    def _mask_pixels(self, mask):
        m = Image.fromarray(mask.astype(np.uint8) * 255).resize((RESOLUTION, RESOLUTION), Image.NEAREST)
        m = torch.from_numpy(np.asarray(m) > 127).float()[None, None].repeat(1, 3, 1, 1)
        return m * 2 - 1

    def _encode(self, x):
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    @torch.no_grad()
    def __call__(self, query, support_images, support_masks):
        self.bank["kv"].clear()
        self.bank["mode"] = "record"
        for image, mask in zip(support_images, support_masks):
            z = torch.cat([self._encode(self._pixels(image)), self._encode(self._mask_pixels(mask))], dim=1)
            stock_conv_in, self.unet.conv_in = self.unet.conv_in, self.conv_in_ref
            self.unet(z, 1, self.text)
            self.unet.conv_in = stock_conv_in
        self.bank["mode"] = "fuse"
        v_pred = self.unet(self._encode(self._pixels(query)), 1, self.text).sample
        self.bank["mode"] = "off"
        decoded = self.vae.decode(-v_pred / self.vae.config.scaling_factor).sample
        return ((decoded.clamp(-1, 1) + 1) / 2)[0].numpy()  # [3, R, R] in [0, 1]


def authors_mask(prediction, threshold, mode):
    """The released evaluation's mask: the prediction as an 8-bit image (`(pred * 255).astype(np.uint8)`), read back
    as `/ 255`, then `mean_c > threshold * max` (relative) or `mean_c > threshold` (absolute)."""
    pred8 = torch.from_numpy((prediction * 255).astype(np.uint8)).float() / 255
    level = threshold * pred8.max() if mode == "relative" else threshold
    return (pred8.mean(dim=0) > level).numpy()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sd_base):
    official = write_official_unet(tmp_path_factory.mktemp("official") / "unet", seed=3)
    pipe = convert(official, sd_base, tmp_path_factory.mktemp("converted"))
    pipe.register_to_config(processing_resolution=RESOLUTION)
    pipe.set_progress_bar_config(disable=True)
    return pipe, AuthorsReference(official, sd_base)


@pytest.mark.parametrize("shots", [1, 2, 5])
def test_pipeline_matches_authors_inference(converted, shots):
    pipe, reference = converted
    rng = np.random.default_rng(shots)
    supports = [random_image(rng, 80 + 8 * i, 96) for i in range(shots)]
    masks = [random_box_mask(rng, s.height, s.width) for s in supports]
    query = random_image(rng, 72, 100)

    ref_prediction = reference(query, supports, masks)
    ref_probability = ref_prediction.mean(0)
    common = dict(match_input_resolution=False, processing_resolution=RESOLUTION)
    out = pipe(query, support_images=supports, support_masks=masks, **common)
    probability = out.probabilities[0]

    assert probability.shape == (RESOLUTION, RESOLUTION)
    assert np.abs(probability - ref_probability).max() < 1e-4
    median = float(np.median(ref_probability))
    # The default (relative 0.25 x max) and thresholds that split the map, so that the comparison is not trivial.
    for mode, threshold in [("relative", 0.25), ("relative", 0.9), ("absolute", median)]:
        kwargs = dict(threshold_mode=mode, threshold=threshold, **common)
        mask = out.masks[0] if (mode, threshold) == ("relative", 0.25) else (
            pipe(query, support_images=supports, support_masks=masks, **kwargs).masks[0])
        assert (mask == authors_mask(ref_prediction, threshold, mode)).mean() >= 0.999, (mode, threshold)
        full = pipe(query, support_images=supports, support_masks=masks, threshold_precision="full", **kwargs).masks[0]
        level = threshold * ref_prediction.max() if mode == "relative" else threshold
        assert (full == (ref_probability > level)).mean() >= 0.999, (mode, threshold)
    split = pipe(query, support_images=supports, support_masks=masks, threshold_mode="absolute", threshold=median,
                 **common).masks[0]
    assert 0.2 < split.mean() < 0.8


def test_default_mask_rule_is_the_authors_8bit_rule(converted):
    """On a map with many pixels near the level, the 8-bit rule and the float32 rule give different masks, and the
    default is the 8-bit one."""
    pipe, reference = converted
    rng = np.random.default_rng(11)
    support, query = random_image(rng, 64, 80), random_image(rng, 64, 80)
    mask = random_box_mask(rng, 64, 80)
    ref_prediction = reference(query, [support], [mask])
    common = dict(match_input_resolution=False, processing_resolution=RESOLUTION)
    median = float(np.median(ref_prediction.mean(0)))  # a level that many pixels sit close to
    default = pipe(query, support_images=[support], support_masks=[mask], threshold_mode="absolute", threshold=median,
                   **common)
    assert pipe.config.threshold_precision == "8bit"
    eight_bit = authors_mask(ref_prediction, median, "absolute")
    full_rule = ref_prediction.mean(0) > median
    assert (eight_bit != full_rule).sum() > 10, "the case must tell the two rules apart"
    assert (default.masks[0] == eight_bit).mean() >= 0.999
    assert (default.masks[0] == full_rule).mean() < 0.999
    with pytest.raises(ValueError, match="threshold_precision"):
        pipe(query, support_images=[support], support_masks=[mask], threshold_precision="16bit")


def test_support_changes_the_prediction(converted):
    """KV fusion is live: another support mask gives another prediction."""
    pipe, _ = converted
    rng = np.random.default_rng(7)
    support, query = random_image(rng, 64, 64), random_image(rng, 64, 64)
    left, right = np.zeros((64, 64), bool), np.zeros((64, 64), bool)
    left[:, :20], right[:, 40:] = True, True
    a = pipe(query, support_images=[support], support_masks=[left]).probabilities[0]
    b = pipe(query, support_images=[support], support_masks=[right]).probabilities[0]
    assert np.abs(a - b).max() > 1e-3
