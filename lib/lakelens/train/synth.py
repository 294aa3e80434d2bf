"""Procedural captioned images (shapes, colours, sizes, positions, backgrounds) for the demo and tests."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

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
LANGS = ("en", "pt")
# Portuguese words: colours and sizes agree with the shape's gender (masculine, feminine form).
PT_COLORS = {"red": ("vermelho", "vermelha"), "green": ("verde", "verde"), "blue": ("azul", "azul"),
             "yellow": ("amarelo", "amarela"), "purple": ("roxo", "roxa"), "orange": ("laranja", "laranja"),
             "black": ("preto", "preta"), "white": ("branco", "branca")}
PT_SHAPES = {"circle": ("círculo", "m"), "square": ("quadrado", "m"), "triangle": ("triângulo", "m"),
             "star": ("estrela", "f")}
PT_SIZES = {"small": ("pequeno", "pequena"), "large": ("grande", "grande")}
PT_POSITIONS = {"left": "à esquerda", "right": "à direita", "top": "em cima", "bottom": "em baixo",
                "center": "no centro"}
PT_BACKGROUNDS = {"grey": "cinzento", "striped": "listrado", "dotted": "pontilhado"}  # o fundo: masculine


@dataclass
class Sample:
    color: str
    shape: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on the {self.position} of a {self.background} background"

    @property
    def caption_pt(self) -> str:
        """The caption in Portuguese: "um grande círculo vermelho à esquerda num fundo cinzento"."""
        noun, gender = PT_SHAPES[self.shape]
        form = 0 if gender == "m" else 1
        article = ("um", "uma")[form]
        return (f"{article} {PT_SIZES[self.size][form]} {noun} {PT_COLORS[self.color][form]} "
                f"{PT_POSITIONS[self.position]} num fundo {PT_BACKGROUNDS[self.background]}")

    def caption_in(self, lang: str) -> str:
        if lang not in LANGS:
            raise ValueError(f"caption language must be one of {', '.join(LANGS)}, not {lang!r}")
        return self.caption if lang == "en" else self.caption_pt


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


def render(sample: Sample, px: int = 96, seed: int = 0) -> Image.Image:
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


def samples(n: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    return [Sample(rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(SIZES)),
                   rng.choice(list(POSITIONS)), rng.choice(list(BACKGROUNDS))) for _ in range(n)]


def write_dataset(folder: str | Path, n: int, seed: int = 0, px: int = 96, start: int = 0,
                  langs: tuple[str, ...] = ("en",)) -> Path:
    """Write n images (JPEG and PNG) under `folder` and their captions (path, caption, label) beside it,
    in FOLDER.captions.csv, so the image folder holds images only. With several `langs`, every image has
    one caption per language and the table a `lang` column."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples(n, seed), start=start):
        name = f"img{i:06d}.{'png' if i % 4 == 0 else 'jpg'}"
        img = render(s, px, seed=seed * 1_000_003 + i)
        img.save(folder / name, quality=92) if name.endswith("jpg") else img.save(folder / name)
        for lang in langs:
            rows.append({"path": str((folder / name).resolve()), "caption": s.caption_in(lang),
                         "label": f"{s.color} {s.shape}", "lang": lang})
    captions = folder.parent / f"{folder.name}.captions.csv"
    new = not captions.exists() or start == 0
    with open(captions, "w" if new else "a", newline="") as f:
        with_lang = tuple(langs) != ("en",)
        w = csv.DictWriter(f, fieldnames=["path", "caption", "label"] + (["lang"] if with_lang else []),
                           extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)
    return captions
