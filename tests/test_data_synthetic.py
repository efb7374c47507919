"""The generated few-shot episodes (`train.data.synthetic`, `--dataset synthetic`)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures_data import ROOT  # noqa: F401  (puts the repository root on sys.path)
from train.data import EvaluationEpisodes, TrainingEpisodes, build_source
from train.data.synthetic import HELD_OUT_IDS, NUM_KINDS, TRAIN_IDS, Kind, SyntheticSource


def scene_keys(source: SyntheticSource, count: int) -> list[str]:
    return [f"{source.split}/{source.class_ids[(7 * i) % len(source.class_ids)]}/{i}" for i in range(count)]


def test_the_same_seed_draws_the_same_pixels_and_another_seed_other_ones():
    keys = scene_keys(SyntheticSource(None, "train"), 6)
    a, b, c = (SyntheticSource(None, "train", seed=s, cache_size=1) for s in (3, 3, 4))
    for key in keys:
        class_id = int(key.split("/")[1])
        np.testing.assert_array_equal(np.asarray(a.load_image(key)), np.asarray(b.load_image(key)))
        np.testing.assert_array_equal(a.load_mask(key, class_id), b.load_mask(key, class_id))
        assert not np.array_equal(np.asarray(a.load_image(key)), np.asarray(c.load_image(key)))
    # The episode stream of train.py is a function of the seed too.
    first = TrainingEpisodes(a, max_shots=2, batch_size=2, seed=0, num_steps=2).batch(1)
    second = TrainingEpisodes(b, max_shots=2, batch_size=2, seed=0, num_steps=2).batch(1)
    for x, y in zip(first, second):
        assert (x.query_key, x.support_keys, x.class_id) == (y.query_key, y.support_keys, y.class_id)
        np.testing.assert_array_equal(np.asarray(x.query_image), np.asarray(y.query_image))


def test_splits_draw_different_scenes():
    train, val = SyntheticSource(None, "train", mode="test"), SyntheticSource(None, "val", mode="test")
    c = train.class_ids[0]
    assert not np.array_equal(np.asarray(train.load_image(f"train/{c}/0")), np.asarray(val.load_image(f"val/{c}/0")))


def test_held_out_kinds_never_appear_in_training_scenes():
    assert set(HELD_OUT_IDS).isdisjoint(TRAIN_IDS) and len(HELD_OUT_IDS) + len(TRAIN_IDS) == NUM_KINDS
    assert all(Kind.from_id(c).held_out for c in HELD_OUT_IDS)
    assert {Kind.from_id(c).name.split()[0] for c in HELD_OUT_IDS} >= {"purple"}
    train = build_source("synthetic", None, "train", None, "train")
    test = build_source("synthetic", None, "val", None, "test")
    assert train.class_ids == sorted(TRAIN_IDS) and test.class_ids == sorted(HELD_OUT_IDS)
    # Every pixel of every training scene (targets and distractors) is background or a training kind.
    for key in scene_keys(train, 30):
        seen = set(np.unique(train.scene(key).labels).tolist()) - {-1}
        assert seen <= set(TRAIN_IDS), key
    episodes = TrainingEpisodes(train, max_shots=1, batch_size=4, seed=1, num_steps=10)
    assert all(e.class_id in TRAIN_IDS for step in range(10) for e in episodes.batch(step))
    with pytest.raises(ValueError, match="not served"):
        train.images_of_class(HELD_OUT_IDS[0])
    with pytest.raises(ValueError, match="not one of this source's kinds"):
        train.load_image(f"train/{HELD_OUT_IDS[0]}/0")


def test_episodes_hold_distractors_and_supports_share_only_the_kind():
    source = build_source("synthetic", None, "val", None, "test")
    episodes = EvaluationEpisodes(source, shots=2, num_episodes=12, seed=0)
    for i in range(len(episodes)):
        episode = episodes[i]
        assert episode.query_mask.any() and all(m.any() for m in episode.support_masks)
        assert episode.query_key not in episode.support_keys
        labels = source.scene(episode.query_key).labels
        distractors = set(np.unique(labels).tolist()) - {-1, episode.class_id}
        assert len(distractors) >= 3  # several visible objects of other kinds
        colour = Kind.from_id(episode.class_id).colour
        assert all(Kind.from_id(d).colour != colour for d in distractors)
        np.testing.assert_array_equal(episode.query_mask, (labels == episode.class_id).astype(np.uint8))
        assert not np.array_equal(np.asarray(episode.query_image), np.asarray(episode.support_images[0]))


def test_scenes_are_128_pixel_rgb_with_binary_masks():
    source = SyntheticSource(None, "train")
    key = scene_keys(source, 1)[0]
    image, mask = source.load_image(key), source.load_mask(key, int(key.split("/")[1]))
    assert image.mode == "RGB" and image.size == (128, 128)
    assert mask.dtype == np.uint8 and mask.shape == (128, 128) and set(np.unique(mask).tolist()) == {0, 1}
    assert not source.load_mask(key, HELD_OUT_IDS[0]).any()  # an absent kind: an empty mask
    assert SyntheticSource(None, "train", size=64).load_image(key).size == (64, 64)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "test"}, "split"),
        ({"mode": "val"}, "mode"),
        ({"fold": 1}, "fold"),
        ({"seed": -1}, "seed"),
        ({"size": 16}, "size"),
        ({"scenes_per_kind": 1}, "scenes_per_kind"),
        ({"distractor_kinds": (2, 9)}, "distractor_kinds"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSource(None, **kwargs)


def test_bad_keys_are_named():
    source = SyntheticSource(None, "train")
    for key in ("val/0/0", "train/0", "train/x/1"):
        with pytest.raises(ValueError, match="key"):
            source.load_image(key)


def test_the_scripts_need_no_data_root_for_generated_scenes():
    from train.evaluate import parse_args as evaluate_args
    from train.train import parse_args as train_args

    assert train_args(["--pretrained", "p", "--dataset", "synthetic", "--output-dir", "o"]).data_root is None
    assert evaluate_args(["--pretrained", "p", "--dataset", "synthetic", "--shots", "1"]).data_root is None
    with pytest.raises(SystemExit):
        train_args(["--pretrained", "p", "--dataset", "camvid", "--output-dir", "o"])
    with pytest.raises(SystemExit):
        evaluate_args(["--pretrained", "p", "--dataset", "camvid", "--shots", "1"])
