"""HSNet's mIoU / FB-IoU metric against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from train.metrics import FewShotSegmentationMetric

# Episode 1 (class 2): the ignored pixel (1, 0) would otherwise be a false negative.
GT1 = np.array([[1, 1, 0, 0], [255, 1, 0, 0]], np.uint8)
PR1 = np.array([[1, 0, 1, 0], [1, 1, 0, 0]], bool)   # fg I=2 U=4, bg I=3 U=5
GT2 = np.ones((2, 2), np.uint8)
PR2 = np.array([[1, 0], [0, 0]], bool)               # fg I=1 U=4, bg I=0 U=3
GT3 = np.array([[1, 0], [0, 0]], np.uint8)
PR3 = np.zeros((2, 2), bool)                         # class 5 never predicted: fg I=0 U=1, bg I=3 U=4

EPISODES = [(PR1, GT1, 2), (PR2, GT2, 2), (PR3, GT3, 5)]
WANT = {
    "miou": (100 * 3 / 8 + 0.0) / 2,
    "fb_iou": 100 * (3 / 9 + 6 / 12) / 2,
    "per_class": {2: 37.5, 5: 0.0},
    "episodes": 3,
}


def check(result, want=WANT):
    assert result["episodes"] == want["episodes"]
    assert math.isclose(result["miou"], want["miou"], rel_tol=1e-12)
    assert math.isclose(result["fb_iou"], want["fb_iou"], rel_tol=1e-12)
    assert result["per_class"].keys() == want["per_class"].keys()
    for c, v in want["per_class"].items():
        assert math.isclose(result["per_class"][c], v, rel_tol=1e-12, abs_tol=1e-12)


def test_hand_computed_values():
    m = FewShotSegmentationMetric(num_classes=10)
    for pred, gt, c in EPISODES:
        m.update(pred, gt, c)
    check(m.compute())


def test_torch_inputs_and_batches():
    m = FewShotSegmentationMetric(num_classes=10)
    m.update(torch.from_numpy(PR1), torch.from_numpy(GT1), torch.tensor(2))
    m.update(np.stack([PR2, PR3]), np.stack([GT2, GT3]), torch.tensor([2, 5]))
    check(m.compute())


def test_two_processes_merge_equals_one_pass():
    a, b = FewShotSegmentationMetric(10), FewShotSegmentationMetric(10)
    a.update(*EPISODES[0])
    a.update(*EPISODES[2])
    b.update(*EPISODES[1])
    a.merge_state(b)
    check(a.compute())


def test_random_halves_merge():
    rng = np.random.default_rng(0)
    eps = [(rng.random((9, 7)) > 0.5, rng.choice([0, 1, 255], (9, 7), p=[.5, .4, .1]).astype(np.uint8),
            int(rng.integers(4))) for _ in range(40)]
    one = FewShotSegmentationMetric(4)
    halves = [FewShotSegmentationMetric(4), FewShotSegmentationMetric(4)]
    for i, e in enumerate(eps):
        one.update(*e)
        halves[i % 2].update(*e)
    # what dist_reduce_fx="sum" does across processes: sum each state
    summed = FewShotSegmentationMetric(4)
    for name in ("fg_inter", "fg_union", "bg_inter", "bg_union", "count"):
        setattr(summed, name, getattr(halves[0], name) + getattr(halves[1], name))
    summed._update_count = 2
    halves[0].merge_state(halves[1])
    ref = one.compute()
    for r in (summed.compute(), halves[0].compute()):
        assert r["per_class"] == pytest.approx(ref["per_class"])
        assert r["miou"] == pytest.approx(ref["miou"]) and r["fb_iou"] == pytest.approx(ref["fb_iou"])
        assert r["episodes"] == 40


def test_reset_and_empty():
    m = FewShotSegmentationMetric(3)
    m.update(PR2, GT2, 1)
    m.reset()
    with pytest.warns(UserWarning):
        r = m.compute()
    assert r["episodes"] == 0 and math.isnan(r["miou"]) and r["per_class"] == {}


def test_bad_input():
    m = FewShotSegmentationMetric(3)
    with pytest.raises(ValueError, match="same shape"):
        m.update(PR1, GT2, 0)
    with pytest.raises(ValueError, match="0, 1 or 255"):
        m.update(PR2, GT2 * 2, 0)
    with pytest.raises(ValueError, match="class_id"):
        m.update(PR2, GT2, 3)
    with pytest.raises(ValueError, match="one id per episode"):
        m.update(np.stack([PR2, PR2]), np.stack([GT2, GT2]), [1])
    with pytest.raises(ValueError, match="num_classes"):
        FewShotSegmentationMetric(0)


def _dist_worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = FewShotSegmentationMetric(10)
        for i, e in enumerate(EPISODES):
            if i % world == rank:
                m.update(*e)
        r = m.compute()  # syncs the states of both processes (sum)
        if rank == 0:
            torch.save(r, out_file)
    finally:
        dist.destroy_process_group()


def test_torch_distributed_sync(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "result.pt"
    mp.start_processes(_dist_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True,
                       start_method="fork")
    check(torch.load(out, weights_only=False))
