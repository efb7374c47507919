"""The CPU fast path: bfloat16 weights on CPU, one VAE batch per uncached call, the support pass cut short."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline_diffews.device_speedups as speedups
from pipeline_diffews import DiffewSPipeline
from tests.tiny_models import RESOLUTION, random_box_mask, random_image, tiny_unet, tiny_vae


def _pipeline(**config) -> DiffewSPipeline:
    pipe = DiffewSPipeline(unet=tiny_unet(0), vae=tiny_vae(1), processing_resolution=RESOLUTION, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _episode(shots):
    """The parity test's cases: random supports of varied sizes with box masks, a 72 x 100 query."""
    rng = np.random.default_rng(shots)
    supports = [random_image(rng, 80 + 8 * i, 96) for i in range(shots)]
    masks = [random_box_mask(rng, s.height, s.width) for s in supports]
    return supports, masks, random_image(rng, 72, 100)


@pytest.fixture(scope="module")
def float32_and_bfloat16():
    return _pipeline(cpu_bfloat16=False), _pipeline(cpu_bfloat16=True)


@pytest.mark.parametrize("shots", [1, 2, 5])
def test_bfloat16_masks_agree_with_float32(float32_and_bfloat16, shots):
    exact, fast = float32_and_bfloat16
    supports, masks, query = _episode(shots)
    kwargs = dict(support_images=supports, support_masks=masks, match_input_resolution=False)
    reference = exact(query, **kwargs).probabilities[0]
    result = fast(query, **kwargs)
    assert result.probabilities[0].dtype == np.float32
    assert np.abs(result.probabilities[0] - reference).mean() < 0.01
    for threshold in (0.25, 0.9):  # relative thresholds: the default mode, and one that cuts through the map
        expected = exact(query, threshold=threshold, **kwargs).masks[0]
        agreement = (fast(query, threshold=threshold, **kwargs).masks[0] == expected).mean()
        assert agreement >= 0.995, (threshold, agreement)
    # An absolute threshold at the median of a random model's map has ~11 % of its pixels within 0.01 of it, closer
    # than bfloat16's rounding: there masks agree on >= 97 % of pixels, and on every pixel 0.05 away from the threshold.
    median = float(np.median(reference))
    mask = fast(query, threshold_mode="absolute", threshold=median, **kwargs).masks[0]
    assert (mask == (reference > median)).mean() >= 0.97
    clear = np.abs(reference - median) > 0.05
    assert (mask[clear] == (reference > median)[clear]).all()
    assert fast.unet.dtype == torch.bfloat16 and exact.unet.dtype == torch.float32


def test_bfloat16_path_converts_once_to_channels_last(float32_and_bfloat16):
    _, fast = float32_and_bfloat16
    supports, masks, query = _episode(1)
    fast(query, support_images=supports, support_masks=masks)
    assert fast.unet.dtype == torch.bfloat16 and fast.vae.dtype == torch.bfloat16
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    weight = fast.unet.conv_in.weight
    fast(query, support_images=supports, support_masks=masks)
    assert fast.unet.conv_in.weight is weight  # not converted again


def test_cached_support_from_bfloat16_path(float32_and_bfloat16):
    exact, fast = float32_and_bfloat16
    supports, masks, query = _episode(2)
    support = fast.encode_support(supports, masks)
    cached = fast(query, support=support).probabilities[0]
    uncached = fast(query, support_images=supports, support_masks=masks).probabilities[0]
    np.testing.assert_allclose(cached, uncached, atol=2e-2)
    expected = exact(query, support=exact.encode_support(supports, masks)).masks[0]
    assert (fast(query, support=support).masks[0] == expected).mean() >= 0.995


def test_auto_keeps_small_models_exact(monkeypatch):
    pipe = _pipeline()
    assert pipe.config.cpu_bfloat16 == "auto"
    supports, masks, query = _episode(1)
    pipe(query, support_images=supports, support_masks=masks)
    assert pipe.unet.dtype == torch.float32 and pipe.vae.dtype == torch.float32

    monkeypatch.setattr(speedups, "CPU_BFLOAT16_MIN_PARAMETERS", 0)  # as if this were the full-size UNet
    monkeypatch.setattr(speedups, "cpu_bfloat16_supported", lambda: True)
    pipe.encode_support(supports, masks)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16

    exact = _pipeline(cpu_bfloat16=False)
    exact(query, support_images=supports, support_masks=masks)
    assert exact.unet.dtype == torch.float32


def test_auto_needs_native_bfloat16(monkeypatch):
    monkeypatch.setattr(speedups, "CPU_BFLOAT16_MIN_PARAMETERS", 0)
    monkeypatch.setattr(speedups, "cpu_bfloat16_supported", lambda: False)
    pipe = _pipeline()
    supports, masks, query = _episode(1)
    pipe(query, support_images=supports, support_masks=masks)
    assert pipe.unet.dtype == torch.float32


def test_weights_in_another_dtype_are_kept():
    pipe = _pipeline(cpu_bfloat16=True)
    torch.nn.Module.to(pipe.unet, torch.float64), torch.nn.Module.to(pipe.vae, torch.float64)
    supports, masks, query = _episode(1)
    pipe(query, support_images=supports, support_masks=masks)
    assert pipe.unet.dtype == torch.float64 and pipe.vae.dtype == torch.float64


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_invalid_setting_is_refused(value):
    with pytest.raises(ValueError, match="cpu_bfloat16"):
        _pipeline(cpu_bfloat16=value)


def test_setting_is_saved_and_can_be_overridden(tmp_path):
    _pipeline(cpu_bfloat16=True).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["cpu_bfloat16"] is True
    assert DiffewSPipeline.from_pretrained(tmp_path).config.cpu_bfloat16 is True
    assert DiffewSPipeline.from_pretrained(tmp_path, cpu_bfloat16=False).config.cpu_bfloat16 is False


def test_uncached_call_encodes_supports_and_query_in_one_vae_batch(monkeypatch):
    pipe = _pipeline(cpu_bfloat16=False)
    batches = []
    encode = pipe.vae.encode

    def counting_encode(pixels, *args, **kwargs):
        batches.append(pixels.shape[0])
        return encode(pixels, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "encode", counting_encode)
    supports, masks, query = _episode(2)
    uncached = pipe([query, query.transpose(Image.FLIP_LEFT_RIGHT)], support_images=supports, support_masks=masks)
    # support images, support masks and the first query, in batches of up to 4; then the second query
    assert batches == [4, 1, 1]
    monkeypatch.undo()
    support = pipe.encode_support(supports, masks)
    cached = pipe([query, query.transpose(Image.FLIP_LEFT_RIGHT)], support=support)
    for a, b in zip(uncached.probabilities, cached.probabilities):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_single_shot_call_encodes_once(monkeypatch):
    pipe = _pipeline(cpu_bfloat16=False)
    batches = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda pixels: batches.append(pixels.shape[0]) or encode(pixels))
    supports, masks, query = _episode(1)
    pipe(query, support_images=supports, support_masks=masks)
    assert batches == [3]  # support image, support mask and query: one VAE batch


def test_support_pass_stops_after_last_self_attention():
    """At inference the support pass skips what follows the last self-attention layer, with the same K/V."""
    unet = tiny_unet(0)
    calls = []
    unet.conv_out.register_forward_hook(lambda *args: calls.append("conv_out"))
    support = torch.randn(1, 2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stopped = unet.encode_support(support)
    assert calls == []
    full = unet.encode_support(support)  # gradients enabled: the forward runs to the end
    assert calls == ["conv_out"]
    assert stopped.layers.keys() == full.layers.keys() and len(stopped.layers) == len(unet.self_attention_layers)
    for name in full.layers:
        for a, b in zip(stopped.layers[name], full.layers[name]):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- CUDA GroupNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, groups", [((2, 64, 32, 32), 32), ((1, 96, 16, 24), 32), ((3, 32, 64), 8)])
def test_split_stats_group_norm_equals_group_norm(dtype, shape, groups):
    """Against float32 `F.group_norm`: within 1e-5 in float32; in bfloat16 within twice the error of PyTorch's own kernel."""
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 2).to(dtype)
    weight, bias = torch.randn(shape[1]), torch.randn(shape[1])
    expected = torch.nn.functional.group_norm(x.float(), groups, weight, bias, 1e-6)
    result = speedups.split_stats_group_norm(x, groups, weight.to(dtype), bias.to(dtype), 1e-6, row_length=16)
    native = torch.nn.functional.group_norm(x, groups, weight.to(dtype), bias.to(dtype), 1e-6)
    tolerance = 1e-5 if dtype == torch.float32 else 2 * (native.float() - expected).abs().max().item()
    assert result.dtype == dtype and result.shape == x.shape
    assert (result.float() - expected).abs().max() <= tolerance
    # Without affine parameters too
    plain = speedups.split_stats_group_norm(x.float(), groups, None, None, 1e-6, row_length=16)
    assert torch.allclose(plain, torch.nn.functional.group_norm(x.float(), groups, eps=1e-6), atol=1e-5)


def test_split_stats_group_norm_swap_keeps_weights_and_masks(monkeypatch):
    """The swap keeps every parameter; forcing the split statistics on CPU leaves the masks unchanged."""
    pipe = _pipeline(cpu_bfloat16=False)
    supports, masks, query = _episode(2)
    kwargs = dict(support_images=supports, support_masks=masks, match_input_resolution=False)
    reference = pipe(query, **kwargs)
    state = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    swapped = speedups.use_split_stats_group_norm(pipe.unet) + speedups.use_split_stats_group_norm(pipe.vae)
    assert swapped == sum(type(m) is speedups.SplitStatsGroupNorm for m in [*pipe.unet.modules(), *pipe.vae.modules()])
    assert swapped > 10
    assert all(torch.equal(state[k], v) for k, v in pipe.vae.state_dict().items())

    calls = []

    def split_everywhere(self, x):
        calls.append(x.shape)
        return speedups.split_stats_group_norm(x, self.num_groups, self.weight, self.bias, self.eps, row_length=8)

    monkeypatch.setattr(speedups.SplitStatsGroupNorm, "forward", split_everywhere)
    result = pipe(query, **kwargs)
    assert len(calls) >= swapped
    assert np.abs(result.probabilities[0] - reference.probabilities[0]).max() < 1e-4
    assert (result.masks[0] == reference.masks[0]).mean() >= 0.999


def test_split_stats_group_norm_installed_on_cuda_only(monkeypatch):
    pipe = _pipeline(cpu_bfloat16=False)
    count = sum(type(m) is torch.nn.GroupNorm for m in [*pipe.unet.modules(), *pipe.vae.modules()])
    pipe._prepare_for_device()  # on CPU: PyTorch's GroupNorm stays
    assert not any(isinstance(m, speedups.SplitStatsGroupNorm) for m in pipe.vae.modules())
    monkeypatch.setattr(DiffewSPipeline, "_execution_device", property(lambda self: torch.device("cuda")))
    pipe._prepare_for_device()
    swapped = [m for m in [*pipe.unet.modules(), *pipe.vae.modules()] if type(m) is speedups.SplitStatsGroupNorm]
    assert len(swapped) == count > 0
