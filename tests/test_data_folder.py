"""Custom folder source (``<class>/images`` + ``<class>/masks``)."""

import numpy as np
import pytest

from tests.fixtures_data import make_folder
from train.data.episodes import EvaluationEpisodes
from train.data.folder import FolderSource


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))


def test_classes_images_masks(folder_root):
    with pytest.warns(UserWarning, match="nomask"):
        s = FolderSource(folder_root, None, None, "train")
    assert s.class_names == {0: "cat", 1: "dog", 2: "rare"}
    assert s.images_of_class(1) == ["dog/dog0.jpg", "dog/dog1.jpg", "dog/dog2.jpg"]
    m = s.load_mask("cat/cat1.jpg", 0)
    assert m.dtype == np.uint8 and m.sum() == 36 and set(np.unique(m)) == {0, 1}
    assert s.load_mask("cat/cat1.jpg", 1).sum() == 0
    assert s.load_image("dog/dog0.jpg").mode == "RGB"


def test_too_small_class_skipped(folder_root):
    with pytest.warns(UserWarning):
        s = FolderSource(folder_root)
    with pytest.warns(UserWarning, match=r"'rare' \(1 image\)"):
        ev = EvaluationEpisodes(s, shots=1, num_episodes=40)
    assert ev.class_ids == [0, 1] and {sp.class_id for sp in ev.specs} == {0, 1}


def test_folds_need_classes(folder_root):
    with pytest.raises(ValueError, match="classes"):
        FolderSource(folder_root, None, 0, "train")
    with pytest.warns(UserWarning):
        s = FolderSource(folder_root, None, 1, "test", classes=["cat", "dog", "rare", "missing", "bird"],
                         num_folds=2)
    assert s.class_ids == [1, 3] and s.images_of_class(3) == []


def test_split_subfolder(tmp_path):
    make_folder(tmp_path / "val")
    with pytest.warns(UserWarning):
        s = FolderSource(tmp_path, "val")
    assert s.root == tmp_path / "val" and s.class_names[0] == "cat"


def test_missing_root(tmp_path):
    with pytest.raises(ValueError, match="Expected layout"):
        FolderSource(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class folder"):
        FolderSource(tmp_path)
