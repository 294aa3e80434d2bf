"""Query driver: Searcher.open(index_dir) -> text / image / vector queries over all shards, merged exactly.

The Searcher holds the live version and what its queries share (the query model, the filters' id cache,
the duplicate groups) and takes each query through its parts: versions.py (a loaded version),
query.py and query_vectors.py (a query's syntax and its vector), selectors.py (the vector side and its
filters), keyword_side.py (filters, BM25, tags), fusion.py (hybrid lists), groups.py (one result per
duplicate group), results.py (result rows and pages)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens import index as ix
from lakelens.errors import QueryError
from lakelens.ingest.embedder import Embedder
from lakelens.models.engines import DEFAULT_ENGINE, check_engine
from lakelens.models.registry import ModelSpec
from lakelens.search import query_vectors
from lakelens.search.fusion import fused_blocks, hybrid_frame
from lakelens.search.groups import GroupsFile
from lakelens.search.idcache import ID_CACHE_BYTES, IdCache
from lakelens.search.keyword_side import allowed_ids, browse, decorate, holding, need, tag_counts
from lakelens.search.query import ParsedQuery, check_mode, parse_query
from lakelens.search.query_vectors import QUERY_MAX_PIXELS, combine, query_vector
from lakelens.search.results import MAX_K, check_limit, check_offset, check_page, first_rows, hits_frame, skip
from lakelens.search.selectors import prefix_ids, search_vectors
from lakelens.search.versions import LoadedVersion, image_details, load_version, stored_vector, stored_vectors


class Searcher:
    """Searches the live version of an index folder. `reload()` switches to a newer published version;
    a query running meanwhile finishes on the version it started with."""

    def __init__(self, index_dir: str | Path, mmap: bool = True, threads: int | None = None,
                 expect_model: ModelSpec | str | None = None, engine: str | None = None, onnx_cache: str = "",
                 query_max_pixels: int = QUERY_MAX_PIXELS, id_cache_bytes: int = ID_CACHE_BYTES):
        if engine is not None:
            check_engine(engine)  # at open, not at the first text query
        self.index_dir = Path(index_dir)
        self.engine = engine or DEFAULT_ENGINE  # embeds the queries: torch | torch-bf16 | onnx | onnx-int8
        self.onnx_cache = onnx_cache
        self.mmap = mmap
        self.query_max_pixels = query_max_pixels
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads or 4)
        self._embedder = None
        self._prefix_cache = IdCache(id_cache_bytes)  # prefixes' ids and rare filters' selectors
        self._groups = GroupsFile(self.index_dir)
        self._expect = expect_model.key if isinstance(expect_model, ModelSpec) else expect_model
        self._state = load_version(self.index_dir, ix.current_version(self.index_dir), self.mmap, self._expect)

    @classmethod
    def open(cls, index_dir: str | Path, **kw) -> Searcher:
        return cls(index_dir, **kw)

    def reload(self) -> bool:
        """Load the version CURRENT names now, if it differs from the loaded one. True if switched."""
        latest = ix.current_version(self.index_dir)
        if latest == self._state.version:
            return False
        state = load_version(self.index_dir, latest, self.mmap, self._expect)
        with self._lock:
            self._state = state
        return True

    # --- facts ---------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self._state.version

    @property
    def manifest(self) -> dict:
        return self._state.manifest

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec.from_key(self._state.manifest["model"]["key"])

    @property
    def ids(self) -> np.ndarray:
        """Every indexed id of the live version, sorted."""
        return self._state.meta.ids

    def __len__(self) -> int:
        return len(self._state.meta)

    def path_of(self, id_: int) -> str | None:
        return self._state.meta.path_of(id_)

    def locator_of(self, id_: int) -> str | None:
        """Where an image inside a shard or a table is read (ingest.table.with_source_columns); None for a file."""
        return self._state.meta.row(int(id_), ("locator",))["locator"]

    @property
    def has_keywords(self) -> bool:
        """Whether the live version has a keyword index, tags and captions (lakelens index --tags)."""
        return self._state.keywords is not None

    @property
    def has_duplicate_groups(self) -> bool:
        """Whether `lakelens dedup --index` has written duplicate groups beside the index."""
        return self._groups.exists()

    def id_paths(self) -> pd.DataFrame:
        """(id, path) of every image of the live version, sorted by id (every path in memory: for
        whole-collection work such as evaluation, not for queries)."""
        return self._state.meta.frame()

    def details(self, id_: int) -> dict:
        """One indexed image: path, size, its tags with scores and its caption (the page's large view)."""
        st = self._state
        try:
            id_ = int(id_)
        except (TypeError, ValueError):
            raise QueryError(f"id must be an integer, got {id_!r}") from None
        out = image_details(st, id_)
        if out is None:
            raise QueryError(f"id {id_} is not in index {st.version}")
        return out

    def vector_of(self, id_: int) -> np.ndarray | None:
        """The stored vector of an indexed image (exact: the raw vectors beside compressed codes), or None."""
        return stored_vector(self._state, id_)

    def vectors_of(self, ids) -> np.ndarray:
        """The stored vectors of indexed images, one row per id, NaN where an id is not live."""
        return stored_vectors(self._state, ids)

    def rows_of(self, ids) -> pd.DataFrame:
        """id and path (None where an id is not live) of indexed images, with their tags and caption when
        the version has them: what a result row shows, for ids a client already holds."""
        st = self._state
        ids = np.asarray(ids, np.int64)
        return decorate(st.keywords, pd.DataFrame({"id": ids, "path": [st.meta.path_of(int(i)) for i in ids]}),
                        st.meta)

    # --- embedding queries ---------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        return self._embedder_for(self._state)

    def _embedder_for(self, st: LoadedVersion) -> Embedder:
        spec = ModelSpec.from_key(st.manifest["model"]["key"])
        spec.check_weights()  # queries are embedded with exactly the index's weights, or not at all
        if self._embedder is None or self._embedder.spec != spec:
            self._embedder = Embedder(spec, decode_threads=1, engine=self.engine, onnx_cache=self.onnx_cache,
                                      max_pixels=self.query_max_pixels)
        return self._embedder

    def embed_query(self, text: str) -> tuple[np.ndarray, list[str]]:
        """A text query's vector, with query arithmetic: "beach + sunset - people" is the sum of the
        terms' unit vectors, signed, normalised (operators need spaces around them, so "t-shirt" and
        "black-and-white" stay words). One term is embedded as it is."""
        st = self._state
        return query_vector(lambda term: self._embed_text(st, term), text)

    def embed_text(self, text: str) -> tuple[np.ndarray, list[str]]:
        return self._embed_text(self._state, text)

    def _embed_text(self, st: LoadedVersion, text: str) -> tuple[np.ndarray, list[str]]:
        return query_vectors.embed_text(lambda: self._embedder_for(st), text)

    def embed_image(self, image: str | Path | bytes) -> np.ndarray:
        return self._embed_image(self._state, image)

    def _embed_image(self, st: LoadedVersion, image: str | Path | bytes) -> np.ndarray:
        return query_vectors.embed_image(lambda: self._embedder_for(st), image)

    # --- search --------------------------------------------------------------------------------
    # Every query takes self._state once and hands it down: reload() may switch versions meanwhile, and
    # a query that read it again would mix two versions (ids of one, paths and tags of the other).
    @property
    def default_mode(self) -> str:
        """vector: on held-out shapes, hybrid (RRF of vectors and BM25 over generated captions and tags)
        ranked below vectors alone (BENCHMARKS.md, "Keyword and hybrid search"); keyword and hybrid are
        asked for by name. Filters (tag:, path:) work in every mode."""
        return "vector"

    def search_text(self, text: str, k: int = 10, mode: str | None = None, tags=(), not_tags=(), **kw) -> pd.DataFrame:
        """Images for a text query in the query syntax (free words, "phrases", tag:dog, -tag:cat, path:2024/;
        "a + b - c" combines terms on the vector side; a "phrase" after a minus excludes the images that
        hold it in modes keyword and hybrid). mode: vector | keyword | hybrid (reciprocal rank fusion of
        both lists, k = 60); default vector (default_mode)."""
        return self.search(text=text, k=k, mode=mode, tags=tags, not_tags=not_tags, **kw)

    def search(self, text: str | None = None, image: str | Path | bytes | None = None, k: int = 10,
               weights: tuple | list | None = None, mode: str | None = None, tags=(), not_tags=(),
               **kw) -> pd.DataFrame:
        """A text, an image, or both: the query vector is weights[0] x text + weights[1] x image (unit
        vectors; default equal weights), normalised. The text may use the query syntax (search_text); the
        keyword side (mode keyword or hybrid) scores the text's words."""
        return self._search(self._state, text, image, k, weights, mode, tags, not_tags, **kw)

    def _search(self, st: LoadedVersion, text, image, k, weights, mode, tags, not_tags, **kw) -> pd.DataFrame:
        q = parse_query(text, tags, not_tags)
        mode = check_mode(mode or self.default_mode)
        parts, notes = [], []
        if q.has_text and mode != "keyword":
            vec, notes = query_vector(lambda term: self._embed_text(st, term), q.text)
            parts.append(vec)
        if image is not None:
            if mode == "keyword":
                raise QueryError("mode keyword searches words; an image query needs mode vector or hybrid")
            parts.append(self._embed_image(st, image))
        if not parts and not q.has_text and not q.has_filters:
            raise QueryError("give a text, an image, or both" if text is None else
                             "empty query text: give words, an image, or a filter such as tag:dog")
        vec = None
        if parts:
            vec, combined = combine(parts, weights)
            notes = notes + combined
        out = self._query(st, q, vec, mode, k, **kw)
        out.attrs["notes"] = notes + out.attrs.get("notes", [])
        return out

    def _query(self, st: LoadedVersion, q: ParsedQuery, vec, mode: str, k: int = 10, min_score: float | None = None,
               path_prefix: str | None = None, nprobe: int | None = None, ef_search: int | None = None,
               offset: int = 0, collapse_duplicates: bool = False) -> pd.DataFrame:
        k, offset = check_page(k, offset)
        prefix = prefix_ids(self._prefix_cache, st, path_prefix) if path_prefix else None
        allowed = allowed_ids(st.keywords, st.version, st.meta, q, prefix)
        words = bool(q.free or q.phrases)
        if mode == "keyword" and not words and not q.has_filters:
            raise QueryError("mode keyword needs words to search for")
        if vec is not None and (mode == "vector" or not words):
            return self._vectors(st, vec[None, :], k, min_score, None, nprobe, ef_search, offset,
                                 collapse_duplicates, allowed)[0]
        side = need(st.keywords, st.version, f"mode {mode}") if words or q.not_phrases else st.keywords
        limited = allowed if (q.paths or q.not_paths or path_prefix) else None

        def ranked(n: int) -> pd.DataFrame:
            """The first n rows of the query's whole list, which a deeper call only extends."""
            if not words:  # filters only: browse what they allow
                scores, ids = browse(st.keywords, q, allowed)
                return hits_frame(st.meta, scores[:n], ids[:n], n)
            depth = n if mode == "keyword" else fused_blocks(n, MAX_K)[-1][1]
            kw_scores, kw_ids = side.index.search(q.free, q.phrases, q.tags, q.not_tags, depth, limited)
            if mode == "keyword":
                return hits_frame(st.meta, kw_scores, kw_ids, n)
            vec_frame = self._search_vectors(st, vec[None, :], depth, min_score, allowed, nprobe, ef_search)[0]
            return hybrid_frame(st.meta, vec_frame, kw_ids, n, MAX_K)

        drop = (lambda ids: holding(st.keywords, q.not_phrases, ids)) if q.not_phrases else None
        frame = first_rows(ranked, k + offset, drop, self._groups.read() if collapse_duplicates else None)
        page = frame.iloc[offset:offset + k].reset_index(drop=True)
        page.attrs = {"notes": frame.attrs.get("notes", [])}
        return decorate(st.keywords, page, st.meta)

    def tag_counts(self, text: str | None = None, tags=(), not_tags=(), limit: int = 50, depth: int = 1000,
                   mode: str | None = None) -> dict:
        """Images per tag in the live version (facets), most first: over every image, or over the images a
        query allows (its filters; with words, its best `depth` results)."""
        st = self._state
        side = need(st.keywords, st.version, "tag counts")
        check_limit(limit)
        q = parse_query(text, tags, not_tags)
        found = self._search(st, text, None, min(depth, MAX_K), None, mode, tags, not_tags)["id"] if q.has_text else None
        return tag_counts(side, st.version, st.meta, q, found, limit)

    def duplicate_groups(self, offset: int = 0, limit: int = 20) -> dict:
        """Groups of near copies, largest first: {"total", "groups": [{"group", "size", "members": [...]}],
        "index_version", "notes"}; members are (id, path, similarity, representative), representative first."""
        offset = check_offset(offset)
        check_limit(limit)
        return self._groups.read().listing(offset, limit, self.version)

    def search_image(self, image: str | Path | bytes, k: int = 10, **kw) -> pd.DataFrame:
        st = self._state
        return self._vectors(st, self._embed_image(st, image)[None, :], k, **kw)[0]

    def search_id(self, id_: int, k: int = 10, **kw) -> pd.DataFrame:
        """Images similar to an indexed image, by its id (its stored vector is the query)."""
        st = self._state
        vec = stored_vector(st, id_)
        if vec is None:
            raise QueryError(f"id {id_} is not in index {st.version}")
        return self._vectors(st, vec[None, :], k, **kw)[0]

    def search_vector(self, vector, k: int = 10, min_score: float | None = None, path_prefix: str | None = None,
                      nprobe: int | None = None, ef_search: int | None = None, offset: int = 0,
                      collapse_duplicates: bool = False, allowed: np.ndarray | None = None) -> pd.DataFrame:
        return self.search_vectors(np.asarray(vector)[None, :] if np.ndim(vector) == 1 else vector, k,
                                   min_score, path_prefix, nprobe, ef_search, offset, collapse_duplicates,
                                   allowed=allowed)[0]

    def search_vectors(self, vectors, k: int = 10, min_score: float | None = None, path_prefix: str | None = None,
                       nprobe: int | None = None, ef_search: int | None = None, offset: int = 0,
                       collapse_duplicates: bool = False, allowed: np.ndarray | None = None) -> list[pd.DataFrame]:
        """A batch of query vectors -> one result frame each (rank, score, id, path). `offset` skips the
        first results (pages: offset = page x k); ranks count from the top of the whole list.
        `collapse_duplicates`: one result per duplicate group (`lakelens dedup --index`), its best hit,
        with a `duplicates` column counting the group's other members. `allowed`: sorted ids the results
        must be among (a query's filters)."""
        return self._vectors(self._state, vectors, k, min_score, path_prefix, nprobe, ef_search, offset,
                             collapse_duplicates, allowed)

    def _vectors(self, st: LoadedVersion, vectors, k: int = 10, min_score=None, path_prefix=None, nprobe=None,
                 ef_search=None, offset: int = 0, collapse_duplicates: bool = False, allowed=None) -> list[pd.DataFrame]:
        """Pages of result rows for query vectors: what the vector-only queries and a query's vector mode share."""
        k, offset = check_page(k, offset)
        if path_prefix:
            prefixed = prefix_ids(self._prefix_cache, st, path_prefix)
            allowed = prefixed if allowed is None else np.intersect1d(allowed, prefixed, assume_unique=True)

        def search(n: int) -> list[pd.DataFrame]:
            return self._search_vectors(st, vectors, n, min_score, allowed, nprobe, ef_search)

        if collapse_duplicates:
            frames = self._groups.read().collapsed_search(search, k + offset, len(st.meta))
        else:
            frames = search(k + offset)
        return [decorate(st.keywords, skip(f, offset) if offset else f, st.meta) for f in frames]

    def _search_vectors(self, st: LoadedVersion, vectors, k, min_score, allowed, nprobe, ef_search) -> list[pd.DataFrame]:
        # the one door of every query's vector side (plain, paged, collapsed, hybrid): a subclass that
        # watches or changes vector search sees every query here
        return search_vectors(st, vectors, k, min_score, allowed, nprobe, ef_search, self._prefix_cache, self._pool)
