"""Image bytes -> unit vectors: the pure batch core (Embedder) and its one Spark wrapper (mapInPandas)."""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from lakelens.ingest import images
from lakelens.ingest.regions import boxes as region_boxes
from lakelens.ingest.regions import crop
from lakelens.models import engines
from lakelens.models import registry as models
from lakelens.models.registry import ModelSpec


@dataclass
class ImageResult:
    embedding: np.ndarray | None  # float32, L2-normalised; None on error
    width: int | None
    height: int | None
    error: str | None
    regions: list | None = None  # [(box, float32 unit vector)] when regions are on and the image decoded


def prepare(transform, image_size: int, data: bytes, max_pixels: int = 89_478_485, draft: bool = True,
            formats: tuple = images.FORMATS):
    """One image file's bytes -> (transform(RGB image), Decoded), or (None, Decoded with its error).
    `transform` is images.Transform (numpy) or open_clip's preprocess (torch tensors, for training)."""
    decoded = images.decode(data, image_size, max_pixels, draft, formats)
    if decoded.error:
        return None, decoded
    try:
        return transform(decoded.image), decoded
    except Exception:
        decoded.error = "corrupt"
        return None, decoded


class Embedder:
    """Load the model once in __init__; embed a batch of encoded image files in __call__, or a stream of
    batches with stream(), which decodes the next batch on threads while the model runs on this one."""

    def __init__(self, spec: ModelSpec, batch_size: int = 32, decode_threads: int = 2, draft: bool = True,
                 max_pixels: int = 89_478_485, engine: str = engines.DEFAULT_ENGINE, device: str = "auto",
                 threads: int | None = None, onnx_cache: str = "", formats: tuple = images.FORMATS,
                 region_grid: int = 0):
        self.spec = spec
        # regions: crops embedded beside each whole image (0: none); their boxes in ingest.regions order
        self.boxes = region_boxes(region_grid) if region_grid else []
        self.region_grid = region_grid
        self.formats = tuple(formats)
        self.engine = engines.get(spec, engine, device, threads, onnx_cache)
        # numpy preprocessing, identical to open_clip's; its torchvision transform only where this one
        # does not cover the model's settings. An engine that takes 8-bit pixels (the int8 tower) gets
        # them as they are: no float normalisation in the worker.
        if self.engine.takes_pixels:
            self.transform = self.engine.transform.pixels
        else:
            self.transform = self.engine.transform or (lambda img: self.loaded.preprocess(img).numpy())
        self.batch_size = batch_size
        # CPU engines run as fast on 8 images as on 32 (one thread per task), so the model waits for only
        # 8 decodes; a GPU wants whole batches
        self.step = batch_size if self.engine.device != "cpu" else min(batch_size, 8)
        self.draft = draft
        self.max_pixels = max_pixels
        # PIL releases the GIL while decoding and resizing, and so do torch and ONNX Runtime while
        # they compute: decode threads overlap each other and the model.
        self._pool = ThreadPoolExecutor(max(1, decode_threads))

    @property
    def dim(self) -> int:
        return self.engine.dim

    @property
    def loaded(self) -> models.LoadedModel:
        """The open_clip model and tokenizer, loaded on first use (text queries): image embedding with
        an ONNX engine never needs them."""
        return models.load(self.spec)

    def _prepare(self, data: bytes):
        if not self.boxes:
            return prepare(self.transform, self.engine.image_size, data, self.max_pixels, self.draft, self.formats)
        # a crop of 1/grid of the image still gets the model's resolution: decode at grid x the size
        decoded = images.decode(data, self.engine.image_size * self.region_grid, self.max_pixels, self.draft,
                                self.formats)
        if decoded.error:
            return None, decoded
        try:
            return [self.transform(decoded.image)] + [self.transform(crop(decoded.image, b)) for b in self.boxes], decoded
        except Exception:
            decoded.error = "corrupt"
            return None, decoded

    def _finish(self, futures: list) -> list[ImageResult]:
        """Embed one batch as its images come out of the decode threads, `step` at a time: the model
        starts on the first images while the rest are still decoding."""
        results: list[ImageResult] = []
        for start in range(0, len(futures), self.step):
            prepared = [f.result() for f in futures[start:start + self.step]]
            ok = [i for i, (x, _) in enumerate(prepared) if x is not None]
            per = 1 + len(self.boxes)  # tensors per image: the whole image, then its crops
            tensors = [t for i in ok for t in (prepared[i][0] if self.boxes else [prepared[i][0]])]
            vectors = self.embed_tensors(tensors) if ok else None
            part = [ImageResult(None, d.width, d.height, d.error) for _, d in prepared]
            for row, i in enumerate(ok):
                part[i].embedding = vectors[row * per]
                if self.boxes:
                    part[i].regions = [(b, vectors[row * per + 1 + j]) for j, b in enumerate(self.boxes)]
            results.extend(part)
        return results

    def __call__(self, contents: Sequence[bytes]) -> list[ImageResult]:
        return self._finish([self._pool.submit(self._prepare, c) for c in contents])

    def stream(self, batches: Iterable[tuple[Any, Sequence[bytes]]]) -> Iterator[tuple[Any, list[ImageResult]]]:
        """(tag, contents) batches -> (tag, results), in order. Batch i+1 is decoded while batch i is
        embedded, so decoding leaves the critical path whenever a core is free for it."""
        queue: deque = deque()
        for tag, contents in batches:
            queue.append((tag, [self._pool.submit(self._prepare, c) for c in contents]))
            if len(queue) > 1:
                done_tag, futures = queue.popleft()
                yield done_tag, self._finish(futures)
        while queue:
            done_tag, futures = queue.popleft()
            yield done_tag, self._finish(futures)

    def embed_tensors(self, tensors: list) -> np.ndarray:
        """Preprocessed CHW arrays (float32 model input: numpy, or torch tensors; or uint8 pixels from
        Transform.pixels) -> (n, dim) float32 unit vectors, in batches."""
        out = np.zeros((len(tensors), self.dim), dtype=np.float32)
        for start in range(0, len(tensors), self.batch_size):
            part = [np.asarray(t) for t in tensors[start:start + self.batch_size]]
            pixels = all(t.dtype == np.uint8 for t in part)
            batch = np.stack(part if pixels else [t.astype(np.float32, copy=False) for t in part])
            out[start:start + len(batch)] = self.engine.encode_image(batch)
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.loaded.tokenizer(list(texts))
        return np.asarray(self.engine.encode_text(tokens), dtype=np.float32)


@functools.lru_cache(maxsize=2)
def cached_embedder(spec: ModelSpec, batch_size: int, decode_threads: int, draft: bool, max_pixels: int,
                    engine: str = engines.DEFAULT_ENGINE, device: str = "auto", threads: int | None = None,
                    onnx_cache: str = "", region_grid: int = 0) -> Embedder:
    """One Embedder per Python worker process and setting; lives in this importable module so that
    Spark's reused workers keep it between tasks instead of rebuilding the model."""
    return Embedder(spec, batch_size, decode_threads, draft, max_pixels, engine, device, threads, onnx_cache,
                    region_grid=region_grid)
