"""`diffews label-studio`: serve a Label Studio ML backend that pre-labels a project's images from its own annotations.

    LABEL_STUDIO_URL=http://localhost:8080 LABEL_STUDIO_API_KEY=<token> diffews label-studio --model incontext

Connect it in the project's Settings > Model (URL http://localhost:9090). Every submitted annotation of the labelling
config's BrushLabels / PolygonLabels controls is an example; each label is a class. Needs the `label-studio` extra:
pip install 'pipeline-diffews[label-studio]'.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..official import ModelNotFoundError, load_pipeline, official_names, resolve_model

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME_DIR_OR_REPO",
                        help=f"an official model ({official_names()}: downloaded and converted the first time), a "
                             "saved DiffewS pipeline folder, or a Hub repository id")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for a Label Studio in a container or "
                             "on another machine)")
    parser.add_argument("--port", type=int, default=9090, help="port to listen on (default 9090)")
    parser.add_argument("--label-studio-url", default=os.environ.get("LABEL_STUDIO_URL"), metavar="URL",
                        help="where Label Studio is served, as the backend reaches it (default: $LABEL_STUDIO_URL)")
    parser.add_argument("--api-key", default=os.environ.get("LABEL_STUDIO_API_KEY"), metavar="TOKEN",
                        help="a personal access token or legacy token of a user of the projects, to read their "
                             "images and annotations (default: $LABEL_STUDIO_API_KEY)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="weights' dtype (default: float16 on CUDA, else float32)")
    parser.add_argument("--processing-resolution", type=int, default=None,
                        help="square size the model sees (default: the model's, 512)")
    parser.add_argument("--threshold", type=float, default=None, help="in [0, 1] (default: the model's, 0.25)")
    parser.add_argument("--threshold-mode", choices=("relative", "absolute"), default=None,
                        help="relative: probability > threshold x the image's maximum; absolute: > threshold")
    parser.add_argument("--batch-size", type=int, default=4, help="images per UNet call when predicting (default 4)")
    parser.add_argument("--max-shots", type=int, default=10,
                        help="examples each label uses at most: its most recent annotations (default 10; a query's "
                             "time and the caches' memory grow with it)")


def run(args: argparse.Namespace) -> int:
    """Serves the backend until interrupted. Returns 0, or 2 for a usage error (one line on stderr)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to Label Studio is too many
    log = logging.getLogger("pipeline_diffews.label_studio")
    problem = _bad_value(args)
    if problem:
        log.error("%s", problem)
        return 2
    if not args.label_studio_url or not args.api_key:
        log.error("set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or --label-studio-url and --api-key): the backend "
                  "reads the project's images and annotations from Label Studio")
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn

        from .regions import sdk_brush

        sdk_brush()
    except ImportError as error:
        log.error("%s", error)
        return 2
    import torch

    from .backend import Backend, Settings
    from .client import LabelStudioClient, LabelStudioError
    from .server import create_app

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        model = resolve_model(args.model)
        pipe = load_pipeline(model, dtype, device, args.revision)
    except ModelNotFoundError as error:
        log.error("--model %s", error)
        return 2
    except Exception as error:  # noqa: BLE001 - a missing client, a broken config, a failed download...
        log.error("--model %s: cannot load it (%s: %s)", args.model, type(error).__name__, error)
        return 2
    if not pipe.design.cacheable:
        log.error("--model %s: its design (%s) cannot cache a support, which the backend grows one annotation at a "
                  "time; serve a model of another interaction", args.model, pipe.design.interaction)
        return 2
    pipe.set_progress_bar_config(disable=True)
    client = LabelStudioClient(args.label_studio_url, args.api_key)
    try:
        user = client.whoami()
        log.info("Label Studio at %s, as %s", client.url, user.get("email") or user.get("username") or user.get("id"))
    except LabelStudioError as error:  # it may start later, or the key be fixed: the backend serves anyway
        log.warning("%s", error)
    settings = Settings(args.processing_resolution, args.threshold, args.threshold_mode, args.batch_size,
                        args.max_shots)
    backend = Backend(pipe, client, model_name(args), settings)
    log.info("DiffewS %s on %s: ML backend at http://%s:%d", args.model, device, args.host, args.port)
    try:
        uvicorn.run(create_app(backend), host=args.host, port=args.port, log_level="warning")
    finally:
        backend.close()
        client.close()
    return 0


def model_name(args: argparse.Namespace) -> str:
    """The first part of the model versions: the model's name (an official name, a folder's or a Hub repository's
    name), then the settings that change predictions, when given (`incontext-r768-t0.4-absolute`)."""
    parts = [Path(str(args.model).rstrip("/\\")).name or str(args.model)]
    if args.processing_resolution:
        parts.append(f"r{args.processing_resolution}")
    if args.threshold is not None:
        parts.append(f"t{args.threshold:g}")
    if args.threshold_mode:
        parts.append(args.threshold_mode)
    return "-".join(parts)


def _bad_value(args: argparse.Namespace) -> str | None:
    """One line naming the first option out of range, or None."""
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        return f"--threshold must be in [0, 1], got {args.threshold}"
    if args.batch_size < 1:
        return f"--batch-size must be a positive integer, got {args.batch_size}"
    if args.max_shots < 1:
        return f"--max-shots must be a positive integer, got {args.max_shots}"
    if args.processing_resolution is not None and args.processing_resolution < 8:
        return f"--processing-resolution must be at least 8, got {args.processing_resolution}"
    if not 0 < args.port < 65536:
        return f"--port must be in 1..65535, got {args.port}"
    return None
