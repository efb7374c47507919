"""Publish a DiffewS pipeline to the Hub with its code and a model card.

    diffews publish incontext --repo OWNER/NAME [--private]
    diffews publish DIR --repo OWNER/NAME
    diffews publish incontext --repo OWNER/NAME --card-only     # print the card, upload nothing

An official name (incontext, coco-fold0 .. coco-fold3) is downloaded and converted first if needed; its card carries
the paper's results for that checkpoint. Log in first (`hf auth login`, or set HF_TOKEN).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from huggingface_hub import ModelCard, constants

from .hub import build_model_card, check_repo_id
from .official import (
    MODELSCOPE_REPO,
    OFFICIAL_MODELS,
    OfficialModel,
    cache_home,
    is_pipeline_folder,
    official_names,
    official_source,
    resolve_model,
)
from .pipeline_diffews import DEFAULT_BASE_MODEL, DiffewSPipeline


def publish(name_or_dir: str, repo_id: str, private: bool = False, token: str | None = None):
    """Uploads the pipeline `name_or_dir` (an official name or a saved pipeline folder) to `repo_id` with
    `push_to_hub`: weights, configs, the code files (so `DiffusionPipeline.from_pretrained(repo_id,
    trust_remote_code=True)` loads it) and the card of `folder_model_card`. Returns the upload's `CommitInfo`.
    """
    check_repo_id(repo_id)
    folder = Path(resolve_model(name_or_dir))
    _check_folder(folder, name_or_dir)
    pipe = DiffewSPipeline.from_pretrained(folder)
    return pipe.push_to_hub(repo_id, model_card=folder_model_card(folder, repo_id), private=private, token=token)


def model_card_for(name_or_dir: str, repo_id: str) -> ModelCard:
    """The card `publish` uploads for `name_or_dir`, made without downloading anything: an official name that is not
    downloaded yet gets the card of its registry entry (the paper's results), a folder its `folder_model_card`."""
    check_repo_id(repo_id)
    if name_or_dir in OFFICIAL_MODELS and not os.path.isdir(name_or_dir):
        folder = cache_home() / name_or_dir
        if not is_pipeline_folder(folder):
            return official_model_card(OFFICIAL_MODELS[name_or_dir], repo_id)
    else:
        folder = Path(name_or_dir)
        _check_folder(folder, name_or_dir)
    return folder_model_card(folder, repo_id)


def official_model_card(model: OfficialModel, repo_id: str) -> ModelCard:
    """The card of official checkpoint `model` converted with its default base model."""
    return build_model_card(repo_id=repo_id, eval_results=model.eval_results(), model_name=f"diffews-{model.name}",
                            base_model=DEFAULT_BASE_MODEL, origin_text=_origin_text(model))


def folder_model_card(folder: str | Path, repo_id: str) -> ModelCard:
    """The card of a pipeline folder: the paper's results when it is a converted official checkpoint, plus the
    results already in its `README.md` (`train/evaluate.py --update-model-card`), under that card's model name."""
    folder = Path(folder)
    official = official_source(folder)
    results = official.eval_results() if official else []
    model_name = f"diffews-{official.name}" if official else None
    if (folder / "README.md").is_file():
        card = ModelCard.load(folder / "README.md")
        results = results + list(card.data.eval_results or [])
        model_name = card.data.model_name or model_name
    base_model = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("base_model")
    return build_model_card(repo_id=repo_id, eval_results=results, model_name=model_name, base_model=base_model,
                            origin_text=_origin_text(official) if official else "")


def _origin_text(model: OfficialModel) -> str:
    return (
        f"The weights are the authors' `{model.name}` checkpoint ({model.description}), released on "
        f"ModelScope (`{MODELSCOPE_REPO}`, `{model.folder}`) and converted with `diffews download {model.name}`."
    )


def _check_folder(folder: Path, name_or_dir: str) -> None:
    if not is_pipeline_folder(folder):
        raise ValueError(
            f"name_or_dir must be one of {official_names()} or a saved DiffewS pipeline folder "
            f"(with model_index.json), got {name_or_dir!r}."
        )


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name_or_dir", metavar="NAME_OR_DIR",
                        help=f"an official model ({official_names()}) or a saved pipeline folder")
    parser.add_argument("--repo", required=True, help="the Hub repository to create or update, OWNER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--card-only", action="store_true",
                        help="print the model card that would be uploaded, and upload nothing (downloads nothing)")


def run(args: argparse.Namespace) -> int:
    """Exit code 2 for a wrong argument or a missing client, 1 if the upload fails."""
    try:
        if args.card_only:
            print(model_card_for(args.name_or_dir, args.repo), end="")
            return 0
        info = publish(args.name_or_dir, args.repo, private=args.private)
    except (ValueError, TypeError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - network, authentication and server errors of the Hub
        print(f"error: publishing to {args.repo} failed ({type(error).__name__}: {error}).", file=sys.stderr)
        return 1
    print(f"Published to {getattr(info, 'commit_url', None) or f'{constants.ENDPOINT}/{args.repo}'}")
    return 0
