"""The repository as a whole: no file names a folder of the machine it sits on (code, tests, docs, results and cards
hold paths relative to the repository, or settings such as DIFFEWS_CAMVID_ROOT), and the pipeline file stays small."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FILE = ROOT / "pipeline_diffews" / "pipeline_diffews.py"
MAX_PIPELINE_LINES = 700


def repository_files() -> list[str]:
    """The files git tracks or would add (untracked and not ignored), relative to the repository."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: which files belong to the repository is unknown")
    return [name for name in listed.stdout.decode("utf-8").split("\0") if name and (ROOT / name).is_file()]


def machine_folders() -> list[str]:
    """The absolute folders of this machine that no file may name: the folder that holds the checkout (and so the
    checkout itself, and the data beside it), and the home folder; the filesystem root is no such folder."""
    folders = [ROOT.parent, Path.home()]
    return sorted({str(folder) + os.sep for folder in folders if len(folder.parts) > 1})


def lines_naming(text: str, folders: list[str]) -> list[int]:
    return [number for number, line in enumerate(text.splitlines(), 1) if any(f in line for f in folders)]


def test_the_check_sees_a_machine_path():
    folders = machine_folders()
    assert folders and all(os.path.isabs(folder) for folder in folders)
    text = f"data = 'shared/data/camvid'\nroot = '{ROOT.parent / 'shared' / 'data' / 'camvid'}'\n"
    assert lines_naming(text, folders) == [2]


def test_no_file_names_a_folder_of_this_machine():
    folders = machine_folders()
    found = []
    for name in repository_files():
        try:
            text = (ROOT / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # images, weights and other binary files
        found += [f"{name}:{number}" for number in lines_naming(text, folders)]
    assert not found, f"absolute paths of this machine ({', '.join(folders)}) in: {', '.join(found)}"


def test_the_pipeline_file_stays_small():
    """The pipeline file holds the outputs, loading and saving, the checks, `encode_support` and `__call__`; pixels
    and supports live in the image processor, the device speed-ups in their own module."""
    lines = len(PIPELINE_FILE.read_text(encoding="utf-8").splitlines())
    assert lines < MAX_PIPELINE_LINES, f"{PIPELINE_FILE.name} has {lines} lines"
