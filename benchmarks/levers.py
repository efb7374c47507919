"""Each CPU speed lever, measured on its own on the true-size Stable Diffusion 2.1 UNet and VAE (random weights).

Components: VAE encode of one 512 x 512 image, VAE decode of one 64 x 64 latent, the UNet support pass (1 shot) and the
UNet query pass (1 shot, fused with the support K/V). Each lever is a variant of the baseline named beside it:

- float32 (baseline), + channels_last, + bfloat16 autocast (float32 weights, cast per call), + oneDNN implicit bfloat16
  (`torch.backends.mkldnn.{matmul,conv}.fp32_precision = "bf16"`, float32 weights);
- bfloat16 weights, + channels_last, + 1 thread instead of all cores;
- structural (bfloat16, channels_last): the three encodes of a 1-shot query (support image, support mask, query) in
  one VAE batch vs three; the support pass stopped after the last self-attention layer vs the full UNet forward;
  SDPA vs explicit softmax attention in the UNet.

Usage:
    python -m benchmarks.levers --output benchmarks/results/levers.json
    python -m benchmarks.levers --quick            # 1 repeat, the VAE decode and the UNet query pass only
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch

from benchmarks import common
from benchmarks.common import command_line, machine, print_header, print_table, sd21_components, time_calls, write_json
from diffusers import UNet2DConditionModel
from pipeline_diffews.unet_diffews import _KVFusionState

COMPONENTS = ("encode", "decode", "support_pass", "query_pass")


@contextlib.contextmanager
def onednn_bf16_precision():
    matmul, conv = torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = torch.backends.mkldnn.conv.fp32_precision = "bf16"
    try:
        yield
    finally:
        torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.conv.fp32_precision = matmul, conv


@contextlib.contextmanager
def num_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ExplicitSoftmaxKV:
    """KV-fusion self-attention with explicit `softmax(QK^T / sqrt(d)) V` (no SDPA), for the SDPA lever."""

    def __init__(self, name):
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, kv_fusion=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if encoder_hidden_states is None and kv_fusion is not None:
            k, v = kv_fusion.apply(self.name, k, v)
        b, heads = q.shape[0], attn.heads
        d = q.shape[-1] // heads
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, -1, heads * d)
        return attn.to_out[1](attn.to_out[0](out))


def full_support_pass(unet, support_sample):
    """The support pass as one plain UNet forward to the end (what `encode_support` cuts short)."""
    recorder = _KVFusionState(record_shots=support_sample.shape[1])
    with unet._support_input():
        UNet2DConditionModel.forward(
            unet, support_sample.flatten(0, 1), 1, unet._conditioning(None, support_sample.shape[1]),
            cross_attention_kwargs={"kv_fusion": recorder},
        )
    return recorder.recorded


class Bench:
    def __init__(self, repeats: int):
        self.repeats = repeats
        self.rows = []

    def time(self, lever: str, component: str, fn, context=contextlib.nullcontext, baseline: str | None = None):
        with context():
            result = time_calls(fn, self.repeats, warmup=1)
        row = dict(lever=lever, component=component, median_s=result["median"], min_s=result["min"],
                   runs=result["runs"], cpu_s=result["cpu_s"], added_mib=result["added_mib"], baseline=baseline)
        self.rows.append(row)
        print(f"  {lever:42s} {component:13s} median {result['median']:7.2f} s  min {result['min']:7.2f} s", flush=True)
        return row


def component_fns(unet, vae, dtype, memory_format):
    """Callables for each component, with inputs in `dtype` and `memory_format`."""
    size = common.RESOLUTION
    latent_size = size // 2 ** (len(vae.config.block_out_channels) - 1)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, size, size, generator=generator).clamp(-1, 1).to(dtype).contiguous(memory_format=memory_format)
    latent = torch.randn(1, 4, latent_size, latent_size, generator=generator).to(dtype).contiguous(memory_format=memory_format)
    support = torch.randn(1, 1, 8, latent_size, latent_size, generator=generator).to(dtype)
    key_values = unet.encode_support(support, 1)
    return {
        "encode": lambda: vae.encode(image).latent_dist.mode(),
        "decode": lambda: vae.decode(latent).sample,
        "support_pass": lambda: unet.encode_support(support, 1),
        "query_pass": lambda: unet(latent, 1, support_key_values=key_values).sample,
    }


def to_format(module, dtype=None, memory_format=torch.contiguous_format):
    # torch.nn.Module.to: no diffusers warning about keeping modules in float32 (none need it here)
    return torch.nn.Module.to(module, dtype=dtype, memory_format=memory_format)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per lever and component (after 1 warm-up)")
    parser.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS))
    parser.add_argument("--quick", action="store_true", help="1 repeat; decode and query pass only")
    parser.add_argument("--skip-float32", action="store_true", help="skip the float32-based levers (the slowest)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.components = 1, ["decode", "query_pass"]
    torch.set_grad_enabled(False)
    bench = Bench(args.repeats)
    info = machine()
    print_header(command_line("benchmarks.levers", argv), info)

    unet, vae = sd21_components()
    cl = torch.channels_last

    def run_all(lever, dtype, memory_format, context=contextlib.nullcontext, baseline=None):
        fns = component_fns(unet, vae, dtype, memory_format)
        for component in args.components:
            bench.time(lever, component, fns[component], context, baseline)

    if not args.skip_float32:
        print("float32 weights")
        run_all("float32", torch.float32, torch.contiguous_format)
        run_all("float32 + bf16 autocast (per call)", torch.float32, torch.contiguous_format,
                lambda: torch.autocast("cpu", dtype=torch.bfloat16), baseline="float32")
        run_all("float32 + oneDNN implicit bf16", torch.float32, torch.contiguous_format, onednn_bf16_precision,
                baseline="float32")
        to_format(unet, memory_format=cl), to_format(vae, memory_format=cl)
        run_all("float32 + channels_last", torch.float32, cl, baseline="float32")

    print("bfloat16 weights")
    to_format(unet, torch.bfloat16), to_format(vae, torch.bfloat16)
    run_all("bfloat16", torch.bfloat16, torch.contiguous_format, baseline="float32")
    to_format(unet, memory_format=cl), to_format(vae, memory_format=cl)
    run_all("bfloat16 + channels_last", torch.bfloat16, cl, baseline="bfloat16")
    if torch.get_num_threads() > 1:
        run_all(f"bfloat16 + channels_last, 1 thread (not {torch.get_num_threads()})", torch.bfloat16, cl,
                lambda: num_threads(1), baseline="bfloat16 + channels_last")

    print("structural levers (bfloat16 + channels_last)")
    reference = "bfloat16 + channels_last"
    generator = torch.Generator().manual_seed(1)
    size = common.RESOLUTION
    latent_size = size // 2 ** (len(vae.config.block_out_channels) - 1)
    three = torch.randn(3, 3, size, size, generator=generator).clamp(-1, 1).to(torch.bfloat16).contiguous(memory_format=cl)
    bench.time("3 encodes, one VAE batch of 3", "encode x3", lambda: vae.encode(three).latent_dist.mode())
    bench.time("3 encodes, 3 VAE calls", "encode x3", lambda: [vae.encode(three[i : i + 1]).latent_dist.mode() for i in range(3)],
               baseline="3 encodes, one VAE batch of 3")
    support = torch.randn(1, 1, 8, latent_size, latent_size, generator=generator).to(torch.bfloat16)
    bench.time("support pass, stopped after last self-attention", "support_pass", lambda: unet.encode_support(support, 1),
               baseline="support pass, full UNet forward")
    bench.time("support pass, full UNet forward", "support_pass", lambda: full_support_pass(unet, support))
    fns = component_fns(unet, vae, torch.bfloat16, cl)
    unet.set_attn_processor({name: ExplicitSoftmaxKV(name) for name in unet.attn_processors})
    bench.time("explicit softmax attention", "query_pass", fns["query_pass"], baseline=reference)
    unet.set_default_attn_processor()

    print()
    print_table(bench.rows, [("lever", "lever", ""), ("component", "component", ""), ("median_s", "median s", ".2f"),
                             ("min_s", "min s", ".2f"), ("cpu_s", "CPU s", ".2f")])
    if args.output:
        write_json(args.output, dict(machine=info, command=command_line("benchmarks.levers", argv),
                                     repeats=args.repeats, rows=bench.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
