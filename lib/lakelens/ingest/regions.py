"""Regions: crops of an image embedded beside the whole image (small objects get a vector of their
own). Boxes are fractions of the displayed image, (x0, y0, x1, y1), so they do not depend on the
scale an image was decoded at; a region's id is xxhash64(image id, region number), computed by Spark
wherever region entries are written or tombstoned (the index job), never by hand."""

from __future__ import annotations

from PIL import Image

MAX_GRID = 4


def boxes(grid: int = 2) -> list[tuple[float, float, float, float]]:
    """The crops of one image: `grid` x `grid` cells, row by row, then the centre (half the width and
    height). grid 1 gives the centre alone (the whole image is always embedded anyway)."""
    if not 1 <= grid <= MAX_GRID:
        raise ValueError(f"grid must be between 1 and {MAX_GRID}, got {grid}")
    cells = [] if grid == 1 else [(c / grid, r / grid, (c + 1) / grid, (r + 1) / grid)
                                  for r in range(grid) for c in range(grid)]
    return cells + [(0.25, 0.25, 0.75, 0.75)]


def crop(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """The pixels of a fractional box (at least one pixel each way)."""
    w, h = img.size
    x0, y0 = min(w - 1, int(round(box[0] * w))), min(h - 1, int(round(box[1] * h)))
    x1, y1 = max(x0 + 1, int(round(box[2] * w))), max(y0 + 1, int(round(box[3] * h)))
    return img.crop((x0, y0, x1, y1))
