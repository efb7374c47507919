"""LVIS-92i source on a tiny LVIS v1 fixture (polygons, coco_url, Matcher folds)."""

import numpy as np
import pytest

from tests.fixtures_data import LVIS_H, LVIS_NUM_CATS, LVIS_W, lvis_val_plan, make_lvis
from train.data.episodes import EvaluationEpisodes
from train.data.lvis92i import Lvis92i, lvis_fold_classes, lvis_image_key


@pytest.fixture(scope="module")
def lvis_root(tmp_path_factory):
    return make_lvis(tmp_path_factory.mktemp("lvis"))


def test_matcher_folds(lvis_root):
    cands = [k for k, imgs in lvis_val_plan().items() if len(imgs) >= 2]
    assert len(cands) == 20
    for f in range(10):
        test = Lvis92i(lvis_root, "val", f, "test")
        assert test.class_ids == sorted([cands[f], cands[f + 10]])
        train = Lvis92i(lvis_root, "train", f, "train")
        assert train.class_ids == [c for c in range(LVIS_NUM_CATS) if c not in test.class_ids]
    assert Lvis92i(lvis_root, "val", 3, "test").class_ids == [3, 14]
    assert 5 not in sum((Lvis92i(lvis_root, "val", f, "test").class_ids for f in range(10)), [])


def test_fold_helper_min_images():
    counts = {c: (3 if c < 20 else 6) for c in range(40)}
    _, test = lvis_fold_classes(counts, 40, 0, 10, min_images=6)
    assert test == [20, 30]


def test_keys_masks_and_names(lvis_root):
    s = Lvis92i(lvis_root, "val", None, "test")
    assert s.num_classes == LVIS_NUM_CATS and s.class_names[0] == "lvis0"
    assert s.images_of_class(0) == ["train2017/000000000001.jpg", "val2017/000000000000.jpg"]
    assert s.images_of_class(22) == []
    key = "val2017/000000000000.jpg"
    img = s.load_image(key)
    assert img.size == (LVIS_W, LVIS_H) and img.mode == "RGB"
    m = s.load_mask(key, 0)
    assert m.dtype == np.uint8 and m.shape == (LVIS_H, LVIS_W)
    assert m[3:12, 2:4].all() and m[:, 8:].sum() == 0


def test_image_key_from_url():
    assert lvis_image_key({"coco_url": "http://images.cocodataset.org/train2017/000000391895.jpg"}) \
        == "train2017/000000391895.jpg"


def test_episodes_never_loop_on_rare_classes(lvis_root):
    s = Lvis92i(lvis_root, "val", None, "test")
    with pytest.warns(UserWarning, match="lvis22"):
        ev = EvaluationEpisodes(s, shots=1, num_episodes=50)
    assert {5, 17, 22}.isdisjoint(ev.class_ids)
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="no class"):
            EvaluationEpisodes(s, shots=5, num_episodes=5)


def test_missing_json(tmp_path):
    with pytest.raises(ValueError, match="lvis_v1_val.json"):
        Lvis92i(tmp_path, "val", 0, "test")


def test_matcher_layout_train_split_and_errors(tmp_path):
    import pickle

    from tests.fixtures_data import make_lvis_matcher

    root = make_lvis_matcher(tmp_path / "lvis")
    with open(root / "lvis_val.pkl", "rb") as f:
        val_keys = list(pickle.load(f))
    test = Lvis92i(root, "val", 2, "test")
    train = Lvis92i(root, "train", 2, "train")
    assert train.layout == "matcher" and train.class_names[0] == str(val_keys[0])
    assert train.class_ids == [c for c in range(LVIS_NUM_CATS) if c not in test.class_ids]
    c = train.class_ids[0]
    key = train.images_of_class(c)[0]
    assert key.startswith("train2017/") and train.load_mask(key, c).sum() > 0
    assert train.load_mask(key, next(k for k in range(LVIS_NUM_CATS) if key not in train.images_of_class(k))).sum() == 0
    with pytest.raises(ValueError, match="layout"):
        Lvis92i(root, "val", 0, "test", layout="pickle")
    (tmp_path / "bad").mkdir()
    with open(tmp_path / "bad" / "lvis_val.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="Matcher's"):
        Lvis92i(tmp_path / "bad", "val")
