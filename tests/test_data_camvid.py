"""CamVid on the real data (`DIFFEWS_CAMVID_ROOT`, see tests/fixtures_data.py; read only)."""

import numpy as np
import pytest

from tests.fixtures_data import CAMVID, needs_camvid
from train.data.camvid import CAMVID_CLASSES, CamVid
from train.data.episodes import EvaluationEpisodes
from train.data.training_episodes import TrainingEpisodes
from train.data.registry import build_source

pytestmark = needs_camvid


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("camvid_cache")


def test_folds_match_readme(cache):
    names = {0: ["Sky", "Pavement", "Car"], 1: ["Building", "Tree", "Pedestrian"],
             2: ["Pole", "SignSymbol", "Bicyclist"], 3: ["Road", "Fence"]}
    for f, want in names.items():
        s = CamVid(CAMVID, "val", f, "test", index_cache=cache)
        assert [s.class_names[c] for c in s.class_ids] == want
        train = CamVid(CAMVID, "val", f, "train", index_cache=cache)
        assert sorted(train.class_ids + s.class_ids) == list(range(11))
    assert len(CAMVID_CLASSES) == 11


def test_masks_and_images(cache):
    s = CamVid(CAMVID, "val", 0, "test", index_cache=cache)
    keys = s.images_of_class(0)
    assert len(keys) == 101 and keys == sorted(keys)
    img = s.load_image(keys[0])
    assert img.mode == "RGB" and img.size == (480, 360)
    m = s.load_mask(keys[0], 8)
    label = np.array(__import__("PIL.Image", fromlist=["Image"]).open(CAMVID / "val" / "labels" / f"{keys[0]}.png"))
    assert m.dtype == np.uint8 and m.shape == (360, 480)
    np.testing.assert_array_equal(m == 1, label == 8)
    np.testing.assert_array_equal(m == 255, label == 11)
    assert (m == 255).any()


def test_evaluation_episodes_fold0(cache):
    s = build_source("camvid", CAMVID, "val", 0, "test", index_cache=cache)
    ev = EvaluationEpisodes(s, shots=1, num_episodes=1000, seed=0)
    assert {sp.class_id for sp in ev.specs} == {0, 4, 8}
    assert all(sp.query_key not in sp.support_keys for sp in ev.specs)
    assert ev.specs == EvaluationEpisodes(s, 1, 1000, 0).specs
    e = ev[0]
    assert e.support_masks[0].max() == 1 and set(np.unique(e.support_masks[0])) <= {0, 1}


def test_training_episodes_train_split(cache):
    s = CamVid(CAMVID, "train", 0, "train", index_cache=cache)
    assert s.class_ids == [1, 2, 3, 5, 6, 7, 9, 10]
    ds = TrainingEpisodes(s, max_shots=3, batch_size=2, num_steps=3)
    batch = ds.batch(1)
    assert len(batch) == 2 and batch[0].shots == batch[1].shots == ds.shots_at(1)
    assert all(e.class_id in s.class_ids for e in batch)
