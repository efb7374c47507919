"""Helpers of the training and evaluation tests: runs of `train/train.py` and `train/evaluate.py` on CamVid."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures_data import CAMVID, ROOT
from tests.tiny_models import RESOLUTION

TRAIN_RESOLUTION = RESOLUTION  # 64 x 64 (latents 32 x 32)


@contextmanager
def one_thread():
    """torch on one CPU thread: on a small shared machine, idle OpenMP threads spinning beside other jobs make the
    tiny models many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# Fixtures for the training test modules, which import them by name (autouse applies in each importing module).


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def index_cache(tmp_path_factory, monkeypatch):
    """Dataset indexes cached under the session's temporary folder, never in the user's cache."""
    monkeypatch.setenv("DIFFEWS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "diffews_index"))


def reset_accelerate() -> None:
    """Forgets the process-wide Accelerate state, so that each in-process run starts like a new process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_argv(pretrained, output_dir, **flags) -> list[str]:
    """Arguments of `train/train.py` for a short CPU run on CamVid fold 0; `flags` add or override (`max_steps=4`)."""
    options = {
        "pretrained": pretrained, "dataset": "camvid", "data_root": CAMVID, "output_dir": output_dir, "fold": 0,
        "resolution": TRAIN_RESOLUTION, "max_steps": 2, "gradient_accumulation_steps": 1, "batch_size": 1,
        "learning_rate": 1e-4, "checkpointing_steps": 100, "dataloader_num_workers": 0, "report_to": "none",
    }
    options.update(flags)
    argv = ["--cpu"]
    for name, value in options.items():
        if value is True:
            argv.append("--" + name.replace("_", "-"))
        elif value is not None and value is not False:
            argv += ["--" + name.replace("_", "-"), str(value)]
    return argv


def run_in_process(main, argv: list[str]) -> int:
    """`main(argv)` of a script, as in a new process (Accelerate's state forgotten before and after)."""
    reset_accelerate()
    try:
        return main(argv)
    finally:
        reset_accelerate()


def run_train(argv: list[str]) -> int:
    from train.train import main

    return run_in_process(main, argv)


def run_evaluate(argv: list[str]) -> int:
    from train.evaluate import main

    return run_in_process(main, argv)


def unet_weights(pipeline_folder) -> dict:
    return load_file(Path(pipeline_folder) / "unet" / "diffusion_pytorch_model.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def distance(a: dict, b: dict) -> float:
    """L2 distance between two state dicts."""
    assert a.keys() == b.keys()
    return sum(((a[k].float() - b[k].float()) ** 2).sum().item() for k in a) ** 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: str, argv: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` of `train/<script>` with the documented two-CPU-process config (gloo), offline."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(ROOT / "train" / "accelerate_configs" / "cpu_two_processes.yaml"),
        "--main_process_port", str(free_port()), str(ROOT / "train" / script), *argv,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
