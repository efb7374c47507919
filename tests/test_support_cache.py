"""The support cache and episode handling: reuse without re-running the support pass, never mixing episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline_diffews import DiffewSUNet2DConditionModel

RNG = np.random.default_rng(1)
IMAGES = [RNG.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(4)]
QUERIES = [RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(5)]


def _mask(top, left, size=20):
    mask = np.zeros((48, 48), dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


MASKS = [_mask(0, 0), _mask(20, 20), _mask(5, 25), _mask(25, 3)]


@pytest.fixture
def support_pass_counter(monkeypatch):
    calls = []
    original = DiffewSUNet2DConditionModel._support_pass

    def counting(self, support_sample, *args, **kwargs):
        calls.append(tuple(support_sample.shape[:2]))
        return original(self, support_sample, *args, **kwargs)

    monkeypatch.setattr(DiffewSUNet2DConditionModel, "_support_pass", counting)
    return calls


def test_cached_equals_uncached(pipe):
    uncached = pipe(QUERIES, support_images=IMAGES[:2], support_masks=MASKS[:2])
    support = pipe.encode_support(IMAGES[:2], MASKS[:2])
    cached = pipe(QUERIES, support=support, batch_size=2)
    for a, b in zip(uncached.probabilities, cached.probabilities):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(uncached.masks, cached.masks):
        np.testing.assert_array_equal(a, b)


def test_support_pass_runs_once_per_encode_support(pipe, support_pass_counter):
    support = pipe.encode_support(IMAGES[:3], MASKS[:3])
    assert support_pass_counter == [(1, 3)]
    for _ in range(2):
        pipe(QUERIES, support=support, batch_size=2)
    assert support_pass_counter == [(1, 3)]  # 10 queries later, still the one support pass


def test_shared_supports_are_encoded_once_per_call(pipe, support_pass_counter):
    pipe(QUERIES, support_images=IMAGES[:2], support_masks=MASKS[:2], batch_size=2)
    assert support_pass_counter == [(1, 2)]


def test_batching_does_not_change_results(pipe):
    one = pipe(QUERIES, support_images=IMAGES[:2], support_masks=MASKS[:2], batch_size=1)
    three = pipe(QUERIES, support_images=IMAGES[:2], support_masks=MASKS[:2], batch_size=3)
    for a, b in zip(one.probabilities, three.probabilities):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_per_query_supports_do_not_mix_episodes(pipe, support_pass_counter):
    """Each query in a batch sees its own supports: same result as running it alone."""
    sets_images = [[IMAGES[0]], [IMAGES[1], IMAGES[2]], [IMAGES[3]]]
    sets_masks = [[MASKS[0]], [MASKS[1], MASKS[2]], [MASKS[3]]]
    batched = pipe(QUERIES[:3], support_images=sets_images, support_masks=sets_masks, batch_size=3)
    # queries with 1 shot share one batch (2 episodes), the 2-shot query its own: each set encoded exactly once
    assert sorted(support_pass_counter) == [(1, 2), (2, 1)]
    for i in range(3):
        alone = pipe(QUERIES[i], support_images=sets_images[i], support_masks=sets_masks[i])
        np.testing.assert_allclose(batched.probabilities[i], alone.probabilities[0], atol=1e-5)
    # and the episodes really differ, so mixing them up would have been caught
    assert np.abs(batched.probabilities[0] - pipe(QUERIES[0], support_images=sets_images[2],
                                                  support_masks=sets_masks[2]).probabilities[0]).max() > 1e-4


def test_one_cached_support_per_query(pipe):
    supports = [pipe.encode_support([IMAGES[i]], [MASKS[i]]) for i in range(3)]
    batched = pipe(QUERIES[:3], support=supports, batch_size=3)
    for i in range(3):
        alone = pipe(QUERIES[i], support_images=[IMAGES[i]], support_masks=[MASKS[i]])
        np.testing.assert_allclose(batched.probabilities[i], alone.probabilities[0], atol=1e-5)


def test_replaced_attention_processors_are_detected(pipe):
    from diffusers.models.attention_processor import AttnProcessor2_0

    support = pipe.encode_support([IMAGES[0]], [MASKS[0]])
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="set_default_attn_processor"):
        pipe(QUERIES[0], support=support)
    pipe.unet.set_default_attn_processor()
    pipe(QUERIES[0], support=support)


@pytest.mark.parametrize("label_maps", [False, True])
def test_a_support_moved_with_to_gives_the_same_outputs(pipe, label_maps):
    masks = [m.astype(np.uint8) * (k + 2) for k, m in enumerate(MASKS[:2])] if label_maps else MASKS[:2]
    support = pipe.encode_support(IMAGES[:2], masks)
    moved = support.to("cpu", torch.float64)
    assert moved is not support and moved.num_shots == support.num_shots and moved.class_ids == support.class_ids
    assert all(k.dtype == torch.float64 for cache in moved.caches for k, _ in cache.layers.values())
    assert all(k.dtype == torch.float32 for cache in support.caches for k, _ in cache.layers.values())
    before, after = pipe(QUERIES[0], support=support), pipe(QUERIES[0], support=moved.to(dtype=torch.float32))
    np.testing.assert_array_equal(before.probabilities[0], after.probabilities[0])
