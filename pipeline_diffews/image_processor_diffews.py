"""Pixels and masks for DiffewS: user images and supports in, model tensors out, predictions back to each query.

Standalone (torch, numpy and PIL only): a saved pipeline carries it beside `pipeline_diffews.py`, which imports it
relatively, so the Hub serves it with the pipeline's code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

# Label maps: 0 is background, 1..254 are classes, 255 is ignored (neither background nor a class).
IGNORE_INDEX = 255
# Single-channel values from this one on are the brightness of a 0-255 mask, not class ids (see `is_label_map`).
LABEL_ID_LIMIT = 128

ImageInput = Union[PIL.Image.Image, np.ndarray, torch.Tensor]


@dataclass
class SupportSet:
    """One support set, read and checked: N images and, per class, the shots that show it with their masks.

    A set of binary masks is the same form with one class (`class_ids` None, every shot showing it).
    """

    images: list  # N RGB PIL images
    shots: list[list[int]]  # per class: indices into `images` of the shots that show it (at least one)
    masks: list[list[np.ndarray]]  # per class: its bool masks [H, W] in those shots
    class_ids: list[int] | None = None  # label-map ids (ascending) or 1..K for dicts; None for binary masks
    class_names: list[str] | None = None  # the keys of dict masks, first-seen order
    palette: list[int] | None = None  # the palette of the first "P" label map, 768 ints

    @property
    def is_multiclass(self) -> bool:
        return self.class_ids is not None

    @property
    def num_shots(self) -> int:
        return len(self.images)


def load_mask(path: str | os.PathLike) -> PIL.Image.Image:
    """Reads a mask file as it is stored: EXIF orientation applied, mode kept ("P" with its palette, "L", "RGBA", ...).

    Whether it is a binary mask or a label map is `DiffewSImageProcessor.is_label_map`'s rule. Raises ValueError
    naming `path` when the file is missing or is not an image PIL can read.
    """
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read the mask file {os.fspath(path)!r}: {error}") from error


class DiffewSImageProcessor:
    """Turns user images and masks into model tensors, and model outputs back into masks.

    Images: PIL (any mode; EXIF orientation applied), np.ndarray [H, W], [H, W, 3] or [H, W, 4] (uint8 in [0, 255] or
    float in [0, 1]), torch.Tensor [3, H, W] or [H, W] (same ranges).

    Support masks, and the one rule that tells a binary mask from a label map (`is_label_map`; the pipeline's
    `multiclass=None`, the command line and the demo all follow it):
    - A label map marks several classes at once: 0 = background, 1..254 = class ids, 255 = ignored (neither). It is
      a dict `{name: binary mask}`; a palette ("P") image; or an integer array / tensor [H, W] or a single-channel
      "L", "I" or "I;16" image whose ids (values other than 0 and 255) are all below 128; in each case only when it
      holds several ids, or one id other than 1.
    - Everything else is a binary mask (True = object): bool, {0, 1} or {0, 255} values, soft or anti-aliased
      0-255 masks (object from 128 on), float masks, PIL "1", "L", "RGB" (white object) and RGBA / LA (the alpha
      channel), and "P" images with the one id 1 (indices 0 and 255 are background).
    - `multiclass=True` reads every mask as a label map (ids from 128 on included), `multiclass=False` every mask as
      a binary mask. `read_support_set` turns any accepted support set into one `SupportSet`.
    """

    @staticmethod
    def to_pil_image(image: ImageInput, name: str) -> PIL.Image.Image:
        """Any supported image -> 8-bit RGB PIL image."""
        if isinstance(image, PIL.Image.Image):
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
        array = DiffewSImageProcessor._to_numpy(image, name)
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)  # channels first (torch convention) -> last
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"`{name}` must be [H, W], [H, W, 3] or [3, H, W], got shape {tuple(array.shape)}.")
        if array.dtype == np.bool_:
            array = array.astype(np.uint8) * 255
        elif np.issubdtype(array.dtype, np.floating):
            if array.min() < 0 or array.max() > 1:
                raise ValueError(f"`{name}` is a float array with values outside [0, 1].")
            array = np.round(array * 255)
        elif array.min() < 0 or array.max() > 255:
            raise ValueError(f"`{name}` is an integer array with values outside [0, 255].")
        return PIL.Image.fromarray(array.astype(np.uint8)).convert("RGB")

    @staticmethod
    def to_binary_mask(mask: ImageInput, name: str) -> np.ndarray:
        """Any supported mask -> bool array [H, W] (True = object)."""
        if isinstance(mask, PIL.Image.Image):
            mask = PIL.ImageOps.exif_transpose(mask)
            if mask.mode in ("RGBA", "LA", "PA"):
                return np.asarray(mask.getchannel("A")) >= 128
            if mask.mode == "P":
                index = np.asarray(mask)
                return (index != 0) & (index != 255)
            if mask.mode == "1":
                return np.asarray(mask, dtype=bool)
            mask = np.asarray(mask.convert("L"))
        array = DiffewSImageProcessor._single_channel(mask, name, "a single-channel mask")
        if array.dtype == np.bool_:
            return array
        if array.min() < 0 or array.max() > 255:
            raise ValueError(
                f"`{name}` must hold bool, 0/1 or 0/255 values, got values in [{array.min()}, {array.max()}]."
            )
        return array > 0.5 if array.max() <= 1 else array >= 128

    @staticmethod
    def is_label_map(mask: Any) -> bool:
        """Whether a support mask is read as a label map when `multiclass` is None (auto): the rule written in the
        class docstring, the one that the pipeline, the command line and the demo follow."""
        if isinstance(mask, dict):
            return True
        if isinstance(mask, PIL.Image.Image):
            if mask.mode not in ("P", "L", "I", "I;16"):
                return False
            values = np.unique(np.asarray(mask))
        elif isinstance(mask, torch.Tensor):
            if mask.dtype == torch.bool or mask.dtype.is_floating_point or mask.dtype.is_complex:
                return False
            if mask.squeeze().ndim != 2:
                return False
            values = torch.unique(mask.detach().cpu()).numpy()
        elif isinstance(mask, np.ndarray):
            if not np.issubdtype(mask.dtype, np.integer) or mask.squeeze().ndim != 2:
                return False
            values = np.unique(mask)
        else:
            return False
        ids = values[(values != 0) & (values != IGNORE_INDEX)]
        if not (isinstance(mask, PIL.Image.Image) and mask.mode == "P") and len(ids) and ids.max() >= LABEL_ID_LIMIT:
            return False  # brightness of a 0-255 mask, not class ids
        return len(ids) > 1 or (len(ids) == 1 and ids[0] != 1)

    @staticmethod
    def to_label_map(mask: ImageInput, name: str) -> np.ndarray:
        """A label map -> int64 [H, W]: 0 = background, 1..254 = classes, 255 = ignored.

        PIL "P" (the palette index), "L", "I", "I;16" or "1" images (the pixel value), bool or integer arrays and
        tensors [H, W]. Raises ValueError for values outside [0, 255] or other image modes, TypeError for floats.
        """
        if isinstance(mask, PIL.Image.Image):
            mask = PIL.ImageOps.exif_transpose(mask)
            if mask.mode not in ("P", "L", "I", "I;16", "1"):
                raise ValueError(
                    f"`{name}` is a {mask.mode!r} image: a label map must be a palette (\"P\") or single-channel "
                    "image whose values are class ids."
                )
            mask = np.asarray(mask)
        array = DiffewSImageProcessor._single_channel(mask, name, "a label map")
        if array.dtype == np.bool_:
            return array.astype(np.int64)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"`{name}` must hold integer class ids, got dtype {array.dtype}.")
        if array.size and (array.min() < 0 or array.max() > IGNORE_INDEX):
            raise ValueError(
                f"`{name}` holds class ids in [{array.min()}, {array.max()}]: ids must be in 0..255 "
                "(0 = background, 1..254 = classes, 255 = ignored)."
            )
        return array.astype(np.int64)

    @staticmethod
    def palette_of(mask: Any) -> list[int] | None:
        """The palette of a "P" image as 768 ints (RGB of indices 0..255), else None."""
        if not isinstance(mask, PIL.Image.Image) or mask.mode != "P" or not mask.getpalette():
            return None
        return (list(mask.getpalette("RGB")) + [0] * 768)[:768]

    @staticmethod
    def default_palette() -> list[int]:
        """768 ints: the PASCAL VOC colour map (0 black, 1 dark red, 2 dark green, 3 olive, ...)."""
        palette = []
        for index in range(256):
            rgb, code = [0, 0, 0], index
            for bit in range(8):
                for channel in range(3):
                    rgb[channel] |= ((code >> channel) & 1) << (7 - bit)
                code >>= 3
            palette += rgb
        return palette

    @staticmethod
    def label_map_to_image(label_map: np.ndarray, palette: list[int] | None) -> PIL.Image.Image:
        """uint8 [H, W] -> "P" image with `palette` (default: `default_palette()`)."""
        image = PIL.Image.fromarray(np.asarray(label_map, dtype=np.uint8))
        image.putpalette(palette or DiffewSImageProcessor.default_palette())
        return image

    @staticmethod
    def _single_channel(value: Any, name: str, what: str) -> np.ndarray:
        """np.ndarray or torch.Tensor [H, W], [1, H, W] or [H, W, 1] -> np.ndarray [H, W]."""
        array = DiffewSImageProcessor._to_numpy(value, name)
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.squeeze(0) if array.shape[0] == 1 else array[..., 0]
        if array.ndim != 2:
            raise ValueError(f"`{name}` must be {what} [H, W], got shape {tuple(array.shape)}.")
        return array

    @staticmethod
    def _to_numpy(value: Any, name: str) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.float().numpy() if value.dtype in (torch.float16, torch.bfloat16) else value.numpy()
        if not isinstance(value, np.ndarray):
            raise TypeError(f"`{name}` must be a PIL image, np.ndarray or torch.Tensor, got {type(value).__name__}.")
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise ValueError(f"`{name}` contains NaN or inf values.")
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise TypeError(f"`{name}` must hold numbers, got dtype {value.dtype}.")
        return value

    @staticmethod
    def image_to_tensor(image: PIL.Image.Image, resolution: int) -> torch.Tensor:
        """RGB PIL image -> [3, R, R] float in [-1, 1] (bilinear, antialiased, aspect ratio not kept)."""
        resized = image.resize((resolution, resolution), PIL.Image.BILINEAR)
        array = torch.from_numpy(np.asarray(resized, dtype=np.float32).copy())
        return array.permute(2, 0, 1) / 127.5 - 1.0

    @staticmethod
    def mask_to_tensor(mask: np.ndarray, resolution: int) -> torch.Tensor:
        """bool [H, W] -> [3, R, R] in {-1, 1} (nearest; white object on black background, 3 channels)."""
        resized = PIL.Image.fromarray(mask.astype(np.uint8) * 255).resize((resolution, resolution), PIL.Image.NEAREST)
        binary = torch.from_numpy(np.asarray(resized) >= 128).float()
        return (binary * 2 - 1).expand(3, -1, -1)

    @staticmethod
    def target_pixels(image: torch.Tensor, mask: torch.Tensor, target: str) -> torch.Tensor:
        """The picture a query's prediction is trained to be (the design's `target`), in [-1, 1].

        image: [..., 3, R, R] in [-1, 1]; mask: [..., 3, R, R] in {-1, 1} (white object on black, as
        `mask_to_tensor`). `white_foreground`: the mask itself; `real_foreground`: the image inside the mask, black
        outside; `black_foreground`: black inside, the image outside; `mask_on_image`: `0.5 image + 0.5 mask` (the
        average in [0, 1] is the same average in [-1, 1]).
        """
        if target == "white_foreground":
            return mask
        inside = mask[..., :1, :, :] > 0
        black = torch.full_like(image, -1.0)
        if target == "real_foreground":
            return torch.where(inside, image, black)
        if target == "black_foreground":
            return torch.where(inside, black, image)
        if target == "mask_on_image":
            return 0.5 * image + 0.5 * mask
        raise ValueError(f"unknown target {target!r}.")

    @staticmethod
    def prediction_map(prediction: torch.Tensor, image: torch.Tensor | None, target: str) -> torch.Tensor:
        """The decoded prediction turned back into the map the threshold reads (each target form's rule).

        prediction: [B, 3, R, R] decoded picture in [0, 1]; image: [B, 3, R, R] the query in [0, 1] (None for
        `white_foreground`). Returns [B, 3, R, R] for `white_foreground` (the picture itself: the probability is its
        channel mean, the relative level comes from its maximum over channels) and [B, 1, R, R] in [0, 1] otherwise:
        - `mask_on_image`: the mask is `2 prediction - image` (the image subtracted), clipped, channel mean;
        - `real_foreground` / `black_foreground`: two hypotheses per pixel, "object" (the image, or black) and
          "background" (black, or the image); with d_o and d_b the mean squared distances of the prediction to
          them, the probability is `d_b / (d_o + d_b)` (1 on the object's hypothesis, 0 on the background's; 0.5
          where the two coincide: black pixels of the query).
        """
        if target == "white_foreground":
            return prediction
        if target == "mask_on_image":
            return (2 * prediction - image).clamp(0, 1).mean(dim=1, keepdim=True)
        to_image = (prediction - image).square().mean(dim=1, keepdim=True)
        to_black = prediction.square().mean(dim=1, keepdim=True)
        to_object, to_background = (to_image, to_black) if target == "real_foreground" else (to_black, to_image)
        total = to_object + to_background
        return torch.where(total > 0, to_background / total.clamp_min(1e-12), torch.full_like(total, 0.5))

    @staticmethod
    def quantize_prediction(prediction: torch.Tensor, precision: str) -> torch.Tensor:
        """The map the threshold is applied to. prediction: [B, 3, R, R] in [0, 1] -> same shape and range.

        "8bit" is the authors' evaluation: their pipeline returns the prediction as an 8-bit image,
        `(pred * 255).astype(np.uint8)` (a truncation), and the mask rule reads it back as `/ 255`. "full" keeps the
        float32 map.
        """
        if precision == "full":
            return prediction
        return torch.floor(prediction * 255) / 255

    @staticmethod
    def threshold_value(prediction: torch.Tensor, threshold: float, mode: str) -> torch.Tensor:
        """The absolute probability above which a pixel is the object.

        prediction: [B, 3, R, R] decoded image in [0, 1]. Relative mode: `threshold * max` over all channels and
        pixels of each query (the authors' evaluation). Returns [B, 1, 1].
        """
        if mode == "absolute":
            return torch.full((prediction.shape[0], 1, 1), threshold, device=prediction.device)
        return threshold * prediction.flatten(1).amax(dim=1).view(-1, 1, 1)

    @staticmethod
    def resize_probability(probability: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[R, R] -> [H, W] (bilinear). size is (H, W)."""
        if tuple(probability.shape) == tuple(size):
            return probability
        resized = F.interpolate(probability[None, None], size=size, mode="bilinear", align_corners=False)
        return resized[0, 0].clamp(0, 1)

    @staticmethod
    def export(mask: torch.Tensor, probability: torch.Tensor, output_type: str):
        """mask bool [H, W], probability float [H, W] on CPU -> the requested output type."""
        if output_type == "pt":
            return mask, probability
        if output_type == "np":
            return mask.numpy(), probability.numpy()
        return (
            PIL.Image.fromarray(mask.numpy().astype(np.uint8) * 255).convert("1"),
            PIL.Image.fromarray((probability.numpy() * 255).round().astype(np.uint8), mode="L"),
        )

    @staticmethod
    def merge_classes(above: torch.Tensor, probability: torch.Tensor, class_ids: list[int]) -> torch.Tensor:
        """The class-merging rule. above: bool [K, H, W] (each class's thresholded mask), probability: float
        [K, H, W], class_ids: the K ids -> int64 [H, W]: each pixel takes the id of the likeliest class among those
        whose mask holds there, else 0 (one class: its mask times its id)."""
        best = torch.where(above, probability, -1.0).argmax(dim=0)
        return torch.where(above.any(dim=0), torch.as_tensor(class_ids)[best], 0)

    @staticmethod
    def export_classes(label_map: torch.Tensor, class_probabilities: torch.Tensor, output_type: str,
                       palette: list[int] | None):
        """label_map int64 [H, W], class_probabilities float [K, H, W] on CPU -> the requested output type: uint8
        and float32 arrays for "np", the tensors for "pt", a "P" image (with `palette`) and a float32 array for
        "pil"."""
        if output_type == "pt":
            return label_map, class_probabilities
        if output_type == "np":
            return label_map.numpy().astype(np.uint8), class_probabilities.numpy()
        return DiffewSImageProcessor.label_map_to_image(label_map.numpy(), palette), class_probabilities.numpy()

    # ------------------------------------------------------------------ support sets

    @staticmethod
    def read_support_set(images, masks, multiclass: bool | None = None) -> SupportSet:
        """Any accepted support set -> one checked `SupportSet`.

        Args:
            images: one image or a list of N >= 1 images (the types of the class docstring).
            masks: the N masks, each the size of its image: binary masks, label maps or dicts `{name: binary mask}`.
            multiclass: None (auto: the rule of the class docstring), True (every mask is a label map or a dict) or
                False (every mask is a binary mask).

        A class absent from some shots keeps only the shots that show it. Raises ValueError / TypeError naming the
        argument (`support_images[i]`, `support_masks[i]`).
        """
        if multiclass not in (None, True, False):
            raise ValueError(f"`multiclass` must be None (auto), True or False, got {multiclass!r}.")
        images, masks = as_list(images), as_list(masks)
        if not images or not masks:
            raise ValueError("No shots: `support_images` and `support_masks` must hold at least one image and mask.")
        if len(images) != len(masks):
            raise ValueError(
                f"Got {len(images)} support_images but {len(masks)} support_masks: pass one mask per support image."
            )
        if multiclass is False and any(isinstance(mask, dict) for mask in masks):
            raise TypeError("`multiclass=False` reads binary masks, but `support_masks` holds a dict {name: mask}.")
        processor = DiffewSImageProcessor
        pil_images = [processor.to_pil_image(image, f"support_images[{i}]") for i, image in enumerate(images)]
        if multiclass or (multiclass is None and any(map(processor.is_label_map, masks))):
            return processor._read_classes(pil_images, masks)
        binary_masks = []
        for i, (image, mask) in enumerate(zip(pil_images, masks)):
            binary = processor._checked(processor.to_binary_mask(mask, f"support_masks[{i}]"), image, i)
            if not binary.any():
                raise ValueError(f"support_masks[{i}] is all background: mark the object in each support mask.")
            binary_masks.append(binary)
        return SupportSet(images=pil_images, shots=[list(range(len(pil_images)))], masks=[binary_masks])

    @staticmethod
    def _checked(mask: np.ndarray, image: PIL.Image.Image, index: int, name: str | None = None) -> np.ndarray:
        """Returns `mask` [H, W] if it has the size of `image` (support image `index`), else raises ValueError."""
        if mask.shape != (image.height, image.width):
            raise ValueError(
                f"{name or f'support_masks[{index}]'} is {mask.shape[1]}x{mask.shape[0]} (WxH) but "
                f"support_images[{index}] is {image.width}x{image.height}: a mask must have its image's size."
            )
        return mask

    @staticmethod
    def _read_classes(images: list[PIL.Image.Image], masks: list) -> SupportSet:
        """Label maps (or dicts `{name: binary mask}`), one per image -> the classes, each with the shots showing
        it."""
        processor = DiffewSImageProcessor
        dicts = [isinstance(mask, dict) for mask in masks]
        if any(dicts) and not all(dicts):
            raise TypeError(
                "`support_masks` mixes dicts and other masks: pass a dict {name: binary mask} for every support "
                "image, or a label map for every one."
            )
        per_shot = []  # per_shot[i]: {class key: bool mask [H, W]}
        for i, (image, mask) in enumerate(zip(images, masks)):
            if isinstance(mask, dict):
                names = {key: f"support_masks[{i}][{key!r}]" for key in mask}
                per_shot.append({
                    str(key): processor._checked(processor.to_binary_mask(value, names[key]), image, i, names[key])
                    for key, value in mask.items()
                })
            else:
                labels = processor._checked(processor.to_label_map(mask, f"support_masks[{i}]"), image, i)
                per_shot.append({int(v): labels == v for v in np.unique(labels) if v not in (0, IGNORE_INDEX)})
        shown = dict.fromkeys(key for classes in per_shot for key, mask in classes.items() if mask.any())
        if not shown:
            raise ValueError(
                "`support_masks` are all background: mark at least one class (label 1..254, or a non-empty mask in a "
                "dict) in at least one support image."
            )
        if all(dicts):
            empty = [key for classes in per_shot for key in classes if key not in shown]
            if empty:
                raise ValueError(
                    f"`support_masks`: class {empty[0]!r} is empty in every support image; mark it or leave it out."
                )
            if len(shown) > IGNORE_INDEX - 1:
                raise ValueError(
                    f"`support_masks` name {len(shown)} classes; at most {IGNORE_INDEX - 1} fit a label map."
                )
            keys, class_ids, class_names = list(shown), list(range(1, len(shown) + 1)), list(shown)
        else:
            keys = class_ids = sorted(shown)
            class_names = None
        shots = [[i for i, classes in enumerate(per_shot) if key in classes and classes[key].any()] for key in keys]
        return SupportSet(
            images=images,
            shots=shots,
            masks=[[per_shot[i][key] for i in indices] for key, indices in zip(keys, shots)],
            class_ids=class_ids,
            class_names=class_names,
            palette=next((p for p in map(processor.palette_of, masks) if p is not None), None),
        )


read_support_set = DiffewSImageProcessor.read_support_set


def as_list(value) -> list:
    """One item or a list/tuple of items -> list. A 4-D array or tensor is a batch of images."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 4:
        return list(value)
    return [value]


def is_nested(value) -> bool:
    """True for a list of lists (one support set per query)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, (list, tuple)) for v in value)
