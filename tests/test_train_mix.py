"""`train/train.py --mix-dataset`: episodes of a second source mixed into the fine-tune, in the share asked for."""

from __future__ import annotations

import pytest
from accelerate import Accelerator

from tests.fixtures_data import CAMVID, needs_camvid
from tests.tiny_models import save_tiny_pipeline
from tests.training_runs import reset_accelerate, run_train, train_argv
from tests.training_runs import index_cache, single_thread  # noqa: F401  (autouse fixtures)
from train.data.synthetic import HELD_OUT_IDS, TRAIN_IDS
from train.train import build_loader, parse_args

pytestmark = needs_camvid

BASE = ["--pretrained", "p", "--dataset", "camvid", "--data-root", str(CAMVID), "--output-dir", "o", "--fold", "0"]


def test_mixed_episodes_come_from_both_sources_in_the_share_asked_for():
    args = parse_args(BASE + ["--mix-dataset", "synthetic", "--mix-share", "0.25", "--max-steps", "400",
                              "--gradient-accumulation-steps", "1", "--dataloader-num-workers", "0"])
    reset_accelerate()
    source, loader = build_loader(args, Accelerator(cpu=True), first_step=0)
    reset_accelerate()
    assert [name for name, _ in source.parts] == ["camvid", "synthetic"]
    assert len(source.parts[0][1].class_ids) == 8  # CamVid fold 0's training classes only
    assert all(source.part_of(c)[0] == "camvid" for c in source.class_ids[:8])
    parts = [source.part_of(loader.dataset.spec(step, 0).class_id)[0] for step in range(400)]
    assert 70 < parts.count("synthetic") < 130  # 25 % of 400
    mixed_kinds = {source.part_of(c)[2] for c in source.class_ids if source.part_of(c)[0] == "synthetic"}
    assert mixed_kinds == set(TRAIN_IDS) and not mixed_kinds & set(HELD_OUT_IDS)  # held-out kinds stay held out


@pytest.mark.parametrize("extra, message", [
    (["--mix-dataset", "camvid"], "must differ from --dataset"),
    (["--mix-dataset", "coco20i"], "--mix-data-root is required"),
    (["--mix-dataset", "synthetic", "--mix-share", "1"], "between 0 and 1"),
    (["--mix-dataset", "synthetic", "--mix-share", "0"], "between 0 and 1"),
])
def test_bad_mix_arguments_are_named(capsys, extra, message):
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)
    assert message in capsys.readouterr().err


def test_a_mixed_fine_tune_runs_and_saves_a_pipeline(tmp_path):
    init = save_tiny_pipeline(tmp_path / "init")
    out = tmp_path / "mixed"
    argv = train_argv(init, out, max_steps=2, batch_size=2, mix_dataset="synthetic", mix_share=0.5,
                      source_option=None)
    assert run_train(argv) == 0
    assert (out / "model_index.json").is_file()
