"""`--source-option KEY=VALUE` on the command line -> keyword arguments of `train.data.build_source`."""

from __future__ import annotations

import argparse
import json


def source_option(text: str) -> tuple[str, object]:
    """`"min_images=6"` -> `("min_images", 6)`; the value is read as JSON when it parses (numbers, true, null, lists),
    else kept as a string (`"crowd=ignore"`)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with a Python identifier as KEY, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_source_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source-option", type=source_option, action="append", default=[], metavar="KEY=VALUE",
        help="Extra argument of the dataset source, repeatable: e.g. min_images=6 (LVIS-92i 5-shot, as Matcher), "
             "crowd=ignore (COCO), weighting=uniform (incontext), index_cache=false.",
    )
