"""Fold splits, evaluation episodes (HSNet's draw, the distinct protocol) and training episodes (sharding, resume)."""

import numpy as np
import pytest
import torch
from PIL import Image

from train.data.base import FewShotSource
from train.data.episodes import Episode, EvaluationEpisodes, collate_episodes, draw_plan_specs
from train.data.protocol import EpisodePlan, fold_class_ids
from train.data.training_episodes import TrainingEpisodes, draw_training_spec, sample_training_episode


class MemSource(FewShotSource):
    """In-memory source: class c has ``sizes[c]`` images ``c-<j>``; masks mark a 2x2 square."""

    name = "mem"

    def __init__(self, sizes):
        self.num_classes = len(sizes)
        self.class_ids = list(range(len(sizes)))
        self.class_names = {c: f"class{c}" for c in self.class_ids}
        self._imgs = {c: sorted(f"{c}-{j:02d}" for j in range(n)) for c, n in enumerate(sizes)}

    def images_of_class(self, class_id):
        return list(self._imgs[class_id])

    def load_image(self, key):
        return Image.new("RGB", (6, 4), (int(key.split("-")[1]), 0, 0))

    def load_mask(self, key, class_id):
        m = np.zeros((4, 6), np.uint8)
        m[0] = 255
        if key.startswith(f"{class_id}-"):
            m[1:3, 1:3] = 1
        return m


# ---------------------------------------------------------------------- folds


def test_fold_rules():
    train, test = fold_class_ids(80, 1, 4, "interleaved")
    assert test == list(range(1, 80, 4)) and len(train) == 60 and not set(train) & set(test)
    assert fold_class_ids(20, 2, 4, "consecutive")[1] == [10, 11, 12, 13, 14]
    assert fold_class_ids(11, 3, 4, "interleaved")[1] == [3, 7]
    assert fold_class_ids(920, 9, 10, "interleaved")[1][:3] == [9, 19, 29]
    for bad in (dict(rule="random"), dict(fold=4), dict(fold=-1), dict(num_folds=1)):
        kw = dict(num_classes=20, fold=0, num_folds=4, rule="interleaved") | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            fold_class_ids(**kw)


# ---------------------------------------------------------------------- evaluation


def test_default_sequence_is_hsnets_coco_loop():
    # A source without a reference loader gets HSNet's COCO-20i loop: class, query, supports until != query.
    src = MemSource([5, 1, 7, 3, 9])
    with pytest.warns(UserWarning, match="class1"):  # one image: no support could differ from the query
        ev = EvaluationEpisodes(src, shots=3, num_episodes=300, seed=0)
    assert ev.class_ids == [0, 2, 3, 4] and ev.protocol == "hsnet" and len(ev) == 300
    state = np.random.get_state()
    np.random.seed(0)  # the reference, as HSNet writes it
    try:
        for spec in ev.specs:
            c = np.random.choice(ev.class_ids, 1, replace=False)[0]
            imgs = src.images_of_class(c)
            q = np.random.choice(imgs, 1, replace=False)[0]
            sup = []
            while True:
                s = np.random.choice(imgs, 1, replace=False)[0]
                if s != q:
                    sup.append(s)
                if len(sup) == 3:
                    break
            assert spec == (c, q, tuple(sup))
    finally:
        np.random.set_state(state)
    assert any(len(set(s.support_keys)) < 3 for s in ev.specs)  # class 3 has 3 images: supports repeat
    assert EvaluationEpisodes(src, 1).__len__() == 1000  # HSNet's count by default


def test_distinct_protocol_sequence():
    src = MemSource([5, 1, 7, 3, 9])
    with pytest.warns(UserWarning, match="class1"):
        ev = EvaluationEpisodes(src, shots=2, num_episodes=200, seed=0, protocol="distinct")
    assert ev.class_ids == [0, 2, 3, 4] and ev.plan is None
    rng = np.random.RandomState(0)  # the reference, written with rng.choice
    for spec in ev.specs:
        c = rng.choice(ev.class_ids)
        imgs = src.images_of_class(c)
        q = rng.choice(imgs)
        sup = []
        while len(sup) < 2:
            s = rng.choice(imgs)
            if s != q and s not in sup:
                sup.append(s)
        assert spec == (c, q, tuple(sup))
    with pytest.warns(UserWarning, match="class1"):
        assert len(EvaluationEpisodes(src, 1, protocol="distinct")) == 1000


def test_evaluation_determinism_and_loading():
    src = MemSource([4, 4, 4])
    a = EvaluationEpisodes(src, 3, 50, seed=0, protocol="distinct")
    assert a.specs == EvaluationEpisodes(src, 3, 50, seed=0, protocol="distinct").specs
    assert a.specs != EvaluationEpisodes(src, 3, 50, seed=1, protocol="distinct").specs
    assert EvaluationEpisodes(src, 3, 50).specs == EvaluationEpisodes(src, 3, 50).specs
    assert EvaluationEpisodes(src, 3, 50).specs != EvaluationEpisodes(src, 3, 50, seed=1).specs
    e = a[7]
    assert isinstance(e, Episode) and e.shots == 3 and e.class_id == a.specs[7].class_id
    assert e.query_key not in e.support_keys and len(set(e.support_keys)) == 3
    assert all(k.startswith(f"{e.class_id}-") for k in e.support_keys + [e.query_key])
    assert (e.query_mask[0] == 255).all()                       # query keeps ignore
    assert all(set(np.unique(m)) == {0, 1} for m in e.support_masks)  # supports: ignore -> 0
    assert (e.binary_query_mask()[0] == 0).all()
    loader = torch.utils.data.DataLoader(a, batch_size=4, collate_fn=collate_episodes)
    first = next(iter(loader))
    assert [x.query_key for x in first] == [s.query_key for s in a.specs[:4]]


def test_plan_rules_listed_and_cycled():
    pools = {0: ("a", "b", "c"), 1: ("x", "y")}
    listed = EpisodePlan("listed", (0, 1), pools, num_episodes=4, reference="t",
                         queries=(("c", 0), ("y", 1), ("a", 0)))
    specs = draw_plan_specs(listed, 2)
    assert len(specs) == 4 and [(s.query_key, s.class_id) for s in specs] == [("c", 0), ("y", 1), ("a", 0), ("c", 0)]
    assert specs[1].support_keys == ("x", "x")  # class 1: the only other image, twice
    cycled = EpisodePlan("cycled", (1, 0), pools, num_episodes=5, reference="t")
    assert [s.class_id for s in draw_plan_specs(cycled, 1)] == [1, 0, 1, 0, 1]
    assert len(draw_plan_specs(cycled, 1, num_episodes=7)) == 7


def test_evaluation_shards_are_disjoint_and_complete():
    ev = EvaluationEpisodes(MemSource([3, 3]), 1, 1000)
    shards = [ev.shard_indices(r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(1000))
    assert len(ev.shard(2, 3)) == 333
    with pytest.raises(ValueError, match="rank"):
        ev.shard_indices(3, 3)


def test_evaluation_errors():
    with pytest.raises(ValueError, match="shots"):
        EvaluationEpisodes(MemSource([3]), 0)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no class"):
        EvaluationEpisodes(MemSource([2, 2]), 2, protocol="distinct")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no class"):
        EvaluationEpisodes(MemSource([1, 1]), 1)
    with pytest.raises(ValueError, match="protocol"):
        EvaluationEpisodes(MemSource([3]), 1, protocol="random")
    with pytest.raises(ValueError, match="num_episodes"):
        EvaluationEpisodes(MemSource([3]), 1, num_episodes=0)
    with pytest.raises(ValueError, match="query_rule"):
        EpisodePlan("sorted", (0,), {0: ("a", "b")}, num_episodes=1, reference="t")
    with pytest.raises(ValueError, match=r"no image pool for class\(es\) \[1\]"):
        EpisodePlan("listed", (0,), {0: ("a", "b")}, num_episodes=1, reference="t", queries=(("z", 1),))
    with pytest.raises(ValueError, match="a batch mixes"):
        ev1, ev2 = EvaluationEpisodes(MemSource([3]), 1, 2), EvaluationEpisodes(MemSource([3]), 2, 2)
        collate_episodes([ev1[0], ev2[0]])


# ---------------------------------------------------------------------- training


def spec_tuple(e):
    return e.class_id, e.query_key, tuple(e.support_keys)


def test_sample_training_episode():
    src = MemSource([6, 2, 6])
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning):
        eps = [sample_training_episode(src, 3, rng) for _ in range(30)]
    for e in eps:
        assert e.class_id in (0, 2) and e.query_key not in e.support_keys and len(set(e.support_keys)) == 3


def test_training_shots_per_step_and_own_supports():
    src = MemSource([30, 30, 30, 3])
    with pytest.warns(UserWarning, match="class3"):  # too small for 3..5 shots
        ds = TrainingEpisodes(src, max_shots=5, batch_size=4, seed=0, num_steps=60, world_size=2)
    assert len(ds) == 60 * 8
    shots = [ds.shots_at(s) for s in range(60)]
    assert set(shots) == {1, 2, 3, 4, 5}
    for step in range(6):
        specs = [ds.spec(step, i) for i in range(8)]
        assert {len(s.support_keys) for s in specs} == {shots[step]}
        assert len({s.support_keys for s in specs}) > 1          # each episode has its own supports
        for s in specs:
            assert s.query_key not in s.support_keys and len(set(s.support_keys)) == len(s.support_keys)
            if shots[step] >= 3:
                assert s.class_id != 3
    rng = np.random.default_rng([0, 4, 3])                        # documented seeding
    assert ds.spec(4, 3) == draw_training_spec(src, shots[4], rng, ds.class_ids_by_shots[shots[4]])


def test_training_accumulation_shares_shots():
    ds = TrainingEpisodes(MemSource([10, 10]), 4, 1, seed=3, num_steps=40, accumulation_steps=4)
    s = [ds.shots_at(i) for i in range(40)]
    assert all(len(set(s[g:g + 4])) == 1 for g in range(0, 40, 4)) and len(set(s)) > 1


def test_training_sharding_with_accelerate_and_batch_sampler():
    from accelerate.data_loader import prepare_data_loader

    src = MemSource([8, 8, 8])
    B, W, steps = 3, 2, 5
    ds = TrainingEpisodes(src, max_shots=4, batch_size=B, seed=7, num_steps=steps, world_size=W)
    seen = {}
    for rank in range(W):
        dl = torch.utils.data.DataLoader(ds, batch_size=B, shuffle=False, collate_fn=collate_episodes)
        acc = prepare_data_loader(dl, num_processes=W, process_index=rank, put_on_device=False)
        acc_batches = [[spec_tuple(e) for e in b] for b in acc]
        plain = torch.utils.data.DataLoader(ds, batch_sampler=ds.batch_sampler(rank), collate_fn=collate_episodes)
        assert acc_batches == [[spec_tuple(e) for e in b] for b in plain]
        assert len(acc_batches) == steps
        for step, b in enumerate(acc_batches):
            want = [tuple(ds.spec(step, rank * B + j)) for j in range(B)]
            assert b == [(c, q, tuple(s)) for c, q, s in want]
            assert {len(x[2]) for x in b} == {ds.shots_at(step)}
            seen[(step, rank)] = b
    all_idx = [i for r in range(W) for s in range(steps) for i in ds.step_indices(s, r)]
    assert sorted(all_idx) == list(range(len(ds)))               # disjoint, complete


def test_training_resume_is_exact_and_worker_independent():
    src = MemSource([8, 8, 8])
    full = TrainingEpisodes(src, 3, 2, seed=1, num_steps=8)
    resumed = TrainingEpisodes(src, 3, 2, seed=1, num_steps=8, start_step=5)
    assert len(resumed) == 3 * 2
    assert [resumed.spec(*resumed.locate(i)) for i in range(len(resumed))] == \
        [full.spec(*full.locate(i)) for i in range(10, 16)]

    def run(ds, workers):
        dl = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_episodes, num_workers=workers)
        return [[spec_tuple(e) for e in b] for b in dl]

    assert run(resumed, 2) == run(full, 0)[5:]


def test_training_errors():
    with pytest.raises(ValueError, match="batch_size"):
        TrainingEpisodes(MemSource([5]), 2, 0)
    with pytest.raises(ValueError, match="start_step"):
        TrainingEpisodes(MemSource([5]), 2, 1, num_steps=3, start_step=4)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no class"):
        TrainingEpisodes(MemSource([2]), 2, 1)
