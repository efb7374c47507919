"""Finding the images and videos to segment, and reading them.

`--input` may be one image, one video, a folder (searched recursively, sorted) or a glob pattern. Each file found is a
`Source` with its path relative to the input's root, which the outputs mirror. Video frames are read with PyAV.
`--support-dir` names a folder of examples (`find_support_pairs`).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import PIL.Image
import PIL.ImageOps

IMAGE_EXTENSIONS = frozenset({".bmp", ".gif", ".jfif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})
VIDEO_EXTENSIONS = frozenset({".avi", ".flv", ".m4v", ".mkv", ".mov", ".mp4", ".mpeg", ".mpg", ".ts", ".webm", ".wmv"})
GLOB_CHARACTERS = frozenset("*?[")
MASK_SUFFIX = "_mask"  # an example set: NAME.png + NAME_mask.png (any image extensions)


class InputError(ValueError):
    """`--input` names nothing that can be segmented."""


@dataclass(frozen=True)
class Source:
    """One input file. `relative` is its path below the input's root (a plain file: its name)."""

    path: Path
    relative: Path

    @property
    def is_video(self) -> bool:
        return is_video_path(self.path)


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def is_media_path(path: str | Path) -> bool:
    suffix = Path(path).suffix.lower()
    return suffix in IMAGE_EXTENSIONS or suffix in VIDEO_EXTENSIONS


def discover(input_path: str | Path, exclude: str | Path | None = None) -> list[Source]:
    """The files named by `--input`, sorted by relative path.

    input_path: an image or video file, a folder (recursive; only image and video extensions, hidden files and folders
        skipped) or a glob pattern (`**` recurses; every matched file is kept, whatever its extension).
    exclude: a folder whose contents are never inputs (the output folder, when it lies inside the input folder).
    """
    text = str(input_path)
    path = Path(text).expanduser()
    excluded = Path(exclude).expanduser().resolve() if exclude is not None else None
    if path.is_file():
        sources = [Source(path, Path(path.name))]
    elif path.is_dir():
        sources = [Source(p, p.relative_to(path)) for p in _walk(path) if is_media_path(p)]
    elif GLOB_CHARACTERS & set(text):
        root = _glob_root(text)
        matches = [Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True)]
        sources = [Source(p, _relative_to_root(p, root)) for p in matches if p.is_file()]
    else:
        raise InputError(f"--input {text!r}: no such file or folder.")
    if excluded is not None:
        sources = [s for s in sources if not _is_within(s.path.resolve(), excluded)]
    sources.sort(key=lambda s: s.relative.as_posix())
    if not sources:
        raise InputError(f"--input {text!r}: no images or videos found.")
    return sources


def _walk(folder: Path):
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob pattern before its first wildcard: `data/*/img_*.jpg` -> `data`."""
    parts = Path(os.path.expanduser(pattern)).parts
    fixed = []
    for part in parts[:-1]:
        if GLOB_CHARACTERS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _relative_to_root(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return Path(path.name)


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def find_support_pairs(folder: str | Path) -> list[tuple[Path, Path]]:
    """The examples of an example-set folder, as the demo exports it: (image, mask) per NAME, in natural order of NAME.

    The folder holds `NAME.<ext>` + `NAME_mask.<ext>` pairs, any number, with image extensions (not necessarily the
    same for both); hidden files and other files are ignored. Raises InputError naming the file for an image without
    a mask, a mask without an image, or two files for one NAME, and for a missing or empty folder; when the folder
    holds no pairs but a subfolder does (the demo's unzipped download: its examples/), the error asks "did you mean"
    that subfolder.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"--support-dir {folder}: no such folder.")
    try:
        return _support_pairs(folder)
    except InputError as error:
        for sub in sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=lambda p: (p.name != "examples", p.name)):
            try:
                _support_pairs(sub)
            except InputError:
                continue
            raise InputError(f"{error} Did you mean --support-dir {sub}?") from None
        raise


def _support_pairs(folder: Path) -> list[tuple[Path, Path]]:
    images: dict[str, list[Path]] = {}
    masks: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem.lower().endswith(MASK_SUFFIX):
            masks.setdefault(path.stem[: -len(MASK_SUFFIX)], []).append(path)
        else:
            images.setdefault(path.stem, []).append(path)
    if not images and not masks:
        raise InputError(f"--support-dir {folder}: no examples in it (expected image + mask pairs: NAME.png and "
                         f"NAME{MASK_SUFFIX}.png).")
    for name, paths in sorted({**images, **masks}.items()):
        for group in (images.get(name, []), masks.get(name, [])):
            if len(group) > 1:
                raise InputError(f"--support-dir {folder}: {group[0].name} and {group[1].name} are two files for one "
                                 "example: keep one.")
        if name not in masks:
            raise InputError(f"--support-dir {folder}: {images[name][0].name} has no mask (expected "
                             f"{name}{MASK_SUFFIX}.png beside it).")
        if name not in images:
            raise InputError(f"--support-dir {folder}: {masks[name][0].name} is a mask without its image ({name}.png, "
                             f".jpg, ...).")
    return [(images[name][0], masks[name][0]) for name in sorted(images, key=_natural_key)]


def _natural_key(text: str) -> list:
    """`shot2` before `shot10`."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def read_image(path: str | Path) -> PIL.Image.Image:
    """An image file -> RGB PIL image, upright (EXIF orientation applied), fully decoded.

    Raises OSError (or another PIL error) when the file is not a readable image.
    """
    with PIL.Image.open(path) as image:
        image.load()
        return PIL.ImageOps.exif_transpose(image).convert("RGB")


@dataclass(frozen=True)
class VideoInfo:
    """num_frames: frames in the video's first video stream; fps: its average frame rate (frames per second)."""

    num_frames: int
    fps: Fraction


def probe_video(path: str | Path) -> VideoInfo:
    """Counts the frames of a video (from the container, or by reading its packets without decoding them)."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise OSError(f"{path} has no video stream.")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or Fraction(25)
        num_frames = stream.frames
        if not num_frames:
            num_frames = sum(1 for packet in container.demux(stream) if packet.size)
    if num_frames <= 0:
        raise OSError(f"{path} holds no video frames.")
    return VideoInfo(num_frames=int(num_frames), fps=Fraction(rate))


class VideoFrameReader:
    """Reads chosen frames of one video in increasing order, decoding it once from the start.

    `reader.frame(i)` -> RGB PIL image of frame i (0-based). Asking for an earlier frame than the last one reopens
    the video. Raises OSError when the video ends before frame i.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._container = None
        self._frames = None
        self._next_index = 0

    def _open(self) -> None:
        import av

        self.close()
        self._container = av.open(str(self.path))
        self._frames = self._container.decode(video=0)
        self._next_index = 0

    def frame(self, index: int) -> PIL.Image.Image:
        if self._frames is None or index < self._next_index:
            self._open()
        for decoded in self._frames:
            current = self._next_index
            self._next_index += 1
            if current == index:
                return decoded.to_image().convert("RGB")
        raise OSError(f"{self.path} ended after {self._next_index} frames; frame {index} is missing.")

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container = None
        self._frames = None

    def __enter__(self) -> VideoFrameReader:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_video_frames(path: str | Path):
    """Yields every frame of a video as an RGB PIL image, in order."""
    import av

    with av.open(str(path)) as container:
        for decoded in container.decode(video=0):
            yield decoded.to_image().convert("RGB")
