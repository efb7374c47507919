"""What a benchmark's protocol fixes: its fold split and how its reference code draws test episodes.

:func:`fold_class_ids` splits a benchmark's classes into a fold's training and test classes;
:class:`EpisodePlan` is what a source answers to :meth:`train.data.base.FewShotSource.evaluation_plan`
and :func:`train.data.episodes.draw_plan_specs` reads. This module imports nothing from the
package: sources (``base.py`` and each benchmark) and episodes (``episodes.py``) both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

FOLD_RULES = ("interleaved", "consecutive")
QUERY_RULES = ("listed", "drawn", "cycled")


def fold_class_ids(num_classes: int, fold: int, num_folds: int, rule: str) -> tuple[list[int], list[int]]:
    """Split class ids ``0 .. num_classes - 1`` into a fold's (train, test) ids.

    Args:
        num_classes: number of classes (> 0).
        fold: fold index in ``0 .. num_folds - 1``.
        num_folds: number of folds (>= 2, <= num_classes).
        rule: ``"interleaved"``: test = ``{fold + num_folds * k}`` (COCO-20i: 80 classes,
            4 folds; LVIS-92i: 10 folds; CamVid: 11 classes, 4 folds).
            ``"consecutive"``: test = ``fold * n // num_folds .. (fold + 1) * n // num_folds - 1``
            (PASCAL-5i: 20 classes, 4 folds -> ``{5f, .., 5f + 4}``).
    Returns:
        ``(train_ids, test_ids)``: two sorted, disjoint lists covering all classes.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(num_folds, (int, np.integer)) or not 2 <= num_folds <= num_classes:
        raise ValueError(f"num_folds must be an integer in 2..num_classes={num_classes}, got {num_folds!r}")
    if not isinstance(fold, (int, np.integer)) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an integer in 0..{num_folds - 1}, got {fold!r}")
    if rule == "interleaved":
        test = list(range(int(fold), int(num_classes), int(num_folds)))
    elif rule == "consecutive":
        test = list(range(fold * num_classes // num_folds, (fold + 1) * num_classes // num_folds))
    else:
        raise ValueError(f"rule must be one of {FOLD_RULES}, got {rule!r}")
    held = set(test)
    return [c for c in range(num_classes) if c not in held], test


@dataclass(frozen=True)
class EpisodePlan:
    """How a benchmark's reference code draws its test episodes (read by :func:`draw_plan_specs`).

    Attributes:
        query_rule: ``"listed"``: episode ``i``'s query and class are ``queries[i % len(queries)]``
            (HSNet's PASCAL-5i and FSS-1000); ``"drawn"``: the class is drawn from
            ``classes``, then the query from its pool (HSNet's COCO-20i);
            ``"cycled"``: the class is ``classes[i % len(classes)]``, the query is drawn
            from its pool (Matcher's LVIS-92i).
        classes: the scored classes, in the reference's order (``"drawn"`` draws from this
            list, ``"cycled"`` walks it). mIoU averages over all of them.
        pools: ``{class_id: image keys}`` in the reference's order, duplicates kept: the
            list supports (and drawn queries) are drawn from.
        queries: ``((key, class_id), ...)`` for ``"listed"``, in the reference's order.
        num_episodes: the reference's number of episodes (HSNet: 1000, FSS-1000: every
            test image once, Matcher's LVIS-92i: 2300).
        reference: the reference loader, e.g. ``"HSNet data/pascal.py"``.
    """

    query_rule: str
    classes: tuple[int, ...]
    pools: Mapping[int, Sequence[str]]
    num_episodes: int
    reference: str
    queries: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.query_rule not in QUERY_RULES:
            raise ValueError(f"query_rule must be one of {QUERY_RULES}, got {self.query_rule!r}")
        if not self.classes:
            raise ValueError(f"{self.reference}: the plan has no class to score")
        if self.query_rule == "listed" and not self.queries:
            raise ValueError(f"{self.reference}: a 'listed' plan needs queries")
        needed = {int(c) for c in self.classes} | {int(c) for _, c in self.queries}
        missing = sorted(needed - {int(c) for c in self.pools})
        if missing:
            raise ValueError(f"{self.reference}: no image pool for class(es) {missing}")
