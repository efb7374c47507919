"""`diffews segment` names its threshold and resolution defaults as the model's, and says the values a run used."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline_diffews.cli import main
from pipeline_diffews.segment import add_arguments

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_help_names_the_models_defaults_not_numbers():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    for option, key in (("--threshold THRESHOLD", "threshold"), ("--threshold-mode", "threshold_mode"),
                        ("--processing-resolution PROCESSING_RESOLUTION", "processing_resolution")):
        described = text.split(option, 2)[-1][:300]
        assert f"the model's, its config's `{key}`" in described
    assert "0.25" not in text and "512" not in text


def segment(output: Path, *extra: str) -> int:
    """The shipped offline model on one shipped example (config: threshold 0.15, relative, resolution 64)."""
    folder, model = EXAMPLES / "balloons", EXAMPLES / "tiny-fewshot-pipeline"
    return main(["segment", "--model", str(model), "--support", str(folder / "support_1.png"),
                 "--support-mask", str(folder / "support_1_mask.png"), "--input", str(folder / "query_1.png"),
                 "--output", str(output), "--no-progress", *extra])


def test_the_run_says_the_values_it_used(tmp_path, capsys):
    assert segment(tmp_path / "out") == 0
    assert "threshold 0.15 (relative), processing resolution 64." in capsys.readouterr().out
    assert segment(tmp_path / "out2", "--threshold", "0.4", "--threshold-mode", "absolute",
                   "--processing-resolution", "128") == 0
    assert "threshold 0.4 (absolute), processing resolution 128." in capsys.readouterr().out
