"""The example set of one Label Studio project: every usable annotation is a shot, kept as its own support cache.

A shot is encoded once, on its own (`encode_support` with a dict {label: mask}: one support pass per label it
shows), when it is added or changed; the support the predictions use joins the shots' caches label by label
(`cat_shots`), in annotation order. The support pass treats every shot on its own, so the join equals encoding all
the shots at once; replacing or removing a shot is a re-join, with no support pass for the others. Each label uses
its `max_shots` most recent shots (a query's cost and the caches' memory grow with the shots: 88 MiB per shot and
label in float32 at Stable Diffusion 2.1's sizes). The shots' caches live on the CPU; the joined support on the
pipeline's device, until the set changes.

`model_version` names the set in use: the model's name, the number of shots and a digest of every shot's annotation
id, image URL and masks. It changes whenever a shot in use is added, changed or removed, and is the same for the same
annotations after a restart.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image

from ..support_diffews import DiffewSSupport

logger = logging.getLogger("pipeline_diffews.label_studio")


@dataclass
class Shot:
    """One annotation as an example: its task, image URL, the digest of its masks, the masks themselves (kept
    compressed, to encode the shot again when it comes back into use), and once encoded one single-shot support cache
    per label (on the CPU; None until encoded, or after it fell out of use)."""

    annotation_id: int
    task_id: int
    image_url: str
    digest: str
    packed: dict[str, tuple[tuple[int, int], bytes]]  # label -> (mask shape, zlib of its packed bits)
    caches: dict[str, Any] | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.packed)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """{label: bool [H, W]}."""
        return {label: np.unpackbits(np.frombuffer(zlib.decompress(data), np.uint8), count=shape[0] * shape[1])
                .reshape(shape).astype(bool) for label, (shape, data) in self.packed.items()}


def shot_digest(annotation_id: int, image_url: str, masks: dict[str, np.ndarray]) -> str:
    """A digest of an annotation's id, image URL and masks (labels, sizes, pixels), the same whichever way they were
    read."""
    digest = hashlib.sha256(f"{int(annotation_id)}|{image_url}".encode())
    for label in sorted(masks):
        mask = np.asarray(masks[label], dtype=bool)
        digest.update(f"|{label}|{mask.shape}|".encode())
        digest.update(np.packbits(mask).tobytes())
    return digest.hexdigest()


class ExampleSet:
    """The shots of one project, by annotation id; each label uses its `max_shots` most recent shots.

    pipe: the DiffewSPipeline. model_name: the first part of `model_version`. read_image: (url, task id) -> PIL
    image, raising an exception with a one-line message when it cannot. processing_resolution: the square size the
    model sees (None: the model's). labels: the config's labels, in order (the classes' order in the support).
    max_shots: how many shots each label uses at most (the most recent annotations; a query's cost and the caches'
    memory grow with it). A shot used by no label keeps no cache, and is encoded again if it comes back into use.
    """

    def __init__(self, pipe, model_name: str, read_image: Callable[[str, int], PIL.Image.Image],
                 processing_resolution: int | None = None, labels: list[str] | None = None, max_shots: int = 10):
        if max_shots < 1:
            raise ValueError(f"max_shots must be at least 1, got {max_shots}")
        self.pipe = pipe
        self.model_name = model_name
        self.read_image = read_image
        self.processing_resolution = processing_resolution or pipe.config.processing_resolution
        self.labels = list(labels or [])
        self.max_shots = max_shots
        self._shots: dict[int, Shot] = {}
        self._support: DiffewSSupport | None = None
        self._support_key = None  # what `_support` was joined from

    def __len__(self) -> int:
        return len(self._shots)

    @property
    def shots(self) -> list[Shot]:
        """Every shot, in annotation order."""
        return [self._shots[key] for key in sorted(self._shots)]

    def windows(self) -> dict[str, list[Shot]]:
        """{label: its most recent `max_shots` shots, in annotation order}, labels in `labels` order, then others."""
        shots = self.shots
        present = {label for shot in shots for label in shot.labels}
        order = [label for label in self.labels if label in present] + sorted(present - set(self.labels))
        return {label: [shot for shot in shots if label in shot.packed][-self.max_shots :] for label in order}

    def in_use(self) -> list[Shot]:
        """The shots some label uses, in annotation order."""
        used = {shot.annotation_id for window in self.windows().values() for shot in window}
        return [shot for shot in self.shots if shot.annotation_id in used]

    @property
    def model_version(self) -> str:
        """`<model>-<N>shots-<digest>` of the N shots in use, or `<model>-0shots` for an empty set."""
        shots = self.in_use()
        if not shots:
            return f"{self.model_name}-0shots"
        digest = hashlib.sha256("".join(shot.digest for shot in shots).encode()).hexdigest()[:10]
        return f"{self.model_name}-{len(shots)}shot{'s' if len(shots) > 1 else ''}-{digest}"

    def put(self, annotation_id: int, task_id: int, image_url: str, masks: dict[str, np.ndarray]) -> bool:
        """Adds the annotation as a shot, or replaces its shot; returns False when it is already there with the same
        masks. masks: {label: bool [H, W]}, each with object pixels."""
        if not masks:
            raise ValueError(f"annotation {annotation_id} has no mask to learn from")
        digest = shot_digest(annotation_id, image_url, masks)
        old = self._shots.get(annotation_id)
        if old is not None and old.digest == digest:
            return False
        packed = {label: (np.shape(mask), zlib.compress(np.packbits(np.asarray(mask, bool)).tobytes()))
                  for label, mask in masks.items()}
        self._shots[annotation_id] = Shot(int(annotation_id), int(task_id), image_url, digest, packed)
        return True

    def remove(self, annotation_ids) -> int:
        """Removes the shots of these annotation ids (ids that are no shot are ignored); returns how many."""
        return len([self._shots.pop(int(key)) for key in annotation_ids if int(key) in self._shots])

    def remove_tasks(self, task_ids) -> int:
        """Removes the shots of these tasks; returns how many."""
        tasks = {int(key) for key in task_ids}
        return self.remove([shot.annotation_id for shot in self.shots if shot.task_id in tasks])

    def adopt(self, other: "ExampleSet") -> int:
        """Takes the support caches of `other`'s encoded shots that are the same here (annotation, masks, image), so
        that reading a project again encodes only what changed. Returns how many were taken."""
        taken = 0
        for shot in self._shots.values():
            old = other._shots.get(shot.annotation_id)
            if shot.caches is None and old is not None and old.caches is not None and old.digest == shot.digest:
                shot.caches = old.caches
                taken += 1
        return taken

    def encode_pending(self) -> list[str]:
        """Runs the support pass of every shot in use that has no cache (added, changed, or back in use), one shot at
        a time, and releases the caches of the shots out of use. A shot whose image cannot be read (ValueError from
        `read_image`) or whose masks the pipeline refuses is dropped; returns one line per dropped shot. Other errors
        of `read_image` (Label Studio unreachable) propagate, and the shot stays pending."""
        problems = []
        while pending := [shot for shot in self.in_use() if shot.caches is None]:
            for shot in pending:
                try:
                    shot.caches = self._encode(shot)
                except (ValueError, TypeError) as error:  # dropped: an older shot may come into use
                    self._shots.pop(shot.annotation_id)
                    problems.append(f"annotation {shot.annotation_id} (task {shot.task_id}) left out: {error}")
        used = {shot.annotation_id for shot in self.in_use()}
        for shot in self.shots:
            if shot.annotation_id not in used:
                shot.caches = None
        return problems

    def _encode(self, shot: Shot) -> dict[str, Any]:
        """{label: the shot's single-shot support cache of that label, on the CPU}."""
        image = self.read_image(shot.image_url, shot.task_id)
        masks = {label: _fit(mask, image.size) for label, mask in shot.masks.items()}
        support = self.pipe.encode_support(image, masks, processing_resolution=self.processing_resolution,
                                           multiclass=True)
        return {name: cache.to(device="cpu") for name, cache in zip(support.class_names, support.class_key_values)}

    def support(self) -> DiffewSSupport | None:
        """The support of the shots in use (after `encode_pending`), one class per label (`windows` order) holding
        the label's shots, on the pipeline's device; None for an empty set. Joined again only when the set changed."""
        windows = {label: [shot for shot in window if shot.caches is not None]
                   for label, window in self.windows().items()}
        windows = {label: window for label, window in windows.items() if window}
        key = [(label, [shot.digest for shot in window]) for label, window in windows.items()]
        if key != self._support_key:
            self._support = None if not windows else DiffewSSupport(
                key_values=None, num_shots=len({shot.annotation_id for w in windows.values() for shot in w}),
                processing_resolution=self.processing_resolution, class_ids=list(range(1, len(windows) + 1)),
                class_names=list(windows),
                class_key_values=[_joined([shot.caches[label] for shot in window], self.pipe.device)
                                  for label, window in windows.items()],
            )
            self._support_key = key
        return self._support


def _joined(caches: list, device):
    """Single-shot caches of one label joined shot-wise, on `device`."""
    return type(caches[0]).cat_shots(caches).to(device=device)


def _fit(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The mask at the image's size (width, height): as it is, or resized (nearest) when the annotation was drawn on
    another size of the image."""
    if mask.shape == (size[1], size[0]):
        return mask
    logger.warning("a mask of %d x %d is resized to its image's %d x %d", mask.shape[1], mask.shape[0], *size)
    return np.asarray(PIL.Image.fromarray(mask).resize(size, PIL.Image.NEAREST), dtype=bool)
