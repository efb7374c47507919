"""Growing a cached support by new shots: only the new shots go through the support pass, and the grown cache
equals encoding every shot at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tiny_models import RESOLUTION, input_batch_sizes, tiny_pipeline

RNG = np.random.default_rng(5)
IMAGES = [RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
QUERIES = [RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8), RNG.integers(0, 256, (36, 44, 3), dtype=np.uint8)]


def _box(top, left, size=20):
    mask = np.zeros((48, 64), dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


MASKS = [_box(0, 0), _box(20, 30), _box(10, 15)]


def _label_maps() -> list[np.ndarray]:
    """Three shots: classes 1 and 2 in the first two, 3 in the first only; the new third shot shows 1 and a new
    class 4, not 2 or 3; 255 (ignored) in the first."""
    first, second, third = (np.zeros((48, 64), np.uint8) for _ in range(3))
    first[:20, :20], first[25:, 30:], first[:10, 40:], first[40:, :10] = 1, 2, 3, 255
    second[10:30, 10:30], second[30:, 40:] = 1, 2
    third[5:25, 30:50], third[30:, :20] = 1, 4
    return [first, second, third]


LABELS = _label_maps()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture
def support_inputs(pipe):
    """The batch size of every call of the support input layer `conv_in_ref` (a forward hook on the real layer)."""
    with input_batch_sizes(pipe.unet.conv_in_ref) as calls:
        yield calls


def _assert_same_outputs(pipe, grown, at_once, **kwargs):
    a, b = pipe(QUERIES, support=grown, **kwargs), pipe(QUERIES, support=at_once, **kwargs)
    for x, y in zip(a.probabilities, b.probabilities):
        np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(a.masks, b.masks):
        np.testing.assert_array_equal(x, y)
    return a, b


def test_one_new_shot_runs_one_support_pass_and_equals_all_shots_at_once(pipe, support_inputs):
    base = pipe.encode_support(IMAGES[:2], MASKS[:2])
    base_keys = {name: k.clone() for name, (k, _) in base.key_values.layers.items()}
    support_inputs.clear()
    grown = pipe.encode_support(IMAGES[2], MASKS[2], extend=base)
    assert support_inputs == [1]  # one support pass, holding the new shot only
    assert grown.num_shots == 3 and grown.key_values.num_shots == 3 and grown.processing_resolution == RESOLUTION
    assert base.num_shots == 2 and all(torch.equal(base_keys[n], k) for n, (k, _) in base.key_values.layers.items())

    at_once = pipe.encode_support(IMAGES, MASKS)
    # a support pass of 1 shot and one of 3 shots block their matrix products differently: a few 1e-5 apart on some CPUs
    for name, (key, value) in at_once.key_values.layers.items():
        torch.testing.assert_close(grown.key_values.layers[name][0], key, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grown.key_values.layers[name][1], value, atol=1e-5, rtol=1e-4)
    _assert_same_outputs(pipe, grown, at_once, batch_size=2)


def test_label_maps_grow_with_a_new_class_and_keep_an_absent_one(pipe, support_inputs):
    base = pipe.encode_support(IMAGES[:2], LABELS[:2], batch_size=3)
    support_inputs.clear()
    grown = pipe.encode_support([IMAGES[2]], [LABELS[2]], extend=base, batch_size=3)
    assert support_inputs == [2]  # one support pass: the new shot, once for each of its classes (1 and 4)
    at_once = pipe.encode_support(IMAGES, LABELS, batch_size=3)
    assert grown.class_ids == at_once.class_ids == [1, 2, 3, 4] and grown.num_shots == at_once.num_shots == 3
    assert [kv.num_shots for kv in grown.class_key_values] == [3, 2, 1, 1]  # class 2 and 3 absent from the new shot
    a, b = _assert_same_outputs(pipe, grown, at_once, batch_size=4)
    for x, y in zip(a.class_probabilities, b.class_probabilities):
        np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(a.label_maps, b.label_maps):
        np.testing.assert_array_equal(x, y)


def test_a_mask_of_class_1_extends_a_label_map_support_as_class_1(pipe):
    """With `extend`, the new masks are read as the support was: a 0/1 label map showing only class 1 stays class 1."""
    base = pipe.encode_support(IMAGES[:2], LABELS[:2])
    grown = pipe.encode_support(IMAGES[2], (LABELS[2] == 1).astype(np.uint8), extend=base)
    assert grown.class_ids == [1, 2, 3] and [kv.num_shots for kv in grown.class_key_values] == [3, 2, 1]


def test_dict_classes_keep_their_ids_and_add_new_names(pipe):
    shots = [{"road": LABELS[0] == 1, "car": LABELS[0] == 2}, {"car": LABELS[1] == 2}, {"sign": LABELS[2] == 4, "road": LABELS[2] == 1}]
    grown = pipe.encode_support(IMAGES[:2], shots[:2])
    grown = pipe.encode_support(IMAGES[2:], shots[2:], extend=grown)
    at_once = pipe.encode_support(IMAGES, shots)
    assert grown.class_names == at_once.class_names == ["road", "car", "sign"] and grown.class_ids == [1, 2, 3]
    a, b = _assert_same_outputs(pipe, grown, at_once)
    assert a.class_names == ["road", "car", "sign"]
    for x, y in zip(a.label_maps, b.label_maps):
        np.testing.assert_array_equal(x, y)


def test_extend_errors_name_the_problem(pipe):
    base = pipe.encode_support(IMAGES[:1], MASKS[:1])
    with pytest.raises(ValueError, match=r"`extend` was encoded at processing_resolution=64, but this call uses 128"):
        pipe.encode_support(IMAGES[1], MASKS[1], processing_resolution=128, extend=base)
    with pytest.raises(TypeError, match=r"`extend` must be a DiffewSSupport made by `encode_support`, got list"):
        pipe.encode_support(IMAGES[1], MASKS[1], extend=[base])
    with pytest.raises(ValueError, match=r"`multiclass=True` but `extend` holds one class"):
        pipe.encode_support(IMAGES[1], LABELS[1], multiclass=True, extend=base)
    classes = pipe.encode_support(IMAGES[:1], LABELS[:1])
    with pytest.raises(ValueError, match=r"`extend` holds classes read from label maps"):
        pipe.encode_support(IMAGES[1], {"car": LABELS[1] == 2}, extend=classes)
    with pytest.raises(ValueError, match=r"support_masks\[0\] is 64x40"):
        pipe.encode_support(IMAGES[1], MASKS[1][:40], extend=base)
    assert base.num_shots == 1 and classes.num_shots == 1
