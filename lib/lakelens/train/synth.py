"""Procedural captioned images (shapes, colours, sizes, positions, backgrounds) for the demo and tests: the
pictures come from lakelens.models.shapes, the captions (English and Portuguese) and the data set from here."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from lakelens.models import shapes
from lakelens.models.shapes import Shape, render

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
class Sample(Shape):
    """A shape picture's description, and its caption in each language."""

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


def samples(n: int, seed: int = 0) -> list[Sample]:
    return [Sample(**asdict(s)) for s in shapes.samples(n, seed)]


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
