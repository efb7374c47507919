"""The model card of a DiffewS pipeline: Hub metadata rendered into the card template shipped inside the package.

`build_model_card` is what `DiffewSPipeline.push_to_hub`, `diffews publish` and `train/` write as a folder's
`README.md`. This module imports nothing else of the package, so the pipeline file can reach it without a cycle.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

TEMPLATE_NAME = "model_card_template.md"  # package data, beside this module
LICENSE_NAME = "diffews-academic"
LICENSE_TEXT = (
    "The DiffewS weights and the authors' code are released for academic research only; commercial use requires the "
    "authors' consent. The base model (Stable Diffusion 2.1) is under the CreativeML Open RAIL++-M licence, whose "
    "use restrictions also apply."
)


def card_template() -> str:
    """The Jinja text of the model card template (`pipeline_diffews/model_card_template.md`, installed with the
    package)."""
    return resources.files(__package__).joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")


def as_eval_result(result: EvalResult | dict[str, Any]) -> EvalResult:
    """A `huggingface_hub.EvalResult`, from itself or from a dict of its fields."""
    return result if isinstance(result, EvalResult) else EvalResult(**result)


def build_model_card(
    pipe=None,
    repo_id: str | None = None,
    eval_results: list[EvalResult | dict[str, Any]] | None = None,
    model_name: str | None = None,
    base_model: str | None = None,
    origin_text: str = "",
) -> ModelCard:
    """Renders the card template with Hub metadata: library, task, base model, licence terms, evaluation results.

    `base_model` defaults to `pipe.config.base_model`. `eval_results` entries are `EvalResult`s or dicts with its
    fields (task_type, dataset_type, dataset_name, metric_type, metric_value, dataset_split, dataset_config,
    metric_name, source_name, source_url, ...). `origin_text`: a Markdown line saying where the weights come from.
    """
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
        + (f" (reported in [{r.source_name}]({r.source_url}))" if r.source_name else "")
        for r in results
    ) or "Not evaluated yet: run `python train/evaluate.py --update-model-card ...`."
    return ModelCard.from_template(
        card_data,
        template_str=card_template(),
        model_name=model_name,
        repo_id=repo_id or "<user>/<repo>",
        base_model=base_model,
        eval_text=eval_text,
        license_text=LICENSE_TEXT,
        origin_text=origin_text,
    )


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it is a valid `OWNER/NAME` Hub id; ValueError otherwise."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be OWNER/NAME, got {repo_id!r}.")
    validate_repo_id(repo_id)
    return repo_id
