"""The default evaluation episodes are the reference loaders' own: each source's sequence is compared with a literal
transcription of HSNet's (PASCAL-5i, COCO-20i, FSS-1000) or Matcher's (LVIS-92i) sampling loop, run on the same
synthetic split files with `np.random.seed(0)` and `np.random.choice(..., 1, replace=False)[0]` on numpy's global
stream, as the reference code does."""

from __future__ import annotations

import glob
import os
import pickle

import numpy as np
import pytest

from tests.fixtures_data import (
    FSS_SPLITS,
    make_coco_hsnet,
    make_fss,
    make_lvis,
    make_voc,
    shuffle_hsnet_pascal_splits,
)
from train.data import EvaluationEpisodes, build_source
from train.data.episodes import draw_plan_specs, reference_choice
from train.data.protocol import EpisodePlan


@pytest.fixture(autouse=True)
def keep_numpy_global_state():
    """The oracles seed numpy's global stream, as HSNet does; restore it afterwards."""
    state = np.random.get_state()
    yield
    np.random.set_state(state)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return shuffle_hsnet_pascal_splits(make_voc(tmp_path_factory.mktemp("voc"), hsnet_splits=True, aug=True))


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return make_coco_hsnet(tmp_path_factory.mktemp("coco"), fold=1)


@pytest.fixture(scope="module")
def fss_root(tmp_path_factory):
    return make_fss(tmp_path_factory.mktemp("fss"), per_class=10)  # FSS-1000: 10 images per class


def as_tuples(specs):
    return [(int(s.class_id), s.query_key, tuple(s.support_keys)) for s in specs]


# ---------------------------------------------------------------------- the reference loops, transcribed


def reference_supports(pool, query_name, shot):
    """The support loop of HSNet's sample_episode / load_frame (and Matcher's): draw from `pool` until `shot` draws
    differ from the query (repeats kept)."""
    support_names = []
    while True:
        support_name = np.random.choice(pool, 1, replace=False)[0]
        if query_name != support_name:
            support_names.append(support_name)
        if len(support_names) == shot:
            break
    return tuple(support_names)


def hsnet_pascal(split_file, shot, episodes=1000):
    """HSNet data/pascal.py: build_img_metadata, build_img_metadata_classwise, __getitem__ and sample_episode."""
    with open(split_file) as f:
        img_metadata = f.read().split("\n")[:-1]
    img_metadata = [[data.split("__")[0], int(data.split("__")[1]) - 1] for data in img_metadata]
    img_metadata_classwise = {class_id: [] for class_id in range(20)}
    for img_name, img_class in img_metadata:
        img_metadata_classwise[img_class] += [img_name]
    np.random.seed(0)
    out = []
    for idx in range(episodes):
        idx %= len(img_metadata)
        query_name, class_sample = img_metadata[idx]
        out.append((class_sample, query_name, reference_supports(img_metadata_classwise[class_sample], query_name, shot)))
    return out


def hsnet_coco(pickle_file, fold, shot, episodes=1000):
    """HSNet data/coco.py: build_class_ids, build_img_metadata_classwise and load_frame."""
    class_ids = [fold + 4 * v for v in range(80 // 4)]
    with open(pickle_file, "rb") as f:
        img_metadata_classwise = pickle.load(f)
    np.random.seed(0)
    out = []
    for _ in range(episodes):
        class_sample = np.random.choice(class_ids, 1, replace=False)[0]
        query_name = np.random.choice(img_metadata_classwise[class_sample], 1, replace=False)[0]
        out.append((class_sample, query_name, reference_supports(img_metadata_classwise[class_sample], query_name, shot)))
    return out


def hsnet_fss(base_path, split_file, shot, class_offset):
    """HSNet data/fss.py: categories, build_img_metadata and sample_episode (keys made relative to base_path)."""
    with open(split_file) as f:
        categories = sorted(f.read().split("\n")[:-1])
    img_metadata = []
    for cat in categories:
        img_paths = sorted(glob.glob("%s/*" % os.path.join(base_path, cat)))
        for img_path in img_paths:
            if os.path.basename(img_path).split(".")[1] == "jpg":
                img_metadata.append(img_path)
    np.random.seed(0)
    out = []
    for idx in range(len(img_metadata)):
        query_name = img_metadata[idx]
        class_sample = categories.index(query_name.split("/")[-2]) + class_offset
        support_names = []
        while True:
            support_name = np.random.choice(range(1, 11), 1, replace=False)[0]
            support_name = os.path.join(os.path.dirname(query_name), str(support_name)) + ".jpg"
            if query_name != support_name:
                support_names.append(support_name)
            if len(support_names) == shot:
                break
        rel = lambda p: os.path.relpath(p, base_path)  # noqa: E731
        out.append((class_sample, rel(query_name), tuple(rel(p) for p in support_names)))
    return out


def matcher_lvis(val_anno, fold, shot, episodes=2300):
    """Matcher matcher/data/lvis.py: build_img_metadata_classwise, __getitem__ and load_frame."""
    val_cat_ids = [i for i in list(val_anno.keys()) if len(val_anno[i]) > shot]
    nclass_val_split = len(val_cat_ids) // 10
    class_ids_ori = [val_cat_ids[fold + 10 * v] for v in range(nclass_val_split)]
    np.random.seed(0)
    out = []
    for idx in range(episodes):
        idx %= len(class_ids_ori)
        class_sample = class_ids_ori[idx]
        query_name = np.random.choice(list(val_anno[class_sample].keys()), 1, replace=False)[0]
        out.append((class_sample, query_name, reference_supports(list(val_anno[class_sample].keys()), query_name, shot)))
    return out


# ---------------------------------------------------------------------- PASCAL-5i


@pytest.mark.parametrize("fold,shots", [(0, 1), (2, 5)])
def test_pascal_episodes_are_hsnets(voc_root, fold, shots):
    source = build_source("pascal5i", voc_root, "val", fold, "test")
    episodes = EvaluationEpisodes(source, shots)
    split_file = voc_root / "splits" / "pascal" / "val" / f"fold{fold}.txt"
    assert len(episodes) == 1000 and episodes.class_ids == list(range(5 * fold, 5 * fold + 5))
    assert as_tuples(episodes.specs) == hsnet_pascal(split_file, shots)


def test_pascal_queries_follow_the_split_file(voc_root):
    source = build_source("pascal5i", voc_root, "val", 1, "test")
    lines = (voc_root / "splits" / "pascal" / "val" / "fold1.txt").read_text().split("\n")[:-1]
    names = [line.split("__")[0] for line in lines]
    assert names != sorted(names)  # the fixture's file is not in name order
    specs = EvaluationEpisodes(source, 1, num_episodes=2 * len(lines) + 3).specs
    want = [(line.split("__")[0], int(line.split("__")[1]) - 1) for line in lines]
    assert [(s.query_key, s.class_id) for s in specs] == [want[i % len(want)] for i in range(len(specs))]


def test_five_shot_episodes_repeat_supports(voc_root):
    # Each class of the fixture lies in 3 images: a 5-shot episode has at most 2 distinct supports.
    episodes = EvaluationEpisodes(build_source("pascal5i", voc_root, "val", 0, "test"), 5, num_episodes=50)
    assert all(len(set(s.support_keys)) < 5 for s in episodes.specs)
    assert all(s.query_key not in s.support_keys for s in episodes.specs)
    episode = episodes[0]
    assert episode.shots == 5 and len(episode.support_images) == 5


def test_pascal_without_split_files_warns(tmp_path):
    source = build_source("pascal5i", make_voc(tmp_path), "val", 0, "test", index_cache=False)
    with pytest.warns(UserWarning, match="not HSNet's"):
        episodes = EvaluationEpisodes(source, 1, num_episodes=10)
    assert len(episodes) == 10


# ---------------------------------------------------------------------- COCO-20i


@pytest.mark.parametrize("shots", [1, 5])
def test_coco_episodes_are_hsnets_in_the_pickles_order(coco_root, shots):
    source = build_source("coco20i", coco_root, "val", 1, "test")
    episodes = EvaluationEpisodes(source, shots)
    assert as_tuples(episodes.specs) == hsnet_coco(coco_root / "splits" / "coco" / "val" / "fold1.pkl", 1, shots)
    assert episodes.class_ids == list(range(1, 80, 4))


def test_coco_list_order_is_the_pickles(coco_root):
    with open(coco_root / "splits" / "coco" / "val" / "fold1.pkl", "rb") as f:
        lists = pickle.load(f)
    source = build_source("coco20i", coco_root, "val", 1, "test")
    plan = source.evaluation_plan(1)
    assert {c: list(v) for c, v in plan.pools.items()} == lists
    assert any(v != sorted(v) for v in lists.values())  # a sorted list would draw other episodes
    assert source.images_of_class(5) == sorted(lists[5])


def test_coco_label_255_is_background(coco_root):
    source = build_source("coco20i", coco_root, "val", 1, "test")
    mask = source.load_mask("val2014/COCO_val2014_000000000000.jpg", 1)
    assert mask[0:2].all() and mask[2:].sum() == 0 and set(np.unique(mask)) == {0, 1}


# ---------------------------------------------------------------------- FSS-1000


@pytest.mark.parametrize("shots", [1, 5])
def test_fss_episodes_are_hsnets(fss_root, shots):
    source = build_source("fss1000", fss_root, "test")
    episodes = EvaluationEpisodes(source, shots)
    offset = len(FSS_SPLITS["trn"]) + len(FSS_SPLITS["val"])
    want = hsnet_fss(str(fss_root / "fewshot_data"), fss_root / "splits" / "fss" / "test.txt", shots, offset)
    assert as_tuples(episodes.specs) == want


def test_fss_every_test_image_is_a_query_once_in_order(fss_root):
    source = build_source("fss1000", fss_root, "test")
    episodes = EvaluationEpisodes(source, 1)
    assert len(episodes) == 10 * len(FSS_SPLITS["test"])  # not 1000
    queries = [s.query_key for s in episodes.specs]
    assert queries[:3] == ["kiwi/1.jpg", "kiwi/10.jpg", "kiwi/2.jpg"]  # file-name order, as HSNet's glob
    assert sorted(queries) == sorted(k for c in source.class_ids for k in source.images_of_class(c))
    pool = source.evaluation_plan(1).pools[source.class_ids[0]]
    assert list(pool) == [f"kiwi/{n}.jpg" for n in range(1, 11)]  # supports: numeric order, as range(1, 11)


# ---------------------------------------------------------------------- LVIS-92i


@pytest.mark.parametrize("fold,shots", [(0, 1), (3, 1)])
def test_lvis_episodes_are_matchers(tmp_path_factory, fold, shots):
    root = make_lvis(tmp_path_factory.mktemp("lvis"))
    source = build_source("lvis92i", root, "val", fold, "test")
    val_anno = {c: {k: None for k in source.images_of_class(c)} for c in range(source.num_classes)}
    episodes = EvaluationEpisodes(source, shots)
    assert len(episodes) == 2300
    assert as_tuples(episodes.specs) == matcher_lvis(val_anno, fold, shots)
    assert episodes.class_ids == source.class_ids


# ---------------------------------------------------------------------- the draw itself


def test_the_draw_is_a_permutation_not_randint():
    pool = [f"img{i}" for i in range(37)]
    ours, numpys, randint = np.random.RandomState(0), np.random.RandomState(0), np.random.RandomState(0)
    drawn = [pool[reference_choice(ours, pool)] for _ in range(50)]
    assert drawn == [numpys.choice(pool, 1, replace=False)[0] for _ in range(50)]
    assert drawn != [pool[randint.randint(len(pool))] for _ in range(50)]


def test_a_randint_draw_gives_other_episodes(voc_root, monkeypatch):
    source = build_source("pascal5i", voc_root, "val", 0, "test")
    want = hsnet_pascal(voc_root / "splits" / "pascal" / "val" / "fold0.txt", 1, episodes=200)
    assert as_tuples(EvaluationEpisodes(source, 1, num_episodes=200).specs) == want
    monkeypatch.setattr("train.data.episodes.reference_choice", lambda rng, pool: int(rng.randint(len(pool))))
    assert as_tuples(EvaluationEpisodes(source, 1, num_episodes=200).specs) != want


def test_a_class_with_only_the_query_is_an_error():
    plan = EpisodePlan("listed", (0,), {0: ("a",)}, num_episodes=1, reference="test", queries=(("a", 0),))
    with pytest.raises(ValueError, match="no image other than the query"):
        draw_plan_specs(plan, 1)


@pytest.mark.parametrize("fold,shots", [(1, 1), (0, 2)])
def test_lvis_episodes_from_matchers_pickles_are_matchers(tmp_path_factory, fold, shots):
    from tests.fixtures_data import make_lvis_matcher

    root = make_lvis_matcher(tmp_path_factory.mktemp("lvis_matcher"))
    with open(root / "lvis_val.pkl", "rb") as f:
        val_anno = pickle.load(f)
    source = build_source("lvis92i", root, "val", fold, "test")
    assert source.layout == "matcher"
    position = {k: i for i, k in enumerate(val_anno)}  # class id = place of the category in the pickle
    want = [(position[c], q, s) for c, q, s in matcher_lvis(val_anno, fold, shots)]
    episodes = EvaluationEpisodes(source, shots)
    assert as_tuples(episodes.specs) == want
    assert any(list(v) != sorted(v) for v in val_anno.values())  # sorted lists would draw other episodes
    key, c = episodes.specs[0].query_key, episodes.specs[0].class_id
    mask = source.load_mask(key, c)
    x0 = 1 + 4 * ((list(val_anno)[c] - 100) // 3 % 4)
    assert mask.shape == (16, 20) and mask[3:12, x0 + 1:x0 + 3].all() and mask.sum() == mask[:, x0:x0 + 4].sum()
    assert source.load_image(key).size == (20, 16)
