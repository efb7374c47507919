"""Shared pieces of the benchmarks: true Stable Diffusion 2.1 components with random weights, inputs, timing, memory.

Compute does not depend on weight values, so the UNet and VAE are built from the true SD 2.1 configurations with
random initialisation (nothing is downloaded). Timings are medians of repeated runs; peak memory is the peak
resident set size of the process during a call on CPU (Linux `VmHWM`, reset before the call), and
`torch.cuda.max_memory_allocated` on a GPU.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from diffusers import AutoencoderKL  # noqa: E402

from pipeline_diffews import DiffewSPipeline, DiffewSUNet2DConditionModel  # noqa: E402

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


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu") -> dict:
    """Runs `fn` `warmup` times untimed, then `repeats` times, each timed and watched for memory.

    Returns dict(median, min, max, runs: wall seconds; cpu_s: median CPU seconds of this process per call (all its
    threads; robust to other processes sharing the cores); peak_mib, added_mib: the largest `PeakMemory` of the runs).
    """
    for _ in range(warmup):
        fn()
    runs, cpu, peaks, added = [], [], [], []
    for _ in range(repeats):
        with PeakMemory(device) as memory:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            runs.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
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
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
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


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        match = re.search(r"^Model name:\s*(.+)$", output, re.MULTILINE)
        if match:
            return match.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (torch.dtype, torch.device)):
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
