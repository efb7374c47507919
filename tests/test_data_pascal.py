"""PASCAL-5i source on tiny VOC2012 fixtures (palette PNGs with 255 borders)."""

import numpy as np
import pytest

from tests.fixtures_data import VOC_SIZE, make_voc, voc_plan
from train.data.episodes import EvaluationEpisodes
from train.data.pascal5i import VOC_CLASSES, Pascal5i, read_voc_label, voc_colormap


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_voc(tmp_path_factory.mktemp("voc"))


def test_consecutive_folds(voc_root):
    for f in range(4):
        test = Pascal5i(voc_root, "val", f, "test", index_cache=False)
        train = Pascal5i(voc_root, "train", f, "train", index_cache=False)
        assert test.class_ids == list(range(5 * f, 5 * f + 5))
        assert train.class_ids == [c for c in range(20) if not 5 * f <= c < 5 * f + 5]
    assert test.class_names[0] == "aeroplane" and len(VOC_CLASSES) == 20


def test_palette_mask_with_ignore_border(voc_root):
    s = Pascal5i(voc_root, "train", None, "train", index_cache=False)
    name, classes = next(iter(voc_plan("train").items()))
    with_palette = voc_root / "SegmentationClass" / f"{name}.png"
    from PIL import Image

    assert Image.open(with_palette).mode == "P"
    m = s.load_mask(name, classes[1])
    assert m.dtype == np.uint8 and m.shape == (VOC_SIZE, VOC_SIZE)
    assert m[9:15, 5:19].all() and m[9:15, 5:19].sum() == 6 * 14
    assert (m == 255).sum() == 3 * (8 * 16 - 6 * 14)  # every class's border is ignored
    assert set(np.unique(m)) == {0, 1, 255}
    assert s.load_image(name).mode == "RGB"


def test_index_from_scan_matches_plan(voc_root):
    s = Pascal5i(voc_root, "val", None, "test", index_cache=False)
    plan = voc_plan("val")
    for c in range(20):
        assert s.images_of_class(c) == sorted(n for n, cs in plan.items() if c in cs)


def test_hsnet_split_files_and_aug_masks(tmp_path):
    root = make_voc(tmp_path, hsnet_splits=True, aug=True)
    s = Pascal5i(root, "val", 2, "test")
    assert s.split_source.endswith("val") and s.label_dir.name == "SegmentationClassAug"
    plan = voc_plan("val")
    assert s.images_of_class(12) == sorted(n for n, cs in plan.items() if 12 in cs)
    ev = EvaluationEpisodes(s, shots=1, num_episodes=20, seed=0)
    for i in range(0, 20, 5):
        e = ev[i]
        assert e.class_id in range(10, 15)
        assert set(np.unique(e.query_mask)) <= {0, 1, 255} and set(np.unique(e.support_masks[0])) <= {0, 1}
        assert e.support_masks[0].sum() > 0 and e.query_key != e.support_keys[0]


def test_rgb_colour_mask_is_mapped(tmp_path):
    from PIL import Image

    cmap = voc_colormap()
    lab = np.array([[0, 3, 255], [20, 3, 0]], dtype=np.uint8)
    Image.fromarray(cmap[lab]).save(tmp_path / "x.png")
    np.testing.assert_array_equal(read_voc_label(tmp_path / "x.png"), lab)


def test_errors(tmp_path, voc_root):
    with pytest.raises(ValueError, match="JPEGImages"):
        Pascal5i(tmp_path, "train", 0, "train")
    with pytest.raises(ValueError, match="fold"):
        Pascal5i(voc_root, "train", 4, "train", index_cache=False)
    with pytest.raises(ValueError, match="mode"):
        Pascal5i(voc_root, "train", 0, "val", index_cache=False)
