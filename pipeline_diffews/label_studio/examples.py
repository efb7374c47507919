"""The example set of one Label Studio project: every usable annotation is a shot, kept as its own support cache.

A shot is encoded once, on its own (`encode_support` with a dict {label: mask}: one support pass per label it
shows), when it is added or changed; the support the predictions use joins the shots' caches label by label
(`cat_shots`), in annotation order. The support pass treats every shot on its own, so the join equals encoding all
the shots at once; replacing or removing a shot is a re-join, with no support pass for the others. The shots' caches
live on the CPU; the joined support on the pipeline's device, until the set changes.

`model_version` names the set: the model's name, the number of shots and a digest of every shot's annotation id,
image URL and masks. It changes whenever a shot is added, changed or removed, and is the same for the same
annotations after a restart.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image

from ..support_diffews import DiffewSSupport

logger = logging.getLogger("pipeline_diffews.label_studio")


@dataclass
class Shot:
    """One annotation as an example: its task, image URL, the digest of its masks, and until it is encoded its
    masks {label: bool [H, W]}; once encoded, one single-shot support cache per label (on the CPU)."""

    annotation_id: int
    task_id: int
    image_url: str
    digest: str
    masks: dict[str, np.ndarray] | None
    caches: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.caches) if self.masks is None else list(self.masks)


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
    """The shots of one project, by annotation id.

    pipe: the DiffewSPipeline. model_name: the first part of `model_version`. read_image: (url, task id) -> PIL
    image, raising an exception with a one-line message when it cannot. processing_resolution: the square size the
    model sees (None: the model's). labels: the config's labels, in order (the classes' order in the support).
    """

    def __init__(self, pipe, model_name: str, read_image: Callable[[str, int], PIL.Image.Image],
                 processing_resolution: int | None = None, labels: list[str] | None = None):
        self.pipe = pipe
        self.model_name = model_name
        self.read_image = read_image
        self.processing_resolution = processing_resolution or pipe.config.processing_resolution
        self.labels = list(labels or [])
        self._shots: dict[int, Shot] = {}
        self._support: DiffewSSupport | None = None

    def __len__(self) -> int:
        return len(self._shots)

    @property
    def shots(self) -> list[Shot]:
        """The shots in annotation order."""
        return [self._shots[key] for key in sorted(self._shots)]

    @property
    def model_version(self) -> str:
        """`<model>-<N>shots-<digest>`, or `<model>-0shots` for an empty set."""
        shots = self.shots
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
        self._shots[annotation_id] = Shot(int(annotation_id), int(task_id), image_url, digest, dict(masks))
        self._support = None
        return True

    def remove(self, annotation_ids) -> int:
        """Removes the shots of these annotation ids (ids that are no shot are ignored); returns how many."""
        removed = [self._shots.pop(int(key)) for key in annotation_ids if int(key) in self._shots]
        if removed:
            self._support = None
        return len(removed)

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
            if shot.masks is not None and old is not None and old.masks is None and old.digest == shot.digest:
                shot.caches, shot.masks = old.caches, None
                taken += 1
        return taken

    def encode_pending(self) -> list[str]:
        """Runs the support pass of every shot added or changed since the last call, one shot at a time. A shot whose
        image cannot be read (ValueError from `read_image`) or whose masks the pipeline refuses is dropped; returns
        one line per dropped shot. Other errors of `read_image` (Label Studio unreachable) propagate, and the shot
        stays pending."""
        problems = []
        for shot in self.shots:
            if shot.masks is None:
                continue
            try:
                shot.caches = self._encode(shot)
            except (ValueError, TypeError) as error:
                self._shots.pop(shot.annotation_id)
                self._support = None
                problems.append(f"annotation {shot.annotation_id} (task {shot.task_id}) left out: {error}")
                continue
            shot.masks = None
        return problems

    def _encode(self, shot: Shot) -> dict[str, Any]:
        """{label: the shot's single-shot support cache of that label, on the CPU}."""
        image = self.read_image(shot.image_url, shot.task_id)
        masks = {label: _fit(mask, image.size) for label, mask in shot.masks.items()}
        support = self.pipe.encode_support(image, masks, processing_resolution=self.processing_resolution,
                                           multiclass=True)
        return {name: cache.to(device="cpu") for name, cache in zip(support.class_names, support.class_key_values)}

    def support(self) -> DiffewSSupport | None:
        """The support of every encoded shot, one class per label (in `labels` order, then any other label), on the
        pipeline's device; None while no shot is encoded."""
        shots = [shot for shot in self.shots if shot.masks is None]
        if not shots:
            return None
        if self._support is None or self._support.num_shots != len(shots):
            present = {label for shot in shots for label in shot.caches}
            order = [label for label in self.labels if label in present]
            order += sorted(present - set(order))
            caches = []
            for label in order:
                parts = [shot.caches[label] for shot in shots if label in shot.caches]
                caches.append(type(parts[0]).cat_shots(parts).to(device=self.pipe.device))
            self._support = DiffewSSupport(
                key_values=None, num_shots=len(shots), processing_resolution=self.processing_resolution,
                class_ids=list(range(1, len(order) + 1)), class_names=order, class_key_values=caches,
            )
        return self._support


def _fit(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The mask at the image's size (width, height): as it is, or resized (nearest) when the annotation was drawn on
    another size of the image."""
    if mask.shape == (size[1], size[0]):
        return mask
    logger.warning("a mask of %d x %d is resized to its image's %d x %d", mask.shape[1], mask.shape[0], *size)
    return np.asarray(PIL.Image.fromarray(mask).resize(size, PIL.Image.NEAREST), dtype=bool)
