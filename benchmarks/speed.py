"""Latency and peak memory of one 512 x 512 query: the authors' way vs the DiffewS pipeline, uncached and cached.

True Stable Diffusion 2.1 UNet and VAE configurations with random weights (compute does not depend on the values).
Rows, for 1, 2 and 5 shots:

- authors' way (float32), written here as the released inference runs: for EVERY query, three separate VAE encodes
  (support images, query, support masks), the support pass as a full UNet forward, the KV-fused query pass, decode;
- ours, float32 (`cpu_bfloat16=False`, the exact path) and ours, defaults (on CPU: bfloat16 weights, see
  `DiffewSPipeline`), each uncached (`pipe(query, support_images=..., support_masks=...)`, everything included) and
  cached (`pipe(query, support=support)` after one `encode_support`, per-query median over --queries queries).

On CUDA (`--device cuda`): the authors' way in float32 and ours in float16 and bfloat16, and the throughput of
cached batches of 1, 4 and 8 queries. Every row has the median wall time, the process CPU time, peak memory, and
the ratio to the authors' way. The first call of the default pipeline on CPU converts its weights; it is timed
apart ("one-time conversion").

Usage:
    python -m benchmarks.speed --output benchmarks/results/speed_cpu.json --plot docs/latency_vs_queries.png
    python -m benchmarks.speed --quick                       # 1 shot, 1 repeat
    python -m benchmarks.speed --device cuda --output benchmarks/results/speed_cuda.json
    python -m benchmarks.speed --plot-from benchmarks/results/speed_cpu.json --plot docs/latency_vs_queries.png
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.common import command_line, episode, machine, machine_summary, print_header, print_table, sd21_components, time_calls, write_json
from diffusers import UNet2DConditionModel
from pipeline_diffews import DiffewSPipeline


# ---------------------------------------------------------------------------------------------------- authors' way


class AuthorsKVProcessor:
    """The released KV-fusion self-attention: "write" stores each layer's K/V (shots along the tokens), "read" appends
    them to the query's K/V. Attention itself is PyTorch SDPA, the kernel diffusers uses by default."""

    def __init__(self, name: str, bank: dict):
        self.name, self.bank = name, bank

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if encoder_hidden_states is None and self.bank["mode"] == "write":
            self.bank["kv"][self.name] = (key.reshape(1, -1, key.shape[-1]), value.reshape(1, -1, value.shape[-1]))
        elif encoder_hidden_states is None and self.bank["mode"] == "read":
            support_key, support_value = self.bank["kv"][self.name]
            key, value = torch.cat([key, support_key], dim=1), torch.cat([value, support_value], dim=1)
        batch, heads = query.shape[0], attn.heads
        head_dim = query.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(batch, -1, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


class AuthorsWay:
    """One query at a time, as the released inference does it, on the given float32 UNet (stock forward) and VAE.

    Call: (query PIL, support PILs, support bool masks) -> bool mask [H, W] at the query's size.
    """

    def __init__(self, unet, vae, resolution: int, device: str = "cpu"):
        self.unet, self.vae, self.resolution, self.device = unet, vae, resolution, device
        self.text = unet.empty_prompt_embeds.detach().clone().to(device)  # the stored [1, 2, 1024] empty prompt
        self.bank = {"mode": "off", "kv": {}}

    def _pixels(self, image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB").resize((self.resolution,) * 2, resample=2), dtype=np.float32)  # bilinear
        return torch.from_numpy(array).permute(2, 0, 1)[None] / 255.0 * 2.0 - 1.0

    def _mask_pixels(self, mask) -> torch.Tensor:
        from PIL import Image

        resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((self.resolution,) * 2, resample=0)  # nearest
        binary = torch.from_numpy(np.asarray(resized) > 127).float()[None, None].repeat(1, 3, 1, 1)
        return binary * 2 - 1

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor

    @torch.no_grad()
    def __call__(self, query, support_images, support_masks) -> np.ndarray:
        prediction = self.predict(query, support_images, support_masks)
        mask = (prediction.mean(0) > 0.25 * prediction.max())[None, None].float()
        return F.interpolate(mask, size=(query.height, query.width), mode="nearest")[0, 0].bool().numpy()

    @torch.no_grad()
    def predict(self, query, support_images, support_masks) -> torch.Tensor:
        """The decoded prediction [3, R, R] in [0, 1] at the processing resolution."""
        processors = self.unet.attn_processors
        self.unet.set_attn_processor({name: AuthorsKVProcessor(name, self.bank) for name in processors})
        try:
            rgb_ref = self._encode(torch.cat([self._pixels(image) for image in support_images]))  # 3 separate encodes
            rgb_tag = self._encode(self._pixels(query))
            gt_ref = self._encode(torch.cat([self._mask_pixels(mask) for mask in support_masks]))
            shots = len(support_images)
            self.bank["mode"], stock_conv_in = "write", self.unet.conv_in
            self.unet.conv_in = self.unet.conv_in_ref
            try:  # support pass: the full stock forward, all shots in one batch
                UNet2DConditionModel.forward(self.unet, torch.cat([rgb_ref, gt_ref], dim=1), 1, self.text.repeat(shots, 1, 1))
            finally:
                self.unet.conv_in = stock_conv_in
            self.bank["mode"] = "read"
            v_pred = UNet2DConditionModel.forward(self.unet, rgb_tag, 1, self.text).sample
            decoded = self.vae.decode(-v_pred / self.vae.config.scaling_factor).sample
        finally:
            self.bank["mode"] = "off"
            self.bank["kv"].clear()
            self.unet.set_attn_processor(processors)
        return ((decoded.float().clamp(-1, 1) + 1) / 2)[0].cpu()


# ---------------------------------------------------------------------------------------------------- runs


def ours_rows(pipe, name: str, data: dict, args, authors_median: float, reference_masks=None) -> list[dict]:
    """Uncached and cached rows of one pipeline and one episode (cached: over the episode's first args.queries)."""
    support_images, support_masks = data["support_images"], data["support_masks"]
    queries = data["queries"][: args.queries]
    shots = len(support_images)
    query = queries[0]
    outputs = {}

    def uncached():
        outputs["uncached"] = pipe(query, support_images=support_images, support_masks=support_masks).masks[0]

    rows = [_row(f"{name}, uncached", shots, time_calls(uncached, args.repeats, warmup=0, device=args.device),
                 authors_median)]
    support_time = time_calls(lambda: outputs.update(support=pipe.encode_support(support_images, support_masks)),
                              1, warmup=0, device=args.device)
    support = outputs["support"]
    per_query = []
    for q in queries:
        per_query.append(time_calls(lambda: pipe(q, support=support), 1, warmup=0, device=args.device))
    cached = dict(
        median=float(np.median([r["median"] for r in per_query])),
        min=min(r["min"] for r in per_query),
        max=max(r["max"] for r in per_query),
        runs=[r["median"] for r in per_query],
        cpu_s=float(np.median([r["cpu_s"] for r in per_query])),
        peak_mib=max(r["peak_mib"] for r in per_query),
        added_mib=max(r["added_mib"] for r in per_query),
    )
    row = _row(f"{name}, cached (per query)", shots, cached, authors_median)
    row["encode_support_s"] = support_time["median"]
    rows.append(row)
    if reference_masks is not None:
        rows[0]["mask_agreement_vs_float32"] = float((outputs["uncached"] == reference_masks).mean())
    rows[0]["mask"] = outputs["uncached"]
    return rows


def _row(method: str, shots: int, result: dict, authors_median: float | None) -> dict:
    row = dict(method=method, shots=shots, median_s=result["median"], min_s=result["min"], max_s=result["max"],
               runs=result["runs"], cpu_s=result.get("cpu_s"), peak_mib=result["peak_mib"], added_mib=result["added_mib"])
    if authors_median:
        row["speedup_vs_authors"] = authors_median / result["median"]
    return row


def run_cpu(args) -> dict:
    unet, vae = sd21_components()
    authors = AuthorsWay(unet, vae, common.RESOLUTION)
    exact = DiffewSPipeline(unet=unet, vae=vae, processing_resolution=common.RESOLUTION, cpu_bfloat16=False)  # shares the float32 weights with the authors' way
    exact.set_progress_bar_config(disable=True)
    fast_unet, fast_vae = sd21_components(copy_weights=True)
    fast = DiffewSPipeline(unet=fast_unet, vae=fast_vae, processing_resolution=common.RESOLUTION)  # defaults
    fast.set_progress_bar_config(disable=True)

    warm = episode(1, 1, seed=100)
    start = time.perf_counter()
    fast(warm["queries"][0], support_images=warm["support_images"], support_masks=warm["support_masks"])
    first_call = time.perf_counter() - start
    print(f"default pipeline on CPU: weights now {fast.unet.dtype}; first call (one-time conversion included) "
          f"{first_call:.1f} s", flush=True)
    if not args.no_warmup_fp32:
        authors(warm["queries"][0], warm["support_images"], warm["support_masks"])
        exact(warm["queries"][0], support_images=warm["support_images"], support_masks=warm["support_masks"])

    rows = []
    for shots in args.shots:
        data = episode(shots, args.queries, seed=shots)
        query, support_images, support_masks = data["queries"][0], data["support_images"], data["support_masks"]
        print(f"{shots} shot(s)", flush=True)
        outputs = {}

        def authors_call():
            outputs["authors"] = authors(query, support_images, support_masks)

        result = time_calls(authors_call, args.fp32_repeats, warmup=0)
        rows.append(_row("authors' way, float32", shots, result, result["median"]))
        authors_median = result["median"]
        print(f"  authors' way {authors_median:.1f} s", flush=True)
        exact_args = _with(args, repeats=args.fp32_repeats, queries=min(args.fp32_queries, args.queries))
        exact_rows = ours_rows(exact, "ours, float32", data, exact_args, authors_median)
        exact_rows[0]["mask_agreement_vs_authors"] = float((exact_rows[0]["mask"] == outputs["authors"]).mean())
        fast_rows = ours_rows(fast, f"ours, defaults ({str(fast.unet.dtype).split('.')[-1]})", data, args,
                              authors_median, reference_masks=exact_rows[0]["mask"])
        if shots == 1 and not args.no_parity:
            exact_rows[0].update(parity_at_processing_resolution(authors, exact, data))
        for row in exact_rows + fast_rows:
            row.pop("mask", None)
            print(f"  {row['method']:40s} {row['median_s']:.2f} s  x{row['speedup_vs_authors']:.1f}", flush=True)
        rows += exact_rows + fast_rows
    return dict(rows=rows, first_call_with_conversion_s=first_call)


def parity_at_processing_resolution(authors: AuthorsWay, pipe, data: dict) -> dict:
    """Ours vs the authors' way at the processing resolution, where both threshold the same map (at the query's size
    the authors' code upsamples the mask with nearest neighbours, the pipeline the probabilities bilinearly)."""
    query, support_images, support_masks = data["queries"][0], data["support_images"], data["support_masks"]
    prediction = authors.predict(query, support_images, support_masks)
    reference = prediction.mean(0).numpy()
    reference_mask = reference > 0.25 * prediction.max().item()
    out = pipe(query, support_images=support_images, support_masks=support_masks, match_input_resolution=False)
    parity = dict(parity_mask_agreement=float((out.masks[0] == reference_mask).mean()),
                  parity_max_abs_probability=float(np.abs(out.probabilities[0] - reference).max()))
    print(f"  parity with the authors' way at {reference.shape[0]} px: masks agree on "
          f"{100 * parity['parity_mask_agreement']:.2f} % of pixels, max |p - p_ref| "
          f"{parity['parity_max_abs_probability']:.2e}", flush=True)
    return parity


def run_cuda(args) -> dict:
    """Authors' way in float32, ours in float16 and bfloat16: latency, cached-batch throughput, peak memory."""
    device = args.device
    unet, vae = sd21_components()
    rows, throughput = [], []
    unet.to(device), vae.to(device)
    authors = AuthorsWay(unet, vae, common.RESOLUTION, device=device)
    warm = episode(1, 1, seed=100)
    authors(warm["queries"][0], warm["support_images"], warm["support_masks"])
    authors_median = {}
    for shots in args.shots:
        data = episode(shots, 1, seed=shots)
        result = time_calls(lambda: authors(data["queries"][0], data["support_images"], data["support_masks"]),
                            args.repeats, warmup=1, device=device)
        authors_median[shots] = result["median"]
        rows.append(_row("authors' way, float32", shots, result, result["median"]))
    unet.to("cpu"), vae.to("cpu")
    del authors
    gc.collect()
    torch.cuda.empty_cache()

    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        gpu_unet, gpu_vae = sd21_components(copy_weights=True)
        pipe = DiffewSPipeline(unet=gpu_unet, vae=gpu_vae, processing_resolution=common.RESOLUTION).to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        pipe(warm["queries"][0], support_images=warm["support_images"], support_masks=warm["support_masks"])
        for shots in args.shots:
            data = episode(shots, args.queries, seed=shots)
            rows += [{k: v for k, v in row.items() if k != "mask"}
                     for row in ours_rows(pipe, f"ours, {name}", data, args, authors_median[shots])]
        data = episode(1, max(args.batch_sizes), seed=1)
        support = pipe.encode_support(data["support_images"], data["support_masks"])
        for batch in args.batch_sizes:
            queries = data["queries"][:batch]
            result = time_calls(lambda: pipe(queries, support=support, batch_size=batch), args.repeats, warmup=1,
                                device=device)
            throughput.append(dict(dtype=name, batch_size=batch, median_s=result["median"],
                                   queries_per_s=batch / result["median"], peak_mib=result["peak_mib"]))
        del pipe, gpu_unet, gpu_vae, support
        gc.collect()
        torch.cuda.empty_cache()
    return dict(rows=rows, throughput=throughput)


def _with(args, **changes):
    return argparse.Namespace(**{**vars(args), **changes})


# ---------------------------------------------------------------------------------------------------- plot


def latency_curves(results: dict, shots: int = 1) -> dict:
    """Per-query latency for n = 1..Q queries: uncached = the median uncached call; cached = (encode_support + the
    first n cached calls) / n; the authors' way = its median. Returns {label: (n values, seconds)}."""
    rows = [r for r in results["rows"] if r["shots"] == shots]
    curves = {}
    for row in rows:
        if row["method"].startswith("authors"):
            curves[row["method"]] = None, row["median_s"]
        elif row["method"].endswith("uncached"):
            curves[row["method"]] = None, row["median_s"]
        elif "cached" in row["method"]:
            cumulative = row["encode_support_s"] + np.cumsum(row["runs"])
            n = np.arange(1, len(row["runs"]) + 1)
            curves[row["method"].replace(" (per query)", "")] = n, cumulative / n
    count = max((len(n) for n, _ in curves.values() if n is not None), default=5)
    return {label: (np.arange(1, count + 1), np.full(count, value)) if n is None else (n, value)
            for label, (n, value) in curves.items()}


def plot(results: dict, path: str, shots: int = 1) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for label, (n, seconds) in latency_curves(results, shots).items():
        style = "--" if "uncached" in label or label.startswith("authors") else "-"
        ax.plot(n, seconds, style, marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xticks(range(1, 1 + max(len(n) for n, _ in latency_curves(results, shots).values())))
    ax.set_xlabel("queries segmented with the same supports")
    ax.set_ylabel("seconds per query (log)")
    info = results["machine"]
    where = info.get("gpu") or machine_summary(info)
    ax.set_title(f"DiffewS, {shots}-shot, 512 px, SD 2.1 sizes, random weights: {where}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 5])
    parser.add_argument("--repeats", type=int, default=3, help="timed uncached calls of the fast paths (median)")
    parser.add_argument("--fp32-repeats", type=int, default=1, help="timed calls of the float32 paths on CPU")
    parser.add_argument("--queries", type=int, default=5, help="cached queries per episode")
    parser.add_argument("--fp32-queries", type=int, default=3, help="cached queries of the float32 path on CPU")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8], help="cached batches (CUDA)")
    parser.add_argument("--quick", action="store_true", help="1 shot, 1 repeat, 3 cached queries")
    parser.add_argument("--no-warmup-fp32", action="store_true", help="skip the untimed float32 warm-up calls")
    parser.add_argument("--no-parity", action="store_true", help="skip the 1-shot parity check with the authors' way")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", help="write the results as JSON")
    parser.add_argument("--plot", help="write the latency-vs-queries plot (PNG) of the 1-shot rows")
    parser.add_argument("--plot-from", help="only redraw --plot from a JSON written by this script")
    args = parser.parse_args(argv)
    if args.plot_from:
        plot(json.loads(Path(args.plot_from).read_text()), args.plot or "latency_vs_queries.png")
        return 0
    if args.quick:
        args.shots, args.repeats, args.fp32_repeats, args.queries = [1], 1, 1, 3
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    info = machine()
    command = command_line("benchmarks.speed", argv)
    print_header(command, info)
    results = run_cuda(args) if args.device.startswith("cuda") else run_cpu(args)
    results.update(machine=info, command=command, args=vars(args))

    print()
    print_table(results["rows"], [
        ("shots", "shots", "d"), ("method", "method", ""), ("median_s", "median s", ".2f"), ("cpu_s", "CPU s", ".1f"),
        ("speedup_vs_authors", "x authors", ".1f"), ("peak_mib", "peak MiB", ".0f"), ("added_mib", "added MiB", ".0f"),
        ("mask_agreement_vs_float32", "agree vs fp32", ".4f"), ("parity_mask_agreement", "agree vs authors @512", ".4f"),
    ])
    if results.get("throughput"):
        print()
        print_table(results["throughput"], [("dtype", "dtype", ""), ("batch_size", "batch", "d"),
                                            ("queries_per_s", "queries/s", ".2f"), ("peak_mib", "peak MiB", ".0f")])
    if args.output:
        write_json(args.output, results)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
