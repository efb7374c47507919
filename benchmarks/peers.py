"""DiffewS vs SegGPT on the same machine and the same 1-shot inputs: per-query latency and peak memory.

SegGPT: transformers' `SegGptForImageSegmentation` with `SegGptConfig()` (the defaults are the `BAAI/seggpt-vit-large`
configuration: ViT-L, 448 x 448 input and prompt stacked to 896 x 448) and random weights, driven by its own
`SegGptImageProcessor` (default arguments) and `post_process_semantic_segmentation`, in float32 and bfloat16.
DiffewS: the pipeline with its defaults (on CPU: bfloat16 weights), uncached and cached; with --with-float32 also the
exact float32 path. Each call includes pre- and post-processing; each method at its own processing resolution (448
SegGPT, 512 DiffewS). Wall time is the median of --repeats calls after one warm-up.

Usage:
    python -m benchmarks.peers --output benchmarks/results/peers_cpu.json
    python -m benchmarks.peers --quick
"""

from __future__ import annotations

import argparse
import gc
import sys

import numpy as np
import torch

from benchmarks import common
from benchmarks.common import command_line, episode, machine, print_header, print_table, sd21_components, time_calls, write_json
from pipeline_diffews import DiffewSPipeline


class SegGpt:
    """SegGPT-L with random weights: (query PIL, support PIL, support bool mask) -> bool mask [H, W] at the query's size."""

    def __init__(self, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
        from transformers import SegGptConfig, SegGptForImageSegmentation, SegGptImageProcessor

        torch.manual_seed(seed)
        self.model = SegGptForImageSegmentation(SegGptConfig()).eval().to(device=device, dtype=dtype)
        self.processor = SegGptImageProcessor()
        self.dtype, self.device = dtype, device

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def __call__(self, query, support_image, support_mask) -> np.ndarray:
        inputs = self.processor(images=query, prompt_images=support_image, prompt_masks=support_mask.astype(np.uint8),
                                num_labels=1, return_tensors="pt")
        inputs = {k: v.to(device=self.device, dtype=self.dtype) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        outputs.pred_masks = outputs.pred_masks.float()
        segmentation = self.processor.post_process_semantic_segmentation(
            outputs, target_sizes=[(query.height, query.width)], num_labels=1
        )[0]
        return (segmentation == 1).cpu().numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (median)")
    parser.add_argument("--queries", type=int, default=5, help="cached DiffewS queries (per-query median)")
    parser.add_argument("--with-float32", action="store_true", help="also the exact float32 DiffewS path")
    parser.add_argument("--quick", action="store_true", help="1 repeat, 3 cached queries")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.queries = 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    device = args.device
    info = machine()
    command = command_line("benchmarks.peers", argv)
    print_header(command, info)

    data = episode(1, args.queries, seed=1)
    query, support_image, support_mask = data["queries"][0], data["support_images"][0], data["support_masks"][0]
    rows = []

    def add(method, result, **extra):
        rows.append(dict(method=method, median_s=result["median"], min_s=result["min"], runs=result["runs"],
                         cpu_s=result["cpu_s"], peak_mib=result["peak_mib"], added_mib=result["added_mib"], **extra))
        print(f"  {method:45s} {result['median']:.2f} s", flush=True)

    on_gpu = device.startswith("cuda")
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if on_gpu else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        seggpt = SegGpt(dtype, device)
        name = str(dtype).split(".")[-1]
        result = time_calls(lambda: seggpt(query, support_image, support_mask), args.repeats, warmup=1, device=device)
        add(f"SegGPT-L, {name}", result, parameters=seggpt.num_parameters, resolution=448)
        del seggpt
        gc.collect()

    unet, vae = sd21_components()
    pipe = DiffewSPipeline(unet=unet, vae=vae, processing_resolution=common.RESOLUTION)
    # On a GPU the pipeline runs in the dtype it is loaded in: float16, as users load it there.
    pipelines = [("float16", pipe.to(device, torch.float16))] if on_gpu else [("defaults", pipe)]
    if args.with_float32:
        exact_unet, exact_vae = sd21_components(copy_weights=True)
        if on_gpu:
            exact_unet.to(device), exact_vae.to(device)
        pipelines.append(("float32", DiffewSPipeline(unet=exact_unet, vae=exact_vae, cpu_bfloat16=False,
                                                     processing_resolution=common.RESOLUTION)))
    for label, pipe in pipelines:
        pipe.set_progress_bar_config(disable=True)
        pipe(query, support_images=[support_image], support_masks=[support_mask])  # warm-up (converts, on CPU)
        name = f"DiffewS, {label}" if on_gpu else f"DiffewS, {label} ({str(pipe.unet.dtype).split('.')[-1]})"
        parameters = sum(p.numel() for m in (pipe.unet, pipe.vae) for p in m.parameters())
        result = time_calls(lambda: pipe(query, support_images=[support_image], support_masks=[support_mask]),
                            args.repeats, warmup=0, device=device)
        add(f"{name}, uncached", result, parameters=parameters, resolution=common.RESOLUTION)
        support = pipe.encode_support([support_image], [support_mask])
        per_query = [time_calls(lambda: pipe(q, support=support), 1, warmup=0, device=device) for q in data["queries"]]
        add(f"{name}, cached (per query)", dict(
            median=float(np.median([r["median"] for r in per_query])), min=min(r["min"] for r in per_query),
            runs=[r["median"] for r in per_query], cpu_s=float(np.median([r["cpu_s"] for r in per_query])),
            peak_mib=max(r["peak_mib"] for r in per_query), added_mib=max(r["added_mib"] for r in per_query),
        ), parameters=parameters, resolution=common.RESOLUTION)

    seggpt_times = {row["method"]: row["median_s"] for row in rows if row["method"].startswith("SegGPT")}
    for row in rows:
        for peer, seconds in seggpt_times.items():
            row[f"speedup_vs_{peer.split(', ')[1]}"] = seconds / row["median_s"]
    print()
    print_table(rows, [("method", "method", ""), ("resolution", "px", "d"), ("median_s", "median s", ".2f"),
                       ("cpu_s", "CPU s", ".1f"), ("speedup_vs_float32", "x SegGPT fp32", ".2f"),
                       ("speedup_vs_bfloat16", "x SegGPT bf16", ".2f"),
                       ("speedup_vs_float16", "x SegGPT fp16", ".2f"), ("peak_mib", "peak MiB", ".0f"),
                       ("added_mib", "added MiB", ".0f")])
    if args.output:
        write_json(args.output, dict(machine=info, command=command, args=vars(args), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
