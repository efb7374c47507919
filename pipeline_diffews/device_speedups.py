"""Device speed-ups of DiffewS that leave the model unchanged: split-statistics GroupNorm on CUDA, bfloat16 on CPU.

Standalone (torch, diffusers): a saved pipeline carries it beside `pipeline_diffews.py`, which imports it relatively.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils import logging

# "auto" converts UNets of at least this size (Stable Diffusion's has 866M parameters); small models stay exact.
CPU_BFLOAT16_MIN_PARAMETERS = 100_000_000

logger = logging.get_logger(__name__)


def split_stats_group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                           eps: float, row_length: int = 8192) -> torch.Tensor:
    """`F.group_norm` for a contiguous x [N, C, ...], with the statistics reduced over many short rows.

    Each group's elements are cut into equal contiguous rows of at least `row_length`; the rows' means and
    variances combine exactly (law of total variance) in float32, then one fused multiply-add normalises in x's
    dtype. Falls back to `F.group_norm` where the groups are too small to cut.
    """
    n, c = x.shape[:2]
    group_size = x.numel() // (n * num_groups)
    rows = 1
    while group_size % (rows * 2) == 0 and group_size // (rows * 2) >= row_length:
        rows *= 2
    if rows == 1 or not x.is_contiguous():
        return F.group_norm(x, num_groups, weight, bias, eps)
    var, mean = torch.var_mean(x.view(n, num_groups, rows, -1), dim=-1, correction=0)
    mean, var = mean.float(), var.float()  # [N, G, rows]
    group_var = var.mean(-1) + mean.var(-1, correction=0)  # [N, G]
    scale = torch.rsqrt(group_var + eps).repeat_interleave(c // num_groups, dim=1)  # [N, C]
    shift = -mean.mean(-1).repeat_interleave(c // num_groups, dim=1) * scale
    if weight is not None:
        scale, shift = scale * weight.float(), shift * weight.float() + bias.float()
    shape = (n, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.view(shape).to(x.dtype), x, scale.view(shape).to(x.dtype))


class SplitStatsGroupNorm(torch.nn.GroupNorm):
    """`torch.nn.GroupNorm` that uses `split_stats_group_norm` on CUDA.

    PyTorch's CUDA kernel gives each (sample, group) pair one thread block: 32 blocks for a batch-1 VAE feature map
    of 128 x 512 x 512, a small part of a GPU, and GroupNorm was 45 % of a cached DiffewS query's GPU time
    (docs/benchmarks.md). Same parameters and state dict as `GroupNorm`; on other devices it is `GroupNorm`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return super().forward(x)
        return split_stats_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def use_split_stats_group_norm(module: torch.nn.Module) -> int:
    """Turns every `GroupNorm` in `module` into a `SplitStatsGroupNorm` in place; returns how many."""
    count = 0
    for child in module.modules():
        if type(child) is torch.nn.GroupNorm:
            child.__class__ = SplitStatsGroupNorm
            count += 1
    return count


def cpu_bfloat16_supported() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where bfloat16 beats float32."""
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        try:
            if getattr(torch.cpu, check)():
                return True
        except (AttributeError, RuntimeError):
            continue
    return False


def prepare_for_device(unet: torch.nn.Module, vae: torch.nn.Module, device: torch.device, cpu_bfloat16) -> None:
    """Once per device, in place: on CPU the bfloat16 conversion that `cpu_bfloat16` asks for, on CUDA the GPU-wide
    GroupNorm statistics. Cheap to call again (a flag marks the modules already swapped).

    cpu_bfloat16: True, False or "auto" (the pipeline's config, see `DiffewSPipeline`).
    """
    if device.type == "cpu":
        _prepare_cpu_bfloat16(unet, vae, cpu_bfloat16)
    if device.type != "cuda":
        return
    for module in (unet, vae):
        if not getattr(module, "_split_stats_group_norm", False):  # walking ~1,000 modules costs ~1 ms per call
            use_split_stats_group_norm(module)
            module._split_stats_group_norm = True


def _prepare_cpu_bfloat16(unet: torch.nn.Module, vae: torch.nn.Module, setting) -> None:
    """Converts a float32 UNet and VAE to bfloat16 + channels_last, once, as `setting` asks."""
    if setting is False or unet.dtype != torch.float32 or vae.dtype != torch.float32:
        return  # never, converted already, or loaded in a dtype of the user's choice
    if setting == "auto":
        if sum(p.numel() for p in unet.parameters()) < CPU_BFLOAT16_MIN_PARAMETERS or not cpu_bfloat16_supported():
            return
    for module in (unet, vae):
        # torch.nn.Module.to: every parameter and buffer, without diffusers' note about modules kept in float32
        torch.nn.Module.to(module, dtype=torch.bfloat16, memory_format=torch.channels_last)
    logger.info("Running the UNet and VAE in bfloat16 on CPU (`cpu_bfloat16=False` keeps float32).")
