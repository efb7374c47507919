"""Draws the demo's example images and their masks (synthetic scenes, CC0-1.0).

Run from the repository root: `python examples/make_examples.py`. The output is deterministic (fixed seeds).

Each set `examples/<name>/` holds:
    support_<i>.png        an example image (RGB)
    support_<i>_mask.png   its object mask (L, 0 = background, 255 = object)
    support_<i>_paint.png  the same mask as a painted editor layer (RGBA, alpha > 0 = object)
    query_<j>.png          images in which to find that kind of object (RGB)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled for smooth edges
PAINT_RGBA = (255, 0, 102, 150)  # colour of the painted mask layer


class Scene:
    """An RGB canvas (float in [0, 1], [H, W, 3]) with a label map of the objects drawn on it (0 = background)."""

    def __init__(self, width: int, height: int, rng: np.random.Generator):
        self.width, self.height, self.rng = width, height, rng
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.labels = np.zeros((height, width), np.int32)
        self.targets: set[int] = set()

    # ---------------------------------------------------------------- backgrounds

    def smooth_noise(self, cells: int, amplitude: float) -> np.ndarray:
        """Low-frequency noise [H, W] in [-amplitude, amplitude] (bicubic upsampling of a random grid)."""
        grid = self.rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
        field = np.asarray(Image.fromarray(grid).resize((self.width, self.height), Image.BICUBIC), np.float32)
        return (field / 127.5 - 1.0) * amplitude

    def gradient(self, top: tuple, bottom: tuple, noise: float = 0.04) -> None:
        t = np.linspace(0, 1, self.height, dtype=np.float32)[:, None, None]
        self.rgb = (1 - t) * np.array(top, np.float32) / 255 + t * np.array(bottom, np.float32) / 255
        self.rgb = np.broadcast_to(self.rgb, (self.height, self.width, 3)).copy()
        self.rgb += self.smooth_noise(6, noise)[..., None]

    def stripes(self, color: tuple, period: float, amplitude: float) -> None:
        """Wood-like grain: wavy horizontal stripes."""
        y, x = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
        wave = np.sin((y + 6 * np.sin(x / 57.0) + self.smooth_noise(5, 12)) * 2 * math.pi / period)
        self.rgb = np.array(color, np.float32) / 255 * (1 + amplitude * wave)[..., None]

    # ---------------------------------------------------------------- objects

    def _canvas(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        image = Image.new("L", (self.width * SUPERSAMPLE, self.height * SUPERSAMPLE), 0)
        return image, ImageDraw.Draw(image)

    def _alpha(self, image: Image.Image) -> np.ndarray:
        return np.asarray(image.resize((self.width, self.height), Image.LANCZOS), np.float32) / 255

    def shadow(self, alpha: np.ndarray, offset: tuple[int, int] = (6, 8), strength: float = 0.35) -> None:
        shifted = np.roll(alpha, offset, axis=(0, 1))
        blurred = (
            np.asarray(
                Image.fromarray((shifted * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(6)), np.float32
            )
            / 255
        )
        self.rgb *= (1 - strength * blurred)[..., None]

    def paint(self, alpha: np.ndarray, color: tuple, target: bool, light: tuple[float, float] | None = None) -> None:
        """Composites a shape (alpha [H, W] in [0, 1]) in `color`, shaded from `light` (x, y), into the label map."""
        rgb = np.array(color, np.float32) / 255
        shade = np.ones((self.height, self.width), np.float32)
        ys, xs = np.nonzero(alpha > 0.5)
        if light is not None and len(xs):
            cx, cy = xs.mean(), ys.mean()
            radius = max(np.ptp(xs), np.ptp(ys), 1) * 0.75
            lx, ly = cx + light[0] * radius, cy + light[1] * radius
            y, x = np.mgrid[0 : self.height, 0 : self.width].astype(np.float32)
            distance = np.sqrt((x - lx) ** 2 + (y - ly) ** 2) / (2 * radius)
            shade = np.clip(1.25 - 0.7 * distance, 0.45, 1.25)
        layer = np.clip(rgb[None, None] * shade[..., None], 0, 1)
        self.rgb = self.rgb * (1 - alpha[..., None]) + layer * alpha[..., None]
        label = int(self.labels.max()) + 1
        self.labels[alpha >= 0.5] = label
        if target:
            self.targets.add(label)

    def ellipse(self, box, color, target=False, light=(-0.4, -0.4), shadow=True) -> np.ndarray:
        image, draw = self._canvas()
        draw.ellipse([v * SUPERSAMPLE for v in box], fill=255)
        alpha = self._alpha(image)
        if shadow:
            self.shadow(alpha)
        self.paint(alpha, color, target, light)
        return alpha

    def polygon(self, points, color, target=False, light=None, shadow=True) -> np.ndarray:
        image, draw = self._canvas()
        draw.polygon([(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points], fill=255)
        alpha = self._alpha(image)
        if shadow:
            self.shadow(alpha)
        self.paint(alpha, color, target, light)
        return alpha

    def line(self, points, color, width: int, target=False) -> None:
        image, draw = self._canvas()
        draw.line(
            [(x * SUPERSAMPLE, y * SUPERSAMPLE) for x, y in points], fill=255, width=width * SUPERSAMPLE, joint="curve"
        )
        self.paint(self._alpha(image), color, target)

    # ---------------------------------------------------------------- output

    def image(self) -> Image.Image:
        return Image.fromarray((np.clip(self.rgb, 0, 1) * 255).round().astype(np.uint8), "RGB")

    def mask(self) -> Image.Image:
        return Image.fromarray(np.isin(self.labels, list(self.targets)).astype(np.uint8) * 255, "L")


# -------------------------------------------------------------------- object kinds


def balloon(scene: Scene, x: float, y: float, r: float, color: tuple) -> None:
    """A balloon centred at (x, y) with radius r: string, knot and body (the string is not part of the object)."""
    scene.line([(x, y + 1.2 * r), (x - 0.3 * r, y + 2.2 * r), (x + 0.2 * r, y + 3.2 * r)], (235, 235, 235), 2)
    scene.polygon(
        [(x, y + 1.05 * r), (x - 0.16 * r, y + 1.3 * r), (x + 0.16 * r, y + 1.3 * r)], color, target=True, shadow=False
    )
    scene.ellipse((x - 0.85 * r, y - r, x + 0.85 * r, y + 1.1 * r), color, target=True)


def cloud(scene: Scene, x: float, y: float, s: float) -> None:
    for dx, dy, r in ((0, 0, 1.0), (-1.0, 0.25, 0.7), (1.0, 0.25, 0.75), (0.4, -0.45, 0.7)):
        scene.ellipse(
            (x + (dx - r) * s, y + (dy - r * 0.7) * s, x + (dx + r) * s, y + (dy + r * 0.7) * s),
            (250, 250, 252),
            light=None,
            shadow=False,
        )


def bird(scene: Scene, x: float, y: float, s: float) -> None:
    scene.line([(x - s, y - 0.4 * s), (x, y), (x + s, y - 0.5 * s)], (40, 40, 50), 3)


def orange(scene: Scene, x: float, y: float, r: float) -> None:
    scene.ellipse((x - r, y - r, x + r, y + r), (240, 140, 25), target=True)
    scene.ellipse(
        (x - 0.08 * r, y - 0.55 * r, x + 0.08 * r, y - 0.4 * r), (90, 110, 40), target=True, light=None, shadow=False
    )


def leaf(scene: Scene, x: float, y: float, s: float, angle: float) -> None:
    c, d = math.cos(angle), math.sin(angle)
    outline = [(-1.0, 0.0), (-0.5, -0.35), (0.3, -0.38), (1.0, 0.0), (0.3, 0.38), (-0.5, 0.35)]
    scene.polygon(
        [(x + s * (u * c - v * d), y + s * (u * d + v * c)) for u, v in outline], (60, 140, 55), light=(-0.3, -0.5)
    )


def cube(scene: Scene, x: float, y: float, s: float, color: tuple) -> None:
    scene.polygon([(x - s, y - s), (x + s, y - s), (x + s, y + s), (x - s, y + s)], color, light=(-0.5, -0.5))


def fish(scene: Scene, x: float, y: float, s: float, color: tuple, facing: int = 1) -> None:
    f = facing
    scene.polygon(
        [(x - f * 0.8 * s, y), (x - f * 1.35 * s, y - 0.45 * s), (x - f * 1.35 * s, y + 0.45 * s)],
        color,
        target=True,
        light=None,
    )
    scene.ellipse((x - s, y - 0.5 * s, x + s, y + 0.5 * s), color, target=True, light=(0.3 * f, -0.5))
    scene.ellipse(
        (x + f * 0.55 * s - 0.1 * s, y - 0.2 * s, x + f * 0.55 * s + 0.1 * s, y),
        (20, 20, 30),
        target=True,
        light=None,
        shadow=False,
    )


def weed(scene: Scene, x: float, height: float, base: float) -> None:
    points = [(x + 10 * math.sin(k / 2.0), base - k * height / 8) for k in range(9)]
    scene.line(points, (40, 110, 60), 7)


def bubble(scene: Scene, x: float, y: float, r: float) -> None:
    scene.ellipse((x - r, y - r, x + r, y + r), (200, 230, 245), light=(-0.5, -0.5), shadow=False)


# -------------------------------------------------------------------- scenes


def balloons_scene(seed: int, width: int, height: int, balloons, clouds, birds) -> Scene:
    scene = Scene(width, height, np.random.default_rng(seed))
    scene.gradient((95, 150, 220), (190, 220, 245))
    for x, y, s in clouds:
        cloud(scene, x, y, s)
    for x, y, s in birds:
        bird(scene, x, y, s)
    for x, y, r, color in balloons:
        balloon(scene, x, y, r, color)
    return scene


def fruit_scene(seed: int, width: int, height: int, oranges, leaves, cubes) -> Scene:
    scene = Scene(width, height, np.random.default_rng(seed))
    scene.stripes((150, 105, 70), period=23, amplitude=0.08)
    for x, y, s, color in cubes:
        cube(scene, x, y, s, color)
    for x, y, s, angle in leaves:
        leaf(scene, x, y, s, angle)
    for x, y, r in oranges:
        orange(scene, x, y, r)
    return scene


def fish_scene(seed: int, width: int, height: int, fishes, weeds, bubbles) -> Scene:
    scene = Scene(width, height, np.random.default_rng(seed))
    scene.gradient((40, 120, 160), (10, 45, 80), noise=0.05)
    for x, h in weeds:
        weed(scene, x, h, height)
    for x, y, s, color, facing in fishes:
        fish(scene, x, y, s, color, facing)
    for x, y, r in bubbles:
        bubble(scene, x, y, r)
    return scene


RED, BLUE, YELLOW, GREEN = (215, 35, 45), (40, 80, 200), (240, 200, 40), (60, 170, 80)


def example_sets() -> dict[str, dict[str, list[Scene]]]:
    """The example sets: name -> {"supports": scenes, "queries": scenes}."""
    return {
        "balloons": {
            "supports": [
                balloons_scene(
                    1,
                    640,
                    480,
                    [(230, 190, 62, RED), (400, 230, 55, BLUE)],
                    [(120, 90, 40), (520, 110, 35)],
                    [(520, 330, 16)],
                ),
            ],
            "queries": [
                balloons_scene(
                    2,
                    512,
                    512,
                    [(150, 170, 48, YELLOW), (300, 130, 60, RED), (410, 260, 40, GREEN)],
                    [(260, 410, 45)],
                    [(90, 380, 14), (130, 420, 10)],
                ),
                balloons_scene(3, 480, 640, [(250, 230, 85, BLUE)], [(120, 110, 38), (380, 520, 42)], [(110, 470, 18)]),
            ],
        },
        "oranges": {
            "supports": [
                fruit_scene(
                    11,
                    640,
                    480,
                    [(220, 250, 70), (420, 200, 58)],
                    [(470, 360, 55, 0.4), (120, 120, 45, -0.8)],
                    [(110, 370, 40, (70, 90, 180))],
                ),
                fruit_scene(12, 512, 384, [(300, 190, 80)], [(120, 280, 50, 2.5)], [(110, 110, 38, (200, 200, 205))]),
            ],
            "queries": [
                fruit_scene(
                    13,
                    600,
                    450,
                    [(160, 160, 55), (300, 270, 65), (470, 150, 48)],
                    [(420, 360, 60, -0.3), (90, 360, 40, 1.2)],
                    [(300, 90, 35, (230, 60, 60))],
                ),
                fruit_scene(
                    14,
                    480,
                    480,
                    [(250, 250, 95)],
                    [(100, 90, 50, 0.9)],
                    [(390, 400, 45, (70, 90, 180)), (390, 100, 30, (240, 200, 40))],
                ),
            ],
        },
        "fish": {
            "supports": [
                fish_scene(
                    21,
                    640,
                    400,
                    [(250, 170, 70, (245, 130, 30), 1), (470, 260, 50, (245, 210, 60), -1)],
                    [(80, 220), (560, 160)],
                    [(360, 90, 8), (375, 60, 6)],
                ),
            ],
            "queries": [
                fish_scene(
                    22,
                    560,
                    420,
                    [(180, 150, 55, (230, 80, 60), -1), (380, 260, 65, (250, 150, 40), 1)],
                    [(470, 250), (60, 180)],
                    [(300, 110, 9), (100, 330, 7)],
                ),
                fish_scene(
                    23,
                    480,
                    480,
                    [(240, 220, 90, (250, 200, 50), 1)],
                    [(60, 300), (420, 200), (380, 260)],
                    [(100, 100, 10), (120, 70, 7), (400, 80, 8)],
                ),
            ],
        },
    }


def paint_layer(mask: Image.Image) -> Image.Image:
    """L mask -> RGBA editor layer: PAINT_RGBA where the mask is set, transparent elsewhere."""
    layer = np.zeros((mask.height, mask.width, 4), np.uint8)
    layer[np.asarray(mask) >= 128] = PAINT_RGBA
    return Image.fromarray(layer, "RGBA")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent), help="folder to write the sets into")
    args = parser.parse_args(argv)
    for name, scenes in example_sets().items():
        folder = Path(args.output) / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, scene in enumerate(scenes["supports"], 1):
            scene.image().save(folder / f"support_{i}.png", optimize=True)
            scene.mask().save(folder / f"support_{i}_mask.png", optimize=True)
            paint_layer(scene.mask()).save(folder / f"support_{i}_paint.png", optimize=True)
        for j, scene in enumerate(scenes["queries"], 1):
            scene.image().save(folder / f"query_{j}.png", optimize=True)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
