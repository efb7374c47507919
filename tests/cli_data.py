"""Inputs for the command line tests: small random images (some nested), a corrupt file, supports, a short video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

# relative path -> (width, height)
GOOD_IMAGES = {
    "a.jpg": (40, 30),
    "b.png": (24, 36),
    "nested/c.png": (33, 21),
    "nested/deeper/d.jpg": (64, 48),
    "nested/deeper/e.png": (20, 20),
}
CORRUPT_IMAGE = "nested/broken.jpg"


def random_image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def write_images(folder: Path, corrupt: bool = True) -> Path:
    """GOOD_IMAGES under `folder`, plus CORRUPT_IMAGE (bytes that are no image) when `corrupt`."""
    for i, (relative, (width, height)) in enumerate(GOOD_IMAGES.items()):
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        random_image(width, height, seed=i).save(path)
    if corrupt:
        (folder / CORRUPT_IMAGE).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return folder


def write_support(folder: Path, name: str = "support", seed: int = 100) -> tuple[Path, Path]:
    """A 48x40 support image and its mask (a white rectangle on black)."""
    folder.mkdir(parents=True, exist_ok=True)
    image_path, mask_path = folder / f"{name}.png", folder / f"{name}_mask.png"
    random_image(48, 40, seed).save(image_path)
    mask = np.zeros((40, 48), dtype=np.uint8)
    mask[8:30, 12:36] = 255
    PIL.Image.fromarray(mask).save(mask_path)
    return image_path, mask_path


def write_video(path: Path, num_frames: int = 4, width: int = 48, height: int = 32, fps: int = 8) -> Path:
    """An H.264 (or MPEG-4) video of random frames, written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    rng = np.random.default_rng(7)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(num_frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def count_video_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def within(labels: np.ndarray, width: int) -> np.ndarray:
    """bool [H, W]: pixels whose (2 width + 1) square (clipped at the image's edge) holds another label."""
    padded = np.pad(labels, width, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * width + 1, 2 * width + 1))
    return (windows != labels[..., None, None]).any(axis=(-1, -2))
