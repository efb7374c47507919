"""The helper module every benchmark shares: models, inputs, timers, memory, the machine, records, training commands.
(The tiny learning model of the two learning benchmarks is apart, in `benchmarks.tiny_diffews` and
`benchmarks.tiny_vae`.)

- True Stable Diffusion 2.1 components with random weights: compute does not depend on weight values, so the UNet
  and VAE are built from the true SD 2.1 configurations with random initialisation (nothing is downloaded).
- Timers: `Stopwatch` (wall and CPU seconds of a block) and `time_calls` (medians of repeated calls, with memory).
  Peak memory is the peak resident set size of the process during a call on CPU (Linux `VmHWM`, reset before the
  call), and `torch.cuda.max_memory_allocated` on a GPU.
- Records: `machine()` (what a figure was measured on), `command_line` (the command as typed from the repository
  root), `write_json`, `print_table`.
- `train_argv`: the `train/train.py` command line of the learning benchmarks.

Every benchmark is a module of this package, run from the repository root: `python -m benchmarks.<name> ...`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from pipeline_diffews import DiffewSPipeline, DiffewSUNet2DConditionModel

REPO_ROOT = Path(__file__).resolve().parents[1]

# Stable Diffusion 2.1 (768 v-prediction) UNet, plus the DiffewS support input convolution: 865.9M parameters.
SD21_UNET_CONFIG = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024,
    attention_head_dim=[5, 10, 20, 20],
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=32,
    in_channels_ref=8,
)

# Stable Diffusion 2.1 VAE: 83.7M parameters, scale factor 8.
SD21_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)

RESOLUTION = 512


@functools.lru_cache(maxsize=1)
def _sd21_components(seed: int) -> tuple[DiffewSUNet2DConditionModel, AutoencoderKL]:
    torch.manual_seed(seed)
    unet = DiffewSUNet2DConditionModel(**SD21_UNET_CONFIG).eval()
    unet.empty_prompt_embeds = torch.randn(1, 2, SD21_UNET_CONFIG["cross_attention_dim"])
    vae = AutoencoderKL(**SD21_VAE_CONFIG).eval()
    for module in (unet, vae):
        module.requires_grad_(False)
    return unet, vae


def sd21_components(seed: int = 0, copy_weights: bool = False) -> tuple[DiffewSUNet2DConditionModel, AutoencoderKL]:
    """The true-size UNet and VAE (float32, random weights, eval mode), built once per process and seed.

    copy_weights: return deep copies, so that converting them (dtype, memory format) leaves the shared ones intact.
    """
    unet, vae = _sd21_components(seed)
    if copy_weights:
        return copy.deepcopy(unet), copy.deepcopy(vae)
    return unet, vae


def sd21_pipeline(seed: int = 0, copy_weights: bool = False, **config) -> DiffewSPipeline:
    """A `DiffewSPipeline` on the true-size components; `config` overrides pipeline settings (e.g. cpu_bfloat16)."""
    unet, vae = sd21_components(seed, copy_weights=copy_weights)
    pipe = DiffewSPipeline(unet=unet, vae=vae, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def episode(shots: int, queries: int, seed: int = 0) -> dict:
    """Random inputs of one episode at sizes that need resizing: 640x480 support images and queries.

    Returns dict(support_images=[PIL], support_masks=[bool HxW], queries=[PIL]).
    """
    rng = np.random.default_rng(seed)

    def image(h=480, w=640):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    def mask(h=480, w=640):
        m = np.zeros((h, w), dtype=bool)
        top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
        m[top : top + h // 3, left : left + w // 3] = True
        return m

    return dict(
        support_images=[image() for _ in range(shots)],
        support_masks=[mask() for _ in range(shots)],
        queries=[image() for _ in range(queries)],
    )


# ---------------------------------------------------------------------------------------------------- timing


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Stopwatch:
    """Wall and CPU seconds of a block: `wall_s` and `cpu_s` (`time.process_time`: every thread of this process, so
    robust to other processes sharing the cores). On CUDA the device is synchronised at both ends."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.wall_s = self.cpu_s = float("nan")

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu

    def as_dict(self) -> dict:
        """{"wall_s", "cpu_s"} rounded to 0.1 s."""
        return {"wall_s": round(self.wall_s, 1), "cpu_s": round(self.cpu_s, 1)}


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Runs `fn` `warmup` times untimed, then `repeats` times, each timed and watched for memory.

    Returns dict(median, min, max, runs: wall seconds; cpu_s: median CPU seconds of this process per call (all its
    threads; robust to other processes sharing the cores); peak_mib, added_mib: the largest `PeakMemory` of the runs).
    """
    for _ in range(warmup):
        fn()
    runs, cpu, peaks, added = [], [], [], []
    for _ in range(repeats):
        with PeakMemory(device) as memory, Stopwatch(device) as watch:
            fn()
        runs.append(watch.wall_s)
        cpu.append(watch.cpu_s)
        peaks.append(memory.peak_mib)
        added.append(memory.added_mib)
    return dict(median=statistics.median(runs), min=min(runs), max=max(runs), runs=runs, cpu_s=statistics.median(cpu),
                peak_mib=max(peaks), added_mib=max(added))


def median_ms(fn: Callable[[], object], repeats: int = 10, warmup: int = 1, device: str = "cuda") -> float:
    """Median wall milliseconds of `fn` over `repeats` synchronised calls, after `warmup` untimed ones."""
    return time_calls(fn, repeats, warmup=warmup, device=device)["median"] * 1000


# ---------------------------------------------------------------------------------------------------- memory


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (VmHWM) of this process; False where it cannot (not Linux)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of what runs inside the `with` block, in MiB.

    CPU: `peak_mib` is the process's peak resident set size (weights included) and `added_mib` the peak above the
    resident size at entry (activations, caches). Linux's VmHWM after a reset; elsewhere a 5 ms psutil sampler.
    CUDA: `torch.cuda.max_memory_allocated` (peak) and its rise above the allocation at entry.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.peak_mib = self.added_mib = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = self._rss_bytes()
        self._sampler = None
        if not _reset_peak_rss() or _read_status_kib("VmHWM") is None:
            self._sampler = _RssSampler()
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self._sampler is not None:
            peak = self._sampler.stop()
        else:
            peak = _read_status_kib("VmHWM") * 1024
        self.peak_mib = peak / 2**20
        self.added_mib = max(peak - self._start, 0) / 2**20

    @staticmethod
    def _rss_bytes() -> int:
        kib = _read_status_kib("VmRSS")
        if kib is not None:
            return kib * 1024
        import psutil

        return psutil.Process().memory_info().rss


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        import psutil

        self._process = psutil.Process()
        self._peak = self._process.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.005):
            self._peak = max(self._peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self._peak, self._process.memory_info().rss)


# ---------------------------------------------------------------------------------------------------- reporting


def machine() -> dict:
    """What the numbers were measured on: CPU model and cores, or the GPU; library versions; threads; load."""
    info = dict(
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        cpu_model=_cpu_model(),
    )
    if load_average() is not None:
        info["load_average_at_start"] = load_average()
    try:
        import diffusers
        import transformers

        info["diffusers"] = diffusers.__version__
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_summary(info: dict) -> str:
    """One line of `machine()`: "CPU model (or GPU), N cores, torch V, T thread(s)"."""
    return (f"{info.get('gpu') or info['cpu_model']}, {info['cpu_count']} cores, torch {info['torch']}, "
            f"{info['torch_threads']} thread(s)")


def print_header(command: str, info: dict) -> None:
    """Prints the command and the machine (`machine()`) a run starts with."""
    print(f"{command}\nmachine: {machine_summary(info)}, load {info.get('load_average_at_start')}", flush=True)


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the system has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", output, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def repo_relative(value):
    """An absolute path as the repository root sees it (`/x/shared/data/camvid` -> `../shared/data/camvid` for a
    repository at `/x/main`); any other value unchanged. Records then name no folder of one machine."""
    if isinstance(value, (str, os.PathLike)) and os.path.isabs(value):
        try:
            return os.path.relpath(value, REPO_ROOT)
        except ValueError:  # another drive
            return str(value)
    return value


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that runs benchmark `module` (e.g. "benchmarks.speed") with `argv` (default: this process's
    arguments) from the repository root, absolute paths written relative to it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = []
    for arg in argv:
        option, equals, value = arg.partition("=")
        args.append(f"{option}={repo_relative(value)}" if equals and option.startswith("--") else repo_relative(arg))
    return shlex.join(["python", "-m", module, *map(str, args)])


def train_argv(pretrained, output_dir, steps: int, data: Sequence[str], *, batch_size: int, learning_rate: float,
               lr_end: float, max_shots: int, resolution: int, seed: int) -> list[str]:
    """The `train/train.py` command line of one model of the learning benchmarks: `data` (the dataset options) and
    a CPU, float32, one-process run of `steps` steps with a linear learning-rate decay, no checkpoints on the way."""
    return [*data,
        "--pretrained", str(pretrained), "--output-dir", str(output_dir), "--max-steps", str(steps),
        "--batch-size", str(batch_size), "--gradient-accumulation-steps", "1",
        "--learning-rate", str(learning_rate), "--lr-end", str(lr_end), "--max-shots", str(max_shots),
        "--resolution", str(resolution), "--mixed-precision", "no", "--checkpointing-steps", str(steps + 1),
        "--dataloader-num-workers", "0", "--report-to", "none", "--seed", str(seed), "--cpu",
    ]


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Writes `data` as indented JSON (numpy scalars, torch dtypes and devices, and paths as their values)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (torch.dtype, torch.device, os.PathLike)):
        return str(value)
    raise TypeError(f"Cannot write {type(value).__name__} to JSON.")


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Prints `rows` as a Markdown table; columns are (key, header, format spec)."""
    print("| " + " | ".join(header for _, header, _ in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("" if value is None else format(value, spec) if spec else str(value))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()
