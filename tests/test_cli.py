"""`diffews segment` and the converter subcommands, run in-process on a tiny saved pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pipeline_diffews import DiffewSPipeline, DiffewSUNet2DConditionModel
from pipeline_diffews.cli import main
from pipeline_diffews.official import load_pipeline
from tests.cli_data import CORRUPT_IMAGE, GOOD_IMAGES, count_video_frames, write_images, write_support, write_video
from tests.tiny_models import write_official_unet


class Passes:
    """Counts the support passes and the queries that go through the UNet."""

    def __init__(self):
        self.support = 0
        self.queries = 0


@pytest.fixture
def passes(monkeypatch):
    counter = Passes()
    encode_support, predict = DiffewSUNet2DConditionModel.encode_support, DiffewSPipeline._predict

    def counting_encode_support(self, *args, **kwargs):
        counter.support += 1
        return encode_support(self, *args, **kwargs)

    def counting_predict(self, queries, *args, **kwargs):
        counter.queries += len(queries)
        return predict(self, queries, *args, **kwargs)

    monkeypatch.setattr(DiffewSUNet2DConditionModel, "encode_support", counting_encode_support)
    monkeypatch.setattr(DiffewSPipeline, "_predict", counting_predict)
    return counter


@pytest.fixture
def support(tmp_path):
    return write_support(tmp_path / "support")


def segment(model, support, inputs, output, *extra) -> int:
    image, mask = support
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    return main(["segment", "--model", str(model), "--support", str(image), "--support-mask", str(mask),
                 "--input", *map(str, inputs), "--output", str(output), "--no-progress", *extra])


def test_folder_masks_at_image_size_corrupt_reported(saved_pipeline, support, tmp_path, passes, capsys):
    images = write_images(tmp_path / "images")
    output = tmp_path / "out"

    code = segment(saved_pipeline, support, images, output, "--overlay", "--batch-size", "2")

    captured = capsys.readouterr()
    assert code == 1  # one input failed
    assert CORRUPT_IMAGE in captured.err
    assert "Segmented 5 image(s)" in captured.out and "1 failed" in captured.out and "images/s" in captured.out
    written = sorted(p.relative_to(output).as_posix() for p in output.rglob("*.png") if "overlays" not in p.parts)
    assert written == sorted(str(Path(r).with_suffix(".png").as_posix()) for r in GOOD_IMAGES)
    for relative, size in GOOD_IMAGES.items():
        mask = PIL.Image.open(output / Path(relative).with_suffix(".png"))
        assert mask.size == size and mask.mode == "L"
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
        assert PIL.Image.open(output / "overlays" / Path(relative).with_suffix(".png")).size == size
    assert passes.support == 1  # one support pass for the whole folder
    assert passes.queries == len(GOOD_IMAGES)
    assert not list(output.rglob(".*"))  # no temporary files left


def test_masks_equal_a_direct_pipeline_call(saved_pipeline, support, tmp_path):
    images = write_images(tmp_path / "images", corrupt=False)
    output = tmp_path / "out"
    assert segment(saved_pipeline, support, images, output, "--batch-size", "3", "--threshold", "0.4",
                   "--threshold-mode", "absolute") == 0

    pipe = load_pipeline(str(saved_pipeline))
    queries = [PIL.Image.open(images / r).convert("RGB") for r in GOOD_IMAGES]
    expected = pipe(queries, support_images=[PIL.Image.open(support[0])], support_masks=[PIL.Image.open(support[1])],
                    threshold=0.4, threshold_mode="absolute").masks
    for relative, mask in zip(GOOD_IMAGES, expected):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(output / Path(relative).with_suffix(".png"))) > 0, mask)


def test_resume_recomputes_only_missing_outputs(saved_pipeline, support, tmp_path, passes, capsys):
    images = write_images(tmp_path / "images", corrupt=False)
    output = tmp_path / "out"
    assert segment(saved_pipeline, support, images, output) == 0
    masks = sorted(output.rglob("*.png"))
    before = {p: p.read_bytes() for p in masks}
    deleted, kept = masks[::2], masks[1::2]
    for path in deleted:
        path.unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in kept}
    passes.queries = passes.support = 0
    capsys.readouterr()

    assert segment(saved_pipeline, support, images, output, "--resume") == 0

    assert passes.queries == len(deleted)
    assert passes.support == 1
    assert {p: p.stat().st_mtime_ns for p in kept} == mtimes  # untouched
    assert {p: p.read_bytes() for p in masks} == before  # recomputed the same
    assert f"Segmented {len(deleted)} image(s), skipped {len(kept)}" in capsys.readouterr().out


def test_video_frames_mask_video_and_overlay_video(saved_pipeline, support, tmp_path, passes):
    video = write_video(tmp_path / "clips" / "clip.mp4", num_frames=4, width=48, height=32)
    output = tmp_path / "out"

    assert segment(saved_pipeline, support, video, output, "--overlay", "--batch-size", "3") == 0

    frames = sorted((output / "clip").glob("*.png"))
    assert [p.name for p in frames] == ["000000.png", "000001.png", "000002.png", "000003.png"]
    assert all(PIL.Image.open(p).size == (48, 32) for p in frames)
    assert count_video_frames(output / "clip.mp4") == 4
    assert count_video_frames(output / "overlays" / "clip.mp4") == 4
    assert passes.support == 1 and passes.queries == 4

    (output / "clip" / "000002.png").unlink()
    mask_video_mtime = (output / "clip.mp4").stat().st_mtime_ns
    assert segment(saved_pipeline, support, video, output, "--overlay", "--resume") == 0
    assert passes.queries == 5  # only the deleted frame
    assert (output / "clip" / "000002.png").is_file()
    assert (output / "clip.mp4").stat().st_mtime_ns != mask_video_mtime  # the videos are remade with the new frame
    assert count_video_frames(output / "clip.mp4") == 4


def test_glob_several_inputs_and_output_inside_input(saved_pipeline, support, tmp_path, passes):
    images = write_images(tmp_path / "images", corrupt=False)
    output = images / "masks"  # inside the input folder: never read back as inputs

    assert segment(saved_pipeline, support, [str(images / "**" / "*.png"), images / "a.jpg"], output) == 0
    assert segment(saved_pipeline, support, images, output, "--resume") == 0

    assert sorted(p.relative_to(output).as_posix() for p in output.rglob("*.png")) == sorted(
        str(Path(r).with_suffix(".png").as_posix()) for r in GOOD_IMAGES
    )
    assert passes.queries == 5  # a.jpg, b.png, nested/c.png, nested/deeper/e.png; then nested/deeper/d.jpg


@pytest.mark.parametrize(
    "case, message",
    [
        ("shots", "--support-mask"),
        ("missing", "no such file"),
        ("conflict", "would all write"),
        ("empty_mask", "all background"),
        ("model", "no_model: no such folder, and not an official model (incontext, coco-fold0"),
    ],
)
def test_usage_errors_exit_2(saved_pipeline, support, tmp_path, capsys, case, message):
    images = write_images(tmp_path / "images", corrupt=False)
    image, mask = support
    args = ["segment", "--model", str(saved_pipeline), "--support", str(image), "--support-mask", str(mask),
            "--input", str(images), "--output", str(tmp_path / "out"), "--no-progress"]
    if case == "shots":
        args += ["--support", str(image)]
    elif case == "missing":
        args[args.index("--input") + 1] = str(tmp_path / "nothing")
    elif case == "conflict":
        PIL.Image.open(images / "a.jpg").save(images / "a.png")
    elif case == "model":
        args[args.index("--model") + 1] = str(tmp_path / "no_model")
    elif case == "empty_mask":
        PIL.Image.new("L", PIL.Image.open(mask).size).save(mask)

    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))


def test_bad_option_values_are_rejected(saved_pipeline, support, tmp_path):
    for extra in (["--threshold", "1.5"], ["--batch-size", "0"], ["--threshold-mode", "top"], ["--device", "gpu!"]):
        with pytest.raises(SystemExit) as exit_info:
            segment(saved_pipeline, support, tmp_path, tmp_path / "out", *extra)
        assert exit_info.value.code == 2


def test_converter_subcommands(sd_base, tmp_path):
    assert main(["init-from-sd", "--base", str(sd_base), "--output", str(tmp_path / "init")]) == 0
    assert (tmp_path / "init" / "model_index.json").is_file()
    official = write_official_unet(tmp_path / "official")
    assert main(["convert-official", "--official", str(official), "--base", str(sd_base),
                 "--output", str(tmp_path / "converted")]) == 0
    assert load_pipeline(str(tmp_path / "converted")).unet.conv_in_ref is not None
    assert main(["convert-official", "--official", str(tmp_path / "init" / "unet" / "nope"), "--base", str(sd_base),
                 "--output", str(tmp_path / "x")]) == 2
