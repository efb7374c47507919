"""In-context mix (COCO + ADE20K + VOC), ConcatSource weighting, and the registry."""

import numpy as np
import pytest

from tests.fixtures_data import make_ade, make_coco, make_voc
from train.data.episodes import EvaluationEpisodes
from train.data.training_episodes import TrainingEpisodes
from train.data.incontext import ConcatSource, InContextSource
from train.data.registry import SOURCES, build_source


@pytest.fixture(scope="module")
def mix_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("incontext")
    make_coco(root / "coco", splits=("train",))
    make_ade(root / "ade20k")
    make_voc(root / "voc")
    return root


def test_offsets_names_and_keys(mix_root):
    s = build_source("incontext", mix_root, "train", None, "train",
                     ade20k_kwargs={"index_cache": False}, voc_kwargs={"index_cache": False})
    assert isinstance(s, InContextSource)
    assert s.num_classes == 8 + 150 + 20 and s.offsets == [0, 8, 158]
    assert s.class_names[0] == "coco/cat1" and s.class_names[8] == "ade20k/wall" and s.class_names[158] == "voc/aeroplane"
    keys = s.images_of_class(8 + 149)
    assert keys[0] == "ade20k:ADE_train_00000001"
    m = s.load_mask(keys[0], 8 + 149)
    assert m.shape == (10, 12) and m[4:8, 0:6].all()
    assert s.load_image(keys[0]).size == (12, 10)
    assert s.part_of(160) == ("voc", s.parts[2][1], 2)
    with pytest.raises(ValueError, match="belongs to"):
        s.load_mask(keys[0], 0)
    with pytest.warns(UserWarning):
        ev = EvaluationEpisodes(s, 1, 20)
    e = ev[0]
    assert e.query_key.split(":")[0] == s.class_names[e.class_id].split("/")[0]


def test_dict_root_and_uniform_weighting(mix_root):
    s = InContextSource({"coco": mix_root / "coco", "voc": mix_root / "voc"}, "train",
                        weighting="uniform", voc_kwargs={"index_cache": False})
    assert [n for n, _ in s.parts] == ["coco", "voc"] and s.num_classes == 28
    w = s.class_weights(s.class_ids)
    parts = np.array([s.part_of(c)[0] for c in s.class_ids])
    assert np.isclose(w[parts == "coco"].sum(), 0.5) and np.isclose(w.sum(), 1)
    with pytest.warns(UserWarning):
        ds = TrainingEpisodes(s, 1, 1, seed=0, num_steps=400)
    drawn = [s.part_of(ds.spec(i, 0).class_id)[0] for i in range(400)]
    assert 150 < drawn.count("coco") < 250  # uniform over datasets, not over classes (7/26)


def test_concat_default_is_uniform_over_classes(mix_root):
    from train.data.folder import FolderSource
    from tests.fixtures_data import make_folder

    with pytest.warns(UserWarning, match="without a mask"):
        a = FolderSource(make_folder(mix_root / "f1"), classes=["cat", "dog"])
    c = ConcatSource({"a": a, "b": a})
    assert c.class_weights(c.class_ids) is None and c.class_ids == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="weighting"):
        ConcatSource({"a": a}, weighting="size")


def test_incontext_errors(tmp_path, mix_root):
    with pytest.raises(ValueError, match="ade20k"):
        InContextSource(tmp_path, "train")
    with pytest.raises(ValueError, match="fold"):
        InContextSource(mix_root, "train", 0, "train")
    with pytest.raises(ValueError, match="subset"):
        InContextSource({"lvis": tmp_path}, "train")


def test_registry():
    assert set(SOURCES) == {
        "coco20i", "pascal5i", "lvis92i", "fss1000", "ade20k", "camvid", "folder", "incontext", "synthetic"}
    with pytest.raises(ValueError, match="coco20i, pascal5i, lvis92i, fss1000, ade20k, camvid, folder, incontext"):
        build_source("imagenet", "/x", "train")


def test_concat_shares_give_each_part_its_fraction_of_the_episodes(mix_root):
    coco = build_source("coco20i", mix_root / "coco", "train", None, "train")
    voc = build_source("pascal5i", mix_root / "voc", "train", None, "train", index_cache=False)
    s = ConcatSource({"coco": coco, "voc": voc}, weighting={"coco": 1, "voc": 3})
    w = s.class_weights(s.class_ids)
    parts = np.array([s.part_of(c)[0] for c in s.class_ids])
    assert np.isclose(w[parts == "voc"].sum(), 0.75) and np.allclose(w[parts == "voc"], 0.75 / (parts == "voc").sum())
    with pytest.warns(UserWarning):
        ds = TrainingEpisodes(s, 1, 1, seed=0, num_steps=400)
    drawn = [s.part_of(ds.spec(i, 0).class_id)[0] for i in range(400)]
    assert 260 < drawn.count("voc") < 340


@pytest.mark.parametrize("shares, match", [
    ({"coco": 1}, "must name every part"),
    ({"coco": 1, "voc": 1, "ade20k": 1}, "must name every part"),
    ({"coco": 1, "voc": 0}, "share of 'voc' must be a positive number"),
    ({"coco": "many", "voc": 1}, "share of 'coco' must be a positive number"),
    ({"coco": float("inf"), "voc": 1}, "share of 'coco'"),
])
def test_bad_shares_are_named(mix_root, shares, match):
    coco = build_source("coco20i", mix_root / "coco", "train", None, "train")
    with pytest.raises(ValueError, match=match):
        ConcatSource({"coco": coco, "voc": coco}, weighting=shares)
