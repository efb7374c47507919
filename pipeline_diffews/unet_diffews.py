"""The DiffewS UNet: Stable Diffusion's UNet plus a support input convolution, with KV-fusion self-attention.

The support (image latent and mask latent, 8 channels) enters through `conv_in_ref`; the query (image latent,
4 channels) through the stock `conv_in`. Every self-attention layer (`attn1`) records its keys and values during the
support pass; during the query pass it attends over its own keys and values followed by those of every shot.
Cross-attention (`attn2`) is untouched.

This file is self-contained (torch and diffusers only): the Hub serves it as `unet/unet_diffews.py`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn

SELF_ATTENTION_SUFFIX = "attn1.processor"


@dataclass
class SupportKeyValues:
    """Keys and values of every self-attention layer, recorded by the support pass.

    `layers[name] = (key, value)`, each of shape [E, N * L, C]: E episodes, N shots per episode (concatenated along
    the token axis in shot order), L tokens of that layer's feature map, C channels (after the linear projections).
    """

    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]
    num_episodes: int
    num_shots: int

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SupportKeyValues":
        layers = {name: (k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for name, (k, v) in self.layers.items()}
        return SupportKeyValues(layers, self.num_episodes, self.num_shots)

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
        return cls(layers, sum(item.num_episodes for item in items), items[0].num_shots)

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
        return cls(layers, items[0].num_episodes, sum(item.num_shots for item in items))

    def split(self) -> list["SupportKeyValues"]:
        """One cache of one episode per episode, in order (views of this cache's tensors, no copy)."""
        return [
            SupportKeyValues(
                {name: (k[e : e + 1], v[e : e + 1]) for name, (k, v) in self.layers.items()}, 1, self.num_shots
            )
            for e in range(self.num_episodes)
        ]


class _SupportPassComplete(Exception):
    """Ends a support pass early: every self-attention layer has recorded its K/V, nothing later can change them."""


class _KVFusionState:
    """What the self-attention processors do during one UNet forward: record support K/V, or fuse them.

    With `stop_after_layers`, recording raises `_SupportPassComplete` once that many layers have recorded their K/V,
    so the rest of the forward (the last layer's attention, its feed-forward, the output convolution) is skipped.
    """

    def __init__(
        self,
        record_shots: int | None = None,
        support: SupportKeyValues | None = None,
        stop_after_layers: int | None = None,
    ):
        self.record_shots = record_shots
        self.support = support
        self.stop_after_layers = stop_after_layers
        self.recorded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers_fused = 0

    def apply(self, name: str, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value: [B, L, C] of one self-attention layer. Returns the K/V that the layer attends over."""
        if self.record_shots is not None:
            batch, tokens, channels = key.shape
            episodes = batch // self.record_shots
            # shots of one episode are adjacent in the batch: [E * N, L, C] -> [E, N * L, C]
            self.recorded[name] = (
                key.reshape(episodes, self.record_shots * tokens, channels),
                value.reshape(episodes, self.record_shots * tokens, channels),
            )
            if self.stop_after_layers is not None and len(self.recorded) == self.stop_after_layers:
                raise _SupportPassComplete
            return key, value
        if name not in self.support.layers:
            raise RuntimeError(f"The support cache has no keys for layer {name!r}: it was made by another UNet.")
        support_key, support_value = self.support.layers[name]
        support_key = support_key.to(key.device, key.dtype).expand(key.shape[0], -1, -1)
        support_value = support_value.to(value.device, value.dtype).expand(value.shape[0], -1, -1)
        self.layers_fused += 1
        return torch.cat([key, support_key], dim=1), torch.cat([value, support_value], dim=1)


class DiffewSAttnProcessor:
    """Scaled-dot-product attention (PyTorch SDPA) that takes part in KV fusion when it is a self-attention layer.

    Installed on every attention layer so that the `kv_fusion` keyword reaches all of them without warnings; only
    self-attention layers (no `encoder_hidden_states`) read it.
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
        batch_size = hidden_states.shape[0]
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
        if is_self_attention and kv_fusion is not None:
            key, value = kv_fusion.apply(self.name, key, value)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class DiffewSUNet2DConditionModel(UNet2DConditionModel):
    """`UNet2DConditionModel` with the support input convolution `conv_in_ref` and KV-fusion self-attention.

    Config: every `UNet2DConditionModel` argument plus `in_channels_ref` (8: support image latent and mask latent).
    The buffer `empty_prompt_embeds` [1, T, cross_attention_dim] holds the text-encoder output of the empty prompt,
    the constant conditioning of DiffewS, so no text encoder is needed at inference.
    """

    def __init__(self, in_channels_ref: int = 8, **unet_kwargs):
        super().__init__(**unet_kwargs)
        self.register_to_config(in_channels_ref=in_channels_ref)
        kernel = self.config.conv_in_kernel
        self.conv_in_ref = nn.Conv2d(
            in_channels_ref, self.config.block_out_channels[0], kernel_size=kernel, padding=(kernel - 1) // 2
        )
        self.register_buffer("empty_prompt_embeds", torch.zeros(1, 2, self.config.cross_attention_dim))
        self.set_default_attn_processor()

    @property
    def self_attention_layers(self) -> list[str]:
        """Names of the processors of the self-attention layers, in forward order."""
        return [name for name in self.attn_processors if name.endswith(SELF_ATTENTION_SUFFIX)]

    def set_default_attn_processor(self) -> None:
        """Installs the KV-fusion SDPA processor on every attention layer (replacing xFormers, slicing, ...)."""
        self.set_attn_processor({name: DiffewSAttnProcessor(name) for name in self.attn_processors})

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, in_channels_ref: int = 8) -> "DiffewSUNet2DConditionModel":
        """A DiffewS UNet with the stock weights of `unet` and `conv_in_ref` initialised from its `conv_in`.

        `conv_in_ref.weight = conv_in.weight.repeat(1, in_channels_ref // in_channels, 1, 1) / repeats` and
        `conv_in_ref.bias = conv_in.bias`, as the DiffewS training starts from Stable Diffusion.
        """
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
        model = cls(in_channels_ref=in_channels_ref, **config).to(unet.dtype)
        missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
        if unexpected or set(missing) - {"conv_in_ref.weight", "conv_in_ref.bias", "empty_prompt_embeds"}:
            raise ValueError(f"UNet weights do not match its config: missing {missing}, unexpected {unexpected}.")
        repeats = in_channels_ref // unet.config.in_channels
        with torch.no_grad():
            model.conv_in_ref.weight.copy_(unet.conv_in.weight.repeat(1, repeats, 1, 1) / repeats)
            model.conv_in_ref.bias.copy_(unet.conv_in.bias)
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

    def encode_support(
        self, support_sample: torch.Tensor, timestep: int | torch.Tensor = 1, encoder_hidden_states: torch.Tensor | None = None
    ) -> SupportKeyValues:
        """Runs the support pass and returns the K/V of every self-attention layer.

        support_sample: [E, N, in_channels_ref, h, w] (E episodes of N shots; image latent then mask latent).
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
        support_key_values: SupportKeyValues | None = None,
        cross_attention_kwargs: dict | None = None,
        **kwargs,
    ):
        """The query pass, the support pass, or both (one training episode).

        Args:
            sample: [B, in_channels, h, w] query latents, or None to run only the support pass.
            timestep: DiffewS uses the constant 1.
            encoder_hidden_states: [B, T, cross_attention_dim]; None uses `empty_prompt_embeds`.
            support_sample: [B, N, in_channels_ref, h, w] supports, run through the support pass first
                (gradients flow through both passes). With `sample=None` the support pass is all that runs.
            support_key_values: K/V from an earlier support pass, with B or 1 episodes (1 is shared by all queries).

        Returns:
            `SupportKeyValues` when `sample` is None; otherwise the stock `UNet2DConditionOutput` (or tuple).
        """
        if support_sample is not None and support_key_values is not None:
            raise ValueError("Pass `support_sample` or `support_key_values`, not both.")
        if support_sample is not None:
            support_key_values = self._support_pass(support_sample, timestep, encoder_hidden_states)
        if sample is None:
            if support_key_values is None:
                raise ValueError("`sample` is None and there is no `support_sample`: nothing to run.")
            return support_key_values

        cross_attention_kwargs = dict(cross_attention_kwargs or {})
        fusion = None
        if support_key_values is not None:
            if support_key_values.num_episodes not in (1, sample.shape[0]):
                raise ValueError(
                    f"The support cache holds {support_key_values.num_episodes} episodes for a batch of "
                    f"{sample.shape[0]} queries: expected 1 (shared) or {sample.shape[0]}."
                )
            fusion = cross_attention_kwargs["kv_fusion"] = _KVFusionState(support=support_key_values)
        encoder_hidden_states = self._conditioning(encoder_hidden_states, sample.shape[0])
        output = super().forward(
            sample, timestep, encoder_hidden_states, *args, cross_attention_kwargs=cross_attention_kwargs, **kwargs
        )
        if fusion is not None:
            self._check_all_layers_took_part(fusion.layers_fused)
        return output

    def _support_pass(self, support_sample, timestep, encoder_hidden_states) -> SupportKeyValues:
        if support_sample.ndim != 5 or support_sample.shape[2] != self.config.in_channels_ref:
            raise ValueError(
                f"support_sample must be [episodes, shots, {self.config.in_channels_ref}, h, w], "
                f"got {tuple(support_sample.shape)}."
            )
        episodes, shots = support_sample.shape[:2]
        flat = support_sample.flatten(0, 1)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.repeat_interleave(shots, dim=0)
        # At inference the forward stops after the last self-attention layer has recorded its K/V. With gradients
        # it runs to the end, so that recomputation (gradient checkpointing) sees the forward it recorded.
        stop_after = None if torch.is_grad_enabled() else len(self.self_attention_layers)
        recorder = _KVFusionState(record_shots=shots, stop_after_layers=stop_after)
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
        return SupportKeyValues(recorder.recorded, episodes, shots)

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


def _signature_with_parent(init, parent_init) -> inspect.Signature:
    # diffusers reads a model's config keys from its __init__ signature; expose the parent's arguments too.
    own = inspect.signature(init).parameters
    parent = inspect.signature(parent_init).parameters
    params = [own["self"], own["in_channels_ref"]] + [p for name, p in parent.items() if name != "self"]
    return inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if i > 0 else p for i, p in enumerate(params)])


DiffewSUNet2DConditionModel.__init__.__signature__ = _signature_with_parent(
    DiffewSUNet2DConditionModel.__init__, UNet2DConditionModel.__init__
)
