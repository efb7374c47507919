"""Inputs the pipeline accepts, the outputs it returns, and the errors it raises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_models import RESOLUTION

RNG = np.random.default_rng(0)
SUPPORT = RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)
MASK = np.zeros((48, 64), dtype=bool)
MASK[10:30, 20:50] = True
QUERY = RNG.integers(0, 256, (40, 52, 3), dtype=np.uint8)


def _probability(pipe, support_image, support_mask, query=QUERY, **kwargs):
    return pipe(query, support_images=[support_image], support_masks=[support_mask], **kwargs).probabilities[0]


def test_outputs_at_query_size_and_processing_size(pipe):
    queries = [QUERY, RNG.integers(0, 256, (30, 70, 3), dtype=np.uint8)]
    out = pipe(queries, support_images=[SUPPORT], support_masks=[MASK])
    assert [m.shape for m in out.masks] == [(40, 52), (30, 70)]
    assert all(m.dtype == np.bool_ for m in out.masks)
    assert all(p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1 for p in out.probabilities)
    small = pipe(queries, support_images=[SUPPORT], support_masks=[MASK], match_input_resolution=False)
    assert [m.shape for m in small.masks] == [(RESOLUTION, RESOLUTION)] * 2


@pytest.mark.parametrize("output_type", ["np", "pt", "pil"])
def test_output_types(pipe, output_type):
    out = pipe(QUERY, support_images=[SUPPORT], support_masks=[MASK], output_type=output_type)
    mask, probability = out.masks[0], out.probabilities[0]
    if output_type == "pt":
        assert mask.dtype == torch.bool and probability.dtype == torch.float32 and tuple(mask.shape) == (40, 52)
    elif output_type == "pil":
        assert mask.mode == "1" and probability.mode == "L" and mask.size == (52, 40)
    else:
        assert mask.dtype == np.bool_
    masks, probabilities = pipe(QUERY, support_images=[SUPPORT], support_masks=[MASK], return_dict=False)
    assert len(masks) == len(probabilities) == 1


def test_image_types_agree(pipe):
    """PIL, uint8 arrays, float arrays in [0, 1] and CHW tensors of the same pixels give the same result."""
    reference = _probability(pipe, Image.fromarray(SUPPORT), MASK, query=Image.fromarray(QUERY))
    variants = [
        (SUPPORT, QUERY),
        (SUPPORT.astype(np.float32) / 255, QUERY.astype(np.float32) / 255),
        (torch.from_numpy(SUPPORT).permute(2, 0, 1), torch.from_numpy(QUERY).permute(2, 0, 1)),
        (Image.fromarray(SUPPORT).convert("RGBA"), Image.fromarray(QUERY).convert("RGBA")),
    ]
    for support, query in variants:
        np.testing.assert_allclose(_probability(pipe, support, MASK, query=query), reference, atol=1e-5)


def test_mask_types_agree(pipe):
    reference = _probability(pipe, SUPPORT, MASK)
    as_uint8 = MASK.astype(np.uint8)
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., 3] = as_uint8 * 255
    palette = Image.fromarray(as_uint8 * 3, mode="L").convert("P")
    variants = [
        as_uint8,  # 0/1
        as_uint8 * 255,  # 0/255
        torch.from_numpy(MASK),
        torch.from_numpy(as_uint8).float(),
        Image.fromarray(as_uint8 * 255).convert("1"),
        Image.fromarray(as_uint8 * 255, mode="L"),
        palette,
        Image.fromarray(rgba, mode="RGBA"),
    ]
    for mask in variants:
        np.testing.assert_allclose(_probability(pipe, SUPPORT, mask), reference, atol=1e-6)


def test_exif_orientation_is_applied(pipe):
    """A photo stored sideways with an EXIF rotation tag is read upright, like its mask."""
    upright = Image.fromarray(SUPPORT)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = stored.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    import io

    buffer = io.BytesIO()
    stored.save(buffer, format="PNG", exif=exif.tobytes())
    loaded = Image.open(io.BytesIO(buffer.getvalue()))
    np.testing.assert_allclose(_probability(pipe, loaded, MASK), _probability(pipe, upright, MASK), atol=1e-5)


def test_grayscale_and_batched_queries(pipe):
    gray = Image.fromarray(QUERY).convert("L")
    out = pipe([gray, np.stack([QUERY, QUERY])[0]], support_images=[SUPPORT], support_masks=[MASK])
    assert len(out.masks) == 2
    batch = torch.from_numpy(np.stack([QUERY, QUERY])).permute(0, 3, 1, 2)  # [2, 3, H, W] is two queries
    assert len(pipe(batch, support_images=[SUPPORT], support_masks=[MASK]).masks) == 2


def test_thresholds(pipe):
    full = pipe(QUERY, support_images=[SUPPORT], support_masks=[MASK], threshold_mode="absolute", threshold=0.5,
                threshold_precision="full")
    np.testing.assert_array_equal(full.masks[0], full.probabilities[0] > 0.5)
    # The default 8-bit rule only differs where the float map is within 1/255 of the level.
    out = pipe(QUERY, support_images=[SUPPORT], support_masks=[MASK], threshold_mode="absolute", threshold=0.5)
    np.testing.assert_array_equal(out.probabilities[0], full.probabilities[0])
    differ = out.masks[0] != full.masks[0]
    assert np.all(np.abs(full.probabilities[0][differ] - 0.5) <= 1 / 255)
    everything = pipe(QUERY, support_images=[SUPPORT], support_masks=[MASK], threshold_mode="relative", threshold=0.0,
                      threshold_precision="full")
    assert everything.masks[0].all()
    nothing = pipe(QUERY, support_images=[SUPPORT], support_masks=[MASK], threshold_mode="absolute", threshold=1.0)
    assert not nothing.masks[0].any()


def test_huge_image_works(pipe):
    """A 6000 x 4000 photo: the model only sees the processing resolution; outputs come back at full size."""
    huge = Image.new("RGB", (6000, 4000), (120, 30, 200))
    huge_mask = np.zeros((4000, 6000), dtype=bool)
    huge_mask[1000:3000, 2000:4000] = True
    out = pipe(huge, support_images=[huge], support_masks=[huge_mask])
    assert out.masks[0].shape == (4000, 6000)


# ---------------------------------------------------------------------- errors


def _call(pipe, **kwargs):
    arguments = dict(image=QUERY, support_images=[SUPPORT], support_masks=[MASK])
    arguments.update(kwargs)
    return pipe(**arguments)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(support_images=None, support_masks=None), ValueError, "No shots"),
        (dict(support_images=[], support_masks=[]), ValueError, "No shots"),
        (dict(support_images=[SUPPORT, SUPPORT], support_masks=[MASK]), ValueError, "2 support_images but 1 support_masks"),
        (dict(support_masks=[MASK[:40]]), ValueError, "support_masks[0] is 64x40"),
        (dict(support_masks=[np.zeros_like(MASK)]), ValueError, "support_masks[0] is all background"),
        (dict(image=np.full((8, 8, 3), np.nan, dtype=np.float32)), ValueError, "`image[0]` contains NaN or inf"),
        (dict(support_images=[torch.full((3, 48, 64), float("inf"))]), ValueError, "`support_images[0]` contains NaN or inf"),
        (dict(support_masks=[np.where(MASK, np.nan, 0.0)]), ValueError, "`support_masks[0]` contains NaN or inf"),
        (dict(output_type="latent"), ValueError, "`output_type` must be one of"),
        (dict(threshold_mode="otsu"), ValueError, "`threshold_mode` must be one of"),
        (dict(threshold=1.5), ValueError, "`threshold` must be a number in [0, 1]"),
        (dict(processing_resolution=98), ValueError, "`processing_resolution` must be a positive multiple"),
        (dict(image="query.jpg"), TypeError, "`image[0]` must be a PIL image, np.ndarray or torch.Tensor"),
        (dict(image=[]), ValueError, "`image` is empty"),
        (dict(image=np.zeros((8, 8, 5), dtype=np.uint8)), ValueError, "`image[0]` must be [H, W], [H, W, 3]"),
        (dict(support_images=[[SUPPORT]] * 3, support_masks=[[MASK]] * 3), ValueError, "3 support sets for 1 queries"),
        (dict(batch_size=0), ValueError, "`batch_size` must be a positive integer"),
    ],
)
def test_bad_input_names_the_problem(pipe, kwargs, error, message):
    with pytest.raises(error) as info:
        _call(pipe, **kwargs)
    assert message in str(info.value)


def test_support_and_support_images_together_is_an_error(pipe):
    support = pipe.encode_support([SUPPORT], [MASK])
    with pytest.raises(ValueError, match="not both"):
        _call(pipe, support=support)
    with pytest.raises(TypeError, match="made by `encode_support`"):
        pipe(QUERY, support=object())
    with pytest.raises(ValueError, match="encoded at processing_resolution=64"):
        pipe(QUERY, support=support, processing_resolution=128)
