"""FSS-1000 source on a tiny fixture with HSNet's split lists."""

import numpy as np
import pytest

from tests.fixtures_data import FSS_SPLITS, make_fss
from train.data.episodes import EvaluationEpisodes
from train.data.fss1000 import Fss1000


@pytest.fixture(scope="module")
def fss_root(tmp_path_factory):
    return make_fss(tmp_path_factory.mktemp("fss"))


def test_class_ids_follow_hsnet_order(fss_root):
    train = Fss1000(fss_root, "train", None, "train")
    test = Fss1000(fss_root, "test", None, "test")
    assert train.class_ids == [0, 1, 2] and [train.class_names[c] for c in (0, 1, 2)] == ["abacus", "bee", "zebra"]
    assert test.class_ids == [5, 6] and test.class_names[5] == "kiwi"
    assert Fss1000(fss_root, "val").class_ids == [3, 4]
    allc = Fss1000(fss_root, "all")
    assert len(allc.class_ids) == sum(map(len, FSS_SPLITS.values()))


def test_images_and_masks(fss_root):
    s = Fss1000(fss_root, "test")
    assert s.images_of_class(5) == [f"kiwi/{j}.jpg" for j in range(1, 5)]
    m = s.load_mask("kiwi/2.jpg", 5)
    assert m.dtype == np.uint8 and m.shape == (8, 10) and m.sum() == 16 and m[0, 0] == 0
    assert s.load_mask("kiwi/2.jpg", 6).sum() == 0
    assert s.load_image("kiwi/2.jpg").size == (10, 8)


def test_episodes(fss_root):
    s = Fss1000(fss_root, "test")
    ev = EvaluationEpisodes(s, shots=3)
    assert len(ev) == 8  # HSNet: every test image once as the query
    assert [sp.query_key for sp in ev.specs] == [f"{n}/{j}.jpg" for n in ("kiwi", "yak") for j in range(1, 5)]
    for spec in ev.specs:
        cls = s.class_names[spec.class_id]
        assert all(k.startswith(cls + "/") for k in (spec.query_key, *spec.support_keys))
        assert spec.query_key not in spec.support_keys  # supports may repeat (HSNet)
    assert len(EvaluationEpisodes(s, shots=3, num_episodes=20)) == 20
    distinct = EvaluationEpisodes(s, shots=3, num_episodes=10, protocol="distinct")
    assert all(len(set(sp.support_keys)) == 3 for sp in distinct.specs)


def test_errors(fss_root, tmp_path):
    with pytest.raises(ValueError, match="fold"):
        Fss1000(fss_root, "test", 0, "test")
    (tmp_path / "fewshot_data").mkdir()
    with pytest.raises(ValueError, match="test.txt"):
        Fss1000(tmp_path, "test")
