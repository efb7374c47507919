"""Training episodes: a random stream of few-shot episodes, reproducible step by step.

:class:`TrainingEpisodes` is a map-style dataset whose item ``index`` is a pure function of
``(seed, index)``, so it can be sharded, shuffled across workers, and resumed exactly; see its
docstring. Each episode is drawn by :func:`draw_training_spec` and loaded by
:func:`train.data.episodes.load_episode`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import FewShotSource
from .episodes import Episode, EpisodeSpec, check_shots, load_episode, usable_classes_or_raise

SHOTS_STREAM = 2**32 - 1
"""Last word of the seed of the per-step shots draw (never an episode index)."""


def draw_training_spec(
    source: FewShotSource,
    shots: int,
    rng: np.random.Generator,
    class_ids: Sequence[int] | None = None,
) -> EpisodeSpec:
    """Draw a random training episode (class, query, ``shots`` distinct other supports).

    The class is drawn with ``source.class_weights`` (uniform over classes by default)
    among ``class_ids`` (default: ``source.usable_classes(1 + shots)``).
    """
    shots = check_shots(shots)
    if class_ids is None:
        class_ids = usable_classes_or_raise(source, shots)
    class_ids = list(class_ids)
    p = source.class_weights(class_ids)
    c = int(class_ids[int(rng.choice(len(class_ids), p=p))])
    imgs = source.images_of_class(c)
    n = len(imgs)
    if n < 1 + shots:
        raise ValueError(f"{source.name}: class {c} has {n} images, a {shots}-shot episode needs {1 + shots}")
    q = int(rng.integers(n))
    others = rng.choice(n - 1, size=shots, replace=False)
    supports = tuple(imgs[int(j) + int(j >= q)] for j in others)
    return EpisodeSpec(c, imgs[q], supports)


def sample_training_episode(
    source: FewShotSource,
    shots: int,
    rng: np.random.Generator,
    class_ids: Sequence[int] | None = None,
) -> Episode:
    """Draw (:func:`draw_training_spec`) and load a random training episode."""
    return load_episode(source, draw_training_spec(source, shots, rng, class_ids))


class TrainingEpisodes(torch.utils.data.Dataset):
    """Random training episodes, a pure function of ``(seed, step, slot)``.

    Args:
        source: the training source (e.g. COCO-20i train split, fold f, mode "train").
        max_shots: the shots of a step are drawn uniformly in ``1 .. max_shots``.
        batch_size: episodes per process per step (B).
        seed: base seed.
        num_steps: loader steps (micro-batches per process) in total.
        world_size: number of training processes (W); every step draws ``B * W``
            episodes, process ``r`` gets slots ``r*B .. r*B + B - 1``.
        start_step: first step served (resume: pass the number of steps already done).
        accumulation_steps: loader steps per optimisation step; all the micro-batches of
            one optimisation step share its number of shots.

    Item layout: ``len(ds) = (num_steps - start_step) * B * W``; item ``index`` is step
    ``s = start_step + index // (B * W)``, slot ``i = index % (B * W)``. Its episode is
    drawn from ``np.random.default_rng([seed, s, i])`` with ``shots_at(s)`` shots, and
    ``shots_at(s)`` comes from ``default_rng([seed, s // accumulation_steps, 2**32 - 1])``.
    Each episode has its OWN supports; all episodes of a step have the same shots.

    How to load it (``collate_fn=collate_episodes`` always; any ``num_workers``):

    * one process: ``DataLoader(ds, batch_size=B, shuffle=False)``: batch ``t`` = step
      ``start_step + t``.
    * Accelerate: build with ``world_size=accelerator.num_processes`` and call
      ``accelerator.prepare(DataLoader(ds, batch_size=B, shuffle=False))``: Accelerate
      gives global batch ``k`` to process ``k % W``, which is exactly slot block ``r`` of
      step ``k // W``; the length is a multiple of ``B * W``, so nothing is padded.
    * plain DDP (no Accelerate): ``DataLoader(ds, batch_sampler=ds.batch_sampler(rank))``
      (do not use ``DistributedSampler``: it would mix steps within a batch).
    * resume at step ``s``: rebuild with ``start_step=s`` (same seed): the episodes are
      identical to those an uninterrupted run would have seen, whatever the workers.
    """

    def __init__(
        self,
        source: FewShotSource,
        max_shots: int,
        batch_size: int,
        seed: int = 0,
        num_steps: int = 10_000,
        world_size: int = 1,
        start_step: int = 0,
        accumulation_steps: int = 1,
    ):
        self.source = source
        self.max_shots = check_shots(max_shots)
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1),
                            ("num_steps", num_steps, 1), ("accumulation_steps", accumulation_steps, 1),
                            ("start_step", start_step, 0), ("seed", seed, 0)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if start_step > num_steps:
            raise ValueError(f"start_step ({start_step}) must be <= num_steps ({num_steps})")
        self.batch_size, self.seed, self.num_steps = int(batch_size), int(seed), int(num_steps)
        self.world_size, self.start_step = int(world_size), int(start_step)
        self.accumulation_steps = int(accumulation_steps)
        # Usable classes for every possible number of shots, computed (and warned about) now.
        self.class_ids_by_shots = {k: usable_classes_or_raise(source, k) for k in range(1, self.max_shots + 1)}

    @property
    def episodes_per_step(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        return (self.num_steps - self.start_step) * self.episodes_per_step

    def locate(self, index: int) -> tuple[int, int]:
        """``(step, slot)`` of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        return self.start_step + index // self.episodes_per_step, index % self.episodes_per_step

    def shots_at(self, step: int) -> int:
        """Number of shots of loader step ``step`` (uniform in 1..max_shots)."""
        rng = np.random.default_rng([self.seed, step // self.accumulation_steps, SHOTS_STREAM])
        return 1 + int(rng.integers(self.max_shots))

    def spec(self, step: int, slot: int) -> EpisodeSpec:
        """The episode of ``slot`` (0 .. B*W - 1) of ``step`` (not loaded)."""
        shots = self.shots_at(step)
        rng = np.random.default_rng([self.seed, step, slot])
        return draw_training_spec(self.source, shots, rng, self.class_ids_by_shots[shots])

    def __getitem__(self, index: int) -> Episode:
        return load_episode(self.source, self.spec(*self.locate(index)))

    def step_indices(self, step: int, rank: int = 0) -> list[int]:
        """Item indices of process ``rank`` at ``step``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank!r}")
        if not self.start_step <= step < self.num_steps:
            raise ValueError(f"step must be in {self.start_step}..{self.num_steps - 1}, got {step!r}")
        first = (step - self.start_step) * self.episodes_per_step + rank * self.batch_size
        return list(range(first, first + self.batch_size))

    def batch(self, step: int, rank: int = 0) -> list[Episode]:
        """The B loaded episodes of process ``rank`` at ``step`` (no DataLoader)."""
        return [self[i] for i in self.step_indices(step, rank)]

    def batch_sampler(self, rank: int) -> "StepBatchSampler":
        """Batch sampler yielding process ``rank``'s item indices, one list per step."""
        return StepBatchSampler(self, rank)


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields ``ds.step_indices(step, rank)`` for every step of a :class:`TrainingEpisodes`."""

    def __init__(self, dataset: TrainingEpisodes, rank: int):
        if not isinstance(rank, int) or not 0 <= rank < dataset.world_size:
            raise ValueError(f"rank must be an integer in 0..{dataset.world_size - 1}, got {rank!r}")
        self.dataset, self.rank = dataset, rank

    def __len__(self) -> int:
        return self.dataset.num_steps - self.dataset.start_step

    def __iter__(self):
        for step in range(self.dataset.start_step, self.dataset.num_steps):
            yield self.dataset.step_indices(step, self.rank)
