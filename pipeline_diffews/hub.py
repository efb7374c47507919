"""The model card of a DiffewS pipeline on the Hub, built from the project's `model_card.md` template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_card.md"
LICENSE_NAME = "diffews-academic"
LICENSE_TEXT = (
    "The DiffewS weights and the authors' code are released for academic research only; commercial use requires the "
    "authors' consent. The base model (Stable Diffusion 2.1) is under the CreativeML Open RAIL++-M licence, whose "
    "use restrictions also apply."
)


def as_eval_result(result: EvalResult | dict[str, Any]) -> EvalResult:
    """A `huggingface_hub.EvalResult`, from itself or from a dict of its fields."""
    return result if isinstance(result, EvalResult) else EvalResult(**result)


def build_model_card(
    pipe=None,
    repo_id: str | None = None,
    eval_results: list[EvalResult | dict[str, Any]] | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
) -> ModelCard:
    """Renders `model_card.md` with Hub metadata: library, task, base model, licence terms, evaluation results.

    `eval_results` entries are `EvalResult`s or dicts with its fields (task_type, dataset_type, dataset_name,
    metric_type, metric_value, dataset_split, dataset_config, metric_name, ...).
    """
    if not TEMPLATE_PATH.is_file():
        raise FileNotFoundError(f"The model card template {TEMPLATE_PATH} is missing: install the project from its source tree.")
    base_model = base_model or (pipe.config.base_model if pipe is not None else None)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else "DiffewS")
    results = [as_eval_result(r) for r in eval_results or []]
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="image-segmentation",
        base_model=base_model,
        license="other",
        license_name=LICENSE_NAME,
        tags=["diffews", "few-shot-segmentation", "in-context-segmentation", "stable-diffusion"],
        model_name=model_name,
        eval_results=results or None,
    )
    eval_text = "\n".join(
        f"- {r.dataset_name} ({r.dataset_config or r.dataset_type}): {r.metric_name or r.metric_type} = {r.metric_value}"
        for r in results
    ) or "Not evaluated yet: run `python train/evaluate.py --update-model-card ...`."
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id or "<user>/<repo>",
        base_model=base_model,
        eval_text=eval_text,
        license_text=LICENSE_TEXT,
    )
