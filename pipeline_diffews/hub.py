"""Publish a converted DiffewS pipeline to the Hub with its code and a model card (from `model_card.md`).

    diffews publish incontext --repo OWNER/NAME [--private]
    diffews publish DIR --repo OWNER/NAME

An official name (`incontext`, `coco-fold0` .. `coco-fold3`) is downloaded and converted first if needed; its card
carries the paper's results for that checkpoint. Log in first (`hf auth login`, or set HF_TOKEN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants
from huggingface_hub.utils import validate_repo_id

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
    origin_text: str = "",
) -> ModelCard:
    """Renders `model_card.md` with Hub metadata: library, task, base model, licence terms, evaluation results.

    `eval_results` entries are `EvalResult`s or dicts with its fields (task_type, dataset_type, dataset_name,
    metric_type, metric_value, dataset_split, dataset_config, metric_name, source_name, source_url, ...).
    `origin_text`: a Markdown line saying where the weights come from.
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
        + (f" (reported in [{r.source_name}]({r.source_url}))" if r.source_name else "")
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
        origin_text=origin_text,
    )


# ---------------------------------------------------------------------------------------------- publish


def publish(name_or_dir: str, repo_id: str, private: bool = False, token: str | None = None):
    """Uploads the pipeline `name_or_dir` (an official name or a saved pipeline folder) to `repo_id` with
    `push_to_hub`: weights, configs, the code files (so `DiffusionPipeline.from_pretrained(repo_id,
    trust_remote_code=True)` loads it) and the model card of `folder_model_card`. Returns the upload's `CommitInfo`.
    """
    from .official import OFFICIAL_MODELS, resolve_model
    from .pipeline_diffews import DiffewSPipeline

    check_repo_id(repo_id)
    folder = Path(resolve_model(name_or_dir))
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"name_or_dir must be one of {', '.join(OFFICIAL_MODELS)} or a saved DiffewS pipeline folder "
            f"(with model_index.json), got {name_or_dir!r}."
        )
    pipe = DiffewSPipeline.from_pretrained(folder)
    card = folder_model_card(pipe, folder, repo_id)
    return pipe.push_to_hub(repo_id, model_card=card, private=private, token=token)


def folder_model_card(pipe, folder: str | Path, repo_id: str) -> ModelCard:
    """The card of a pipeline folder: the paper's results when it is a converted official checkpoint, plus the
    results already in its `README.md` (`train/evaluate.py --update-model-card`), under that card's model name."""
    from .official import MODELSCOPE_REPO, official_source

    folder = Path(folder)
    official = official_source(folder)
    results = official.eval_results() if official else []
    model_name = f"diffews-{official.name}" if official else None
    origin = ""
    if official:
        origin = (
            f"The weights are the authors' `{official.name}` checkpoint ({official.description}), released on "
            f"ModelScope (`{MODELSCOPE_REPO}`, `{official.folder}`) and converted with `diffews download "
            f"{official.name}`."
        )
    if (folder / "README.md").is_file():
        card = ModelCard.load(folder / "README.md")
        results = results + list(card.data.eval_results or [])
        model_name = card.data.model_name or model_name
    return build_model_card(pipe, repo_id=repo_id, eval_results=results, model_name=model_name, origin_text=origin)


def check_repo_id(repo_id: str) -> str:
    """`repo_id` when it is a valid `OWNER/NAME` Hub id; ValueError otherwise."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be OWNER/NAME, got {repo_id!r}.")
    validate_repo_id(repo_id)
    return repo_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name_or_dir", metavar="NAME_OR_DIR",
                        help="an official name (incontext, coco-fold0..3) or a saved pipeline folder")
    parser.add_argument("--repo", required=True, help="the Hub repository to create or update, OWNER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")


def run(args: argparse.Namespace) -> int:
    """Exit code 2 for a wrong argument or a missing client, 1 if the upload fails."""
    try:
        info = publish(args.name_or_dir, args.repo, private=args.private)
    except (ValueError, TypeError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - network, authentication and server errors of the Hub
        print(f"error: publishing to {args.repo} failed ({type(error).__name__}: {error}).", file=sys.stderr)
        return 1
    print(f"Published to {getattr(info, 'commit_url', None) or f'{constants.ENDPOINT}/{args.repo}'}")
    return 0
