"""GPU levers of a cached DiffewS query: split-statistics GroupNorm, channels_last, bfloat16, CUDA graphs.

True Stable Diffusion 2.1 UNet and VAE sizes with random weights, one 1-shot episode of 640 x 480 images processed at
512 x 512. For each setting it prints the median wall time of a cached query (`pipe(q, support=support)`), an
uncached query, a cached batch of 8 (per query), the GPU kernel time of one cached query (from the profiler), the
first call (compilation included), and the mask agreement / largest probability difference against the float16
baseline. The baseline turns off the pipeline's split-statistics GroupNorm, which it otherwise installs on CUDA.

Usage:
    python -m benchmarks.levers_cuda | tee benchmarks/results/levers_cuda_h200.txt
"""

from __future__ import annotations

import copy
import sys
import time
import traceback

import torch

import pipeline_diffews.device_speedups as speedups
from benchmarks.common import episode, median_ms, sd21_components
from pipeline_diffews import DiffewSPipeline

DEVICE = "cuda"
SPLIT_STATS_GROUP_NORM = speedups.use_split_stats_group_norm


def gpu_ms(fn) -> float:
    """Sum of the CUDA kernel times of one call of `fn`, in milliseconds."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(k.self_device_time_total for k in prof.key_averages()) / 1000


def run(label, data, reference, split_group_norm=False, channels_last=False, dtype=torch.float16, compile_mode=None):
    query, batch = data["queries"][0], data["queries"][:8]
    base_unet, base_vae = sd21_components()
    unet, vae = copy.deepcopy(base_unet), copy.deepcopy(base_vae)
    pipe = DiffewSPipeline(unet=unet, vae=vae, processing_resolution=512).to(DEVICE, dtype)
    pipe.set_progress_bar_config(disable=True)
    speedups.use_split_stats_group_norm = SPLIT_STATS_GROUP_NORM if split_group_norm else (lambda module: 0)
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    support = pipe.encode_support(data["support_images"], data["support_masks"])
    start = time.perf_counter()
    if compile_mode:
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode)
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=compile_mode)
        pipe.vae.encoder = torch.compile(pipe.vae.encoder, mode=compile_mode)
    out = pipe(query, support=support, output_type="pt")
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    if not reference:
        reference.update(mask=out.masks[0], probability=out.probabilities[0])
    agree = (out.masks[0] == reference["mask"]).float().mean().item()
    max_dp = (out.probabilities[0] - reference["probability"]).abs().max().item()
    cached = median_ms(lambda: pipe(query, support=support))
    batch8 = median_ms(lambda: pipe(batch, support=support, batch_size=8), 3) / 8
    uncached = median_ms(lambda: pipe(query, support_images=data["support_images"], support_masks=data["support_masks"]), 5)
    kernels = gpu_ms(lambda: pipe(query, support=support))
    print(f"{label:40s} cached {cached:6.1f} ms  uncached {uncached:6.1f} ms  batch8/query {batch8:5.1f} ms  "
          f"gpu-time cached {kernels:5.1f} ms  first {first:5.1f} s  agree {agree:.5f} maxdp {max_dp:.2e}", flush=True)


def main() -> int:
    if not torch.cuda.is_available():
        print("levers_cuda.py needs a CUDA device", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    data, reference = episode(1, 8, seed=1), {}
    settings = [
        ("fp16 baseline", {}),
        ("fp16 + split-stats GN", dict(split_group_norm=True)),
        ("fp16 + channels_last", dict(channels_last=True)),
        ("fp16 + GN + channels_last", dict(split_group_norm=True, channels_last=True)),
        ("bf16 + GN", dict(split_group_norm=True, dtype=torch.bfloat16)),
        ("fp16 + GN + compile reduce-overhead", dict(split_group_norm=True, compile_mode="reduce-overhead")),
    ]
    for label, options in settings:
        try:
            run(label, data, reference, **options)
            torch.cuda.empty_cache()  # the run's pipeline is gone with its frame
        except Exception:  # one failing lever (e.g. a compiler error) must not hide the others
            traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
