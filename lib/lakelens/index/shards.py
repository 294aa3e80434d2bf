"""Shard files: build one from a trained empty index, load it, search a set of them and merge exactly,
re-rank compressed codes from raw vectors, reconstruct a stored vector, and tune nprobe."""

from __future__ import annotations

import mmap as mmap_module
import re
import threading
import uuid
from pathlib import Path

import faiss
import numpy as np

from lakelens.errors import IndexDirError
from lakelens.files import replacing
from lakelens.index.factory import Choice
from lakelens.index.layout import rerank_files


class ShardWriter:
    """One shard built from batches of (ids, vectors), so no process ever holds a shard's raw vectors:
    each batch is added to a copy of the trained empty index; with `rerank`, the raw vectors are appended
    to a scratch file and written sorted by id at the end (queries memory-map them to re-score
    candidates of compressed codes). `close()` writes the FAISS file and returns the vector count."""

    def __init__(self, trained: bytes, path: str | Path, rerank: bool = False):
        self.path, self.rerank = Path(path), rerank
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
        if not isinstance(faiss.downcast_index(index), faiss.IndexIVF):
            index = faiss.IndexIDMap2(index)  # Flat and HNSW keep ids beside the index
        self.index, self.dim = index, index.d
        self._ids: list[np.ndarray] = []
        self._scratch = None
        if rerank:
            self._scratch_path = Path(f"{self.path}.raw-{uuid.uuid4().hex[:6]}")
            self._scratch = open(self._scratch_path, "wb")

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if (ids == -1).any():
            raise IndexDirError("id -1 is FAISS's 'no result' marker and cannot be indexed")
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index.add_with_ids(vectors, ids)
        self._ids.append(ids)
        if self._scratch is not None:
            self._scratch.write(vectors.tobytes())

    def close(self) -> int:
        ids = np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64)
        if self._scratch is not None:
            self._scratch.close()
            try:
                self._write_rerank(ids)
            finally:
                self._scratch_path.unlink(missing_ok=True)
        with replacing(self.path) as tmp:
            faiss.write_index(self.index, str(tmp))
        return int(self.index.ntotal)

    def _write_rerank(self, ids: np.ndarray, rows: int = 65_536) -> None:
        vec_file, id_file = rerank_files(self.path)
        order = np.argsort(ids, kind="stable")
        raw = np.memmap(self._scratch_path, dtype=np.float32, mode="r", shape=(len(ids), self.dim)) if len(ids) \
            else np.zeros((0, self.dim), np.float32)
        with replacing(vec_file) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(ids), self.dim))
            for i in range(0, len(ids), rows):
                out[i:i + rows] = raw[order[i:i + rows]]
            out.flush()
            del out, raw
        with replacing(id_file) as tmp, open(tmp, "wb") as f:
            np.save(f, ids[order])


def build_shard(trained: bytes, ids: np.ndarray, vectors: np.ndarray, path: str | Path,
                rerank: bool = False) -> int:
    """A shard from arrays in memory (local builds, empty shards): one batch through ShardWriter."""
    writer = ShardWriter(trained, path, rerank)
    writer.add(ids, vectors)
    return writer.close()


NPROBE_STEPS = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def tune_nprobe(staged: Path, files: list[str], choice: Choice, queries: np.ndarray, query_ids: np.ndarray,
                target: float = 0.97, k: int = 10) -> dict:
    """The smallest nprobe whose recall@k reaches `target` against visiting every list, measured on
    indexed vectors as queries (each query's own id left out of both lists), over the staged shards."""
    m = re.search(r"IVF(\d+)", choice.factory)
    if not m or not len(queries):
        return dict(choice.search_params)
    nlist = int(m.group(1))
    # memory-mapped, as the query driver opens them: the raw vectors of a large index exceed RAM
    shards = [load_shard(staged / f, True)[0] for f in files]
    rerank = [load_raw_vectors(staged / f) if choice.rerank else None for f in files]
    q = np.ascontiguousarray(queries, dtype=np.float32)

    quantizer = shared_quantizer(shards)

    def top(nprobe):
        _, ids = search_shards(shards, rerank, q, k + 1, nprobe=nprobe, factor=choice.rerank, quantizer=quantizer)
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


def load_shard(path: Path, mmap: bool):
    if mmap:
        try:
            return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY), True
        except RuntimeError:
            pass  # index types whose storage cannot be memory-mapped (HNSW graphs, PQ tables) load in RAM
    return faiss.read_index(str(path)), False


def search_params(index, nprobe: int | None, ef_search: int | None, selector=None):
    """Per-call FAISS search parameters: concurrent queries with different settings never interfere.
    `selector` (a faiss.IDSelector) restricts the search to those ids, inside the scan."""
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else faiss.downcast_index(index)
    sel = {"sel": selector} if selector is not None else {}
    if isinstance(inner, faiss.IndexIVF) and (nprobe is not None or sel):
        return faiss.SearchParametersIVF(nprobe=int(nprobe if nprobe is not None else inner.nprobe), **sel)
    if isinstance(inner, faiss.IndexHNSW) and (ef_search is not None or sel):
        return faiss.SearchParametersHNSW(efSearch=int(ef_search if ef_search is not None else inner.hnsw.efSearch),
                                          **sel)
    return faiss.SearchParameters(**sel) if sel else None


def shared_quantizer(shards: list):
    """The coarse quantizer of a set of IVF shards when they all share its centroids (every shard of a
    version is built from one trained index, deltas included), else None. Assigning a query to lists
    once for all shards, instead of once per shard, saves a pass over the centroids per shard."""
    ivfs = []
    for shard in shards:
        try:
            ivfs.append(faiss.extract_index_ivf(shard))
        except RuntimeError:
            return None
    if not ivfs:
        return None
    first = ivfs[0]
    centroids = first.quantizer.reconstruct_n(0, first.nlist)
    for other in ivfs[1:]:
        if other.nlist != first.nlist or not np.array_equal(other.quantizer.reconstruct_n(0, other.nlist), centroids):
            return None
    return first.quantizer


def _search_preassigned(ivf, q: np.ndarray, k: int, assigned, params):
    """IndexIVF.search_preassigned with per-call parameters (nprobe, selector), which FAISS's Python
    wrapper refuses: the C++ call takes them."""
    n = len(q)
    scores, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
    lists = np.ascontiguousarray(assigned[1], dtype=np.int64)
    dist = np.ascontiguousarray(assigned[0], dtype=np.float32)
    ivf.search_preassigned_c(n, faiss.swig_ptr(q), k, faiss.swig_ptr(lists), faiss.swig_ptr(dist),
                             faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params)
    return scores, ids


def search_shards(shards: list, rerank: list, q: np.ndarray, k: int, nprobe: int | None = None,
                  ef_search: int | None = None, factor: int = 0, pool=None, selector=None, excluded=None,
                  quantizer=None):
    """Top-k over all shards, merged exactly by score: (scores, ids), each (len(q), k), id -1 padding.
    With `selector`, only the ids it accepts are candidates; `excluded[i]`, a selector per shard, drops
    the ids that shard still holds but that are not live there (tombstones of an incremental version).
    `quantizer` (from shared_quantizer): IVF shards' lists are chosen once for all of them."""
    q = np.ascontiguousarray(q, dtype=np.float32)
    assigned = None
    if quantizer is not None:
        ivf = faiss.extract_index_ivf(shards[0])
        probes = min(int(nprobe if nprobe is not None else ivf.nprobe), ivf.nlist)
        assigned = quantizer.search(q, probes)  # (distances, lists), shared by every shard
        nprobe = probes

    def one(i):
        shard = shards[i]
        kk = min(k * max(1, factor), max(1, shard.ntotal))
        sel, keep = selector, None
        if excluded is not None and excluded[i] is not None:
            sel = excluded[i] if selector is None else faiss.IDSelectorAnd(selector, excluded[i])
            keep = sel  # the combined selector only points at its parts; they outlive this call
        params = search_params(shard, nprobe, ef_search, sel)
        if assigned is not None:
            scores, ids = _search_preassigned(faiss.extract_index_ivf(shard), q, kk, assigned, params)
        else:
            scores, ids = shard.search(q, kk, params=params) if params is not None else shard.search(q, kk)
        if factor and rerank[i] is not None:
            scores, ids = rerank_exact(q, ids, *rerank[i], k)
        del keep
        return scores, ids

    parts = list(pool.map(one, range(len(shards)))) if pool is not None and len(shards) > 1 \
        else [one(i) for i in range(len(shards))]
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids == -1, -np.inf, scores)  # faiss pads missing results with id -1 (ids are signed)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def rerank_exact(q: np.ndarray, cand: np.ndarray, vectors: np.ndarray, sorted_ids: np.ndarray, k: int):
    """Exact inner products for the candidates of each query, read from the memory-mapped raw vectors."""
    nq = len(q)
    scores = np.full((nq, min(k, cand.shape[1])), -np.inf, dtype=np.float32)
    ids = np.full(scores.shape, -1, dtype=np.int64)
    for row in range(nq):
        c = cand[row][cand[row] != -1]
        if not len(c):
            continue
        pos = np.searchsorted(sorted_ids, c)
        exact = np.asarray(vectors[np.sort(pos)], dtype=np.float32) @ q[row]
        c = sorted_ids[np.sort(pos)]
        top = np.argsort(-exact, kind="stable")[: scores.shape[1]]
        scores[row, : len(top)], ids[row, : len(top)] = exact[top], c[top]
    return scores, ids


_DIRECT_MAP_LOCK = threading.Lock()


def prepare_direct_map(shard) -> None:
    """Build an IVF shard's id -> list position table (once, at load): reconstruct() then only reads it,
    so concurrent look-ups never see a half-built map."""
    inner = faiss.downcast_index(shard)
    if isinstance(inner, faiss.IndexIVF):
        with _DIRECT_MAP_LOCK:
            if inner.direct_map.type == faiss.DirectMap.NoMap:
                inner.set_direct_map_type(faiss.DirectMap.Hashtable)


def reconstruct(shard, id_: int, rerank=None) -> np.ndarray | None:
    """The stored vector of `id_` in one shard, or None if not held: from the raw vectors beside
    compressed shards (exact), else from the index (its id -> position table built on first use)."""
    if rerank is not None:
        vectors, ids = rerank
        i = int(np.searchsorted(ids, id_))
        return np.array(vectors[i], dtype=np.float32) if i < len(ids) and ids[i] == id_ else None
    prepare_direct_map(shard)
    try:
        return faiss.downcast_index(shard).reconstruct(id_)
    except RuntimeError:
        return None




def shard_entries(manifest: dict) -> list[dict]:
    """Every shard a version searches: its base shards (generation 0) and its delta shards, in order of
    generation."""
    return [*manifest["shards"], *manifest.get("deltas", [])]


def read_tombstones(folder: Path, manifest: dict):
    """(id, generation) of a version's tombstones: an id is dead in every shard of an older generation
    than its tombstone's (deleted, or replaced by a newer vector in a later delta)."""
    import pandas as pd

    name = (manifest.get("tombstones") or {}).get("file")
    if not name:
        return pd.DataFrame({"id": np.zeros(0, np.int64), "generation": np.zeros(0, np.int64)})
    return pd.read_parquet(Path(folder) / name, columns=["id", "generation"])


def dead_ids(tomb, generation: int) -> np.ndarray:
    """Ids a shard of `generation` still holds copies of that are not live there: tombstoned later."""
    return tomb["id"].to_numpy(np.int64)[tomb["generation"].to_numpy() > generation]


def _stored_chunks(shard, rerank, rows: int = 65_536):
    """(ids, float32 vectors) of every vector a shard holds, in chunks: the raw vectors beside compressed
    shards, or the codes of IVF-Flat's lists copied into one reused buffer (a chunk is valid until the
    next one is asked for)."""
    if rerank is not None:
        vectors, ids = rerank
        for i in range(0, len(ids), rows):
            yield np.asarray(ids[i:i + rows]), np.asarray(vectors[i:i + rows], dtype=np.float32)
        return
    ivf = faiss.extract_index_ivf(shard)
    lists, dim = ivf.invlists, ivf.d
    if lists.code_size != 4 * dim:
        raise ValueError(f"{type(ivf).__name__} codes are not raw vectors: pass the shard's raw vectors")
    ids, vecs, taken = [], [], []
    buffer = None

    def chunk():
        nonlocal buffer
        n = sum(len(v) for v in vecs)
        if buffer is None or len(buffer) < n:
            buffer = np.empty((n, dim), np.float32)  # reused: new memory would be faulted in chunk by chunk
        out = np.concatenate(ids), np.concatenate(vecs, out=buffer[:n])  # one copy, out of views of the lists
        for lst, codes, list_ids in taken:
            lists.release_codes(lst, codes)
            lists.release_ids(lst, list_ids)
        ids.clear(), vecs.clear(), taken.clear()
        return out

    held = 0
    for lst in range(ivf.nlist):
        n = lists.list_size(lst)
        if not n:
            continue
        codes, list_ids = lists.get_codes(lst), lists.get_ids(lst)
        taken.append((lst, codes, list_ids))
        vecs.append(np.frombuffer(faiss.rev_swig_ptr(codes, n * lists.code_size), dtype=np.float32).reshape(n, dim))
        ids.append(faiss.rev_swig_ptr(list_ids, n))
        held += n
        if held >= rows:
            yield chunk()
            held = 0
    if held:
        yield chunk()


def top_rows(scores: np.ndarray, k: int, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of each row and their columns, unordered. Exact, and far cheaper than a
    partition of whole rows: the k largest lie in the k blocks of columns with the largest maxima."""
    nq, n = scores.shape
    k = min(k, n)
    blocks = n // block
    if blocks <= k:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        return np.take_along_axis(scores, top, 1), top
    peaks = scores[:, : blocks * block].reshape(nq, blocks, block).max(axis=2)
    chosen = np.argpartition(-peaks, k - 1, axis=1)[:, :k]
    cols = (chosen[:, :, None] * block + np.arange(block)).reshape(nq, -1)
    if n > blocks * block:  # the ragged end is always a candidate
        cols = np.concatenate([cols, np.broadcast_to(np.arange(blocks * block, n), (nq, n - blocks * block))], 1)
    cand = np.take_along_axis(scores, cols, 1)
    top = np.argpartition(-cand, k - 1, axis=1)[:, :k]
    return np.take_along_axis(cand, top, 1), np.take_along_axis(cols, top, 1)


def exact_topk(shards: list, rerank: list, q: np.ndarray, k: int, dead: list | None = None):
    """Exact top-k by inner product over every live vector of a set of IVF shards, as matrix products
    over chunks of stored vectors (FAISS with nprobe = nlist scans the whole index once per query).
    `dead[i]`: ids shard i holds that are not live there. (scores, ids), id -1 padding."""
    nq = len(q)
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    for i, shard in enumerate(shards):
        drop = dead[i] if dead is not None and dead[i] is not None and len(dead[i]) else None
        for ids, vecs in _stored_chunks(shard, rerank[i] if rerank else None):
            if not len(ids):
                continue
            scores = q @ vecs.T
            if drop is not None:
                scores[:, np.isin(ids, drop)] = -np.inf  # not live in this shard
            scores, top = top_rows(scores, k)
            best_s, best_i = merge_topk((best_s, best_i), (scores, np.where(np.isneginf(scores), -1, ids[top])), k)
    return best_s, best_i


def merge_topk(a: tuple, b: tuple, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Two (scores, ids) top lists of the same queries -> the top k of both, by score."""
    scores, ids = np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def map_raw_vectors(path: Path) -> np.ndarray:
    """A shard's raw vectors, memory-mapped for random reads of a few rows (re-ranking, id look-ups):
    no read-ahead, which would bring in far more of the file than the rows asked for."""
    vectors = np.load(path, mmap_mode="r")
    mapped = getattr(vectors, "_mmap", None)
    if mapped is not None and hasattr(mapped, "madvise"):
        mapped.madvise(mmap_module.MADV_RANDOM)
    return vectors


def load_raw_vectors(shard_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The raw vectors beside a compressed shard (memory-mapped, map_raw_vectors) and their sorted ids."""
    vectors, ids = rerank_files(shard_path)
    return map_raw_vectors(vectors), np.load(ids)


def open_version(folder: Path, manifest: dict, mmap: bool = True, tomb=None, direct_map: bool = False):
    """Every shard of a version ready to search: (shards, rerank, excluded, keep). `rerank[i]` holds the
    memory-mapped raw vectors of compressed shards; `excluded[i]` is a selector of the ids shard i still
    holds but that later generations replaced or deleted (None when there are none); `keep` holds the
    Python objects those selectors point into. `tomb`: the version's tombstones, when the caller has
    read them already. `direct_map`: build IVF shards' id -> position tables now (otherwise the first id
    look-up does, under a lock)."""
    folder = Path(folder)
    entries = shard_entries(manifest)
    shards = []
    for e in entries:
        shard, _ = load_shard(folder / e["file"], mmap)
        if direct_map:
            prepare_direct_map(shard)  # id look-ups (similar-image queries) only read it afterwards
        shards.append(shard)
    rerank = [load_raw_vectors(folder / e["file"]) if manifest.get("rerank") else None for e in entries]
    tomb = read_tombstones(folder, manifest) if tomb is None else tomb
    excluded, keep = [], []
    for e in entries:
        dead = dead_ids(tomb, e.get("generation", 0))
        if len(dead):
            inner = faiss.IDSelectorBatch(dead)
            keep.extend([inner, dead])
            excluded.append(faiss.IDSelectorNot(inner))
        else:
            excluded.append(None)
    return shards, rerank, excluded, keep
