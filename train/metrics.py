"""The IoU metrics of the evaluation: HSNet's few-shot metric and semantic segmentation's, as torchmetrics.

:class:`FewShotSegmentationMetric` scores one-class episodes (mIoU and FB-IoU);
:class:`SemanticSegmentationIoU` scores label maps of several classes (``--multiclass``).

For every class ``c`` the metric pools, over all episodes of ``c``, the foreground
intersection and union and the background intersection and union (ignore pixels, gt ==
255, excluded). Then:

* ``per_class[c] = 100 * sum(fg intersection) / max(sum(fg union), 1)`` (a class evaluated
  but never predicted gets 0 if it had ground truth; a class with an empty union also
  gets 0, as HSNet's ``max(union, 1)``);
* ``miou`` = mean of ``per_class`` over the classes seen (updated at least once); with
  HSNet's 1000 episodes this is every test class of the fold;
* ``fb_iou = 100 * mean(sum_c bg_inter / sum_c bg_union, sum_c fg_inter / sum_c fg_union)``,
  pooled over the classes seen (HSNet's FB-IoU);
* ``episodes`` = number of episodes.

States are per-class count vectors reduced with ``sum``, so under torch.distributed
``compute()`` gathers all processes' episodes (each process must have seen disjoint
episodes, e.g. ``EvaluationEpisodes.shard``), and ``merge_state`` combines two metrics.
No logging happens here.

Label maps (:class:`SemanticSegmentationIoU`): one confusion matrix over (background + K
classes), pooled over every image, ``IoU_c = TP / (TP + FP + FN)``; a class an image lacks
still costs false positives where it is predicted; mIoU = mean over the classes 1..K with a
non-empty union.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

IGNORE = 255


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    return x


class FewShotSegmentationMetric(Metric):
    """Pooled per-class IoU (HSNet). See the module docstring.

    Args:
        num_classes: class ids are ``0 .. num_classes - 1`` (use ``source.num_classes``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        for name in ("fg_inter", "fg_union", "bg_inter", "bg_union", "count"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_mask, gt_mask, class_id) -> None:
        """Add one episode, or a batch of episodes.

        Args:
            pred_mask: bool (H, W) or (B, H, W) (numpy or torch; nonzero = foreground).
            gt_mask: uint8 of the same shape, values 0 / 1 / 255 (255 ignored).
            class_id: int, or a sequence / tensor of B ints for a batch.
        """
        pred = _as_tensor(pred_mask, "pred_mask").to(self.device)
        gt = _as_tensor(gt_mask, "gt_mask").to(self.device)
        if pred.shape != gt.shape or pred.ndim not in (2, 3):
            raise ValueError(f"pred_mask and gt_mask must have the same shape (H, W) or (B, H, W); "
                             f"got {tuple(pred.shape)} and {tuple(gt.shape)}")
        if pred.ndim == 2:
            pred, gt = pred[None], gt[None]
            ids = [class_id]
        else:
            if isinstance(class_id, (torch.Tensor, np.ndarray)):
                ids = class_id.reshape(-1).tolist()
            elif isinstance(class_id, Sequence) and not isinstance(class_id, str):
                ids = list(class_id)
            else:
                ids = None
            if ids is None or len(ids) != pred.shape[0]:
                raise ValueError(f"class_id must give one id per episode ({pred.shape[0]}), got {class_id!r}")
        ids_t = torch.as_tensor([int(c) for c in ids], dtype=torch.long, device=self.device)
        if ((ids_t < 0) | (ids_t >= self.num_classes)).any():
            raise ValueError(f"class_id must be in 0..{self.num_classes - 1}, got {ids}")
        bad = ~((gt == 0) | (gt == 1) | (gt == IGNORE))
        if bad.any():
            raise ValueError(f"gt_mask values must be 0, 1 or 255; found {torch.unique(gt[bad]).tolist()}")
        valid = gt != IGNORE
        p = pred.bool() & valid
        g = (gt == 1) & valid
        pb = ~pred.bool() & valid
        gb = (gt == 0) & valid
        dims = (1, 2)
        self.fg_inter.index_add_(0, ids_t, (p & g).sum(dims))
        self.fg_union.index_add_(0, ids_t, (p | g).sum(dims))
        self.bg_inter.index_add_(0, ids_t, (pb & gb).sum(dims))
        self.bg_union.index_add_(0, ids_t, (pb | gb).sum(dims))
        self.count.index_add_(0, ids_t, torch.ones_like(ids_t))

    def compute(self) -> dict:
        """``{"miou", "fb_iou", "per_class": {class_id: IoU}, "episodes"}`` (IoUs x100).

        With no episode yet: ``miou`` and ``fb_iou`` are NaN, ``per_class`` is empty.
        """
        seen = torch.nonzero(self.count > 0).flatten()
        episodes = int(self.count.sum())
        if seen.numel() == 0:
            return {"miou": float("nan"), "fb_iou": float("nan"), "per_class": {}, "episodes": 0}
        fi, fu = self.fg_inter[seen].double(), self.fg_union[seen].double()
        bi, bu = self.bg_inter[seen].double(), self.bg_union[seen].double()
        iou = fi / fu.clamp(min=1) * 100
        fg = fi.sum() / fu.sum().clamp(min=1)
        bg = bi.sum() / bu.sum().clamp(min=1)
        return {
            "miou": float(iou.mean()),
            "fb_iou": float((fg + bg) / 2 * 100),
            "per_class": {int(c): float(v) for c, v in zip(seen.tolist(), iou.tolist())},
            "episodes": episodes,
        }


class SemanticSegmentationIoU:
    """Per-class IoU from one confusion matrix pooled over all images (torchmetrics' MulticlassConfusionMatrix).

    Args:
        num_labels: K + 1 (label 0 = background, 1..K = classes); label 255 is ignored.
    """

    def __init__(self, num_labels: int):
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"num_labels must be an integer >= 2 (background + classes), got {num_labels!r}")
        self.num_labels = num_labels
        self.matrix = MulticlassConfusionMatrix(num_classes=num_labels, ignore_index=IGNORE)
        self.images = 0

    def update(self, prediction: np.ndarray, truth: np.ndarray) -> None:
        """prediction: integer label map [H, W] in 0..K. truth: uint8 [H, W] in 0..K or 255 (ignored)."""
        prediction, truth = np.asarray(prediction), np.asarray(truth)
        if prediction.shape != truth.shape or prediction.ndim != 2:
            raise ValueError(f"prediction and truth must be label maps [H, W] of one shape, got {prediction.shape} "
                             f"and {truth.shape}")
        for name, labels in (("prediction", prediction), ("truth", truth)):
            bad = (labels >= self.num_labels) & (labels != IGNORE) | (labels < 0)
            if bad.any():
                raise ValueError(f"{name} holds labels {np.unique(labels[bad]).tolist()} outside 0..{self.num_labels - 1}")
        if (prediction == IGNORE).any():
            raise ValueError("prediction must not hold the ignore label 255")
        self.matrix.update(torch.from_numpy(prediction.astype(np.int64)).flatten(),
                           torch.from_numpy(truth.astype(np.int64)).flatten())
        self.images += 1

    def compute(self) -> dict:
        """{"iou": [IoU of label 0..K] (x100, NaN for an empty union), "miou": mean over labels 1..K that have a
        union (x100), "background_iou", "images"}."""
        matrix = self.matrix.compute().double()  # [truth, prediction]
        true_positive = matrix.diag()
        union = matrix.sum(0) + matrix.sum(1) - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1) * 100, torch.tensor(float("nan")))
        classes = iou[1:][union[1:] > 0]
        return {
            "iou": iou.tolist(),
            "miou": float(classes.mean()) if classes.numel() else float("nan"),
            "background_iou": float(iou[0]),
            "images": self.images,
        }
