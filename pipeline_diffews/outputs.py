"""Where each input's outputs go, and which of them are still to be made.

For an input at relative path `a/b.jpg` under `--output OUT`:
    mask        OUT/a/b.png             (8-bit grayscale, 255 = object, at the image's size; with several classes an
                                         index PNG of class ids with the support's palette, named in OUT/classes.json)
    overlay     OUT/overlays/a/b.png    (with --overlay: the object tinted and outlined)
    COCO        OUT/annotations.json    (with --format coco: every still image's masks, `coco.coco_dataset`)
                OUT/annotations_polygons.json  (with --format coco-polygons: the same as polygons)
    YOLO        OUT/yolo/images/a/b.jpg, OUT/yolo/labels/a/b.txt, OUT/yolo/data.yaml  (with --format yolo)
For a video `a/clip.mp4`:
    mask frames OUT/a/clip/000000.png, 000001.png, ...
    mask video  OUT/a/clip.mp4
    overlay     OUT/overlays/a/clip.mp4 (with --overlay)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .inputs import Source, VideoInfo, probe_video

OVERLAY_FOLDER = "overlays"
FRAME_NAME = "{:06d}.png"


class OutputConflictError(ValueError):
    """Two inputs would write the same output file."""


@dataclass(frozen=True)
class WorkItem:
    """One image to segment: a file (frame is None) or frame `frame` of a video."""

    source: Source
    frame: int | None
    mask_path: Path
    overlay_path: Path | None

    @property
    def name(self) -> str:
        """How reports name the item: the relative path, with `#frame` for a video frame."""
        name = self.source.relative.as_posix()
        return name if self.frame is None else f"{name}#{self.frame}"

    def is_done(self) -> bool:
        return self.mask_path.exists() and (self.overlay_path is None or self.overlay_path.exists())


@dataclass(frozen=True)
class VideoJob:
    """A video's frame folder and the videos assembled from it once every frame has its mask."""

    source: Source
    info: VideoInfo
    frame_folder: Path
    mask_video: Path
    overlay_video: Path | None

    def frame_paths(self) -> list[Path]:
        return [self.frame_folder / FRAME_NAME.format(i) for i in range(self.info.num_frames)]


@dataclass
class Plan:
    """Every image (or frame) to segment in input order, the videos to assemble, and the inputs that failed already."""

    items: list[WorkItem] = field(default_factory=list)
    videos: list[VideoJob] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)


def make_plan(sources: list[Source], output: str | Path, overlay: bool) -> Plan:
    """Maps sources to output paths. Videos are probed here: one that cannot be opened becomes a failure.

    Raises OutputConflictError when two inputs would write one file (e.g. `a.jpg` and `a.png` -> `a.png`).
    """
    output = Path(output)
    plan = Plan()
    for source in sources:
        stem = source.relative.with_suffix("")
        if not source.is_video:
            overlay_path = output / OVERLAY_FOLDER / source.relative.with_suffix(".png") if overlay else None
            plan.items.append(WorkItem(source, None, output / source.relative.with_suffix(".png"), overlay_path))
            continue
        try:
            info = probe_video(source.path)
        except Exception as error:  # noqa: BLE001 - any container or codec error: report the file and go on
            plan.failures.append((source.relative.as_posix(), _describe(error)))
            continue
        video = VideoJob(
            source=source,
            info=info,
            frame_folder=output / stem,
            mask_video=output / stem.with_suffix(".mp4"),
            overlay_video=output / OVERLAY_FOLDER / stem.with_suffix(".mp4") if overlay else None,
        )
        plan.videos.append(video)
        plan.items.extend(WorkItem(source, i, path, None) for i, path in enumerate(video.frame_paths()))
    _check_conflicts(plan)
    return plan


def _check_conflicts(plan: Plan) -> None:
    writers = defaultdict(list)
    for item in plan.items:
        writers[item.mask_path].append(item.source)
        if item.overlay_path is not None:
            writers[item.overlay_path].append(item.source)
    for video in plan.videos:
        writers[video.mask_video].append(video.source)
        if video.overlay_video is not None:
            writers[video.overlay_video].append(video.source)
    for path, sources in writers.items():
        names = sorted({s.relative.as_posix() for s in sources})
        if len(names) > 1:
            raise OutputConflictError(
                f"{' and '.join(names)} would all write {path}: rename one of them or segment them separately."
            )


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
