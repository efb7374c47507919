"""Writing evaluation results: JSON to a file (its folder made as needed), or to standard output."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(results: dict, output: str | None) -> None:
    """`results` as indented JSON to `output`, or printed when `output` is None."""
    text = json.dumps(results, indent=2)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")
    else:
        print(text)
