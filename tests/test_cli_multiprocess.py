"""`accelerate launch -m pipeline_diffews segment` with two CPU processes writes what one process writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from pipeline_diffews.cli import main
from tests.cli_data import CORRUPT_IMAGE, write_images, write_support, write_video


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_write_the_same_files_as_one(saved_pipeline, tmp_path):
    inputs = write_images(tmp_path / "inputs")
    write_video(tmp_path / "inputs" / "clips" / "clip.mp4", num_frames=3)
    image, mask = write_support(tmp_path / "support")
    args = ["segment", "--model", str(saved_pipeline), "--support", str(image), "--support-mask", str(mask),
            "--input", str(inputs), "--overlay", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--format", "coco"]

    assert main(args + ["--output", str(tmp_path / "one")]) == 1

    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "pipeline_diffews"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command + args + ["--output", str(tmp_path / "two")], env=env, capture_output=True,
                            text=True, timeout=300, check=False)

    assert result.returncode != 0, result.stderr  # the corrupt file fails the run
    assert "2 process(es)" in result.stdout, result.stdout + result.stderr
    assert result.stdout.count("Segmented 8 image(s)") == 1  # only the main process prints the totals
    assert result.stderr.count(CORRUPT_IMAGE) == 1
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(one) == sorted(two)
    assert {k: v for k, v in one.items() if k.endswith(".png")} == {k: v for k, v in two.items() if k.endswith(".png")}
    assert one["annotations.json"] == two["annotations.json"]  # written once, by the main process, from all masks
