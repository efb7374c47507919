"""Where a cached DiffewS query spends its time on a GPU: stage timings and the PyTorch profiler's tables.

True Stable Diffusion 2.1 sizes with random weights in float16, one 1-shot episode (640 x 480 images, 512 x 512
processing). Prints the median wall milliseconds of a cached call and of each stage (pre-processing, VAE encode,
UNet query pass, VAE decode, post-processing), a cached batch of 8 per query, then the profiler's operator tables
by CPU time and by GPU time, and last a call with a compiled VAE decoder. PyTorch's own GroupNorm is used, as before
the pipeline's split-statistics GroupNorm (`benchmarks/levers_cuda.py` compares the two).

Usage:
    python -m benchmarks.profile_cuda | tee benchmarks/results/profile_cuda_h200.txt
"""

from __future__ import annotations

import functools
import sys
import time
import traceback

import torch

import pipeline_diffews.device_speedups as speedups
from benchmarks.common import episode, median_ms, sd21_components
from pipeline_diffews import DiffewSPipeline

DEVICE = "cuda"
wall_ms = functools.partial(median_ms, warmup=0)  # every stage is timed right after the warmed-up calls


def main() -> int:
    if not torch.cuda.is_available():
        print("profile_cuda.py needs a CUDA device", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    speedups.use_split_stats_group_norm = lambda module: 0  # PyTorch's GroupNorm
    unet, vae = sd21_components()
    pipe = DiffewSPipeline(unet=unet, vae=vae, processing_resolution=512).to(DEVICE, torch.float16)
    pipe.set_progress_bar_config(disable=True)
    data = episode(1, 8, seed=1)
    query = data["queries"][0]
    support = pipe.encode_support(data["support_images"], data["support_masks"])
    for _ in range(3):
        pipe(query, support=support)

    processor = pipe.image_processor
    print("cached call ms", wall_ms(lambda: pipe(query, support=support)))
    print("cached call output pt ms", wall_ms(lambda: pipe(query, support=support, output_type="pt")))
    print("cached call no resize ms", wall_ms(lambda: pipe(query, support=support, match_input_resolution=False)))
    print("preprocess ms", wall_ms(lambda: processor.image_to_tensor(query, 512)))
    pixels = processor.image_to_tensor(query, 512)[None].to(DEVICE, torch.float16)
    print("encode ms", wall_ms(lambda: pipe._encode_latents(pixels)))
    latents = pipe._encode_latents(pixels).half()
    print("unet ms", wall_ms(lambda: pipe.unet(latents, 999, support_key_values=support.key_values)))
    output = pipe.unet(latents, 999, support_key_values=support.key_values).sample
    print("decode ms", wall_ms(lambda: pipe.vae.decode(output)))
    print("predict ms", wall_ms(lambda: pipe._predict([query], support.key_values, 512)))
    prediction = pipe._predict([query], support.key_values, 512)

    def post():
        level = processor.threshold_value(prediction, 0.25, "relative")
        resized = processor.resize_probability(prediction.mean(1)[0], (480, 640))
        processor.export(resized > level[0], resized, "np")

    print("post ms", wall_ms(post))
    batch = data["queries"][:8]
    print("batch8 per query ms", wall_ms(lambda: pipe(batch, support=support, batch_size=8), 3) / 8)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pipe(query, support=support)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))

    try:
        start = time.perf_counter()
        pipe.vae.decode = torch.compile(pipe.vae.decode)
        pipe(query, support=support)
        torch.cuda.synchronize()
        print("compile vae s", time.perf_counter() - start)
        print("cached call, compiled vae ms", wall_ms(lambda: pipe(query, support=support)))
    except Exception:  # a compiler failure must not hide the figures above
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
