"""The DiffewS UNet: Stable Diffusion's UNet plus a support input, reading the support the way its design says.

The default design (`kv_fusion` + `concat`): the support (image latent and mask latent, 8 channels) enters through
`conv_in_ref`, the query (image latent, 4 channels) through the stock `conv_in`. Every self-attention layer (`attn1`)
records its keys and values during the support pass; during the query pass it attends over its own keys and values
followed by those of every shot. Cross-attention (`attn2`) is untouched.

The other designs of the paper (config `design`, a dict with `interaction` and `mask_injection` among its keys):
- `qkv_fusion`: supports and queries run through the UNet in one batch; each query attends over its own and its
  shots' keys/values, each shot over its own and its query's. Nothing can be cached.
- `tokenized_cross_attention`: no fusion; the support's image-encoder tokens, projected by `support_token_proj` to
  the cross-attention width, replace the empty prompt in every cross-attention layer.
- `attention_mask`: the support sample carries the object mask as a last channel (latent grid, or a flag per token);
  the query's attention to support tokens outside it gets an additive bias of -10000 (zero weight), the mask
  nearest-resized to each layer's grid. Its own tokens are unrestricted.
- Support-token sampling (`support_token_sampling=True`): each layer attends over a random subset of the shots'
  keys/values as large as one shot's, so an N-shot query costs about what a 1-shot query costs.

This file is self-contained (torch and diffusers only): the Hub serves it as `unet/unet_diffews.py`.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

SELF_ATTENTION_SUFFIX = "attn1.processor"
MASKED_OUT_BIAS = -10000.0  # the authors' attention-mask bias: exp(-10000) is 0 in float32
DEFAULT_DESIGN = {"interaction": "kv_fusion", "mask_injection": "concat"}


def _token_bias(inside: torch.Tensor) -> torch.Tensor:
    """{0, 1} inside-the-mask flags [..., L] -> additive attention biases [..., L] (0 inside, -10000 outside)."""
    return (1 - inside.float()) * MASKED_OUT_BIAS


def _grid_bias(grid: torch.Tensor, tokens: int) -> torch.Tensor:
    """Object masks [K, 1, h, w] in {0, 1} -> biases [K, tokens] of a layer whose feature map has `tokens` tokens
    (the mask nearest-resized to that map: h / f x w / f with f = sqrt(h w / tokens))."""
    height, width = grid.shape[-2:]
    factor = round(math.sqrt(height * width / tokens))
    resized = F.interpolate(grid.float(), size=(height // factor, width // factor), mode="nearest")
    return _token_bias(resized.flatten(1))


@dataclass
class SupportKeyValues:
    """Keys and values of every self-attention layer, recorded by the support pass (`kv_fusion`).

    `layers[name] = (key, value)`, each of shape [E, N * L, C]: E episodes, N shots per episode (concatenated along
    the token axis in shot order), L tokens of that layer's feature map, C channels (after the linear projections).
    `biases[name]`: [E, N * L] additive attention biases of those tokens (`attention_mask` injection), else None.
    """

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_episodes: int
    num_shots: int
    biases: dict[str, torch.Tensor] | None = None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SupportKeyValues":
        layers = {name: (k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for name, (k, v) in self.layers.items()}
        biases = None if self.biases is None else {name: b.to(device=device) for name, b in self.biases.items()}
        return SupportKeyValues(layers, self.num_episodes, self.num_shots, biases)

    @classmethod
    def cat(cls, items: list["SupportKeyValues"]) -> "SupportKeyValues":
        """Stacks the episodes of several caches that have the same number of shots."""
        if len({item.num_shots for item in items}) != 1:
            raise ValueError("Support caches with different numbers of shots cannot share a batch.")
        if len(items) == 1:
            return items[0]
        layers = {
            name: (torch.cat([item.layers[name][0] for item in items]), torch.cat([item.layers[name][1] for item in items]))
            for name in items[0].layers
        }
        biases = _joined_biases(items, lambda parts: torch.cat(parts))
        return cls(layers, sum(item.num_episodes for item in items), items[0].num_shots, biases)

    @classmethod
    def cat_shots(cls, items: list["SupportKeyValues"]) -> "SupportKeyValues":
        """Joins caches of the same episodes shot-wise: the shots of `items[0]`, then those of `items[1]`, ...

        The support pass treats every shot on its own, so this equals one support pass over all the shots. Tensors
        go to the device and dtype of the last cache.
        """
        if len({item.num_episodes for item in items}) != 1:
            raise ValueError("Support caches with different numbers of episodes cannot be joined shot-wise.")
        if any(item.layers.keys() != items[0].layers.keys() for item in items):
            raise ValueError("Support caches of different UNets cannot be joined: their self-attention layers differ.")
        reference = next(iter(items[-1].layers.values()))[0]
        layers = {
            name: tuple(
                torch.cat([item.layers[name][j].to(reference.device, reference.dtype) for item in items], dim=1)
                for j in (0, 1)
            )
            for name in items[0].layers
        }
        biases = _joined_biases(items, lambda parts: torch.cat([p.to(reference.device) for p in parts], dim=1))
        return cls(layers, items[0].num_episodes, sum(item.num_shots for item in items), biases)

    def split(self) -> list["SupportKeyValues"]:
        """One cache of one episode per episode, in order (views of this cache's tensors, no copy)."""
        return [
            SupportKeyValues(
                {name: (k[e : e + 1], v[e : e + 1]) for name, (k, v) in self.layers.items()}, 1, self.num_shots,
                None if self.biases is None else {name: b[e : e + 1] for name, b in self.biases.items()},
            )
            for e in range(self.num_episodes)
        ]


def _joined_biases(items: list[SupportKeyValues], join) -> dict[str, torch.Tensor] | None:
    if all(item.biases is None for item in items):
        return None
    if any(item.biases is None for item in items):
        raise ValueError("Support caches with and without an attention mask cannot be joined.")
    return {name: join([item.biases[name] for item in items]) for name in items[0].biases}


@dataclass
class SupportTokens:
    """The support of the `tokenized_cross_attention` interaction: its tokens, the query's cross-attention input.

    `tokens`: [E, N * T, C] (E episodes, N shots of T tokens each, C = the UNet's cross-attention width, after
    `support_token_proj`). `bias`: [E, N * T] additive attention biases (`attention_mask` injection), else None.
    """

    tokens: torch.Tensor
    num_episodes: int
    num_shots: int
    bias: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> "SupportTokens":
        bias = None if self.bias is None else self.bias.to(device=device)
        return replace(self, tokens=self.tokens.to(device=device, dtype=dtype), bias=bias)

    @classmethod
    def cat(cls, items: list["SupportTokens"]) -> "SupportTokens":
        if len({item.num_shots for item in items}) != 1:
            raise ValueError("Support caches with different numbers of shots cannot share a batch.")
        return cls._join(items, 0, sum(item.num_episodes for item in items), items[0].num_shots)

    @classmethod
    def cat_shots(cls, items: list["SupportTokens"]) -> "SupportTokens":
        if len({item.num_episodes for item in items}) != 1:
            raise ValueError("Support caches with different numbers of episodes cannot be joined shot-wise.")
        return cls._join(items, 1, items[0].num_episodes, sum(item.num_shots for item in items))

    @classmethod
    def _join(cls, items, dim: int, episodes: int, shots: int) -> "SupportTokens":
        reference = items[-1].tokens
        tokens = torch.cat([item.tokens.to(reference.device, reference.dtype) for item in items], dim=dim)
        if any((item.bias is None) != (items[0].bias is None) for item in items):
            raise ValueError("Support caches with and without an attention mask cannot be joined.")
        bias = None if items[0].bias is None else torch.cat([i.bias.to(reference.device) for i in items], dim=dim)
        return cls(tokens, episodes, shots, bias)

    def split(self) -> list["SupportTokens"]:
        return [
            SupportTokens(self.tokens[e : e + 1], 1, self.num_shots, None if self.bias is None else self.bias[e : e + 1])
            for e in range(self.num_episodes)
        ]


@dataclass
class SupportLatents:
    """The support of the `qkv_fusion` interaction: its UNet input, run beside each query (nothing to cache).

    `sample`: [E, N, C, h, w] (E episodes of N shots; the design's support sample).
    """

    sample: torch.Tensor

    @property
    def num_episodes(self) -> int:
        return self.sample.shape[0]

    @property
    def num_shots(self) -> int:
        return self.sample.shape[1]

    def to(self, device=None, dtype=None) -> "SupportLatents":
        return SupportLatents(self.sample.to(device=device, dtype=dtype))

    @classmethod
    def cat(cls, items: list["SupportLatents"]) -> "SupportLatents":
        if len({item.num_shots for item in items}) != 1:
            raise ValueError("Support caches with different numbers of shots cannot share a batch.")
        return cls(torch.cat([item.sample for item in items]))

    @classmethod
    def cat_shots(cls, items: list["SupportLatents"]) -> "SupportLatents":
        if len({item.num_episodes for item in items}) != 1:
            raise ValueError("Support caches with different numbers of episodes cannot be joined shot-wise.")
        reference = items[-1].sample
        return cls(torch.cat([item.sample.to(reference.device, reference.dtype) for item in items], dim=1))

    def split(self) -> list["SupportLatents"]:
        return [SupportLatents(self.sample[e : e + 1]) for e in range(self.num_episodes)]


def _sample_tokens(total: int, keep: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """`keep` distinct token indices drawn at random from `total` (on `generator`'s device, then moved)."""
    gen_device = generator.device if generator is not None else "cpu"
    return torch.randperm(total, generator=generator, device=gen_device)[:keep].to(device)


class _SupportPassComplete(Exception):
    """Ends a support pass early: every self-attention layer has recorded its K/V, nothing later can change them."""


class _KVFusionState:
    """What the attention processors do during one UNet forward.

    - record (`record_shots`): each self-attention layer records its K/V (and, with `mask_grid` [E * N, 1, h, w],
      the biases of its tokens); with `stop_after_layers`, recording raises `_SupportPassComplete` once that many
      layers have recorded, so the rest of the forward is skipped.
    - fuse (`support`, a `SupportKeyValues`): each self-attention layer attends over its own K/V and the shots'.
    - joint (`joint_queries` B, `joint_shots` N; `qkv_fusion`): the batch holds B queries then B * N shots; each query
      attends over its own and its shots' K/V, each shot over its own and its query's.
    - cross (`cross_bias` [B, T]; tokenized interaction): biases of the support tokens in cross-attention.
    With `generator` set (`support_token_sampling`), a query's support tokens are sampled per layer down to one
    shot's count.
    """

    def __init__(
        self,
        record_shots: int | None = None,
        support: SupportKeyValues | None = None,
        stop_after_layers: int | None = None,
        mask_grid: torch.Tensor | None = None,
        joint_queries: int | None = None,
        joint_shots: int | None = None,
        cross_bias: torch.Tensor | None = None,
        cross_shots: int = 1,
        sampling: bool = False,
        generator: torch.Generator | None = None,
    ):
        self.record_shots = record_shots
        self.support = support
        self.stop_after_layers = stop_after_layers
        self.mask_grid = mask_grid
        self.joint_queries, self.joint_shots = joint_queries, joint_shots
        self.cross_bias, self.cross_shots = cross_bias, cross_shots
        self.sampling, self.generator = sampling, generator
        self.recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recorded_biases: dict[str, torch.Tensor] = {}
        self.layers_fused = 0

    def apply(self, name: str, key: torch.Tensor, value: torch.Tensor):
        """Record or fuse without attention masks: key, value [B, L, C] -> the K/V the layer attends over."""
        key, value, _ = self._fuse(name, key, value)
        return key, value

    def self_attention(self, name: str, query, key, value, attend) -> torch.Tensor:
        """One self-attention layer: query, key, value [B, L, C]; `attend(q, k, v, bias)` -> [B, L, C]."""
        if self.joint_queries is not None:
            return self._joint(name, query, key, value, attend)
        key, value, bias = self._fuse(name, key, value)
        return attend(query, key, value, bias)

    def cross_attention(self, query, key, value, attend) -> torch.Tensor:
        """A cross-attention layer over the support tokens: key, value [B, N * T, C]."""
        bias = None if self.cross_bias is None else self.cross_bias.expand(key.shape[0], -1)
        key, value, bias = self._sampled(key, value, bias, key.shape[1] // self.cross_shots)
        return attend(query, key, value, bias)

    def _fuse(self, name, key, value):
        if self.record_shots is not None:
            batch, tokens, channels = key.shape
            episodes = batch // self.record_shots
            # shots of one episode are adjacent in the batch: [E * N, L, C] -> [E, N * L, C]
            self.recorded[name] = (
                key.reshape(episodes, self.record_shots * tokens, channels),
                value.reshape(episodes, self.record_shots * tokens, channels),
            )
            if self.mask_grid is not None:
                self.recorded_biases[name] = _grid_bias(self.mask_grid, tokens).reshape(episodes, -1)
            if self.stop_after_layers is not None and len(self.recorded) == self.stop_after_layers:
                raise _SupportPassComplete
            return key, value, None
        if self.support is None:
            return key, value, None
        if name not in self.support.layers:
            raise RuntimeError(f"The support cache has no keys for layer {name!r}: it was made by another UNet.")
        support_key, support_value = self.support.layers[name]
        batch = key.shape[0]
        support_key = support_key.to(key.device, key.dtype).expand(batch, -1, -1)
        support_value = support_value.to(value.device, value.dtype).expand(batch, -1, -1)
        support_bias = None if self.support.biases is None else self.support.biases[name].expand(batch, -1)
        self.layers_fused += 1
        return self._with_own(key, value, support_key, support_value, support_bias)

    def _with_own(self, key, value, support_key, support_value, support_bias):
        """The query's own K/V first, then its (sampled) shots'; biases of 0 on its own tokens."""
        support_key, support_value, support_bias = self._sampled(support_key, support_value, support_bias, key.shape[1])
        bias = None
        if support_bias is not None:
            bias = torch.cat([support_bias.new_zeros(key.shape[0], key.shape[1]), support_bias.to(key.device)], dim=1)
        return torch.cat([key, support_key], dim=1), torch.cat([value, support_value], dim=1), bias

    def _sampled(self, key, value, bias, keep: int):
        if not self.sampling or key.shape[1] <= keep:
            return key, value, bias
        index = _sample_tokens(key.shape[1], keep, self.generator, key.device)
        return key[:, index], value[:, index], None if bias is None else bias[:, index]

    def _joint(self, name, query, key, value, attend):
        queries, shots = self.joint_queries, self.joint_shots
        tokens, channels = key.shape[1:]
        query_key, query_value = key[:queries], value[:queries]
        shot_key = key[queries:].reshape(queries, shots * tokens, channels)
        shot_value = value[queries:].reshape(queries, shots * tokens, channels)
        shot_bias = None if self.mask_grid is None else _grid_bias(self.mask_grid, tokens).reshape(queries, -1)
        fused_key, fused_value, bias = self._with_own(query_key, query_value, shot_key, shot_value, shot_bias)
        self.layers_fused += 1
        # each shot: its own K/V, then its query's
        own_key = torch.cat([key[queries:], query_key.repeat_interleave(shots, dim=0)], dim=1)
        own_value = torch.cat([value[queries:], query_value.repeat_interleave(shots, dim=0)], dim=1)
        return torch.cat(
            [attend(query[:queries], fused_key, fused_value, bias), attend(query[queries:], own_key, own_value, None)]
        )


class DiffewSAttnProcessor:
    """Scaled-dot-product attention (PyTorch SDPA) that takes part in the support interaction.

    Installed on every attention layer so that the `kv_fusion` keyword reaches all of them without warnings:
    self-attention layers (no `encoder_hidden_states`) fuse the support's K/V, cross-attention layers read the
    support-token biases of the tokenized interaction.
    """

    def __init__(self, name: str):
        self.name = name

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        kv_fusion: _KVFusionState | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_self_attention = encoder_hidden_states is None
        query = attn.to_q(hidden_states)
        if is_self_attention:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        def attend(query, key, value, bias):
            """[B, Lq, C], [B, Lk, C] x 2, bias [B, Lk] or None -> [B, Lq, C]."""
            batch = query.shape[0]
            mask = attention_mask
            if mask is not None:
                mask = attn.prepare_attention_mask(mask, key.shape[1], batch)
                mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
            if bias is not None:
                bias = bias.to(query.dtype)[:, None, None, :]
                mask = bias if mask is None else mask + bias
            head_dim = key.shape[-1] // attn.heads
            query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        if kv_fusion is None:
            hidden_states = attend(query, key, value, None)
        elif is_self_attention:
            hidden_states = kv_fusion.self_attention(self.name, query, key, value, attend)
        else:
            hidden_states = kv_fusion.cross_attention(query, key, value, attend)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class _JointInput(nn.Module):
    """The input convolution of a joint (`qkv_fusion`) batch: `conv_in` on the first `queries` rows (their first
    `query_channels` channels), `conv_in_ref` on the shots that follow (their first `support_channels`)."""

    def __init__(self, conv_in, conv_in_ref, queries: int, query_channels: int, support_channels: int):
        super().__init__()
        self.conv_in, self.conv_in_ref = conv_in, conv_in_ref
        self.queries, self.query_channels, self.support_channels = queries, query_channels, support_channels

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        queries = self.conv_in(sample[: self.queries, : self.query_channels])
        shots = self.conv_in_ref(sample[self.queries :, : self.support_channels])
        return torch.cat([queries, shots])


class DiffewSUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel` with a support input and the interaction of its design (default: KV fusion).

    Config: every `UNet2DConditionModel` argument plus `in_channels_ref` (the support latent's channels through
    `conv_in_ref`: 8 for image and mask latents, 4 when the mask is injected otherwise, 0 for the tokenized
    interaction, which has no `conv_in_ref`), `design` (the design record, a dict; None is DiffewS's) and
    `support_token_dim` (tokenized interaction: the width of the image encoder's tokens, projected by
    `support_token_proj` to `cross_attention_dim`). The buffer `empty_prompt_embeds` [1, T, cross_attention_dim]
    holds the text-encoder output of the empty prompt, the constant conditioning of DiffewS, so no text encoder is
    needed at inference.
    """

    def __init__(self, in_channels_ref: int = 8, design: dict | None = None, support_token_dim: int | None = None,
                 **unet_kwargs):
        super().__init__(**unet_kwargs)
        self.register_to_config(in_channels_ref=in_channels_ref, design=design, support_token_dim=support_token_dim)
        kernel = self.config.conv_in_kernel
        if in_channels_ref:
            self.conv_in_ref = nn.Conv2d(
                in_channels_ref, self.config.block_out_channels[0], kernel_size=kernel, padding=(kernel - 1) // 2
            )
        if self.interaction == "tokenized_cross_attention":
            if not support_token_dim:
                raise ValueError("The tokenized interaction needs `support_token_dim`, the image encoder's token width.")
            self.support_token_proj = nn.Linear(support_token_dim, self.config.cross_attention_dim)
        elif not in_channels_ref:
            raise ValueError(f"`in_channels_ref` must be positive with the {self.interaction} interaction.")
        self.register_buffer("empty_prompt_embeds", torch.zeros(1, 2, self.config.cross_attention_dim))
        self.set_default_attn_processor()

    @property
    def interaction(self) -> str:
        return (self.config.design or {}).get("interaction", DEFAULT_DESIGN["interaction"])

    @property
    def mask_injection(self) -> str:
        return (self.config.design or {}).get("mask_injection", DEFAULT_DESIGN["mask_injection"])

    @property
    def support_sample_channels(self) -> int:
        """Channels of `support_sample`: `in_channels_ref`, plus the mask channel of `attention_mask`."""
        return self.config.in_channels_ref + (self.mask_injection == "attention_mask")

    @property
    def self_attention_layers(self) -> list[str]:
        """Names of the processors of the self-attention layers, in forward order."""
        return [name for name in self.attn_processors if name.endswith(SELF_ATTENTION_SUFFIX)]

    def set_default_attn_processor(self) -> None:
        """Installs the fusion SDPA processor on every attention layer (replacing xFormers, slicing, ...)."""
        self.set_attn_processor({name: DiffewSAttnProcessor(name) for name in self.attn_processors})

    @classmethod
    def from_unet(
        cls, unet: UNet2DConditionModel, in_channels_ref: int | None = None, design: dict | None = None,
        support_token_dim: int | None = None,
    ) -> "DiffewSUNet2DConditionModel":
        """A DiffewS UNet of `design` with the weights of `unet` (Stable Diffusion's, or a DiffewS UNet of any design).

        Every weight both have is copied; the rest starts as follows (Stable Diffusion's `conv_in` has C channels):
        - `conv_in_ref` of 2C channels (`concat`): `conv_in.weight` repeated twice along the input channels and
          halved, `conv_in.bias` copied, as the DiffewS training starts from Stable Diffusion. Of C channels: a copy
          of `conv_in`. A `conv_in_ref` of another width than `unet`'s is made anew this way.
        - `conv_in` of 2C channels (`mn2m`: image latent, noisy mask latent): the C-channel `conv_in` repeated and
          halved, as Marigold. Back to C channels: the two halves summed.
        - `support_token_proj` (tokenized interaction): the identity when the widths match, else PyTorch's default.
        `in_channels_ref` defaults to the design's (8 for `concat`, 4 otherwise, 0 tokenized).
        """
        design = dict(design) if design is not None else getattr(unet.config, "design", None)
        mask_injection = (design or {}).get("mask_injection", "concat")
        tokenized = (design or {}).get("interaction") == "tokenized_cross_attention"
        query_channels = 8 if (design or {}).get("generation") == "mn2m" else 4
        if in_channels_ref is None:
            in_channels_ref = 0 if tokenized else 8 if mask_injection == "concat" else 4
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        config.update(in_channels=query_channels, in_channels_ref=in_channels_ref, design=design,
                      support_token_dim=support_token_dim if tokenized else None)
        model = cls(**config)
        if unet.dtype != model.dtype:
            model = model.to(unet.dtype)
        own = model.state_dict()
        shared = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
        missing, _ = model.load_state_dict(shared, strict=False)
        with torch.no_grad():
            stock_weight = _stock_conv_in(unet.conv_in.weight)
            if model.conv_in.weight.shape != unet.conv_in.weight.shape:
                repeats = query_channels // stock_weight.shape[1]
                model.conv_in.weight.copy_(stock_weight.repeat(1, repeats, 1, 1) / repeats)
            if in_channels_ref and "conv_in_ref.weight" in missing:
                repeats = in_channels_ref // stock_weight.shape[1]
                model.conv_in_ref.weight.copy_(stock_weight.repeat(1, repeats, 1, 1) / repeats)
                model.conv_in_ref.bias.copy_(unet.conv_in.bias)
            if tokenized and "support_token_proj.weight" in missing and support_token_dim == config["cross_attention_dim"]:
                model.support_token_proj.weight.copy_(torch.eye(support_token_dim))
                model.support_token_proj.bias.zero_()
        return model

    @contextmanager
    def _support_input(self):
        # The stock forward reads `self.conv_in`; the support pass routes it to `conv_in_ref` for its duration.
        stock_conv_in = self.conv_in
        self.conv_in = self.conv_in_ref
        try:
            yield
        finally:
            self.conv_in = stock_conv_in

    @contextmanager
    def _joint_input(self, queries: int):
        stock_conv_in = self.conv_in
        self.conv_in = _JointInput(stock_conv_in, self.conv_in_ref, queries, self.config.in_channels,
                                   self.config.in_channels_ref)
        try:
            yield
        finally:
            self.conv_in = stock_conv_in

    def encode_support(
        self, support_sample: torch.Tensor, timestep: int | torch.Tensor = 1, encoder_hidden_states: torch.Tensor | None = None
    ):
        """Runs the support side and returns what the query pass reads.

        support_sample: [E, N, C, h, w] (E episodes of N shots: the design's support latents, C =
        `support_sample_channels`), or [E, N, T, D(+1)] image-encoder tokens for the tokenized interaction.
        Returns `SupportKeyValues` (`kv_fusion`), `SupportTokens` (tokenized) or `SupportLatents` (`qkv_fusion`).
        Goes through `forward` so that device hooks (model CPU offload) apply.
        """
        return self.forward(None, timestep, encoder_hidden_states, support_sample=support_sample)

    def forward(
        self,
        sample: torch.Tensor | None,
        timestep: int | torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args,
        support_sample: torch.Tensor | None = None,
        support_key_values=None,
        support_timestep: int | torch.Tensor | None = None,
        support_token_sampling: bool = False,
        generator: torch.Generator | None = None,
        cross_attention_kwargs: dict | None = None,
        **kwargs,
    ):
        """The query pass, the support side, or both (one training episode).

        Args:
            sample: [B, in_channels, h, w] query latents, or None to run only the support side.
            timestep: DiffewS uses the constant 1; the multi-step generations pass the step's (or one per query).
            encoder_hidden_states: [B, T, cross_attention_dim]; None uses `empty_prompt_embeds`.
            support_sample: [B, N, C, h, w] supports, run through the support side first (gradients flow through
                both passes); see `encode_support`. With `sample=None` the support side is all that runs.
            support_key_values: what `encode_support` returned, with B or 1 episodes (1 is shared by all queries).
            support_timestep: the support pass's timestep (default: `timestep`).
            support_token_sampling: sample the shots' tokens of each layer down to one shot's count (`generator`).

        Returns:
            The support cache when `sample` is None; otherwise the stock `UNet2DConditionOutput` (or tuple).
        """
        if support_sample is not None and support_key_values is not None:
            raise ValueError("Pass `support_sample` or `support_key_values`, not both.")
        support_timestep = timestep if support_timestep is None else support_timestep
        if support_sample is not None:
            support_key_values = self._support_side(support_sample, support_timestep, encoder_hidden_states)
        if sample is None:
            if support_key_values is None:
                raise ValueError("`sample` is None and there is no `support_sample`: nothing to run.")
            return support_key_values

        cross_attention_kwargs = dict(cross_attention_kwargs or {})
        if support_key_values is None:
            return super().forward(sample, timestep, self._conditioning(encoder_hidden_states, sample.shape[0]), *args,
                                   cross_attention_kwargs=cross_attention_kwargs, **kwargs)
        if support_key_values.num_episodes not in (1, sample.shape[0]):
            raise ValueError(
                f"The support cache holds {support_key_values.num_episodes} episodes for a batch of "
                f"{sample.shape[0]} queries: expected 1 (shared) or {sample.shape[0]}."
            )
        sampling = {"sampling": support_token_sampling, "generator": generator}
        if isinstance(support_key_values, SupportLatents):
            return self._joint_pass(sample, timestep, support_key_values, support_timestep, sampling, *args,
                                    cross_attention_kwargs=cross_attention_kwargs, **kwargs)
        if isinstance(support_key_values, SupportTokens):
            tokens = support_key_values.tokens.to(sample.device, self.dtype).expand(sample.shape[0], -1, -1)
            bias = support_key_values.bias
            cross_attention_kwargs["kv_fusion"] = _KVFusionState(
                cross_bias=None if bias is None else bias.to(sample.device), cross_shots=support_key_values.num_shots,
                **sampling,
            )
            return super().forward(sample, timestep, tokens, *args, cross_attention_kwargs=cross_attention_kwargs,
                                   **kwargs)
        fusion = cross_attention_kwargs["kv_fusion"] = _KVFusionState(support=support_key_values, **sampling)
        encoder_hidden_states = self._conditioning(encoder_hidden_states, sample.shape[0])
        output = super().forward(
            sample, timestep, encoder_hidden_states, *args, cross_attention_kwargs=cross_attention_kwargs, **kwargs
        )
        self._check_all_layers_took_part(fusion.layers_fused)
        return output

    def _support_side(self, support_sample, timestep, encoder_hidden_states):
        if self.interaction == "tokenized_cross_attention":
            return self._support_tokens(support_sample)
        expected = self.support_sample_channels
        if support_sample.ndim != 5 or support_sample.shape[2] != expected:
            raise ValueError(
                f"support_sample must be [episodes, shots, {expected}, h, w] for the {self.interaction} + "
                f"{self.mask_injection} design, got {tuple(support_sample.shape)}."
            )
        if self.interaction == "qkv_fusion":
            return SupportLatents(support_sample)
        return self._support_pass(support_sample, timestep, encoder_hidden_states)

    def _support_tokens(self, support_sample) -> SupportTokens:
        """[E, N, T, D] tokens (+ a last inside-the-mask flag with `attention_mask`) -> projected `SupportTokens`."""
        width = self.config.support_token_dim + (self.mask_injection == "attention_mask")
        if support_sample.ndim != 4 or support_sample.shape[-1] != width:
            raise ValueError(
                f"support_sample must be image-encoder tokens [episodes, shots, tokens, {width}] for the tokenized "
                f"interaction with {self.mask_injection}, got {tuple(support_sample.shape)}."
            )
        episodes, shots, tokens = support_sample.shape[:3]
        features = support_sample[..., : self.config.support_token_dim].to(self.dtype)
        bias = None
        if self.mask_injection == "attention_mask":
            bias = _token_bias(support_sample[..., -1]).reshape(episodes, shots * tokens)
        projected = self.support_token_proj(features).reshape(episodes, shots * tokens, -1)
        return SupportTokens(projected, episodes, shots, bias)

    def _split_mask(self, support_sample):
        """[..., C(+1), h, w] -> (the support latents, the object mask [..., 1, h, w] or None)."""
        if self.mask_injection != "attention_mask":
            return support_sample, None
        return support_sample[:, :, :-1], support_sample[:, :, -1:]

    def _support_pass(self, support_sample, timestep, encoder_hidden_states) -> SupportKeyValues:
        support_sample, grid = self._split_mask(support_sample)
        episodes, shots = support_sample.shape[:2]
        flat = support_sample.flatten(0, 1)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(shots, dim=0)
        # At inference the forward stops after the last self-attention layer has recorded its K/V. With gradients
        # it runs to the end, so that recomputation (gradient checkpointing) sees the forward it recorded.
        stop_after = None if torch.is_grad_enabled() else len(self.self_attention_layers)
        recorder = _KVFusionState(
            record_shots=shots, stop_after_layers=stop_after, mask_grid=None if grid is None else grid.flatten(0, 1)
        )
        with self._support_input():
            try:
                super().forward(
                    flat,
                    timestep,
                    self._conditioning(encoder_hidden_states, flat.shape[0]),
                    cross_attention_kwargs={"kv_fusion": recorder},
                )
            except _SupportPassComplete:
                pass
        self._check_all_layers_took_part(len(recorder.recorded))
        return SupportKeyValues(recorder.recorded, episodes, shots, recorder.recorded_biases or None)

    def _joint_pass(self, sample, timestep, support: SupportLatents, support_timestep, sampling, *args,
                    cross_attention_kwargs, **kwargs):
        """`qkv_fusion`: the queries [B, ...] and their shots [B * N, ...] in one UNet batch; returns the queries'."""
        queries = sample.shape[0]
        shots_sample, grid = self._split_mask(support.sample.to(sample.device, sample.dtype).expand(queries, -1, -1, -1, -1))
        shots = shots_sample.shape[1]
        channels = max(sample.shape[1], shots_sample.shape[2])
        batch = torch.cat([F.pad(sample, (0, 0, 0, 0, 0, channels - sample.shape[1])),
                           F.pad(shots_sample.flatten(0, 1), (0, 0, 0, 0, 0, channels - shots_sample.shape[2]))])
        steps = torch.cat([torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(queries),
                           torch.as_tensor(support_timestep, device=sample.device).reshape(-1).expand(queries * shots)])
        fusion = cross_attention_kwargs["kv_fusion"] = _KVFusionState(
            joint_queries=queries, joint_shots=shots, mask_grid=None if grid is None else grid.flatten(0, 1), **sampling
        )
        return_dict = kwargs.pop("return_dict", True)
        with self._joint_input(queries):
            output = super().forward(batch, steps, self._conditioning(None, batch.shape[0]), *args,
                                     cross_attention_kwargs=cross_attention_kwargs, **kwargs).sample[:queries]
        self._check_all_layers_took_part(fusion.layers_fused)
        return self._output(output, return_dict)

    @staticmethod
    def _output(sample, return_dict: bool):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)

    def _conditioning(self, encoder_hidden_states: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        if encoder_hidden_states is not None:
            return encoder_hidden_states
        return self.empty_prompt_embeds.to(self.dtype).expand(batch_size, -1, -1)

    def _check_all_layers_took_part(self, count: int) -> None:
        expected = len(self.self_attention_layers)
        if count != expected:
            raise RuntimeError(
                f"Only {count} of {expected} self-attention layers took part in KV fusion: the attention processors "
                "were replaced (xFormers, attention slicing, ...). Call `unet.set_default_attn_processor()`."
            )


def _stock_conv_in(weight: torch.Tensor) -> torch.Tensor:
    """The 4-channel `conv_in` weight of a UNet: itself, or (`mn2m`'s 8 channels) the two halves summed."""
    if weight.shape[1] == 8:
        return weight[:, :4] + weight[:, 4:]
    return weight


def _signature_with_parent(init, parent_init) -> inspect.Signature:
    # diffusers reads a model's config keys from its __init__ signature; expose the parent's arguments too.
    own = inspect.signature(init).parameters
    parent = inspect.signature(parent_init).parameters
    params = [own["self"], own["in_channels_ref"], own["design"], own["support_token_dim"]]
    params += [p for name, p in parent.items() if name != "self"]
    return inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if i > 0 else p for i, p in enumerate(params)])


DiffewSUNet2DConditionModel.__init__.__signature__ = _signature_with_parent(
    DiffewSUNet2DConditionModel.__init__, UNet2DConditionModel.__init__
)
