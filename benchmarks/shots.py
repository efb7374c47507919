"""Time per query against the number of shots, with a cached support, in float32 and bfloat16 side by side.

True Stable Diffusion 2.1 UNet and VAE configurations with random weights (compute does not depend on the values),
one 640 x 480 query processed at 512 x 512. For each precision:

- the support cost per shot: `encode_support` of one shot (two VAE encodes and the support pass), which is what
  adding one shot to a cached support costs (shots are encoded independently, so N shots cost N times this);
- the time of one cached query, `pipe(query, support=support)`, for 1, 5 and 10 shots (the support pass excluded),
  and its ratio to 1 shot. Only the query pass's self-attention grows with the shots (each layer attends to the
  query's tokens plus N times as many support tokens). The N-shot caches repeat the one encoded shot's keys/values
  N times: the same shapes, hence the same compute, as N different shots;
- the same query with support-token sampling (`support_token_sampling=True`: each layer's support keys/values
  sampled at random down to one shot's count), for every shot count above the smallest, beside the others.

Calls are interleaved (1, 5, 10, 1, 5, 10, ...) so that a change in the machine's load touches every shot count;
each call records its wall time and the process's CPU time, and the load average is recorded before and after.

Usage (from the repository root):
    python -m benchmarks.shots --threads 2 --output benchmarks/results/shots_cpu.json
    python -m benchmarks.shots --shots 1 5 --repeats 1 --dtypes bfloat16     # quicker
    python -m benchmarks.shots --dtypes bfloat16 --resolution 256 --threads 2 \
        --output benchmarks/results/shots_sampling_cpu_256px.json               # token sampling at a small size
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import (
    RESOLUTION,
    command_line,
    episode,
    load_average,
    machine,
    print_header,
    print_table,
    sd21_components,
    time_calls,
    write_json,
)
from pipeline_diffews import DiffewSPipeline, DiffewSSupport
from pipeline_diffews.unet_diffews import SupportKeyValues

DTYPES = ("float32", "bfloat16")


def repeated_support(support: DiffewSSupport, shots: int) -> DiffewSSupport:
    """A cache of `shots` shots made of `support`'s one-shot keys/values repeated along the token axis."""
    kv = support.key_values
    layers = {name: (k.repeat(1, shots, 1), v.repeat(1, shots, 1)) for name, (k, v) in kv.layers.items()}
    return DiffewSSupport(key_values=SupportKeyValues(layers, kv.num_episodes, shots), num_shots=shots,
                          processing_resolution=support.processing_resolution)


def cache_mib(support: DiffewSSupport) -> float:
    """MiB held by a cached support's keys and values."""
    tensors = [t for pair in support.key_values.layers.values() for t in pair]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def cpu_precision() -> dict:
    """What torch reports about this CPU's reduced-precision support."""
    info = dict(cpu_capability=torch.backends.cpu.get_cpu_capability(),
                mkldnn_bf16_supported=bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    init_amx = getattr(torch._C._cpu, "_init_amx", None)
    if init_amx is not None:
        info["amx_tile_usable"] = bool(init_amx())
    return info


def run_dtype(name: str, args) -> dict:
    """Support cost per shot and cached per-query times of one precision."""
    unet, vae = sd21_components(copy_weights=name != "float32")
    pipe = DiffewSPipeline(unet=unet, vae=vae, processing_resolution=args.resolution, cpu_bfloat16=name == "bfloat16")
    pipe.set_progress_bar_config(disable=True)
    data = episode(1, 1, seed=1)
    query = data["queries"][0]
    result = dict(dtype=name, load_average_before=load_average())

    start = time.perf_counter()
    one_shot = pipe.encode_support(data["support_images"], data["support_masks"])
    pipe(query, support=one_shot)  # warm-up (and, for bfloat16, the one-time conversion before it)
    result["warmup_s"] = time.perf_counter() - start
    result["weights_dtype"] = str(pipe.unet.dtype).split(".")[-1]
    result["cache_mib_per_shot"] = cache_mib(one_shot)
    print(f"{name}: weights {result['weights_dtype']}, warm-up {result['warmup_s']:.1f} s", flush=True)

    support_time = time_calls(lambda: pipe.encode_support(data["support_images"], data["support_masks"]),
                              args.support_repeats, warmup=0)
    result["support_per_shot"] = dict(median_s=support_time["median"], runs=support_time["runs"],
                                      cpu_s=support_time["cpu_s"], peak_mib=support_time["peak_mib"])
    print(f"  encode_support, 1 shot: {support_time['median']:.2f} s", flush=True)

    supports = {shots: repeated_support(one_shot, shots) for shots in args.shots}
    # (shots, token sampling): every count plain, and sampled above the smallest count
    calls = {(shots, sampled): [] for shots in args.shots
             for sampled in ((False, True) if shots > min(args.shots) else (False,))}
    for _ in range(args.repeats):
        for shots, sampled in calls:
            options = dict(support_token_sampling=True, generator=torch.Generator().manual_seed(0)) if sampled else {}
            timed = time_calls(lambda: pipe(query, support=supports[shots], **options), 1, warmup=0)
            calls[shots, sampled].append(timed)
            print(f"  {shots:2d} shots{', sampled' if sampled else ''}: {timed['median']:.2f} s "
                  f"(CPU {timed['cpu_s']:.1f} s)", flush=True)

    rows = []
    for (shots, sampled), timings in calls.items():
        runs = [c["median"] for c in timings]
        rows.append(dict(dtype=name, shots=shots, token_sampling=sampled, median_s=statistics.median(runs), runs=runs,
                         cpu_s=statistics.median(c["cpu_s"] for c in timings),
                         peak_mib=max(c["peak_mib"] for c in timings),
                         added_mib=max(c["added_mib"] for c in timings)))
    base = next(r for r in rows if r["shots"] == min(args.shots))
    for row in rows:
        row["ratio_vs_1_shot"] = row["median_s"] / base["median_s"]
        row["cpu_ratio_vs_1_shot"] = row["cpu_s"] / base["cpu_s"]
        row["support_s"] = row["shots"] * result["support_per_shot"]["median_s"]
    result["rows"] = rows
    result["load_average_after"] = load_average()
    return result


def plain_rows(rows: list[dict]) -> list[dict]:
    """The rows without support-token sampling."""
    return [r for r in rows if not r.get("token_sampling")]


def shots_within(rows: list[dict], factor: float, key: str = "cpu_s") -> float:
    """The largest shot count whose query costs at most `factor` x the 1-shot query, from the line through the
    fewest- and most-shot measurements (time = a + b x shots)."""
    first, last = min(rows, key=lambda r: r["shots"]), max(rows, key=lambda r: r["shots"])
    slope = (last[key] - first[key]) / (last["shots"] - first["shots"])
    intercept = first[key] - slope * first["shots"]
    one_shot = intercept + slope
    return float("inf") if slope <= 0 else (factor * one_shot - intercept) / slope


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES),
                        help="float32: cpu_bfloat16=False; bfloat16: the CPU fast path (cpu_bfloat16=True)")
    parser.add_argument("--repeats", type=int, default=2, help="timed cached queries per shot count")
    parser.add_argument("--support-repeats", type=int, default=2, help="timed one-shot encode_support calls")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--resolution", type=int, default=RESOLUTION,
                        help=f"processing resolution (default {RESOLUTION}; smaller is quicker, with fewer tokens per "
                             "layer)")
    parser.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args(argv)
    if min(args.shots) < 1 or len(set(args.shots)) < 2:
        parser.error("--shots: give at least two different counts >= 1")
    args.shots = sorted(set(args.shots))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    info = dict(machine(), **cpu_precision())
    command = command_line("benchmarks.shots", argv)
    print_header(command, info)
    print(f"torch on this CPU: {cpu_precision()}", flush=True)
    if "bfloat16" in args.dtypes and not info["mkldnn_bf16_supported"]:
        print("note: torch reports no native bfloat16 on this CPU; the bfloat16 rows are emulated", flush=True)
    results = dict(command=command, machine=info, args=vars(args),
                   by_dtype=[run_dtype(name, args) for name in args.dtypes])
    results["machine"]["load_average_at_end"] = load_average()
    for entry in results["by_dtype"]:
        entry["shots_within_3x_of_1_shot"] = dict(
            wall=shots_within(plain_rows(entry["rows"]), 3.0, "median_s"),
            cpu=shots_within(plain_rows(entry["rows"]), 3.0, "cpu_s"))

    print()
    print_table([dict(row, support_per_shot_s=entry["support_per_shot"]["median_s"])
                 for entry in results["by_dtype"] for row in entry["rows"]], [
        ("dtype", "precision", ""), ("shots", "shots", "d"), ("token_sampling", "token sampling", ""),
        ("median_s", "s per query", ".2f"),
        ("cpu_s", "CPU s", ".1f"), ("ratio_vs_1_shot", "x 1 shot", ".2f"), ("cpu_ratio_vs_1_shot", "CPU x 1 shot", ".2f"),
        ("support_per_shot_s", "support s / shot", ".2f"), ("peak_mib", "peak MiB", ".0f"),
    ])
    if args.output:
        write_json(args.output, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
