"""Image bytes -> unit vectors: the pure batch core (Embedder) and its one Spark wrapper (mapInPandas)."""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from . import images, models
from .config import EmbedConfig
from .models import ModelSpec


@dataclass
class ImageResult:
    embedding: np.ndarray | None  # float32, L2-normalised; None on error
    width: int | None
    height: int | None
    error: str | None


class Embedder:
    """Load the model once in __init__; embed a batch of encoded image files in __call__."""

    def __init__(self, spec: ModelSpec, batch_size: int = 32, decode_threads: int = 2, draft: bool = True,
                 max_pixels: int = 89_478_485):
        self.loaded = models.load(spec)
        self.batch_size = batch_size
        self.draft = draft
        self.max_pixels = max_pixels
        # PIL releases the GIL while decoding and resizing, so threads overlap the decode work
        self._pool = ThreadPoolExecutor(decode_threads) if decode_threads > 1 else None

    @property
    def dim(self) -> int:
        return self.loaded.dim

    def _prepare(self, data: bytes):
        decoded = images.decode(data, self.loaded.image_size, self.max_pixels, self.draft)
        if decoded.error:
            return None, decoded
        try:
            return self.loaded.preprocess(decoded.image), decoded
        except Exception:
            decoded.error = "corrupt"
            return None, decoded

    def _map(self, fn, items):
        return list(self._pool.map(fn, items)) if self._pool else [fn(x) for x in items]

    def __call__(self, contents: Sequence[bytes]) -> list[ImageResult]:
        prepared = self._map(self._prepare, contents)
        ok = [i for i, (tensor, _) in enumerate(prepared) if tensor is not None]
        vectors = self.embed_tensors([prepared[i][0] for i in ok])
        results = [ImageResult(None, d.width, d.height, d.error) for _, d in prepared]
        for row, i in enumerate(ok):
            results[i].embedding = vectors[row]
        return results

    def embed_tensors(self, tensors: list) -> np.ndarray:
        """Preprocessed CHW tensors -> (n, dim) float32 unit vectors, in batches of batch_size."""
        import torch

        out = np.zeros((len(tensors), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(tensors), self.batch_size):
                batch = torch.stack(tensors[start:start + self.batch_size])
                vec = self.loaded.model.encode_image(batch, normalize=True)
                out[start:start + len(batch)] = vec.float().numpy()
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            tokens = self.loaded.tokenizer(list(texts))
            return self.loaded.model.encode_text(tokens, normalize=True).float().numpy()


@functools.lru_cache(maxsize=2)
def cached_embedder(spec: ModelSpec, batch_size: int, decode_threads: int, draft: bool,
                    max_pixels: int) -> Embedder:
    """One Embedder per Python worker process and setting; lives in this importable module so that
    Spark's reused workers keep it between tasks instead of rebuilding the model."""
    return Embedder(spec, batch_size, decode_threads, draft, max_pixels)


def partition_embedder(spec: ModelSpec, conf: EmbedConfig):
    """The mapInPandas function: binaryFile batches (path, modificationTime, length, content) ->
    rows of tables.UDF_SCHEMA. Torch uses as many threads as the task was given cores (spark.task.cpus)."""
    batch_size, threads, draft, max_pixels = conf.batch_size, conf.decode_threads, conf.draft, conf.max_pixels

    def embed_batches(batches: Iterator) -> Iterator:
        import pandas as pd
        import torch
        from pyspark import TaskContext

        ctx = TaskContext.get()
        torch.set_num_threads(max(1, ctx.cpus() if ctx is not None else 1))
        embedder = cached_embedder(spec, batch_size, threads, draft, max_pixels)
        for pdf in batches:
            contents = pdf["content"].tolist()
            results = embedder(contents)
            yield pd.DataFrame({
                "path": pdf["path"],
                "content_sha256": [hashlib.sha256(c).hexdigest() for c in contents],
                "size_bytes": pdf["length"],
                "modified": pdf["modificationTime"],
                "width": pd.array([r.width for r in results], dtype="Int32"),
                "height": pd.array([r.height for r in results], dtype="Int32"),
                "embedding": [r.embedding for r in results],
                "error": [r.error for r in results],
            })

    return embed_batches


def embed_files(files, spec: ModelSpec, conf: EmbedConfig):
    """Spark DataFrame of binaryFile rows -> DataFrame of tables.UDF_SCHEMA rows."""
    from .tables import UDF_SCHEMA

    return files.mapInPandas(partition_embedder(spec, conf), UDF_SCHEMA)

