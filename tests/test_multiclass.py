"""Several classes at once: label maps, palette images and dicts as supports, against one-class calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_support_cache import support_pass_counter  # noqa: F401 - a fixture: (episodes, shots) per support pass
from tests.tiny_models import input_batch_sizes, tiny_pipeline

RNG = np.random.default_rng(7)
IMAGES = [RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2)]
QUERIES = [RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8), RNG.integers(0, 256, (36, 44, 3), dtype=np.uint8)]


def _label_maps() -> list[np.ndarray]:
    """Two shots: classes 1 and 2 in both, class 3 in the first only; a 255 (ignored) region in each."""
    first, second = np.zeros((48, 64), np.uint8), np.zeros((48, 64), np.uint8)
    first[:20, :20], first[25:, 30:], first[:10, 40:], first[40:, :10] = 1, 2, 3, 255
    second[10:30, 10:30], second[30:, 40:], second[:5, :] = 1, 2, 255
    return [first, second]


LABELS = _label_maps()
TOO_LARGE = LABELS[0].astype(np.int64)
TOO_LARGE[0, 0] = 300


@pytest.fixture(scope="module")
def pipe():
    """One tiny pipeline for the module (deterministic: the tests only read it)."""
    return tiny_pipeline()


@pytest.fixture(scope="module")
def reference(pipe):
    """The 3-class call on the first query, with the label maps as uint8 arrays."""
    return pipe(QUERIES[0], support_images=IMAGES, support_masks=LABELS, batch_size=3)


@pytest.fixture
def encoded_images(pipe):
    """How many images each VAE encoder call takes (a forward hook on the real encoder)."""
    with input_batch_sizes(pipe.vae.encoder) as counts:
        yield counts


def _one_class(pipe, class_id, query, **kwargs):
    """The one-class call for `class_id`: only the shots that show it, with its binary masks."""
    shots = [i for i, labels in enumerate(LABELS) if (labels == class_id).any()]
    return pipe(query, support_images=[IMAGES[i] for i in shots], support_masks=[LABELS[i] == class_id for i in shots],
                **kwargs)


def _expected_label_map(one_class_outputs, class_ids) -> np.ndarray:
    """The label-map rule applied to one-class outputs: the likeliest class among those whose mask holds."""
    probability = np.stack([out.probabilities[0] for out in one_class_outputs])
    above = np.stack([out.masks[0] for out in one_class_outputs])
    best = np.where(above, probability, -1).argmax(axis=0)
    return np.where(above.any(axis=0), np.asarray(class_ids)[best], 0)


def test_three_classes_equal_three_one_class_calls_with_fewer_encodes(pipe, encoded_images):
    out = pipe(QUERIES[0], support_images=IMAGES, support_masks=LABELS, batch_size=3)
    multi_encodes = sum(encoded_images)
    assert out.class_ids == [1, 2, 3] and out.class_names is None
    assert out.class_probabilities[0].shape == (3, 40, 56) and out.class_probabilities[0].dtype == np.float32
    assert out.label_maps[0].shape == (40, 56) and out.label_maps[0].dtype == np.uint8

    encoded_images.clear()
    singles = [_one_class(pipe, class_id, QUERIES[0]) for class_id in (1, 2, 3)]  # class 3: the first shot only
    # 2 images + 2 + 2 + 1 masks + 1 query, against (2 + 2 + 1) + (2 + 2 + 1) + (1 + 1 + 1)
    assert (multi_encodes, sum(encoded_images)) == (8, 13)
    for k, single in enumerate(singles):
        np.testing.assert_allclose(out.class_probabilities[0][k], single.probabilities[0], atol=1e-5)
    np.testing.assert_array_equal(out.label_maps[0], _expected_label_map(singles, [1, 2, 3]))
    np.testing.assert_array_equal(out.masks[0], out.label_maps[0] > 0)
    np.testing.assert_array_equal(out.probabilities[0], out.class_probabilities[0].max(axis=0))


def test_ignored_label_is_neither_class_nor_background(pipe, reference):
    cleared = [np.where(labels == 255, 0, labels) for labels in LABELS]
    out = pipe(QUERIES[0], support_images=IMAGES, support_masks=cleared, batch_size=3)
    assert 255 not in reference.class_ids
    np.testing.assert_allclose(out.class_probabilities[0], reference.class_probabilities[0], atol=1e-5)


def test_dict_supports_name_the_classes(pipe, reference):
    shots = [{"road": LABELS[0] == 1, "car": LABELS[0] == 2, "sign": LABELS[0] == 3},
             {"car": LABELS[1] == 2, "road": LABELS[1] == 1}]
    out = pipe(QUERIES[0], support_images=IMAGES, support_masks=shots)
    assert out.class_ids == [1, 2, 3] and out.class_names == ["road", "car", "sign"]
    np.testing.assert_allclose(out.class_probabilities[0], reference.class_probabilities[0], atol=1e-5)


def test_sparse_ids_and_tensor_label_maps(pipe, reference):
    relabelled = [torch.from_numpy(np.select([labels == 1, labels == 2, labels == 3], [7, 200, 3], labels.astype(np.int64))).long()
                  for labels in LABELS]
    out = pipe(QUERIES[0], support_images=IMAGES, support_masks=relabelled, output_type="pt", multiclass=True)
    assert out.class_ids == [3, 7, 200]  # ids from 128 on are read as class ids when asked (auto reads brightness)
    assert out.label_maps[0].dtype == torch.int64 and out.class_probabilities[0].shape == (3, 40, 56)
    assert set(out.label_maps[0].unique().tolist()) <= {0, 3, 7, 200}
    np.testing.assert_allclose(out.class_probabilities[0].numpy(), reference.class_probabilities[0][[2, 0, 1]], atol=1e-5)


def test_cached_support_and_batches_give_the_same_classes(pipe, encoded_images, support_pass_counter):  # noqa: F811
    support = pipe.encode_support(IMAGES, LABELS, batch_size=2)
    # classes 1 and 2 (two shots each) in one support pass, class 3 (one shot) in another
    assert support_pass_counter == [(2, 2), (1, 1)]
    assert support.class_ids == [1, 2, 3] and [kv.num_shots for kv in support.class_key_values] == [2, 2, 1]
    encoded_images.clear()
    cached = pipe(QUERIES, support=support, batch_size=4)  # 6 (query, class) episodes: UNet batches [4], [2]
    assert sum(encoded_images) == 2 and len(support_pass_counter) == 2  # only the queries, no support pass
    uncached = pipe(QUERIES, support_images=IMAGES, support_masks=LABELS, batch_size=1)
    for a, b in zip(cached.class_probabilities, uncached.class_probabilities):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(cached.label_maps, uncached.label_maps):
        assert (a == b).mean() > 0.999  # a pixel within float noise of a threshold may flip
    assert [lm.shape for lm in cached.label_maps] == [(40, 56), (36, 44)]


def test_palette_image_keeps_its_palette(pipe, reference):
    palette = [0, 0, 0, 128, 64, 0, 0, 128, 255, 10, 200, 10] + [0] * 756
    masks = []
    for labels in LABELS:
        image = Image.fromarray(labels, mode="L")
        image.putpalette(palette)  # "L" + palette = "P"
        masks.append(image)
    out = pipe(QUERIES[0], support_images=IMAGES, support_masks=masks, output_type="pil")
    assert out.palette == palette and out.class_ids == [1, 2, 3]
    assert out.label_maps[0].mode == "P" and out.label_maps[0].getpalette() == palette
    assert out.label_maps[0].size == (56, 40) and out.masks[0].mode == "1"
    np.testing.assert_array_equal(np.asarray(out.label_maps[0]), reference.label_maps[0])
    assert isinstance(out.class_probabilities[0], np.ndarray)


def test_binary_masks_keep_one_class_output(pipe):
    single_id = Image.fromarray((LABELS[0] == 1).astype(np.uint8), mode="L")
    single_id.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    binary = pipe(QUERIES[0], support_images=IMAGES[:1], support_masks=[single_id])
    assert binary.label_maps is None and binary.class_probabilities is None and binary.class_ids is None
    forced = pipe(QUERIES[0], support_images=IMAGES[:1], support_masks=[single_id], multiclass=True)
    assert forced.class_ids == [1]
    np.testing.assert_allclose(forced.class_probabilities[0][0], binary.probabilities[0], atol=1e-5)
    np.testing.assert_array_equal(forced.label_maps[0] > 0, binary.masks[0])
    union = pipe(QUERIES[0], support_images=IMAGES, support_masks=LABELS, multiclass=False)
    assert union.label_maps is None
    masks, probabilities = pipe(QUERIES[0], support_images=IMAGES[:1], support_masks=[single_id], return_dict=False)
    np.testing.assert_array_equal(masks[0], binary.masks[0])


def test_return_dict_false_gives_masks_and_probabilities_for_several_classes(pipe, reference):
    masks, probabilities = pipe(QUERIES[0], support_images=IMAGES, support_masks=LABELS, batch_size=3, return_dict=False)
    np.testing.assert_array_equal(masks[0], reference.masks[0])
    np.testing.assert_array_equal(probabilities[0], reference.probabilities[0])


@pytest.mark.parametrize(
    "masks, kwargs, error, match",
    [
        ([LABELS[0], LABELS[1][:40]], {}, ValueError, r"support_masks\[1\] is 64x40 \(WxH\)"),
        ([TOO_LARGE, LABELS[1]], {}, ValueError, r"support_masks\[0\]` holds class ids in \[0, 300\]"),
        ([-LABELS[0].astype(np.int64), LABELS[1]], {}, ValueError, r"ids must be in 0..255"),
        ([np.zeros((48, 64), np.uint8)] * 2, {"multiclass": True}, ValueError, r"`support_masks` are all background"),
        ([np.full((48, 64), 255, np.uint8)] * 2, {"multiclass": True}, ValueError, r"`support_masks` are all background"),
        ([{"a": LABELS[0] == 1}, LABELS[1]], {}, TypeError, r"mixes dicts"),
        ([{"a": LABELS[0] == 1, "b": LABELS[0] == 9}, {"a": LABELS[1] == 1}], {}, ValueError, r"class 'b' is empty"),
        ([{"a": LABELS[0] == 1}, {"a": LABELS[1] == 1}], {"multiclass": False}, TypeError, r"multiclass=False"),
        ([LABELS[0].astype(np.float32), LABELS[1]], {"multiclass": True}, TypeError, r"integer class ids"),
        ([Image.fromarray(IMAGES[0]), LABELS[1]], {"multiclass": True}, ValueError, r"'RGB' image"),
        (LABELS, {"multiclass": "yes"}, ValueError, r"`multiclass` must be"),
    ],
)
def test_bad_label_maps_are_named(pipe, masks, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(QUERIES[0], support_images=IMAGES, support_masks=masks, **kwargs)


def test_multiclass_needs_one_shared_support_set(pipe):
    with pytest.raises(ValueError, match="one support set shared by all queries"):
        pipe(QUERIES, support_images=[IMAGES, IMAGES], support_masks=[LABELS, LABELS])
    binary = pipe.encode_support(IMAGES[:1], [LABELS[0] == 1])
    with pytest.raises(ValueError, match="`multiclass=True` but `support` holds one class"):
        pipe(QUERIES[0], support=binary, multiclass=True)
    with pytest.raises(ValueError, match="`multiclass` must be None"):
        pipe(QUERIES[0], support=binary, multiclass="auto")


def test_soft_0_255_mask_stays_a_binary_mask(pipe):
    """An anti-aliased uint8 mask (values 0..255) is brightness, not class ids: thresholded at 128 as before."""
    soft = np.zeros((48, 64), np.uint8)
    soft[10:30, 10:40] = 255
    soft[9, 10:40], soft[30, 10:40], soft[10:30, 9] = 60, 200, 127  # soft edges
    out = pipe(QUERIES[0], support_images=IMAGES[:1], support_masks=[soft])
    assert out.label_maps is None
    expected = pipe(QUERIES[0], support_images=IMAGES[:1], support_masks=[soft >= 128])
    np.testing.assert_array_equal(out.masks[0], expected.masks[0])
    np.testing.assert_array_equal(out.probabilities[0], expected.probabilities[0])


def test_a_label_map_call_prepares_the_device_like_a_one_class_call():
    """The CPU bfloat16 conversion (and, on CUDA, the GroupNorm swap) happens for multi-class calls too."""
    pipe = tiny_pipeline()
    pipe.register_to_config(cpu_bfloat16=True)
    out = pipe(QUERIES[0], support_images=IMAGES, support_masks=LABELS)
    assert out.class_ids == [1, 2, 3]
    assert pipe.unet.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="`multiclass` must be None"):
        pipe.encode_support(IMAGES, LABELS, multiclass="yes")
