"""Arithmetic per query and the machine's peak, to bound what any CPU speed-up can reach.

Counts the floating-point operations (torch.utils.flop_counter, on the meta device: nothing is computed) of each
DiffewS step at 512 x 512 with the true Stable Diffusion 2.1 sizes, and of one SegGPT-L forward at 448 x 448; then
measures this CPU's throughput on a large 3x3 convolution and matrix product in float32 and bfloat16.

Usage:
    python -m benchmarks.flops --output benchmarks/results/flops.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import SD21_UNET_CONFIG, SD21_VAE_CONFIG, command_line, machine, print_header, print_table, write_json
from diffusers import AutoencoderKL
from pipeline_diffews import DiffewSUNet2DConditionModel


def tflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def count() -> list[dict]:
    from transformers import SegGptConfig, SegGptForImageSegmentation

    with torch.device("meta"):
        unet = DiffewSUNet2DConditionModel(**SD21_UNET_CONFIG).eval()
        vae = AutoencoderKL(**SD21_VAE_CONFIG).eval()
        seggpt = SegGptForImageSegmentation(SegGptConfig()).eval()
    image, latent = torch.empty(1, 3, 512, 512, device="meta"), torch.empty(1, 4, 64, 64, device="meta")
    rows = [dict(step="VAE encode (one 512 image)", tflop=tflop(lambda: vae.encode(image))),
            dict(step="VAE decode (one 64 latent)", tflop=tflop(lambda: vae.decode(latent)))]
    for shots in (1, 5):
        support = torch.empty(1, shots, 8, 64, 64, device="meta")
        key_values = unet.encode_support(support, 1)
        rows.append(dict(step=f"UNet support pass ({shots} shot)", tflop=tflop(lambda: unet.encode_support(support, 1))))
        rows.append(dict(step=f"UNet query pass ({shots} shot)",
                         tflop=tflop(lambda: unet(latent, 1, support_key_values=key_values))))
    by_step = {row["step"]: row["tflop"] for row in rows}
    encode, decode = by_step["VAE encode (one 512 image)"], by_step["VAE decode (one 64 latent)"]
    rows.append(dict(step="DiffewS 1-shot query, uncached (3 encodes, 2 passes, decode)",
                     tflop=3 * encode + by_step["UNet support pass (1 shot)"] + by_step["UNet query pass (1 shot)"] + decode))
    rows.append(dict(step="DiffewS 1-shot query, cached (encode, query pass, decode)",
                     tflop=encode + by_step["UNet query pass (1 shot)"] + decode))
    pixels = torch.empty(1, 3, 448, 448, device="meta")
    rows.append(dict(step="SegGPT-L 1-shot query (448)",
                     tflop=tflop(lambda: seggpt(pixel_values=pixels, prompt_pixel_values=pixels, prompt_masks=pixels))))
    return rows


def peak(threads: int, repeats: int = 3) -> list[dict]:
    """Best-of-`repeats` throughput of a 256->256 3x3 convolution at 256 x 256 (channels_last) and a 2048^3 matmul."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        with torch.no_grad():
            for dtype in (torch.float32, torch.bfloat16):
                conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
                x = torch.randn(1, 256, 256, 256).to(dtype).contiguous(memory_format=torch.channels_last)
                a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
                for op, fn, flop in [("conv 3x3 256->256 @256x256", lambda: conv(x), 2 * 256 * 256 * 256 * 256 * 9),
                                     ("matmul 2048^3", lambda: a @ b, 2 * 2048**3)]:
                    fn()
                    times = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        fn()
                        times.append(time.perf_counter() - start)
                    rows.append(dict(op=op, dtype=str(dtype).split(".")[-1], threads=threads,
                                     gflop_per_s=flop / min(times) / 1e9))
    finally:
        torch.set_num_threads(previous)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args(argv)
    info = machine()
    command = command_line("benchmarks.flops", argv)
    print_header(command, info)
    torch.set_grad_enabled(False)
    counts = count()
    print_table(counts, [("step", "step", ""), ("tflop", "TFLOP", ".3f")])
    print()
    peaks = [row for threads in sorted({1, torch.get_num_threads()}) for row in peak(threads)]
    print_table(peaks, [("op", "operation", ""), ("dtype", "dtype", ""), ("threads", "threads", "d"),
                        ("gflop_per_s", "GFLOP/s", ".0f")])
    if args.output:
        write_json(args.output, dict(machine=info, command=command, counts=counts, peaks=peaks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
