"""The authors' release in its real layouts (tiny, random) and stand-ins for the two download clients.

`write_modelscope_repo` lays out the ModelScope repository `zzzmmz/Diffews` as released: `weight/incontext/unet/`
(safetensors, the authors' class name and extra config keys), `weight/coco_fold0/` (the UNet files directly, a pickled
.bin, no `in_channels_ref` in the config), and `weight/coco_fold2/` without weights. `write_hub_repo` is a Stable
Diffusion 2.1 repository (model_index.json, unet/, vae/, text_encoder/, tokenizer/). `FakeSnapshotDownload` replaces a
client's `snapshot_download`: it checks the call against the real function's signature, copies the files matching
`allow_patterns` (fnmatch, as both clients match) into a cache folder and returns that folder, like the clients do.
"""

from __future__ import annotations

import contextlib
import fnmatch
import importlib
import inspect
import io
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from pipeline_diffews import official
from tests.tiny_models import RESOLUTION, write_official_unet, write_sd_base

# The module whose `snapshot_download` official.py calls (imported by its path: `modelscope` itself imports lazily).
MODELSCOPE_MODULE = importlib.import_module("modelscope.hub.snapshot_download")
REAL_CLIENTS = {"modelscope": MODELSCOPE_MODULE.snapshot_download, "hub": huggingface_hub.snapshot_download}
# Where each official UNet lies in the fixture repository, and its seed.
UNET_FOLDERS = {"incontext": ("weight/incontext/unet", 3), "coco-fold0": ("weight/coco_fold0", 4)}


def write_modelscope_repo(root: Path) -> Path:
    folder, seed = UNET_FOLDERS["incontext"]
    unet = write_official_unet(root / folder, seed=seed)
    (unet / "random_states_0.pkl").write_bytes(b"training state, not needed")  # the download must skip it
    folder, seed = UNET_FOLDERS["coco-fold0"]
    write_official_unet(root / folder, seed=seed, weights="bin", with_ref_config=False)
    (root / "weight" / "coco_fold2").mkdir(parents=True)
    (root / "weight" / "coco_fold2" / "notes.txt").write_text("weights to come\n")
    (root / "README.md").write_text("DiffewS weights\n")
    return root


def write_hub_repo(root: Path) -> Path:
    write_sd_base(root)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


class FakeSnapshotDownload:
    """A client's `snapshot_download` over a local tree: records each call's patterns and the files it fetched.

    `fail_after`: raise ConnectionError after copying that many files (a download cut half-way).
    """

    def __init__(self, real, repo_id: str, tree: Path, cache: Path, fail_after: int | None = None):
        self.signature = inspect.signature(real)
        self.repo_id, self.tree, self.cache, self.fail_after = repo_id, tree, cache, fail_after
        self.calls: list[list[str]] = []
        self.fetched: list[str] = []

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs).arguments
        repo_id = bound.get("repo_id") or bound.get("model_id")
        assert repo_id == self.repo_id, repo_id
        patterns = bound.get("allow_patterns")
        patterns = [patterns] if isinstance(patterns, str) else patterns
        assert patterns, "a download without allow_patterns would fetch the whole repository"
        self.calls.append(list(patterns))
        files = sorted(p.relative_to(self.tree).as_posix() for p in self.tree.rglob("*") if p.is_file())
        for relative in (f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)):
            if self.fail_after is not None and len(self.fetched) >= self.fail_after:
                raise ConnectionError("connection reset by peer")
            (self.cache / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.tree / relative, self.cache / relative)
            self.fetched.append(relative)
        return str(self.cache)


class Clients:
    """Both fakes, over the fixture trees under `root`, with fresh client caches."""

    def __init__(self, root: Path, trees: tuple[Path, Path], fail_after: int | None = None):
        ms_tree, hub_tree = trees
        self.modelscope = FakeSnapshotDownload(REAL_CLIENTS["modelscope"],
                                               official.MODELSCOPE_REPO, ms_tree, root / "ms_cache", fail_after)
        self.hub = FakeSnapshotDownload(REAL_CLIENTS["hub"], official.DEFAULT_BASE_MODEL, hub_tree,
                                        root / "hf_cache")

    def install(self, monkeypatch) -> Clients:
        monkeypatch.setattr(MODELSCOPE_MODULE, "snapshot_download", self.modelscope)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.hub)
        return self

    @property
    def call_count(self) -> int:
        return len(self.modelscope.calls) + len(self.hub.calls)


@pytest.fixture(scope="session")
def release_trees(tmp_path_factory) -> tuple[Path, Path]:
    """(ModelScope repository tree, Hub base repository tree)."""
    return (write_modelscope_repo(tmp_path_factory.mktemp("modelscope_repo")),
            write_hub_repo(tmp_path_factory.mktemp("hub_repo")))


@pytest.fixture(scope="module")
def official_home(tmp_path_factory, release_trees) -> Path:
    """A DIFFEWS_HOME holding `incontext` and `coco-fold0`, downloaded through the fakes, set to run at the tiny
    models' resolution."""
    root = tmp_path_factory.mktemp("official_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(official.HOME_ENV, str(root / "home"))
        Clients(root, release_trees).install(patch)
        with contextlib.redirect_stderr(io.StringIO()):
            folders = [official.download(name) for name in ("incontext", "coco-fold0")]
    for folder in folders:
        set_processing_resolution(folder, RESOLUTION)
    return root / "home"


@pytest.fixture
def offline_home(official_home, monkeypatch) -> Path:
    """`official_home` as DIFFEWS_HOME, with clients that fail the test if anything is downloaded."""

    def no_download(*args, **kwargs):
        raise AssertionError(f"unexpected download: {args} {kwargs}")

    monkeypatch.setenv(official.HOME_ENV, str(official_home))
    monkeypatch.setattr(MODELSCOPE_MODULE, "snapshot_download", no_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    return official_home


def set_processing_resolution(folder: Path, resolution: int) -> None:
    """The tiny fixture models run at the tiny resolution (as `tests.tiny_models` pipelines do)."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["processing_resolution"] = resolution
    index_path.write_text(json.dumps(index, indent=2))
