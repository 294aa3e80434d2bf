"""Procedural pictures of shapes (colours, sizes, positions, backgrounds): the probe and calibration images
of the int8 engine, and the pictures of the demo's captioned data set (lakelens.train.synth)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 70, 220), "yellow": (240, 210, 30),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "black": (20, 20, 20), "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.22, "large": 0.42}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
BACKGROUNDS = {"grey": (128, 128, 128), "striped": None, "dotted": None}


@dataclass
class Shape:
    color: str
    shape: str
    size: str
    position: str
    background: str


def _background(kind: str, px: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (px, px), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    if kind == "striped":
        step = max(4, px // 10)
        for x in range(0, px, step * 2):
            draw.rectangle([x, 0, x + step - 1, px], fill=(95, 95, 95))
    elif kind == "dotted":
        step = max(6, px // 8)
        for x in range(step // 2, px, step):
            for y in range(step // 2, px, step):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(170, 170, 170))
    return img


def render(sample: Shape, px: int = 96, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    img = _background(sample.background, px, rng)
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[sample.position]
    jitter = 0.04
    cx, cy = (cx + rng.uniform(-jitter, jitter)) * px, (cy + rng.uniform(-jitter, jitter)) * px
    r = SIZES[sample.size] * px / 2 * rng.uniform(0.85, 1.15)
    color = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLORS[sample.color])
    if sample.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif sample.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif sample.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:
        draw.regular_polygon((cx, cy, r), n_sides=5, rotation=rng.uniform(0, 72), fill=color)
        draw.regular_polygon((cx, cy, r * 0.6), n_sides=5, rotation=36, fill=color)
    return img


def samples(n: int, seed: int = 0) -> list[Shape]:
    rng = random.Random(seed)
    return [Shape(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIZES)),
                   rng.choice(list(POSITIONS)), rng.choice(list(BACKGROUNDS))) for _ in range(n)]
