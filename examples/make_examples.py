"""Draws the demo's example images, their masks and the true masks of the queries (synthetic scenes, CC0-1.0).

Run from the repository root: `python examples/make_examples.py`. The output is deterministic (fixed seeds).

The objects are drawn by the renderer of the generated training episodes (`train.data.synthetic.paint_instance`):
each set's target is one *kind* (shape, colour family, texture), and every image also holds objects of other kinds,
so the support alone says which objects to find: the red balloons (not the blue or green ones), the striped orange
fish (not the blue or the dotted pink ones), the oranges (not the leaves or the toy bricks).

Each set `examples/<name>/` holds:
    support_<i>.png        an example image (RGB)
    support_<i>_mask.png   its object mask (L, 0 = background, 255 = object)
    query_<j>.png          images in which to find that kind of object (RGB)
    truth/query_<j>.png    the true mask of each query (L, 255 = the target kind), for scoring
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from train.data.synthetic import COLOUR_FAMILIES, SHAPES, TEXTURES, Kind, paint_instance, smooth_noise  # noqa: E402

def kind(shape: str, colour: str, texture: str) -> int:
    """Class id of the kind (shape family, colour family, texture) of `train.data.synthetic`."""
    return Kind(SHAPES.index(shape), list(COLOUR_FAMILIES).index(colour), TEXTURES.index(texture)).class_id


RED_BALLOON, BLUE_BALLOON, GREEN_BALLOON = (kind("disc", c, "plain") for c in ("red", "blue", "green"))
CLOWNFISH, BLUE_FISH, PINK_FISH = kind("disc", "orange", "stripes"), kind("disc", "blue", "plain"), kind(
    "disc", "pink", "dots")
ORANGE, LEAF, BLUE_BRICK, PINK_BRICK = (kind("disc", "orange", "dots"), kind("diamond", "green", "plain"),
                                        kind("square", "blue", "checks"), kind("square", "pink", "plain"))


class Scene:
    """An RGB canvas (float in [0, 1], [H, W, 3]) with the kind seen at each pixel (-1 = background)."""

    def __init__(self, width: int, height: int, seed: int, target: int):
        self.width, self.height, self.target = width, height, target
        self.rng = np.random.default_rng(seed)
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.labels = np.full((height, width), -1, np.int16)

    # ---------------------------------------------------------------- backgrounds

    def noise(self, cells: int, amplitude: float) -> np.ndarray:
        """Low-frequency noise [H, W] in [-amplitude, amplitude]."""
        field = smooth_noise(max(self.width, self.height), cells, self.rng)
        return field[: self.height, : self.width] * amplitude

    def gradient(self, top: tuple, bottom: tuple, noise: float = 0.04) -> None:
        t = np.linspace(0, 1, self.height, dtype=np.float32)[:, None, None]
        self.rgb = (1 - t) * np.array(top, np.float32) / 255 + t * np.array(bottom, np.float32) / 255
        self.rgb = np.broadcast_to(self.rgb, (self.height, self.width, 3)).copy()
        self.rgb += self.noise(6, noise)[..., None]

    def stripes(self, color: tuple, period: float, amplitude: float) -> None:
        """Wood-like grain: wavy horizontal stripes."""
        y, x = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        wave = np.sin((y + 6 * np.sin(x / 57.0) + self.noise(5, 12)) * 2 * math.pi / period)
        self.rgb = np.array(color, np.float32) / 255 * (1 + amplitude * wave)[..., None]

    def blobs(self, blobs, color: tuple, blur: float) -> None:
        """Soft background shapes (clouds, bubbles): ellipses (x, y, rx, ry) in `color`, blurred, not objects."""
        layer = Image.new("L", (self.width, self.height), 0)
        draw = ImageDraw.Draw(layer)
        for x, y, rx, ry in blobs:
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=255)
        alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(blur)), np.float32)[..., None] / 255
        self.rgb = self.rgb * (1 - alpha) + np.array(color, np.float32) / 255 * alpha

    def strokes(self, lines, color: tuple, width: int) -> None:
        """Thin background strokes (strings, weed): polylines in `color`, not objects."""
        layer = Image.new("L", (self.width, self.height), 0)
        draw = ImageDraw.Draw(layer)
        for points in lines:
            draw.line(points, fill=255, width=width, joint="curve")
        alpha = np.asarray(layer, np.float32)[..., None] / 255
        self.rgb = self.rgb * (1 - alpha) + np.array(color, np.float32) / 255 * alpha

    # ---------------------------------------------------------------- objects

    def add(self, kind_id: int, x: float, y: float, radius: float, aspect: float = 1.0, angle: float = 0.0) -> None:
        """One object of `kind_id` (the generator's renderer): centre (x, y), radius in pixels."""
        paint_instance(self.rgb, self.labels, kind_id, x, y, radius, aspect, angle, self.rng)

    # ---------------------------------------------------------------- output

    def image(self) -> Image.Image:
        return Image.fromarray((np.clip(self.rgb, 0, 1) * 255).round().astype(np.uint8), "RGB")

    def mask(self) -> Image.Image:
        """L mask of the scene's target kind: 255 where it is visible."""
        return Image.fromarray((self.labels == self.target).astype(np.uint8) * 255, "L")


# -------------------------------------------------------------------- scenes


def balloons_scene(seed: int, width: int, height: int, balloons, clouds) -> Scene:
    """Balloons (kind, x, y, r) with their strings, under clouds (x, y, s) in a sky; the red ones are the target."""
    scene = Scene(width, height, seed, RED_BALLOON)
    scene.gradient((95, 150, 220), (190, 220, 245))
    scene.blobs([(x + dx * s, y + dy * s, r * s, 0.7 * r * s) for x, y, s in clouds
                 for dx, dy, r in ((0, 0, 1.0), (-1.0, 0.25, 0.7), (1.0, 0.25, 0.75), (0.4, -0.45, 0.7))],
                (250, 250, 252), blur=2)
    scene.strokes([[(x, y + r / 0.85 - 2), (x - 0.3 * r, y + 2.2 * r), (x + 0.2 * r, y + 3.0 * r)]
                   for _, x, y, r in balloons], (240, 240, 240), 2)
    for kind_id, x, y, r in balloons:
        scene.add(kind_id, x, y, r, aspect=0.85, angle=0.0)
    return scene


def fish_scene(seed: int, width: int, height: int, fishes, weeds, bubbles) -> Scene:
    """Fish (kind, x, y, r, angle) among weed and bubbles under water; the striped orange ones are the target."""
    scene = Scene(width, height, seed, CLOWNFISH)
    scene.gradient((40, 120, 160), (10, 45, 80), noise=0.05)
    scene.strokes([[(x + 10 * math.sin(k / 2.0), height - k * h / 8) for k in range(9)] for x, h in weeds],
                  (45, 95, 70), 7)
    scene.blobs([(x, y, r, r) for x, y, r in bubbles], (190, 215, 230), blur=1)
    for kind_id, x, y, r, angle in fishes:
        scene.add(kind_id, x, y, r, aspect=1.3, angle=angle)
    eyes = [(x + 0.8 * r * math.cos(angle), y + 0.8 * r * math.sin(angle) - 0.15 * r, 0.1 * r)
            for _, x, y, r, angle in fishes]
    scene.blobs([(x, y, e, e) for x, y, e in eyes], (20, 20, 30), blur=0.5)  # inside the fish: part of its mask
    return scene


def fruit_scene(seed: int, width: int, height: int, objects) -> Scene:
    """Oranges, leaves and toy bricks (kind, x, y, r, angle) on a wooden table; the oranges are the target."""
    scene = Scene(width, height, seed, ORANGE)
    scene.stripes((150, 105, 70), period=23, amplitude=0.08)
    for kind_id, x, y, r, angle in objects:
        scene.add(kind_id, x, y, r, aspect={ORANGE: 1.0, LEAF: 0.75}.get(kind_id, 1.2), angle=angle)
    return scene


def example_sets() -> dict[str, dict[str, list[Scene]]]:
    """The example sets: name -> {"supports": scenes, "queries": scenes}."""
    R, B2, G = RED_BALLOON, BLUE_BALLOON, GREEN_BALLOON
    C, B, F = CLOWNFISH, BLUE_FISH, PINK_FISH
    O, L, BB, PB = ORANGE, LEAF, BLUE_BRICK, PINK_BRICK
    return {
        "balloons": {
            "supports": [balloons_scene(1, 512, 384, [(R, 170, 150, 66), (B2, 355, 175, 58)], [(430, 60, 36)])],
            "queries": [
                balloons_scene(2, 448, 448, [(B2, 100, 160, 56), (R, 235, 125, 70), (G, 365, 215, 54)],
                               [(220, 400, 40)]),
                balloons_scene(3, 448, 448, [(R, 150, 170, 70), (G, 340, 110, 52), (B2, 310, 290, 56)],
                               [(90, 410, 30)]),
            ],
        },
        "fish": {
            "supports": [fish_scene(21, 512, 384, [(C, 190, 150, 68, 0.1), (B, 370, 260, 56, -0.2)],
                                    [(60, 220), (470, 160)], [(330, 80, 8), (345, 52, 6)])],
            "queries": [
                fish_scene(22, 448, 448, [(B, 130, 120, 54, 0.3), (C, 280, 290, 72, -0.15), (F, 340, 110, 50, 0.0)],
                           [(40, 250), (420, 230)], [(200, 60, 9), (90, 330, 7)]),
                fish_scene(23, 448, 384, [(C, 150, 200, 72, 0.0), (F, 340, 120, 52, 0.4)],
                           [(60, 200), (400, 260)], [(300, 300, 10), (320, 270, 7)]),
            ],
        },
        "oranges": {
            "supports": [fruit_scene(11, 512, 384, [(O, 180, 200, 70, 0), (L, 370, 130, 55, 0.5),
                                                    (BB, 390, 290, 45, 0.2)])],
            "queries": [
                fruit_scene(13, 448, 448, [(L, 100, 340, 55, -0.4), (O, 220, 200, 80, 0), (PB, 360, 90, 44, 0.3),
                                           (BB, 370, 360, 40, 0.5)]),
                fruit_scene(14, 448, 384, [(O, 230, 190, 80, 0), (L, 80, 90, 50, 0.9), (BB, 380, 300, 42, -0.2)]),
            ],
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent), help="folder to write the sets into")
    args = parser.parse_args(argv)
    for name, scenes in example_sets().items():
        folder = Path(args.output) / name
        (folder / "truth").mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(scenes["supports"], 1):
            scene.image().save(folder / f"support_{i}.png", optimize=True)
            scene.mask().save(folder / f"support_{i}_mask.png", optimize=True)
        for j, scene in enumerate(scenes["queries"], 1):
            scene.image().save(folder / f"query_{j}.png", optimize=True)
            scene.mask().save(folder / "truth" / f"query_{j}.png", optimize=True)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
