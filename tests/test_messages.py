"""`--model` values that name nothing loadable: one line saying what is wrong, from `load_pipeline` (shared by the
command line, the demo and evaluation) as a ModelNotFoundError; before any network access when the value is plainly
a local path or cannot be a Hub id. The help texts name the official models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from pipeline_diffews import DiffewSPipeline
from pipeline_diffews.cli import build_parser, main
from pipeline_diffews.official import ModelNotFoundError, load_pipeline
from tests.cli_data import write_images, write_support

NAMES = "incontext, coco-fold0, coco-fold1, coco-fold2, coco-fold3"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to fetch from the Hub (or to load at all) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(DiffewSPipeline, "from_pretrained", refuse)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working folder holding an `examples/` folder."""
    (tmp_path / "examples").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def segment_error(tmp_path, model: str, capsys) -> str:
    """Runs `diffews segment --model MODEL`; asserts exit code 2 and one line on stderr, returns it."""
    image, mask = write_support(tmp_path / "support")
    images = write_images(tmp_path / "images", corrupt=False)
    code = main(["segment", "--model", model, "--support", str(image), "--support-mask", str(mask), "--input",
                 str(images), "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("value", ["examples/no-such-model", "./no-such-model", "/no/such/model", "~/no-such-model",
                                   "../no-such-model"])
def test_a_plainly_local_path_is_named_before_any_network_access(workdir, no_network, capsys, value):
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline(value)
    assert str(error.value) == f"{value}: no such folder, and not an official model ({NAMES})."
    assert isinstance(error.value, ValueError)
    err = segment_error(workdir, value, capsys)
    assert err == f"error: --model {value}: no such folder, and not an official model ({NAMES})."


@pytest.mark.parametrize("value", ["no such model", "a/b/c", "owner/name!", "x--y/z"])
def test_a_value_that_cannot_be_a_hub_id(workdir, no_network, capsys, value):
    expected = f"{value}: not an official model ({NAMES}), an existing folder or a Hub repository id (OWNER/NAME)."
    with pytest.raises(ModelNotFoundError, match="not an official model") as error:
        load_pipeline(value)
    assert str(error.value) == expected
    assert segment_error(workdir, value, capsys) == f"error: --model {expected}"


def test_a_folder_that_holds_no_pipeline_and_a_file(workdir, no_network, capsys):
    (workdir / "examples" / "notes.txt").write_text("x")
    with pytest.raises(ModelNotFoundError, match=r"^examples: this folder holds no saved pipeline \(no model_index"):
        load_pipeline("examples")
    with pytest.raises(ModelNotFoundError, match="examples/notes.txt: a file, not a pipeline folder"):
        load_pipeline("examples/notes.txt")
    assert "examples: this folder holds no saved pipeline" in segment_error(workdir, "examples", capsys)


def test_a_hub_id_offline_names_the_id_and_the_hub(workdir, capsys):
    assert constants.HF_HUB_OFFLINE  # set by conftest
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline("someone/diffews-x")
    assert str(error.value) == (
        f"someone/diffews-x: not an official model ({NAMES}) or a folder, and the Hub could not be reached to fetch "
        "this repository id (offline mode is on (HF_HUB_OFFLINE) and the repository is not in the local cache).")
    assert isinstance(error.value.__cause__, (LocalEntryNotFoundError, huggingface_hub.errors.OfflineModeIsEnabled))
    err = segment_error(workdir, "someone/diffews-x", capsys)
    assert err.startswith("error: --model someone/diffews-x: ") and "Hub could not be reached" in err
    assert "coco-fold4: " in str(pytest.raises(ModelNotFoundError, load_pipeline, "coco-fold4").value)
    assert "(did you mean the official model coco-fold" in str(pytest.raises(ModelNotFoundError, load_pipeline,
                                                                             "coco-fold4").value)


def test_a_hub_id_without_connection_or_without_repository(workdir, monkeypatch):
    """The Hub client's own errors (raised where it would reach the network) become one line naming the id."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_connection(repo_id, **kwargs):
        raise LocalEntryNotFoundError("An error happened while trying to locate the files on the Hub ... check your "
                                      "internet connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_connection)
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline("someone/diffews-x", revision="v1")
    assert str(error.value) == (
        f"someone/diffews-x: not an official model ({NAMES}) or a folder, and the Hub could not be reached to fetch "
        "this repository id at revision v1 (no connection, and the repository is not in the local cache).")

    def missing(repo_id, **kwargs):
        url = f"https://huggingface.co/api/models/{repo_id}"
        response = httpx2.Response(404, request=httpx2.Request("GET", url))
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline("someone/diffews-x")
    assert str(error.value) == ("someone/diffews-x: the Hub has no repository of that id, or it is private or gated "
                                "(log in with `hf auth login`).")


def test_a_folder_and_an_official_folder_still_load(saved_pipeline):
    pipe = load_pipeline(saved_pipeline)
    assert type(pipe) is DiffewSPipeline and pipe.dtype.is_floating_point and str(pipe.device) == "cpu"


def test_help_texts_name_the_official_models(monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # argparse would wrap lines at the hyphens of the names
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("segment", "download", "publish"):
        assert NAMES in " ".join(commands[name].format_help().split()), name


@pytest.mark.parametrize("script, extra", [
    ("train/evaluate.py", ["--dataset", "synthetic", "--fold", "0", "--shots", "1"]),
    ("train/train.py", ["--dataset", "synthetic"]),
])
def test_training_and_evaluation_say_in_one_line_that_the_model_does_not_exist(script, extra, tmp_path):
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, str(root / script), "--pretrained", "examples/no-such-model", *extra]
    if script == "train/train.py":
        command += ["--output-dir", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --pretrained examples/no-such-model: no such folder, and not an official model ({NAMES})."
    )
