"""Few-shot episodes: what an episode is, how it is loaded, and the fixed evaluation sequences.

Everything here works on any :class:`train.data.base.FewShotSource`.

Evaluation: :class:`EvaluationEpisodes` draws the whole sequence of test episodes up front,
in one pass, from ``np.random.RandomState(seed)`` (the stream of HSNet's
``np.random.seed(0)``), so that every process of a sharded run holds the same sequence.
Two protocols:

* ``"hsnet"`` (default): the reference loaders' episodes. The source says how its
  benchmark's reference code draws (:meth:`FewShotSource.evaluation_plan`, an
  :class:`EpisodePlan`): PASCAL-5i lists its queries (episode ``i`` takes line
  ``i mod n`` of the fold's split file), COCO-20i draws the class then the query,
  FSS-1000 lists every test image once, LVIS-92i (Matcher) cycles through the fold's
  classes and draws the query. Every draw is HSNet's
  ``np.random.choice(pool, 1, replace=False)[0]``: the first element of a permutation of
  the whole pool (:func:`reference_choice`). Supports are drawn from the class's pool
  until ``shots`` of them differ from the query: only equality with the query is
  rejected, so a support can appear twice. See :func:`draw_plan_specs`.
* ``"distinct"``: class uniform, query uniform in the class, then supports redrawn
  while equal to the query or to an already chosen support (``a[rng.randint(len(a))]``
  draws), among the classes with ``1 + shots`` images. This is not any paper's sequence.

Several classes: :class:`MulticlassEpisodes` draws episodes whose query and supports carry
label maps of all the source's classes (the ``--multiclass`` evaluation): every image holding
one of the classes once as the query, in a seeded order, with supports drawn among the others.

Training episodes (a random stream) are drawn in :mod:`train.data.training_episodes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .base import IGNORE, FewShotSource
from .protocol import EpisodePlan

PROTOCOLS = ("hsnet", "distinct")


# ---------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One few-shot episode.

    Attributes:
        query_image: RGB ``PIL.Image`` (its own size, H x W).
        query_mask: uint8 (H, W), 0 background / 1 class / 255 ignore.
        support_images: ``shots`` RGB images (each its own size).
        support_masks: ``shots`` uint8 arrays (H_i, W_i) of 0/1 (ignore pixels mapped to 0).
        class_id: the class (id of the source).
        query_key / support_keys: the source's image keys.
    """

    query_image: Image.Image
    query_mask: np.ndarray
    support_images: list[Image.Image]
    support_masks: list[np.ndarray]
    class_id: int
    query_key: str
    support_keys: list[str] = field(default_factory=list)

    @property
    def shots(self) -> int:
        return len(self.support_images)

    def binary_query_mask(self) -> np.ndarray:
        """``query_mask`` with ignore (255) mapped to 0: uint8 (H, W) of 0/1."""
        return np.where(self.query_mask == 1, 1, 0).astype(np.uint8)


class EpisodeSpec(NamedTuple):
    """What an episode is made of, before loading: class, query key, support keys."""

    class_id: int
    query_key: str
    support_keys: tuple[str, ...]


def load_episode(source: FewShotSource, spec: EpisodeSpec) -> Episode:
    """Load the images and masks of ``spec`` from ``source``."""
    supports = [source.load_mask(k, spec.class_id) for k in spec.support_keys]
    return Episode(
        query_image=source.load_image(spec.query_key),
        query_mask=source.load_mask(spec.query_key, spec.class_id),
        support_images=[source.load_image(k) for k in spec.support_keys],
        support_masks=[np.where(m == 1, 1, 0).astype(np.uint8) for m in supports],
        class_id=int(spec.class_id),
        query_key=spec.query_key,
        support_keys=list(spec.support_keys),
    )


def collate_episodes(batch: Sequence[Episode]) -> list[Episode]:
    """``collate_fn`` for DataLoaders of episodes: the list itself (PIL images stay PIL).

    Raises ValueError if the episodes of the batch have different numbers of shots.
    """
    batch = list(batch)
    shots = {e.shots for e in batch}
    if len(shots) > 1:
        raise ValueError(f"a batch mixes episodes with different shots: {sorted(shots)}")
    return batch


def check_shots(shots) -> int:
    if not isinstance(shots, (int, np.integer)) or isinstance(shots, bool) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    return int(shots)


def usable_classes_or_raise(source: FewShotSource, shots: int) -> list[int]:
    ids = source.usable_classes(1 + shots)
    if not ids:
        raise ValueError(
            f"{source.name}: no class has the {1 + shots} images needed for a {shots}-shot "
            f"episode (classes: {source.class_ids})"
        )
    return ids


# ---------------------------------------------------------------------- evaluation


def reference_choice(rng: np.random.RandomState, pool: Sequence) -> int:
    """Index drawn as HSNet's ``np.random.choice(pool, 1, replace=False)[0]``.

    In numpy's legacy ``RandomState`` that call takes the first element of
    ``rng.permutation(len(pool))``: it consumes the stream differently from
    ``rng.randint(len(pool))``, so it is written here the same way.
    """
    return int(rng.choice(len(pool), 1, replace=False)[0])


def draw_plan_specs(plan: EpisodePlan, shots: int, num_episodes: int | None = None,
                    seed: int = 0) -> list[EpisodeSpec]:
    """The reference's episode sequence of ``plan`` (episode ``i`` after episode ``i - 1``).

    Per episode, on one ``np.random.RandomState(seed)`` stream: the class and query
    (``plan.query_rule``), then supports drawn from the class's pool with
    :func:`reference_choice` until ``shots`` of them differ from the query (repeats kept).

    Args:
        plan: see :class:`EpisodePlan`.
        shots: supports per episode (>= 1).
        num_episodes: default ``plan.num_episodes``.
        seed: HSNet and Matcher: 0.
    Raises:
        ValueError: a query's class pool holds no other image (the reference would loop
            forever).
    """
    shots = check_shots(shots)
    num_episodes = plan.num_episodes if num_episodes is None else _check_episodes(num_episodes)
    rng = np.random.RandomState(seed)
    classes = [int(c) for c in plan.classes]
    pools = {int(c): list(v) for c, v in plan.pools.items()}
    distinct = {c: set(v) for c, v in pools.items()}
    specs = []
    for i in range(num_episodes):
        if plan.query_rule == "listed":
            query, c = plan.queries[i % len(plan.queries)]
            c = int(c)
        else:
            c = classes[i % len(classes)] if plan.query_rule == "cycled" else classes[reference_choice(rng, classes)]
            query = pools[c][reference_choice(rng, pools[c])]
        if not distinct[c] - {query}:
            raise ValueError(f"{plan.reference}: class {c} has no image other than the query {query!r} "
                             "to draw a support from")
        supports: list[str] = []
        while len(supports) < shots:  # only equality with the query is rejected
            s = pools[c][reference_choice(rng, pools[c])]
            if s != query:
                supports.append(s)
        specs.append(EpisodeSpec(c, query, tuple(supports)))
    return specs


def draw_distinct_specs(source: FewShotSource, shots: int, num_episodes: int = 1000,
                        seed: int = 0) -> list[EpisodeSpec]:
    """The ``"distinct"`` protocol (see the module docstring)."""
    shots = check_shots(shots)
    num_episodes = _check_episodes(num_episodes)
    class_ids = usable_classes_or_raise(source, shots)
    rng = np.random.RandomState(seed)
    images = {c: source.images_of_class(c) for c in class_ids}
    specs = []
    for _ in range(num_episodes):
        c = int(class_ids[rng.randint(len(class_ids))])
        imgs = images[c]
        query = imgs[rng.randint(len(imgs))]
        supports: list[str] = []
        while len(supports) < shots:  # terminates: len(imgs) >= 1 + shots
            s = imgs[rng.randint(len(imgs))]
            if s != query and s not in supports:
                supports.append(s)
        specs.append(EpisodeSpec(c, query, tuple(supports)))
    return specs


def _check_episodes(num_episodes) -> int:
    if not isinstance(num_episodes, (int, np.integer)) or isinstance(num_episodes, bool) or num_episodes < 1:
        raise ValueError(f"num_episodes must be an integer >= 1, got {num_episodes!r}")
    return int(num_episodes)


def _check_protocol(protocol) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def draw_evaluation_specs(
    source: FewShotSource, shots: int, num_episodes: int | None = None, seed: int = 0,
    protocol: str = "hsnet",
) -> list[EpisodeSpec]:
    """The fixed episode sequence of ``source`` (see the module docstring).

    Args:
        num_episodes: default: the reference's count (``"hsnet"``: HSNet's 1000,
            FSS-1000's number of test images, LVIS-92i's 2300) or 1000 (``"distinct"``).
        protocol: ``"hsnet"`` or ``"distinct"``.
    """
    if _check_protocol(protocol) == "distinct":
        return draw_distinct_specs(source, shots, 1000 if num_episodes is None else num_episodes, seed)
    return draw_plan_specs(source.evaluation_plan(check_shots(shots)), shots, num_episodes, seed)


class FixedEpisodes(torch.utils.data.Dataset):
    """A sequence of evaluation episodes drawn up front (``specs``), loaded one by one, shardable.

    Several processes: take ``ds.shard(rank, world_size)`` (disjoint, together all
    episodes, no padding). Do NOT let ``accelerator.prepare`` shard it with the default
    ``even_batches=True``: when the number of episodes is not a multiple of the world size it
    repeats episodes to pad, which would count them twice in the metric.
    """

    specs: list

    def __len__(self) -> int:
        return len(self.specs)

    def shard_indices(self, rank: int, world_size: int) -> list[int]:
        """Episode indices of process ``rank``: ``rank, rank + world_size, ...``."""
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in 0..{world_size - 1}, got {rank!r}")
        return list(range(rank, len(self), world_size))

    def shard(self, rank: int, world_size: int) -> torch.utils.data.Subset:
        """The episodes of process ``rank`` out of ``world_size`` (disjoint, no padding)."""
        return torch.utils.data.Subset(self, self.shard_indices(rank, world_size))


class EvaluationEpisodes(FixedEpisodes):
    """The fixed evaluation episodes of one fold.

    Args:
        source: the fold's test source (e.g. ``build_source("coco20i", root, "val", f, "test")``).
        shots: supports per episode (>= 1).
        num_episodes: default: the protocol's (HSNet: 1000 per fold; FSS-1000: each test
            image once; LVIS-92i: 2300).
        seed: seed of ``np.random.RandomState`` (HSNet: 0).
        protocol: ``"hsnet"`` (default: the reference loaders' episodes, see
            :meth:`FewShotSource.evaluation_plan`) or ``"distinct"`` (see the module docstring).

    Attributes:
        specs: the sequence, drawn in ``__init__`` in one pass, so every process that
            builds it with the same arguments gets the same episodes.
        class_ids: the scored classes: mIoU averages over all of them, a class without
            an episode counting 0 (HSNet).

    ``__getitem__(i)`` loads episode ``i`` as an :class:`Episode`. Use
    ``collate_fn=collate_episodes`` in a DataLoader; several processes: see :class:`FixedEpisodes`.
    """

    def __init__(self, source: FewShotSource, shots: int, num_episodes: int | None = None, seed: int = 0,
                 protocol: str = "hsnet"):
        self.source = source
        self.shots = check_shots(shots)
        self.seed = seed
        self.protocol = _check_protocol(protocol)
        if protocol == "hsnet":
            self.plan: EpisodePlan | None = source.evaluation_plan(self.shots)
            self.specs: list[EpisodeSpec] = draw_plan_specs(self.plan, self.shots, num_episodes, seed)
            self.class_ids: list[int] = [int(c) for c in self.plan.classes]
        else:
            self.plan = None
            self.specs = draw_distinct_specs(source, self.shots, 1000 if num_episodes is None else num_episodes, seed)
            self.class_ids = source.usable_classes(1 + self.shots)

    def __getitem__(self, index: int) -> Episode:
        return load_episode(self.source, self.specs[index])


# ---------------------------------------------------------------------- several classes


@dataclass
class MulticlassEpisode:
    """One episode with several classes: label maps of the source's classes.

    Attributes:
        query_image: RGB ``PIL.Image`` (H x W).
        query_labels: uint8 (H, W): 0 background, ``k + 1`` = ``class_ids[k]``, 255 ignore;
            classes that no support shows are 0 (the model was not asked for them).
        support_images: ``shots`` RGB images (each its own size).
        support_labels: ``shots`` uint8 label maps (H_i, W_i), same coding.
        class_ids: the source's class ids of labels ``1 .. len(class_ids)``.
        query_key / support_keys: the source's image keys.
    """

    query_key: str
    query_image: Image.Image
    query_labels: np.ndarray
    support_keys: list[str]
    support_images: list[Image.Image]
    support_labels: list[np.ndarray]
    class_ids: list[int]

    @property
    def shots(self) -> int:
        return len(self.support_images)

    @property
    def shown(self) -> list[int]:
        """The labels (1..K) shown in at least one support, ascending."""
        values = np.unique(np.concatenate([np.unique(m) for m in self.support_labels]))
        return [int(v) for v in values if 0 < v < IGNORE]


def label_map(source: FewShotSource, key: str, class_ids: Sequence[int]) -> np.ndarray:
    """uint8 (H, W) of image ``key``: ``k + 1`` where ``class_ids[k]`` is, 255 where the source ignores, else 0."""
    labels = None
    for k, class_id in enumerate(class_ids):
        mask = source.load_mask(key, class_id)  # uint8: 1 the class, 0 other, 255 ignored
        if labels is None:
            labels = np.where(mask == IGNORE, IGNORE, 0).astype(np.uint8)
        labels[mask == 1] = k + 1
    return labels


def draw_multiclass_specs(source: FewShotSource, shots: int, num_episodes: int | None = None,
                          seed: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """``(query key, support keys)`` per episode, from ``np.random.RandomState(seed)``.

    The images holding at least one of the source's classes, in a seeded order: every one once
    as the query when ``num_episodes`` is None (repeating the order when more are asked for);
    supports drawn uniformly among the other images, all different.
    """
    shots = check_shots(shots)
    keys = sorted({key for c in source.class_ids for key in source.images_of_class(c)})
    if len(keys) <= shots:
        raise ValueError(f"{source.name}: {len(keys)} images hold the classes {list(source.class_ids)}, a {shots}-shot "
                         f"episode needs more than {shots}")
    rng = np.random.RandomState(seed)
    count = len(keys) if num_episodes is None else _check_episodes(num_episodes)
    order = []
    while len(order) < count:
        order += [keys[i] for i in rng.permutation(len(keys))]
    specs = []
    for query in order[:count]:
        others = [k for k in keys if k != query]
        specs.append((query, tuple(others[i] for i in rng.choice(len(others), shots, replace=False))))
    return specs


def load_multiclass_episode(source: FewShotSource, query: str, supports: Sequence[str]) -> MulticlassEpisode:
    """Reads the images and label maps of one episode; query pixels of classes no support shows become 0."""
    class_ids = list(source.class_ids)
    support_labels = [label_map(source, key, class_ids) for key in supports]
    query_labels = label_map(source, query, class_ids)
    shown = np.zeros(IGNORE + 1, bool)
    for labels in support_labels:
        shown[labels] = True
    shown[0] = shown[IGNORE] = True
    query_labels[~shown[query_labels]] = 0
    return MulticlassEpisode(
        query_key=query,
        query_image=source.load_image(query),
        query_labels=query_labels,
        support_keys=list(supports),
        support_images=[source.load_image(key) for key in supports],
        support_labels=support_labels,
        class_ids=class_ids,
    )


class MulticlassEpisodes(FixedEpisodes):
    """The fixed several-class evaluation episodes of a source (see :func:`draw_multiclass_specs`).

    ``specs`` holds ``(query key, support keys)`` per episode; ``__getitem__(i)`` loads episode
    ``i`` as a :class:`MulticlassEpisode`. Use ``collate_fn=collate_episodes`` in a DataLoader.
    """

    def __init__(self, source: FewShotSource, shots: int, num_episodes: int | None = None, seed: int = 0):
        self.source = source
        self.shots = check_shots(shots)
        self.seed = seed
        self.specs = draw_multiclass_specs(source, self.shots, num_episodes, seed)
        self.class_ids: list[int] = list(source.class_ids)

    def __getitem__(self, index: int) -> MulticlassEpisode:
        return load_multiclass_episode(self.source, *self.specs[index])
