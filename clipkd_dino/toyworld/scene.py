"""Scenes of the toy world: object kinds as polygons, colours, backgrounds, random layouts and their rendering.

Every shape lives in "shape units": it fills about [-1, 1]^2 with y pointing down. A scene places 1 to 3 shapes
(scaled, rotated, sometimes mirrored) on a background; `render` draws it supersampled and reduces it with a box
filter, so edges are antialiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Part = tuple[np.ndarray, bool]  # (polygon of shape-unit points, filled: False cuts a hole)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _circle(cx: float, cy: float, r: float) -> np.ndarray:
    return _ellipse(cx, cy, r, r)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.array(points, dtype=float)


def _arc_band(cx: float, cy: float, r_in: float, r_out: float, deg0: float, deg1: float) -> np.ndarray:
    t = np.radians(np.linspace(deg0, deg1, 16))
    outer = np.stack([cx + r_out * np.cos(t), cy + r_out * np.sin(t)], axis=1)
    inner = np.stack([cx + r_in * np.cos(t[::-1]), cy + r_in * np.sin(t[::-1])], axis=1)
    return np.concatenate([outer, inner])


def _star(points: int = 5, inner: float = 0.42) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=1)
    pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2
    return pts / np.abs(pts).max()


@dataclass(frozen=True)
class Shape:
    """One object kind: its parts, the rotation (degrees, either way) that keeps it recognisable, mirroring."""

    parts: tuple[Part, ...]
    max_rotation: float
    mirror: bool = False


_LADDER_RUNGS = tuple((_rect(-0.4, y - 0.09, 0.4, y + 0.09), True) for y in (-0.6, -0.2, 0.2, 0.6))

SHAPES: dict[str, Shape] = {
    "circle": Shape(((_circle(0, 0, 1), True),), 0),
    "square": Shape(((_rect(-0.85, -0.85, 0.85, 0.85), True),), 15),
    "triangle": Shape(((_poly((0, -0.95), (0.95, 0.7), (-0.95, 0.7)), True),), 20),
    "star": Shape(((_star(), True),), 36),
    "heart": Shape(((_heart(), True),), 20),
    "cross": Shape(((_rect(-0.3, -1, 0.3, 1), True), (_rect(-1, -0.3, 1, 0.3), True)), 15),
    "ring": Shape(((_circle(0, 0, 1), True), (_circle(0, 0, 0.58), False)), 0),
    "diamond": Shape(((_poly((0, -1), (0.68, 0), (0, 1), (-0.68, 0)), True),), 12),
    "arrow": Shape(((_rect(-1, -0.22, 0.15, 0.22), True), (_poly((0.05, -0.65), (1, 0), (0.05, 0.65)), True)), 180),
    "moon": Shape(((_circle(0, 0, 1), True), (_circle(0.45, -0.25, 0.82), False)), 180),
    "house": Shape(
        (
            (_poly((-1, -0.05), (0, -1), (1, -0.05)), True),
            (_rect(-0.75, -0.1, 0.75, 0.95), True),
            (_rect(-0.2, 0.4, 0.2, 0.95), False),
        ),
        10,
    ),
    "tree": Shape(
        (
            (_rect(-0.17, 0.5, 0.17, 1), True),
            (_poly((0, -1), (0.55, -0.35), (-0.55, -0.35)), True),
            (_poly((0, -0.7), (0.75, 0.1), (-0.75, 0.1)), True),
            (_poly((0, -0.3), (0.95, 0.58), (-0.95, 0.58)), True),
        ),
        10,
    ),
    "fish": Shape(
        (
            (_ellipse(-0.2, 0, 0.8, 0.5), True),
            (_poly((0.45, 0), (1, -0.55), (1, 0.55)), True),
            (_circle(-0.62, -0.12, 0.11), False),
        ),
        20,
        mirror=True,
    ),
    "key": Shape(
        (
            (_circle(-0.62, 0, 0.38), True),
            (_rect(-0.3, -0.12, 1, 0.12), True),
            (_rect(0.52, 0.1, 0.7, 0.4), True),
            (_rect(0.8, 0.1, 0.98, 0.32), True),
            (_circle(-0.62, 0, 0.17), False),
        ),
        30,
        mirror=True,
    ),
    "umbrella": Shape(
        (
            (_arc_band(0, -0.05, 0, 1, 180, 360), True),
            (_circle(-0.66, -0.05, 0.34), False),
            (_circle(0, -0.05, 0.32), False),
            (_circle(0.66, -0.05, 0.34), False),
            (_rect(-0.08, -0.4, 0.08, 0.75), True),
            (_arc_band(-0.22, 0.72, 0.12, 0.3, 0, 180), True),
        ),
        15,
        mirror=True,
    ),
    "ladder": Shape(((_rect(-0.62, -1, -0.4, 1), True), (_rect(0.4, -1, 0.62, 1), True), *_LADDER_RUNGS), 15),
}

COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 30),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 50, 180),
    "pink": (245, 120, 190),
    "brown": (130, 80, 40),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
BACKGROUND_COLOURS: dict[str, RGB] = {
    "white": (245, 245, 242),
    "light gray": (200, 200, 200),
    "dark gray": (60, 60, 60),
    "black": (15, 15, 15),
    "beige": (232, 220, 190),
    "light blue": (185, 210, 238),
    "light green": (195, 228, 190),
}
BACKGROUND_STYLES = ("plain", "gradient", "noisy", "textured")
SIZE_WORDS = ("small", "medium", "big")
OBJECT_COUNT_PROBS = (0.6, 0.25, 0.15)  # 1, 2 or 3 objects
# Extent of a shape (its [-1, 1] square) as a fraction of the image side, by number of objects in the image.
SIZE_RANGES = {1: (0.45, 0.80), 2: (0.34, 0.52), 3: (0.30, 0.44)}
MIN_COLOUR_DISTANCE = 140.0  # RGB distance between an object's colour and every background tone
MARGIN = 0.03  # of the image side, kept free at the border and between the boxes of objects


@dataclass(frozen=True)
class Background:
    style: str  # one of BACKGROUND_STYLES
    colours: tuple[str, ...]  # names from BACKGROUND_COLOURS; two for a gradient (from, to)
    rgbs: tuple[RGB, ...]
    angle: float  # gradient direction, degrees
    noise_seed: int

    def describe(self) -> str:
        """E.g. "plain white", "noisy beige", "gradient from black to light blue"."""
        if self.style == "gradient":
            return f"gradient from {self.colours[0]} to {self.colours[1]}"
        return f"{self.style} {self.colours[0]}"


@dataclass(frozen=True)
class ToyObject:
    kind: str
    colour: str
    size: str  # one of SIZE_WORDS, relative to the other images with as many objects
    rgb: RGB
    centre: tuple[float, float]  # pixels of the written image
    scale: float  # pixels per shape unit
    rotation: float  # degrees, counter-clockwise
    mirrored: bool
    extent: tuple[float, float, float, float]  # x0, y0, x1, y1 (pixels) of the filled parts; holes not subtracted

    def points(self, polygon: np.ndarray, factor: float = 1.0) -> np.ndarray:
        """`polygon` (shape units) in pixels of an image `factor` times the written size."""
        return _transform(polygon, self.rotation, self.mirrored, self.scale, self.centre) * factor


@dataclass(frozen=True)
class Scene:
    size: int
    background: Background
    objects: tuple[ToyObject, ...]


def _transform(
    polygon: np.ndarray, rotation: float, mirrored: bool, scale: float, centre: tuple[float, float]
) -> np.ndarray:
    angle = math.radians(rotation)
    cos, sin = math.cos(angle), math.sin(angle)
    x = -polygon[:, 0] if mirrored else polygon[:, 0]
    y = polygon[:, 1]
    # y points down, so this turns the shape counter-clockwise on screen.
    return np.stack([x * cos + y * sin, -x * sin + y * cos], axis=1) * scale + np.asarray(centre)


def _extent(shape: Shape, rotation: float, mirrored: bool) -> tuple[np.ndarray, np.ndarray]:
    """Min and max corner (shape units, about the centre) of the filled parts after rotation."""
    pts = np.concatenate([_transform(p, rotation, mirrored, 1.0, (0.0, 0.0)) for p, filled in shape.parts if filled])
    return pts.min(axis=0), pts.max(axis=0)


def _distinct(rgb: RGB, tones: list[RGB]) -> bool:
    return all(math.dist(rgb, tone) >= MIN_COLOUR_DISTANCE for tone in tones)


def _jitter(rng: np.random.Generator, rgb: RGB, amount: int) -> RGB:
    values = np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return tuple(int(v) for v in values)


def _sample_background(rng: np.random.Generator, colour: str) -> tuple[Background, list[str]]:
    """A background against which `colour` stands out, and every object colour that does."""
    names = list(BACKGROUND_COLOURS)
    while True:
        style = BACKGROUND_STYLES[rng.choice(len(BACKGROUND_STYLES), p=(0.4, 0.25, 0.2, 0.15))]
        if style == "gradient":
            first, second = rng.choice(len(names), 2, replace=False)
            colours = (names[first], names[second])
        else:
            colours = (names[rng.integers(len(names))],)
        tones = [BACKGROUND_COLOURS[c] for c in colours]
        if style == "gradient":
            tones.append(tuple((a + b) // 2 for a, b in zip(*tones)))
        if _distinct(COLOURS[colour], tones):
            break
    background = Background(
        style=style,
        colours=colours,
        rgbs=tuple(_jitter(rng, BACKGROUND_COLOURS[c], 8) for c in colours),
        angle=float(rng.uniform(0, 360)),
        noise_seed=int(rng.integers(2**31)),
    )
    return background, [name for name, rgb in COLOURS.items() if _distinct(rgb, tones)]


def _sample_identities(
    rng: np.random.Generator, n: int, first_colour: str, allowed: list[str]
) -> list[tuple[str, str]]:
    """(kind, colour) per object, colours drawn independently of kinds. Multi-object images repeat a kind a
    quarter of the time so that captions can count."""
    kinds = list(SHAPES)
    colours = [first_colour] + [allowed[rng.integers(len(allowed))] for _ in range(n - 1)]
    pairs = [(kinds[rng.integers(len(kinds))], colour) for colour in colours]
    if n > 1 and rng.random() < 0.25:
        copies = n - 1 if rng.random() < 0.3 else 1
        same_colour = rng.random() < 0.5
        for i in range(1, 1 + copies):
            pairs[i] = (pairs[0][0], pairs[0][1] if same_colour else pairs[i][1])
    return pairs


class _Placement(NamedTuple):
    centre: tuple[float, float]
    scale: float
    rotation: float
    mirrored: bool
    extent: tuple[float, float, float, float]


def _place(rng: np.random.Generator, shapes: list[Shape], fractions: list[float], size: int) -> list[_Placement] | None:
    """Poses with no two extents closer than the margin; None if they did not fit."""
    margin = MARGIN * size
    placed: list[_Placement] = []
    for shape, fraction in zip(shapes, fractions):
        rotation = float(rng.uniform(-shape.max_rotation, shape.max_rotation))
        mirrored = bool(shape.mirror and rng.random() < 0.5)
        scale = fraction * size / 2
        low, high = _extent(shape, rotation, mirrored)
        x_range = (margin - low[0] * scale, size - margin - high[0] * scale)
        y_range = (margin - low[1] * scale, size - margin - high[1] * scale)
        if x_range[0] > x_range[1] or y_range[0] > y_range[1]:
            return None
        for _ in range(30):
            cx, cy = float(rng.uniform(*x_range)), float(rng.uniform(*y_range))
            box = (cx + low[0] * scale, cy + low[1] * scale, cx + high[0] * scale, cy + high[1] * scale)
            if all(
                box[0] > other[2] + margin
                or other[0] > box[2] + margin
                or box[1] > other[3] + margin
                or other[1] > box[3] + margin
                for other in (p.extent for p in placed)
            ):
                placed.append(_Placement((cx, cy), scale, rotation, mirrored, box))
                break
        else:
            return None
    return placed


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    """A random scene for an image of `size` pixels.

    The first object's colour is uniform over COLOURS and picks the background (light colours need dark ones);
    the others are uniform over the colours that stand out against that background.
    """
    first_colour = list(COLOURS)[rng.integers(len(COLOURS))]
    background, allowed = _sample_background(rng, first_colour)
    n = int(rng.choice(3, p=OBJECT_COUNT_PROBS)) + 1
    identities = _sample_identities(rng, n, first_colour, allowed)
    low, high = SIZE_RANGES[n]
    size_classes = rng.integers(len(SIZE_WORDS), size=n)
    fractions = [low + (high - low) * (c + rng.random()) / len(SIZE_WORDS) for c in size_classes]
    shapes = [SHAPES[kind] for kind, _ in identities]
    while (layout := _place(rng, shapes, fractions, size)) is None:
        fractions = [f * 0.95 for f in fractions]
    objects = tuple(
        ToyObject(kind, colour, SIZE_WORDS[c], _jitter(rng, COLOURS[colour], 12), *placement)
        for (kind, colour), c, placement in zip(identities, size_classes, layout)
    )
    return Scene(size=size, background=background, objects=objects)


def _background_image(background: Background, side: int) -> Image.Image:
    base = np.asarray(background.rgbs[0], dtype=np.float32)
    if background.style == "plain":
        return Image.new("RGB", (side, side), background.rgbs[0])
    rng = np.random.default_rng(background.noise_seed)
    if background.style == "gradient":
        ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
        angle = math.radians(background.angle)
        t = xs * math.cos(angle) + ys * math.sin(angle)
        t = ((t - t.min()) / (t.max() - t.min()))[..., None]
        pixels = base * (1 - t) + np.asarray(background.rgbs[1], dtype=np.float32) * t
    elif background.style == "noisy":
        pixels = base + rng.normal(0.0, 14.0, (side, side, 1)).astype(np.float32)
    else:  # textured: smooth blotches
        blotches = Image.fromarray(rng.normal(0.0, 1.0, (5, 5)).astype(np.float32))
        blotches = np.asarray(blotches.resize((side, side), Image.Resampling.BICUBIC))
        pixels = base + 12.0 * blotches[..., None]
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def supersampling(size: int) -> int:
    """Drawing factor: at least 2, and a canvas of at least 128 pixels."""
    return max(2, math.ceil(128 / size))


def render(scene: Scene) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """Draw the scene supersampled, reduce it (box filter) to `scene.size` pixels; also return the box
    (x0, y0, x1, y1, pixels of the written image, x1 and y1 exclusive) of every pixel each object touches."""
    factor = supersampling(scene.size)
    side = scene.size * factor
    canvas = _background_image(scene.background, side)
    boxes = []
    for obj in scene.objects:
        mask = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(mask)
        for polygon, filled in SHAPES[obj.kind].parts:
            # Polygon vertices address pixel centres: shift by half a pixel so extents and pixels line up.
            draw.polygon((obj.points(polygon, factor) - 0.5).ravel().tolist(), fill=255 if filled else 0)
        canvas.paste(obj.rgb, (0, 0, side, side), mask)
        x0, y0, x1, y1 = mask.getbbox()
        boxes.append((x0 // factor, y0 // factor, -(-x1 // factor), -(-y1 // factor)))
    return canvas.reduce(factor), boxes
