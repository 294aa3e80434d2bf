"""Which FAISS index fits n vectors in a memory budget, and its training: the factory ladder."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import faiss
import numpy as np

from lakelens.errors import ConfigError


@dataclass
class Choice:
    factory: str  # FAISS index_factory string, without the IDMap prefix
    reason: str
    needs_training: bool
    search_params: dict = field(default_factory=dict)  # nprobe / efSearch defaults
    rerank: int = 0  # compressed codes: fetch rerank x k candidates, re-score them exactly from disk


def nlist_for(n: int) -> int:
    """Inverted lists: about 4 sqrt(n), at least 39 training points per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def choose_factory(n: int, dim: int, memory_budget: int, exact_max_rows: int = 50_000,
                   hnsw_max_rows: int = 300_000) -> Choice:
    """The index type for n vectors of `dim` floats within `memory_budget` bytes of RAM at query time."""
    flat_bytes = n * dim * 4
    if n <= exact_max_rows and flat_bytes <= memory_budget:
        return Choice("Flat", f"{n} rows <= {exact_max_rows}: exact search", False)
    hnsw_bytes = flat_bytes + n * 32 * 2 * 4 * 1.1
    if n <= hnsw_max_rows and hnsw_bytes <= memory_budget:
        return Choice("HNSW32,Flat", f"{n} rows <= {hnsw_max_rows} and graph + vectors "
                      f"({hnsw_bytes / 2**20:.0f} MiB) fit the budget: HNSW", False, {"efSearch": 128})
    nlist = nlist_for(n)
    if flat_bytes * 1.05 <= memory_budget:
        return Choice(f"IVF{nlist},Flat", f"raw vectors ({flat_bytes / 2**20:.0f} MiB) fit the budget: "
                      f"IVF-Flat with {nlist} lists", True, {"nprobe": max(8, nlist // 32)})
    if n * dim * 1.05 <= memory_budget:
        return Choice(f"IVF{nlist},SQ8", f"raw vectors exceed the budget, 8-bit codes "
                      f"({n * dim / 2**20:.0f} MiB) fit: IVF-SQ8 with {nlist} lists, re-ranked exactly "
                      f"from memory-mapped vectors", True, {"nprobe": max(8, nlist // 32)}, rerank=4)
    m = next((m for m in (64, 48, 32, 24, 16, 8, 4) if dim % m == 0 and n * m * 1.05 <= memory_budget), None)
    if m is None:
        raise ValueError(f"{n} vectors cannot fit a {memory_budget} byte budget even as 4-byte PQ codes")
    return Choice(f"IVF{nlist},PQ{m}", f"only {m}-byte codes fit the budget: IVF-PQ with {nlist} lists, "
                  f"re-ranked exactly from memory-mapped vectors", True, {"nprobe": max(16, nlist // 16)},
                  rerank=10)


def explicit_choice(factory: str, dim: int) -> Choice:
    """A user's FAISS index_factory string for `dim`-dim vectors; ConfigError (naming index.factory) when
    FAISS cannot build it, e.g. an unknown string or PQ codes that do not divide the dimension."""
    text = factory.strip()
    if not text or text.split(",")[0].startswith("IDMap"):
        raise ConfigError(f"index.factory: expected auto or a FAISS index_factory string without IDMap "
                          f"(lakelens keeps the ids itself), e.g. IVF1024,Flat; got {factory!r}")
    try:
        probe = faiss.index_factory(dim, text, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:  # FAISS reports every bad string as a RuntimeError with a C++ location
        lines = str(e).strip().splitlines() or [""]
        reason = re.sub(r"^.*?\.cpp:\d+: ", "", lines[0]).removeprefix("Error: ").strip()
        raise ConfigError(f"index.factory: FAISS cannot build {factory!r} for {dim}-dim vectors: {reason}") from None
    params = {"nprobe": 16} if "IVF" in text else {"efSearch": 128} if "HNSW" in text else {}
    return Choice(text, "explicit factory string", not probe.is_trained, params)


def training_rows(choice: Choice, n: int, train_sample: int) -> int:
    """Sample size for training: the configured one, raised to 40 points per IVF list (k-means needs them)."""
    m = re.search(r"IVF(\d+)", choice.factory)
    return min(n, max(train_sample, 40 * int(m.group(1)) if m else 0))


def new_index(dim: int, choice: Choice):
    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if "HNSW" in choice.factory:
        faiss.downcast_index(index).hnsw.efConstruction = 80
    return index


def train(dim: int, choice: Choice, sample: np.ndarray) -> bytes:
    """Train once on a sample (the driver); shards copy the trained empty index so they share centroids."""
    index = new_index(dim, choice)
    if choice.needs_training:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()

