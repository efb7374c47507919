"""Few-shot evaluation results as Hub model-index entries in a pipeline folder's `README.md`."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

from pipeline_diffews.hub import build_model_card

DATASET_TITLES = {
    "coco20i": "COCO-20i",
    "pascal5i": "PASCAL-5i",
    "lvis92i": "LVIS-92i",
    "fss1000": "FSS-1000",
    "ade20k": "ADE20K",
    "camvid": "CamVid",
    "folder": "Custom folder dataset",
}


def eval_results_from(results: dict) -> list[EvalResult]:
    """The mIoU and FB-IoU of one `evaluate.py` run (a dict with dataset, fold, split, shots, miou, fb_iou)."""
    fold = results.get("fold")
    common = dict(
        task_type="image-segmentation",
        task_name=f"Few-shot semantic segmentation ({results['shots']}-shot)",
        dataset_type=results["dataset"],
        dataset_name=DATASET_TITLES.get(results["dataset"], results["dataset"]),
        dataset_config="all classes" if fold is None else f"fold {fold}",
        dataset_split=results.get("split"),
    )
    shots = results["shots"]
    return [
        EvalResult(metric_type="mean_iou", metric_name=f"mIoU {shots}-shot", metric_value=round(results["miou"], 2),
                   **common),
        EvalResult(metric_type="fb_iou", metric_name=f"FB-IoU {shots}-shot", metric_value=round(results["fb_iou"], 2),
                   **common),
    ]


def _same_entry(a: EvalResult, b: EvalResult) -> bool:
    keys = ("task_type", "dataset_type", "dataset_config", "dataset_split", "metric_type", "metric_name")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def update_model_card(folder: str | Path, results: dict, model_name: str | None = None, pipe=None) -> Path:
    """Adds (or replaces) this run's entries in the model-index of `folder/README.md`; creates the card if missing.

    `model_name` (required by the Hub's model-index) defaults to the card's own, then to the folder's name.
    Returns the README path.
    """
    path = Path(folder) / "README.md"
    new = eval_results_from(results)
    if path.is_file():
        card = ModelCard.load(path)
        kept = [r for r in (card.data.eval_results or []) if not any(_same_entry(r, n) for n in new)]
        card.data.eval_results = kept + new
        card.data.model_name = model_name or card.data.model_name or Path(folder).resolve().name
    else:
        card = build_model_card(pipe, eval_results=new, model_name=model_name or Path(folder).resolve().name)
    card.save(path)
    return path
