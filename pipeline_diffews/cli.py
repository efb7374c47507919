"""The `diffews` command line.

    diffews segment --model NAME_DIR_OR_REPO --support IMG --support-mask MASK --input PATH --output DIR
    diffews segment --model NAME_DIR_OR_REPO --support-dir EXAMPLES --input PATH --output DIR --format coco
    diffews download NAME [--output DIR]
    diffews publish NAME_OR_DIR --repo OWNER/NAME [--private] [--card-only]
    diffews convert-official --official DIR --base DIR --output DIR
    diffews init-from-sd --base DIR --output DIR
    diffews label-studio --model NAME_DIR_OR_REPO [--port 9090]   (with LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)

NAME: an official model (incontext, coco-fold0 .. coco-fold3), downloaded and converted the first time. On several
GPUs: `accelerate launch -m pipeline_diffews segment ...` (the inputs are split between the processes).
"""

from __future__ import annotations

import argparse
import sys

from . import convert_official, init_from_sd, official, publish, segment
from .label_studio import command as label_studio

COMMANDS = {
    "segment": (segment, "segment images, folders, globs and videos with one set of examples"),
    "download": (official, f"download, convert and cache the authors' checkpoint NAME ({official.official_names()})"),
    "publish": (publish, "push a converted pipeline with its code and model card to the Hub"),
    "convert-official": (convert_official, "convert the authors' fine-tuned UNet into a DiffewS pipeline folder"),
    "init-from-sd": (init_from_sd, "make an untrained DiffewS pipeline from Stable Diffusion 2.1 (to train)"),
    "label-studio": (label_studio, "serve a Label Studio ML backend that learns from the project's own annotations"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffews",
        description="DiffewS: few-shot segmentation with Stable Diffusion in one UNet step.",
        epilog="Several GPUs: accelerate launch -m pipeline_diffews segment ... ; "
        "`diffews COMMAND --help` describes each command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        subparser = commands.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0])
        module.add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses `argv` (default: sys.argv[1:]) and runs the command. Returns the exit code."""
    args = build_parser().parse_args(argv)
    module, _ = COMMANDS[args.command]
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
