"""FAISS index core: factory choice, shard build, manifest, atomic publish of versions, pruning."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

CURRENT = "CURRENT"
TUNING_QUERIES = 200
MANIFEST = "manifest.json"
META = "meta.parquet"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


class IndexDirError(RuntimeError):
    """An index directory is missing, incomplete or inconsistent."""


def parse_size(text: str | int) -> int:
    """'4G', '512M', '1.5g', 1024 -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 4G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


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


def explicit_choice(factory: str) -> Choice:
    import faiss

    probe = faiss.index_factory(8 if "PQ" not in factory else 64, factory, faiss.METRIC_INNER_PRODUCT)
    params = {"nprobe": 16} if "IVF" in factory else {"efSearch": 128} if "HNSW" in factory else {}
    return Choice(factory, "explicit factory string", not probe.is_trained, params)


def training_rows(choice: Choice, n: int, train_sample: int) -> int:
    """Sample size for training: the configured one, raised to 40 points per IVF list (k-means needs them)."""
    m = re.search(r"IVF(\d+)", choice.factory)
    return min(n, max(train_sample, 40 * int(m.group(1)) if m else 0))


def new_index(dim: int, choice: Choice):
    import faiss

    index = faiss.index_factory(dim, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if "HNSW" in choice.factory:
        faiss.downcast_index(index).hnsw.efConstruction = 80
    return index


def train(dim: int, choice: Choice, sample: np.ndarray) -> bytes:
    """Train once on a sample (the driver); shards copy the trained empty index so they share centroids."""
    import faiss

    index = new_index(dim, choice)
    if choice.needs_training:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = Path(f"{path}.tmp-{uuid.uuid4().hex[:6]}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def rerank_files(shard_path: str | Path) -> tuple[Path, Path]:
    """Raw vectors and their ids beside a shard, for exact re-ranking of compressed-code candidates."""
    p = Path(shard_path)
    stem = p.name[: -len(".faiss")] if p.name.endswith(".faiss") else p.name
    return p.with_name(stem + ".vectors.npy"), p.with_name(stem + ".ids.npy")


def build_shard(trained: bytes, ids: np.ndarray, vectors: np.ndarray, path: str | Path,
                rerank: bool = False) -> int:
    """Add one shard's vectors (with their 64-bit ids) to a copy of the trained index and write it;
    with `rerank`, also the raw vectors sorted by id, which queries memory-map to re-score candidates."""
    import faiss

    if (ids == -1).any():
        raise IndexDirError("id -1 is FAISS's 'no result' marker and cannot be indexed")
    if rerank:
        order = np.argsort(ids, kind="stable")
        vec_file, id_file = rerank_files(path)
        _atomic_save_npy(vec_file, np.ascontiguousarray(vectors[order], dtype=np.float32))
        _atomic_save_npy(id_file, np.ascontiguousarray(ids[order], dtype=np.int64))
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    if not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        index = faiss.IndexIDMap2(index)  # Flat and HNSW keep ids beside the index
    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:6]}"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)
    return int(index.ntotal)


NPROBE_STEPS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def tune_nprobe(staged: Path, files: list[str], choice: Choice, queries: np.ndarray, query_ids: np.ndarray,
                target: float = 0.97, k: int = 10) -> dict:
    """The smallest nprobe whose recall@k reaches `target` against visiting every list, measured on
    indexed vectors as queries (each query's own id left out of both lists), over the staged shards."""
    import faiss

    from .search import search_shards

    m = re.search(r"IVF(\d+)", choice.factory)
    if not m or not len(queries):
        return dict(choice.search_params)
    nlist = int(m.group(1))
    shards = [faiss.read_index(str(staged / f)) for f in files]
    rerank = [tuple(np.load(p) for p in rerank_files(staged / f)) if choice.rerank else None for f in files]
    q = np.ascontiguousarray(queries, dtype=np.float32)

    def top(nprobe):
        _, ids = search_shards(shards, rerank, q, k + 1, nprobe=nprobe, factor=choice.rerank)
        return [[i for i in row if i != own and i != -1][:k] for row, own in zip(ids, query_ids)]

    reference = top(nlist)
    measured = {}
    for nprobe in [p for p in NPROBE_STEPS if p < nlist] + [nlist]:
        found = top(nprobe)
        measured[nprobe] = float(np.mean([len(set(f) & set(r)) / max(1, len(r)) for f, r in zip(found, reference)]))
        if measured[nprobe] >= target:
            break
    best = max(measured, key=lambda p: (measured[p] >= target, -p))
    return {**choice.search_params, "nprobe": best, "tuned_recall": round(measured[best], 4),
            "tuned_queries": int(len(q))}


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
    return np.mod(ids, shards)  # the same as Spark's pmod(id, shards)


def build_local(index_dir: str | Path, ids: np.ndarray, vectors: np.ndarray, paths: list[str],
                choice: Choice, shards: int = 1, model_key: str = "", train_sample: int = 100_000,
                source: dict | None = None) -> str:
    """Build and publish a version from in-memory arrays, without Spark: the same shard builder and
    publish step the index job uses on executors (benchmarks, tests, notebooks)."""
    import pandas as pd

    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(vectors))
    # tuning queries are rows the quantizer was not trained on, as real queries are
    probe = order[:TUNING_QUERIES] if len(vectors) > 2 * TUNING_QUERIES else order[:0]
    rest = order[len(probe):]
    size = training_rows(choice, len(rest), train_sample)
    sample = vectors[rest[:size]] if choice.needs_training else None
    trained = train(vectors.shape[1], choice, sample)
    staged = staging_dir(index_dir)
    owner = shard_of(ids, shards)
    counts = []
    for s in range(shards):
        mask = owner == s
        counts.append(build_shard(trained, ids[mask], vectors[mask], staged / f"shard-{s:04d}.faiss",
                                  rerank=bool(choice.rerank)))
    choice = Choice(choice.factory, choice.reason, choice.needs_training,
                    tune_nprobe(staged, [f"shard-{s:04d}.faiss" for s in range(shards)], choice,
                                vectors[probe], ids[probe]), choice.rerank)
    pd.DataFrame({"id": ids, "path": list(paths)}).to_parquet(staged / META, index=False)
    manifest = make_manifest(model_key, int(vectors.shape[1]), choice, counts,
                             source or {"table": None, "format": None, "version": None, "fingerprint": None}, {})
    return publish(index_dir, staged, manifest)


def make_manifest(model_key: str, dim: int, choice: Choice, counts: list[int], source: dict, settings: dict,
                  **extra) -> dict:
    name, _, pretrained = model_key.partition("@")
    return {
        "model": {"name": name, "pretrained": pretrained, "key": model_key},
        "dim": dim, "metric": "inner_product", "rows": int(sum(counts)),
        "factory": choice.factory, "reason": choice.reason, "search_params": choice.search_params,
        "rerank": choice.rerank,
        "shards": [{"file": f"shard-{s:04d}.faiss", "count": int(c), "factory": choice.factory}
                   for s, c in enumerate(counts)],
        "source": source, "settings": settings, **extra,
    }


# --- versions -----------------------------------------------------------------------------------
def versions(index_dir: str | Path) -> list[str]:
    d = Path(index_dir)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if _VERSION_RE.match(p.name) and (p / MANIFEST).is_file()),
                  key=lambda n: int(n[1:]))


def current_version(index_dir: str | Path) -> str | None:
    f = Path(index_dir) / CURRENT
    if not f.is_file():
        return None
    name = f.read_text().strip()
    return name or None


def read_manifest(index_dir: str | Path, version: str | None = None) -> dict:
    version = version or current_version(index_dir)
    if version is None:
        raise IndexDirError(f"no published index in {index_dir} (no {CURRENT} file)")
    path = Path(index_dir) / version / MANIFEST
    if not path.is_file():
        raise IndexDirError(f"{index_dir}: {CURRENT} names {version}, which has no {MANIFEST}")
    return json.loads(path.read_text())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(index_dir: str | Path) -> Path:
    """A fresh hidden folder inside the index dir where a version is written before it is published."""
    d = Path(index_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(index_dir: str | Path, staged: Path, manifest: dict) -> str:
    """Write the manifest, move the staged folder to the next vNNNN name, then switch CURRENT with an
    atomic rename: readers see either the old version or the complete new one."""
    d = Path(index_dir)
    existing = [int(v[1:]) for v in versions(d)]
    name = f"v{(max(existing) + 1 if existing else 1):04d}"
    manifest = {**manifest, "version": name, "published_at": time.time()}
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    for f in staged.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.rename(staged, d / name)
    tmp = d / f".{CURRENT}.{uuid.uuid4().hex[:6]}"
    tmp.write_text(name + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, d / CURRENT)
    _fsync_dir(d)
    return name


def prune(index_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest versions; never the live one. Returns the removed names."""
    if keep < 1:
        raise ValueError("prune keeps at least 1 version")
    live = current_version(index_dir)
    names = versions(index_dir)
    doomed = [v for v in names[:-keep] if v != live]
    for v in doomed:
        shutil.rmtree(Path(index_dir) / v, ignore_errors=True)
    for stale in Path(index_dir).glob(".building-*"):  # left by a crashed build
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    return doomed
