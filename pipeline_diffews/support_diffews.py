"""Cached supports: `DiffewSSupport` (one episode's keys/values, tokens or latents, per class), growing one by new
shots, and the batching of episodes by shot count."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch


@dataclass
class DiffewSSupport:
    """Cached supports of one episode: the K/V of every self-attention layer, ready to be reused by any query.

    Made by `DiffewSPipeline.encode_support` (which can also grow one by new shots: `extend=`); pass it as
    `pipe(image, support=...)`. `num_shots` counts every shot. A multi-class support set has `key_values=None` and
    one cache per class in `class_key_values` (in `class_ids` order; a class's cache holds the shots that show it),
    with `class_ids`, `class_names` and `palette` as in `DiffewSPipelineOutput`.
    """

    key_values: Any  # one episode: unet_diffews.SupportKeyValues (or SupportTokens, ...); None with several classes
    num_shots: int
    processing_resolution: int
    class_ids: list | None = None
    class_names: list | None = None
    class_key_values: list | None = None  # one single-episode unet_diffews.SupportKeyValues per class
    palette: list | None = None

    @property
    def is_multiclass(self) -> bool:
        return self.class_ids is not None

    @property
    def caches(self) -> list:
        """The cache of each class, in `class_ids` order: `[key_values]` for one class."""
        return list(self.class_key_values) if self.is_multiclass else [self.key_values]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DiffewSSupport":
        """A copy whose caches live on `device` (and in `dtype`), e.g. `support.to("cpu")` to keep it off the GPU."""
        moved = [cache.to(device=device, dtype=dtype) for cache in self.caches]
        if self.is_multiclass:
            return replace(self, class_key_values=moved)
        return replace(self, key_values=moved[0])


def groups(items: list, shots: list[int], batch_size: int) -> list[list]:
    """`items` in batches of up to `batch_size` with equal `shots` (one shot count per batch, in first-seen order)."""
    batches = []
    for count in dict.fromkeys(shots):
        same = [item for item, n in zip(items, shots) if n == count]
        batches += [same[k : k + batch_size] for k in range(0, len(same), batch_size)]
    return batches


def offsets(counts: list[int]) -> list[int]:
    """Start index of each of consecutive runs of `counts` items."""
    starts, total = [], 0
    for count in counts:
        starts.append(total)
        total += count
    return starts


def extended(old: DiffewSSupport, new: DiffewSSupport) -> DiffewSSupport:
    """The support holding the shots of `old`, then those of `new` (both one class, or both several classes)."""
    if not old.is_multiclass:
        key_values = type(old.key_values).cat_shots([old.key_values, new.key_values])
        return DiffewSSupport(key_values, old.num_shots + new.num_shots, old.processing_resolution)
    named = old.class_names is not None  # classes of dicts: keyed by name, ids 1..K in first-seen order
    if named != (new.class_names is not None):
        form = "dicts {name: mask}" if named else "label maps"
        raise ValueError(f"`extend` holds classes read from {form}: give the new shots' masks in the same form.")
    old_keys, new_keys = old.class_names or old.class_ids, new.class_names or new.class_ids
    keys = list(dict.fromkeys(old_keys + new_keys)) if named else sorted(set(old_keys) | set(new_keys))
    caches = []
    for key in keys:
        parts = [s.class_key_values[k.index(key)] for s, k in ((old, old_keys), (new, new_keys)) if key in k]
        caches.append(parts[0] if len(parts) == 1 else type(parts[0]).cat_shots(parts))
    return DiffewSSupport(
        key_values=None,
        num_shots=old.num_shots + new.num_shots,
        processing_resolution=old.processing_resolution,
        class_ids=list(range(1, len(keys) + 1)) if named else keys,
        class_names=keys if named else None,
        class_key_values=caches,
        palette=old.palette or new.palette,
    )
