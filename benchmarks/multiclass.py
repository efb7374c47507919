"""Several classes at once: one K-class call against K one-class calls, per query, for K = 1, 3 and 5.

True Stable Diffusion 2.1 UNet and VAE configurations with random weights (compute does not depend on the values),
the pipeline's defaults. One episode per K: a 640 x 480 support image whose label map holds K boxes (classes 1..K)
and a 640 x 480 query, uncached (support passes included, as a one-off call pays them):

- one K-class call: `pipe(query, support_images=[image], support_masks=[label_map], batch_size=K)`: the support
  image, the K class masks and the query go through the VAE encoder once each, the K support passes in one UNet
  batch, the K query passes in another, then K decodes;
- K one-class calls: `pipe(query, support_images=[image], support_masks=[label_map == k])` for k = 1..K, each
  encoding the support image and the query again.

After one untimed warm-up call, the two ways run interleaved (the machine may be shared), alternating which goes first, and each repetition gives
its own ratio (K one-class calls / one K-class call); the table reports the median times and the median ratio.
Also counted: the images each way sends through the VAE encoder (a forward hook on the encoder).

Usage:
    python -m benchmarks.multiclass --threads 2 --processing-resolution 256 --output benchmarks/results/multiclass_cpu.json
    python -m benchmarks.multiclass --quick          # K = 1 and 3, one repetition, 128 px
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

from benchmarks.common import Stopwatch, command_line, machine, print_table, sd21_pipeline, write_json


def label_episode(num_classes: int, seed: int = 0) -> dict:
    """A 640 x 480 support image, its label map with `num_classes` disjoint boxes (ids 1..K), and a query."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((480, 640), dtype=np.uint8)
    width = 640 // num_classes
    for k in range(num_classes):
        top = int(rng.integers(0, 240))
        labels[top : top + 160, k * width + 8 : (k + 1) * width - 8] = k + 1
    image, query = (Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(2))
    return dict(image=image, labels=labels, query=query)


class EncoderCount:
    """Images through the VAE encoder while it is active (a forward hook on `vae.encoder`)."""

    def __init__(self, vae):
        self.images = 0
        self._handle = vae.encoder.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.images += args[0].shape[0]

    def close(self) -> None:
        self._handle.remove()


def measure(pipe, num_classes: int, repeats: int, resolution: int) -> dict:
    data = label_episode(num_classes, seed=num_classes)
    image, labels, query = data["image"], data["labels"], data["query"]
    common = dict(processing_resolution=resolution)

    def one_call():
        pipe(query, support_images=[image], support_masks=[labels], batch_size=num_classes, multiclass=True, **common)

    def separate_calls():
        for k in range(1, num_classes + 1):
            pipe(query, support_images=[image], support_masks=[labels == k], **common)

    runs, cpu, counts = {"one_call": [], "separate_calls": []}, {"one_call": [], "separate_calls": []}, {}
    for repeat in range(repeats):
        order = [("one_call", one_call), ("separate_calls", separate_calls)]
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            counter = EncoderCount(pipe.vae)
            with Stopwatch() as watch:
                fn()
            counter.close()
            counts[name] = counter.images
            runs[name].append(watch.wall_s)
            cpu[name].append(watch.cpu_s)
    ratios = [s / o for s, o in zip(runs["separate_calls"], runs["one_call"])]
    row = dict(
        classes=num_classes,
        one_call_s=statistics.median(runs["one_call"]),
        separate_calls_s=statistics.median(runs["separate_calls"]),
        ratio=statistics.median(ratios),
        ratio_min=min(ratios),
        ratio_max=max(ratios),
        one_call_cpu_s=statistics.median(cpu["one_call"]),
        separate_calls_cpu_s=statistics.median(cpu["separate_calls"]),
        one_call_encoded_images=counts["one_call"],
        separate_calls_encoded_images=counts["separate_calls"],
        runs=runs,
    )
    print(f"K={num_classes}: one call {row['one_call_s']:.1f} s, {num_classes} calls {row['separate_calls_s']:.1f} s, "
          f"ratio {row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f}); VAE encoder images "
          f"{row['one_call_encoded_images']} vs {row['separate_calls_encoded_images']}", flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each way")
    parser.add_argument("--processing-resolution", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="K = 1 and 3, one repetition, 128 px")
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.repeats, args.processing_resolution = [1, 3], 1, 128
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = sd21_pipeline(processing_resolution=args.processing_resolution)
    start = time.perf_counter()
    warm = label_episode(2, seed=100)  # one untimed call first: allocator, oneDNN kernels, a CPU bfloat16 conversion
    pipe(warm["query"], support_images=[warm["image"]], support_masks=[warm["labels"]], multiclass=True)
    rows = [measure(pipe, k, args.repeats, args.processing_resolution) for k in args.classes]
    print()
    print_table(rows, [("classes", "K", ""), ("one_call_s", "one K-class call (s)", ".1f"),
                       ("separate_calls_s", "K one-class calls (s)", ".1f"), ("ratio", "ratio (median)", ".2f"),
                       ("ratio_min", "min", ".2f"), ("ratio_max", "max", ".2f"),
                       ("one_call_encoded_images", "VAE encodes, one call", ""),
                       ("separate_calls_encoded_images", "VAE encodes, K calls", "")])
    result = dict(
        benchmark="multiclass",
        command=command_line("benchmarks.multiclass", argv),
        machine=machine(),
        processing_resolution=args.processing_resolution,
        repeats=args.repeats,
        weights_dtype=str(pipe.unet.dtype),
        total_s=time.perf_counter() - start,
        rows=rows,
    )
    if args.output:
        write_json(args.output, result)


if __name__ == "__main__":
    main()
