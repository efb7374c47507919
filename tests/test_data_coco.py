"""COCO-20i source on tiny COCO-format fixtures (JSON and HSNet PNG layouts)."""

import pickle

import numpy as np
import pytest
from tests.fixtures_data import COCO_CAT_IDS, COCO_H, COCO_W, coco_plan, make_coco, make_coco_png

from train.data.coco20i import COCO_CLASSES, Coco20i, decode_segmentation, safe_load_pickle
from train.data.episodes import EvaluationEpisodes


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"))


def test_categories_contiguous_in_id_order(coco_root):
    s = Coco20i(coco_root, "train", None, "train")
    assert s.num_classes == len(COCO_CAT_IDS)
    # the JSON lists categories in reverse order; ids follow the category id
    assert s.class_names == {i: f"cat{cid}" for i, cid in enumerate(COCO_CAT_IDS)}
    assert s.class_ids == list(range(8))


def test_fold_split_interleaved(coco_root):
    train = Coco20i(coco_root, "train", 1, "train")
    test = Coco20i(coco_root, "val", 1, "test")
    assert test.class_ids == [1, 5]
    assert train.class_ids == [0, 2, 3, 4, 6, 7]


def test_index_matches_plan(coco_root):
    s = Coco20i(coco_root, "train", None, "train")
    plan = coco_plan("train")
    for c in range(8):
        want = sorted(f"train2014/COCO_train2014_{i:012d}.jpg" for i, cs in plan.items() if c in cs)
        assert s.images_of_class(c) == want


def test_polygon_rle_and_crowd_masks(coco_root):
    s = Coco20i(coco_root, "train", None, "train")
    key = "train2014/COCO_train2014_000000000001.jpg"  # classes 1 (polygon + crowd) and 4 (RLE)
    img = s.load_image(key)
    assert img.mode == "RGB" and img.size == (COCO_W, COCO_H)
    poly = s.load_mask(key, 1)
    assert poly.dtype == np.uint8 and poly.shape == (COCO_H, COCO_W)
    x0 = 2 + 6 * (1 % 3)
    assert poly[3:8, x0 + 1:x0 + 4].all()           # polygon interior
    assert poly[10:16].sum() == 0
    assert poly[17:20, 0:6].all()                   # crowd counted as the class (HSNet)
    rle = s.load_mask(key, 4)
    want = np.zeros((COCO_H, COCO_W), np.uint8)
    x0 = 2 + 6 * (4 % 3)
    want[10:16, x0:x0 + 4] = 1
    np.testing.assert_array_equal(rle, want)        # uncompressed RLE, exact
    assert s.load_mask(key, 0).sum() == 0           # absent class

    ign = Coco20i(coco_root, "train", None, "train", crowd="ignore")
    m = ign.load_mask(key, 1)
    assert (m[17:20, 0:6] == 255).all() and set(np.unique(m)) == {0, 1, 255}


def test_decode_compressed_rle_and_degenerate_polygon():
    from tests.fixtures_data import box, compressed_rle

    m = box(5, 7, 1, 3, 2, 6)
    np.testing.assert_array_equal(decode_segmentation(compressed_rle(m), 5, 7), m)
    assert decode_segmentation([[1.0, 1.0, 2.0, 2.0]], 5, 7).sum() == 0


def test_episodes_skip_small_class_and_are_valid(coco_root):
    s = Coco20i(coco_root, "train", None, "train")
    with pytest.warns(UserWarning, match=r"cat13"), pytest.warns(UserWarning, match="not HSNet's episodes"):
        ev = EvaluationEpisodes(s, shots=2, num_episodes=30, seed=0)
    assert 7 not in ev.class_ids
    for i in range(0, 30, 7):
        e = ev[i]
        assert e.query_key not in e.support_keys and len(e.support_keys) == 2
        assert all(m.sum() > 0 for m in e.support_masks)
        assert all(k in s.images_of_class(e.class_id) for k in e.support_keys)


def test_png_layout_with_pickles(tmp_path):
    root = make_coco_png(tmp_path)
    s = Coco20i(root, "val", 0, "test")
    assert s.layout == "png" and s.num_classes == 80 and s.class_names[0] == COCO_CLASSES[0]
    assert s.class_ids == list(range(0, 80, 4))
    assert s.images_of_class(40) == sorted(f"val2014/COCO_val2014_{i:012d}.jpg" for i in range(10) if i % 3 == 0)
    m = s.load_mask("val2014/COCO_val2014_000000000003.jpg", 40)
    assert m[6:12, 0:8].all() and m.sum() == 48
    assert s.load_image("val2014/COCO_val2014_000000000003.jpg").size == (16, 12)


def test_png_layout_scanned_without_pickles(tmp_path):
    root = make_coco_png(tmp_path, with_pickles=False)
    s = Coco20i(root, "val", None, "train", index_cache=tmp_path / "cache")
    assert s.images_of_class(5) == ["val2014/COCO_val2014_000000000005.jpg"]
    assert len(s.images_of_class(41)) == 3


def test_unsafe_pickle_refused(tmp_path):
    import os

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    p = tmp_path / "fold0.pkl"
    p.write_bytes(pickle.dumps({0: [Evil()]}))
    with pytest.raises(pickle.UnpicklingError):
        safe_load_pickle(p)


def test_missing_folder_message(tmp_path):
    with pytest.raises(ValueError, match=r"train2014.*Expected layout"):
        Coco20i(tmp_path, "train", None, "train")
    with pytest.raises(ValueError, match="split"):
        Coco20i(tmp_path, "test2014", None, "train")


def test_json_layout_draws_from_the_split_pickle_in_its_order(tmp_path):
    root = make_coco(tmp_path, splits=("val",))
    plan = coco_plan("val")
    lists = {c: [f"val2014/COCO_val2014_{i:012d}.jpg" for i in sorted(plan, reverse=True) if c in plan[i]]
             for c in (1, 5)}
    (root / "splits" / "coco" / "val").mkdir(parents=True)
    with open(root / "splits" / "coco" / "val" / "fold1.pkl", "wb") as f:
        pickle.dump(lists, f)
    s = Coco20i(root, "val", 1, "test")
    assert s.layout == "json" and s.class_ids == [1, 5]
    assert {c: list(v) for c, v in s.evaluation_plan(1).pools.items()} == lists  # not sorted
    assert s.images_of_class(1) == sorted(lists[1])
