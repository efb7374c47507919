"""The paper's design space: each option's own semantics, with tiny random components of the real classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline_diffews import DiffewSPipeline, DiffewSUNet2DConditionModel
from pipeline_diffews.design_diffews import (
    GENERATIONS,
    INTERACTIONS,
    MASK_INJECTIONS,
    PAPER_DESIGNS,
    TARGETS,
    DiffewSDesign,
    make_scheduler,
)
from pipeline_diffews.cli import main
from pipeline_diffews.image_processor_diffews import DiffewSImageProcessor
from pipeline_diffews.unet_diffews import SupportKeyValues, SupportTokens

from .cli_data import write_images, write_support
from .tiny_models import RESOLUTION, random_box_mask, random_image, tiny_design_pipeline, tiny_pipeline

RNG = np.random.default_rng(7)
IMAGES = [random_image(RNG, 48, 40) for _ in range(3)]
MASKS = [random_box_mask(RNG, 48, 40) for _ in range(3)]
QUERIES = [random_image(RNG, 50, 60), random_image(RNG, 36, 44)]


def _design(**choices) -> DiffewSDesign:
    return DiffewSDesign(**choices)


# ---------------------------------------------------------------------- the record


def test_default_design_is_diffews_and_old_configs_read_as_it(tmp_path):
    pipe = tiny_pipeline()
    assert pipe.design == DiffewSDesign() and pipe.design.describe().endswith("(DiffewS)")
    pipe.save_pretrained(tmp_path / "old")
    config_path = tmp_path / "old" / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    for key in ("design", "support_token_dim"):  # a pipeline saved before the record existed
        config.pop(key, None)
    config_path.write_text(json.dumps(config))
    loaded = DiffewSPipeline.from_pretrained(tmp_path / "old")
    assert loaded.design == DiffewSDesign() and loaded.scheduler is None and loaded.image_encoder is None


@pytest.mark.parametrize("choices, words", [
    ({"interaction": "cross"}, ["interaction", "kv_fusion", "qkv_fusion", "tokenized_cross_attention"]),
    ({"mask_injection": "mul"}, ["mask_injection", "multiply_latent"]),
    ({"target": "white"}, ["target", "white_foreground"]),
    ({"generation": "ddim"}, ["generation", "oi2m", "mi2m", "mn2m"]),
    ({"interaction": "tokenized_cross_attention", "mask_injection": "multiply_latent"}, ["multiply_latent", "concat"]),
])
def test_undefined_designs_are_refused_with_the_options(choices, words):
    with pytest.raises(ValueError) as error:
        DiffewSDesign(**choices)
    assert all(word in str(error.value) for word in words)
    with pytest.raises(ValueError, match="unknown keys"):
        DiffewSDesign.from_dict({"interplay": "kv_fusion"})


def test_a_pipeline_without_the_components_its_design_needs_is_refused():
    base = tiny_pipeline()
    mi2m = DiffewSUNet2DConditionModel.from_unet(base.unet, design={"generation": "mi2m"})
    with pytest.raises(ValueError, match="mi2m generation needs a `scheduler`"):
        DiffewSPipeline(mi2m, base.vae)
    tokenized = DiffewSUNet2DConditionModel.from_unet(
        base.unet, design={"interaction": "tokenized_cross_attention"}, support_token_dim=32
    )
    with pytest.raises(ValueError, match="image_encoder"):
        DiffewSPipeline(tokenized, base.vae)
    stock_channels = DiffewSUNet2DConditionModel.from_unet(base.unet)  # 8 support channels
    stock_channels.register_to_config(design={"mask_injection": "multiply"})
    with pytest.raises(ValueError, match="from_unet"):
        DiffewSPipeline(stock_channels, base.vae)


def test_paper_designs_cover_the_space():
    designs = [design for design, _ in PAPER_DESIGNS.values()]
    assert {d.interaction for d in designs} == set(INTERACTIONS)
    assert {d.mask_injection for d in designs} == set(MASK_INJECTIONS)
    assert {d.target for d in designs} == set(TARGETS)
    assert {d.generation for d in designs} == set(GENERATIONS)
    assert len(PAPER_DESIGNS) == 16


# ---------------------------------------------------------------------- the design round trip


@pytest.mark.parametrize("name", ["tokenized_cross_attention+attention_mask", "mn2m", "qkv_fusion+concat"])
def test_a_saved_design_loads_and_runs_with_no_argument(name, tmp_path):
    design, betas = PAPER_DESIGNS[name]
    pipe = tiny_design_pipeline(design, beta_range=betas, num_inference_steps=2)
    pipe.save_pretrained(tmp_path / name)
    loaded = DiffewSPipeline.from_pretrained(tmp_path / name)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.design == design
    call = dict(support_images=IMAGES[:2], support_masks=MASKS[:2])
    a = pipe(QUERIES[0], generator=torch.Generator().manual_seed(0), **call)
    b = loaded(QUERIES[0], generator=torch.Generator().manual_seed(0), **call)
    np.testing.assert_allclose(a.probabilities[0], b.probabilities[0], atol=1e-6)


@pytest.mark.parametrize("name", ["tokenized_cross_attention+concat", "mi2m:0.0272-0.384", "target:mask_on_image"])
def test_a_saved_design_runs_as_remote_code(name, tmp_path):
    from diffusers import DiffusionPipeline

    design, betas = PAPER_DESIGNS[name]
    pipe = tiny_design_pipeline(design, beta_range=betas, num_inference_steps=2)
    pipe.save_pretrained(tmp_path / "saved")
    remote = DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    remote.set_progress_bar_config(disable=True)
    assert type(remote).__module__.startswith("diffusers_modules") and remote.design.to_dict() == design.to_dict()
    call = dict(support_images=IMAGES[:2], support_masks=MASKS[:2])
    np.testing.assert_allclose(remote(QUERIES[1], **call).probabilities[0], pipe(QUERIES[1], **call).probabilities[0],
                               atol=1e-5)


# ---------------------------------------------------------------------- mask injection


def _support_input(injection: str):
    """(pipeline of that mask injection, what its `conv_in_ref` reads for the shot IMAGES[0], MASKS[0])."""
    pipe = tiny_design_pipeline(_design(mask_injection=injection))
    seen = []
    handle = pipe.unet.conv_in_ref.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    pipe.encode_support(IMAGES[0], MASKS[0])
    handle.remove()
    return pipe, seen


def test_multiply_encodes_the_image_times_its_mask():
    pipe, seen = _support_input("multiply")
    processor = DiffewSImageProcessor
    image = (processor.image_to_tensor(IMAGES[0], RESOLUTION) + 1) / 2  # [3, R, R] in [0, 1]
    mask = processor.mask_to_tensor(MASKS[0], RESOLUTION)[:1] > 0
    with torch.no_grad():
        expected = pipe.vae.encode((image * mask * 2 - 1)[None]).latent_dist.mode() * pipe.vae.config.scaling_factor
    torch.testing.assert_close(seen[0], expected, atol=1e-5, rtol=0)
    assert seen[0].shape[1] == 4 and pipe.unet.config.in_channels_ref == 4


def test_multiply_latent_zeroes_the_latent_outside_the_mask():
    _, seen = _support_input("multiply_latent")
    mask = (DiffewSImageProcessor.mask_to_tensor(MASKS[0], RESOLUTION)[:1] > 0).float()[None]  # [1, 1, R, R]
    grid = F.interpolate(mask, size=seen[0].shape[-2:], mode="nearest")[0, 0] > 0
    assert torch.all(seen[0][0][:, ~grid] == 0) and torch.any(seen[0][0][:, grid] != 0)


def _perturbed_outside(cache: SupportKeyValues) -> SupportKeyValues:
    """The cache with random keys and values on every support token outside the mask."""
    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, (key, value) in cache.layers.items():
        outside = (cache.biases[name] < 0)[..., None]
        layers[name] = (torch.where(outside, torch.randn(key.shape, generator=generator) * 5, key),
                        torch.where(outside, torch.randn(value.shape, generator=generator) * 5, value))
    return SupportKeyValues(layers, cache.num_episodes, cache.num_shots, cache.biases)


@pytest.mark.parametrize("interaction", ["kv_fusion"])
def test_attention_mask_gives_support_tokens_outside_the_mask_zero_weight(interaction):
    pipe = tiny_design_pipeline(_design(interaction=interaction, mask_injection="attention_mask"))
    support = pipe.encode_support(IMAGES[:2], MASKS[:2])
    biases = support.key_values.biases
    assert set(biases) == set(support.key_values.layers)
    assert all(((b == 0) | (b == -10000.0)).all() and (b < 0).any() and (b == 0).any() for b in biases.values())
    perturbed = type(support)(_perturbed_outside(support.key_values), support.num_shots, support.processing_resolution)
    a = pipe(QUERIES[0], support=support).probabilities[0]
    b = pipe(QUERIES[0], support=perturbed).probabilities[0]
    np.testing.assert_allclose(a, b, atol=1e-6)
    # without the mask the same perturbation changes the output: the test can fail
    unmasked = SupportKeyValues(perturbed.key_values.layers, 1, 2, None)
    c = pipe(QUERIES[0], support=type(support)(unmasked, 2, support.processing_resolution)).probabilities[0]
    assert np.abs(a - c).max() > 1e-3


def test_tokenized_attention_mask_flags_the_class_token_and_the_patches_inside():
    pipe = tiny_design_pipeline(_design(interaction="tokenized_cross_attention", mask_injection="attention_mask"))
    support = pipe.encode_support(IMAGES[0], MASKS[0])
    bias = support.key_values.bias  # [1, 17]: class token, then 4 x 4 patches
    assert bias.shape == (1, 17) and bias[0, 0] == 0
    assert (bias[0, 1:] == 0).any() and (bias[0, 1:] < 0).any()


# ---------------------------------------------------------------------- interaction


def _support_rows_of_first_self_attention(pipe, query):
    """The first self-attention layer's output for the shots' rows of a `qkv_fusion` batch."""
    layer = next(module for name, module in pipe.unet.named_modules() if name.endswith("attn1"))
    outputs = []
    handle = layer.register_forward_hook(lambda module, args, output: outputs.append(output[1:].clone()))
    pipe(query, support_images=IMAGES[:2], support_masks=MASKS[:2])
    handle.remove()
    return outputs[0]


def test_qkv_fusion_support_side_depends_on_the_query_and_cannot_be_cached():
    pipe = tiny_design_pipeline(_design(interaction="qkv_fusion"))
    first = _support_rows_of_first_self_attention(pipe, QUERIES[0])
    second = _support_rows_of_first_self_attention(pipe, QUERIES[1])
    assert first.shape[0] == 2 and (first - second).abs().max() > 1e-4
    with pytest.raises(ValueError, match="qkv_fusion interaction cannot"):
        pipe.encode_support(IMAGES[0], MASKS[0])
    with pytest.raises(ValueError, match="cannot use a cached support"):
        pipe(QUERIES[0], support=tiny_pipeline().encode_support(IMAGES[0], MASKS[0]))


def test_kv_fusion_support_side_does_not_depend_on_the_query():
    pipe = tiny_pipeline()
    support = pipe.encode_support(IMAGES[:2], MASKS[:2])
    a = pipe(QUERIES, support_images=IMAGES[:2], support_masks=MASKS[:2]).probabilities
    b = pipe(QUERIES, support=support).probabilities
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=1e-5)


def _cross_attention_inputs(pipe, image):
    layer = next(module for name, module in pipe.unet.named_modules() if name.endswith("attn2"))
    inputs = []
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: inputs.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    pipe(QUERIES[0], support_images=[image], support_masks=[MASKS[0]])
    handle.remove()
    return inputs[0]


def test_tokenized_cross_attention_reads_the_support_tokens_and_records_no_keys():
    pipe = tiny_design_pipeline(_design(interaction="tokenized_cross_attention"))
    assert not hasattr(pipe.unet, "conv_in_ref")
    first, second = _cross_attention_inputs(pipe, IMAGES[0]), _cross_attention_inputs(pipe, IMAGES[1])
    assert first.shape == (1, 34, 32)  # concat: the image's 17 tokens, then the mask picture's 17
    assert (first - second).abs().max() > 1e-4
    support = pipe.encode_support(IMAGES[0], MASKS[0])
    assert isinstance(support.key_values, SupportTokens) and not hasattr(support.key_values, "layers")
    with pytest.raises(ValueError, match="another interaction"):
        pipe(QUERIES[0], support=tiny_pipeline().encode_support(IMAGES[0], MASKS[0]))


# ---------------------------------------------------------------------- targets


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_rule_recovers_the_mask_from_a_perfect_prediction(target):
    rng = np.random.default_rng(1)
    image = torch.as_tensor(rng.uniform(0.2, 1.0, (1, 3, 32, 32)), dtype=torch.float32)  # no black pixel
    mask = torch.as_tensor(rng.random((32, 32)) > 0.6)
    mask_pixels = (mask.float() * 2 - 1).expand(1, 3, 32, 32)
    perfect = (DiffewSImageProcessor.target_pixels(image * 2 - 1, mask_pixels, target) + 1) / 2
    score = DiffewSImageProcessor.prediction_map(perfect, image, target)
    assert score.shape[1] == (3 if target == "white_foreground" else 1)
    quantized = DiffewSImageProcessor.quantize_prediction(score, "8bit")
    level = DiffewSImageProcessor.threshold_value(quantized, 0.25, "relative")
    assert torch.equal(quantized.mean(dim=1)[0] > level[0], mask)


@pytest.mark.parametrize("target", TARGETS[1:])
def test_other_targets_train_and_segment(target):
    pipe = tiny_design_pipeline(_design(target=target))
    out = pipe(QUERIES, support_images=IMAGES[:2], support_masks=MASKS[:2])
    assert [p.shape for p in out.probabilities] == [(50, 60), (36, 44)]
    assert all(0 <= p.min() and p.max() <= 1 for p in out.probabilities)


# ---------------------------------------------------------------------- generation


def test_mn2m_draws_follow_the_generator_and_the_ensemble_reduces_them():
    pipe = tiny_design_pipeline(_design(generation="mn2m"), num_inference_steps=2)
    assert pipe.unet.config.in_channels == 8
    support = pipe.encode_support(IMAGES[0], MASKS[0])

    def run(seed, **kwargs):
        return pipe(QUERIES[0], support=support, generator=torch.Generator().manual_seed(seed), **kwargs).probabilities[0]

    np.testing.assert_array_equal(run(0), run(0))
    assert np.abs(run(0) - run(1)).max() > 1e-4
    ensemble = run(0, ensemble_size=3)
    np.testing.assert_array_equal(ensemble, run(0, ensemble_size=3))
    assert np.abs(ensemble - run(0)).max() > 1e-5


def test_mi2m_is_deterministic_and_steps_through_the_scheduler():
    pipe = tiny_design_pipeline(_design(generation="mi2m"), beta_range=(0.0272, 0.384))
    assert pipe.scheduler.config.beta_start == 0.0272 and pipe.scheduler.config.beta_end == 0.384
    calls = []
    handle = pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[1]))
    a = pipe(QUERIES[0], support_images=IMAGES[:1], support_masks=MASKS[:1], num_inference_steps=3).probabilities[0]
    handle.remove()
    timesteps = [int(t) for t in calls if not isinstance(t, int) or t != 1]
    assert len(timesteps) == 3 and timesteps == sorted(timesteps, reverse=True)
    b = pipe(QUERIES[0], support_images=IMAGES[:1], support_masks=MASKS[:1], num_inference_steps=3).probabilities[0]
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).all() and bool((pipe.scheduler.alphas_cumprod > 0).all())  # it underflows on this schedule
    five = pipe(QUERIES[0], support_images=IMAGES[:1], support_masks=MASKS[:1], num_inference_steps=5).probabilities[0]
    assert np.isfinite(five).all() and five.max() > 0


def test_generation_options_are_checked_against_the_design():
    pipe = tiny_pipeline()
    call = dict(support_images=IMAGES[:1], support_masks=MASKS[:1])
    with pytest.raises(ValueError, match="oi2m generation takes one step"):
        pipe(QUERIES[0], num_inference_steps=4, **call)
    with pytest.raises(ValueError, match="only the mn2m generation"):
        pipe(QUERIES[0], ensemble_size=2, **call)
    with pytest.raises(ValueError, match="`support_token_sampling` must be True or False"):
        pipe(QUERIES[0], support_token_sampling="yes", **call)
    with pytest.raises(ValueError, match="`oi2m` has no schedule"):
        make_scheduler("oi2m", 0.1, 0.2)


# ---------------------------------------------------------------------- support-token sampling


def _self_attention_key_lengths(monkeypatch, pipe, **call):
    """(query, key) lengths of every self-attention call of the UNet's query pass (the support is cached)."""
    lengths, sdpa = [], F.scaled_dot_product_attention

    def recording(query, key, value, **kwargs):
        lengths.append((query.shape[-2], key.shape[-2]))
        return sdpa(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    pipe(QUERIES[0], **call)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    prompt = pipe.unet.empty_prompt_embeds.shape[1]
    return [(q, k) for q, k in lengths if k not in (prompt, q)]  # not cross-attention, not the VAE's attention


def test_token_sampling_keeps_one_shots_tokens_per_layer(monkeypatch):
    pipe = tiny_pipeline()
    one, three = pipe.encode_support(IMAGES[:1], MASKS[:1]), pipe.encode_support(IMAGES, MASKS)
    sampled = _self_attention_key_lengths(monkeypatch, pipe, support=three, support_token_sampling=True,
                                          generator=torch.Generator().manual_seed(0))
    full = _self_attention_key_lengths(monkeypatch, pipe, support=three)
    assert sampled and all(k == 2 * q for q, k in sampled)  # own tokens + one shot's
    assert all(k == 4 * q for q, k in full)  # own tokens + three shots'
    # one shot: sampling changes nothing
    a = pipe(QUERIES[0], support=one, support_token_sampling=True, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(a.probabilities[0], pipe(QUERIES[0], support=one).probabilities[0])
    # several shots: reproducible with the generator, and different from the full attention
    b = pipe(QUERIES[0], support=three, support_token_sampling=True, generator=torch.Generator().manual_seed(0))
    c = pipe(QUERIES[0], support=three, support_token_sampling=True, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(b.probabilities[0], c.probabilities[0])
    assert np.abs(b.probabilities[0] - pipe(QUERIES[0], support=three).probabilities[0]).max() > 1e-5


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize("name", ["qkv_fusion+concat", "tokenized_cross_attention+add"])
def test_the_command_line_segments_with_any_design(name, tmp_path):
    design, _ = PAPER_DESIGNS[name]
    pipe = tiny_design_pipeline(design)
    pipe.save_pretrained(tmp_path / "model")
    image, mask = write_support(tmp_path / "support")
    images = write_images(tmp_path / "images", corrupt=False)
    code = main(["segment", "--model", str(tmp_path / "model"), "--support", str(image), "--support-mask", str(mask),
                 "--input", str(images), "--output", str(tmp_path / "out"), "--no-progress", "--batch-size", "2"])
    assert code == 0
    query = Image.open(images / "a.jpg").convert("RGB")
    expected = pipe(query, support_images=[Image.open(image).convert("RGB")], support_masks=[Image.open(mask)]).masks[0]
    written = np.asarray(Image.open(tmp_path / "out" / "a.png")) > 0
    assert written.shape == expected.shape and (written == expected).mean() > 0.999
