"""ADE20K source on a tiny ADEChallengeData2016 fixture."""

import numpy as np
import pytest

from tests.fixtures_data import make_ade
from train.data.ade20k import ADE20K_CLASSES, Ade20k


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return make_ade(tmp_path_factory.mktemp("ade"))


def test_classes_and_index(ade_root, tmp_path):
    s = Ade20k(ade_root, "train", None, "train", index_cache=tmp_path)
    assert len(ADE20K_CLASSES) == 150 and s.class_names[149] == "flag" and s.class_ids == list(range(150))
    assert s.images_of_class(149) == [f"ADE_train_{i + 1:08d}" for i in range(8)]
    assert s.images_of_class(1) == ["ADE_train_00000002", "ADE_train_00000005", "ADE_train_00000008"]
    assert s.images_of_class(10) == ["ADE_train_00000001"]
    assert list(tmp_path.glob("ade20k-train-*.json"))  # cached
    again = Ade20k(ade_root, "train", None, "train", index_cache=tmp_path)
    assert again._index == s._index
    strict = Ade20k(ade_root, "train", None, "train", min_pixels=2, index_cache=False)
    assert strict.images_of_class(10) == []


def test_mask_other_is_ignored(ade_root):
    s = Ade20k(ade_root / "ADEChallengeData2016", "val", None, "test", index_cache=False)
    m = s.load_mask("ADE_val_00000001", 0)
    assert m.dtype == np.uint8 and m.shape == (10, 12)
    assert m[0:4].all() and (m[4:8, 0:6] == 0).all() and (m[4:8, 6:] == 255).all() and (m[8] == 255).all() and m[9, 11] == 0
    assert s.load_image("ADE_val_00000001").size == (12, 10)


def test_fold_and_errors(ade_root, tmp_path):
    s = Ade20k(ade_root, "val", 2, "test", index_cache=False)
    assert s.class_ids == list(range(2, 150, 4))
    with pytest.raises(ValueError, match="images/training"):
        Ade20k(tmp_path, "train", None, "train")
