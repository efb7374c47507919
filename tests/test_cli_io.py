"""Finding inputs, reading video frames, planning outputs and writing them atomically (no model involved)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from pipeline_diffews.inputs import InputError, VideoFrameReader, discover, probe_video
from pipeline_diffews.outputs import OutputConflictError, make_plan
from pipeline_diffews.writers import atomic_path, mask_to_image, overlay, overlay_classes, save_png, write_video
from tests.cli_data import count_video_frames, random_image, within
from tests.cli_data import write_video as write_test_video


def touch_images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        random_image(4, 4, 0).save(folder / name)


def test_discover_folder_recursive_sorted_media_only(tmp_path):
    touch_images(tmp_path, ["b.png", "a/z.jpg", "a/b/c.JPG", ".hidden.png", ".cache/x.png", "out/m.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "v.MP4").write_bytes(b"")

    sources = discover(tmp_path, exclude=tmp_path / "out")

    assert [s.relative.as_posix() for s in sources] == ["a/b/c.JPG", "a/z.jpg", "b.png", "v.MP4"]
    assert [s.is_video for s in sources] == [False, False, False, True]


def test_discover_glob_file_and_errors(tmp_path):
    touch_images(tmp_path, ["x/1.png", "x/y/2.png", "x/y/3.jpg"])

    assert [s.relative.as_posix() for s in discover(str(tmp_path / "x" / "**" / "*.png"))] == ["1.png", "y/2.png"]
    assert [s.relative.as_posix() for s in discover(tmp_path / "x" / "y" / "3.jpg")] == ["3.jpg"]
    with pytest.raises(InputError, match="no such file"):
        discover(tmp_path / "missing")
    with pytest.raises(InputError, match="no images or videos"):
        discover(str(tmp_path / "*.gif"))


def test_plan_paths_and_conflicts(tmp_path):
    touch_images(tmp_path / "in", ["a.jpg", "s/b.png"])
    plan = make_plan(discover(tmp_path / "in"), tmp_path / "out", overlay=True)
    assert [(i.mask_path, i.overlay_path) for i in plan.items] == [
        (tmp_path / "out/a.png", tmp_path / "out/overlays/a.png"),
        (tmp_path / "out/s/b.png", tmp_path / "out/overlays/s/b.png"),
    ]
    touch_images(tmp_path / "in", ["a.png"])
    with pytest.raises(OutputConflictError, match="a.jpg and a.png"):
        make_plan(discover(tmp_path / "in"), tmp_path / "out", overlay=False)


def test_plan_reports_unreadable_video(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.mp4").write_bytes(b"not a video")
    plan = make_plan(discover(tmp_path / "in"), tmp_path / "out", overlay=False)
    assert plan.items == [] and [name for name, _ in plan.failures] == ["bad.mp4"]


def test_atomic_write_leaves_old_file_on_error(tmp_path):
    target = tmp_path / "m.png"
    save_png(mask_to_image(np.ones((3, 5), bool)), target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(target) as temporary:
        temporary.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]
    assert PIL.Image.open(target).size == (5, 3)


def test_overlay_tints_the_object_and_outlines_it_in_two_tones():
    image = PIL.Image.new("RGB", (12, 10), (0, 0, 200))
    mask = np.zeros((10, 12), bool)
    mask[2:8, 3:10] = True
    pixels = np.asarray(overlay(image, mask)).astype(int)

    outer, inner = mask & within(mask, 1), mask & within(mask, 2) & ~within(mask, 1)
    interior = mask & ~within(mask, 2)
    assert outer.sum() == 22 and inner.sum() == 14 and interior.sum() == 6
    assert (pixels[~mask] == (0, 0, 200)).all()  # outside: untouched
    assert (pixels[interior] == (128, 16, 116)).all()  # half the image, half the red
    assert (pixels[inner] == (255, 32, 32)).all()  # the colour at full strength
    assert (pixels[outer] == (255, 255, 255)).all()  # a light line beside a dark colour
    with pytest.raises(ValueError, match="must match"):
        overlay(image, mask.T)


def test_overlay_on_a_red_object_differs_visibly_from_the_image():
    """The default tint is red: on a red object it is replaced by a contrasting one, and the outline shows."""
    base = np.full((40, 50, 3), 120, np.uint8)
    base[10:30, 12:40] = (210, 25, 30)
    mask = np.zeros((40, 50), bool)
    mask[10:30, 12:40] = True
    image = PIL.Image.fromarray(base)
    pixels = np.asarray(overlay(image, mask)).astype(int)

    interior = mask & ~within(mask, 2)
    change = np.abs(pixels - base.astype(int)).sum(axis=-1)  # summed over R, G, B
    assert change[interior].min() >= 150  # a red tint would change these by about 30
    assert (change[~mask] == 0).all()
    outline = mask & within(mask, 1)
    assert (change[outline] >= 150).all()
    tones = {tuple(p) for p in pixels[outline]}
    assert len(tones) == 1 and tones.pop() in {(0, 0, 0), (255, 255, 255)}


def test_overlay_classes_outlines_each_class_in_its_colour():
    palette = [0, 0, 0, 200, 30, 30, 30, 200, 30] + [0] * 759
    labels = np.zeros((20, 30), np.uint8)
    labels[2:18, 2:14], labels[2:18, 14:28], labels[0, :] = 1, 2, 255  # two classes side by side, an ignored row
    image = PIL.Image.fromarray(np.full((20, 30, 3), 128, np.uint8))
    pixels = np.asarray(overlay_classes(image, labels, palette)).astype(int)

    assert (pixels[(labels == 0) | (labels == 255)] == 128).all()
    for class_id, color in ((1, (200, 30, 30)), (2, (30, 200, 30))):
        region = labels == class_id
        interior, inner = region & ~within(labels, 2), region & within(labels, 2) & ~within(labels, 1)
        np.testing.assert_array_equal(pixels[interior], np.round(0.5 * 128 + 0.5 * np.asarray(color))[None].repeat(
            interior.sum(), 0))
        assert (pixels[inner] == color).all()
        assert (pixels[region & within(labels, 1)] == 255).all()  # white beside these dark colours
    assert overlay_classes(image, labels).size == image.size  # the default palette


def test_video_reader_probe_and_writer(tmp_path):
    video = write_test_video(tmp_path / "v.mp4", num_frames=5, width=32, height=16)
    assert probe_video(video).num_frames == 5
    with VideoFrameReader(video) as reader:
        assert reader.frame(3).size == (32, 16)
        assert reader.frame(1).size == (32, 16)  # earlier frame: reopens
        with pytest.raises(OSError, match="frame 7"):
            reader.frame(7)

    odd = [random_image(33, 21, i) for i in range(3)]
    assert write_video(odd, tmp_path / "odd.mkv", fps=10) == 3  # no frame count in the header: counted from packets
    assert probe_video(tmp_path / "odd.mkv").num_frames == 3 == count_video_frames(tmp_path / "odd.mkv")
