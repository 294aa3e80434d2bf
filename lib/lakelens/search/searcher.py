"""Query driver: Searcher.open(index_dir) -> text / image / vector queries over all shards, merged exactly."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens import index as ix
from lakelens.errors import IndexDirError, IndexMismatchError, QueryError
from lakelens.index.keyword import KEYWORD_DIR
from lakelens.index.meta import MetaStore
from lakelens.index.shards import (
    open_version,
    read_tombstones,
    reconstruct,
    search_shards,
    shard_entries,
    shared_quantizer,
)
from lakelens.ingest.embedder import Embedder
from lakelens.models.engines import DEFAULT_ENGINE, check_engine
from lakelens.models.registry import ModelSpec
from lakelens.search.groups import GROUPS_FILE, DuplicateGroups, read_groups  # noqa: F401 (GROUPS_FILE: dedup.job)
from lakelens.search.idcache import ID_CACHE_BYTES, IdCache
from lakelens.search.keyword_side import KeywordSide, allowed_ids, browse, decorate, holding, need
from lakelens.search.query import ParsedQuery, check_mode, fuse, fused_blocks, parse_query

MAX_K = 10_000
RESULT_COLUMNS = ["rank", "score", "id", "path"]
COMMON_PREFIX = 0.05  # a prefix held by this share of the images or more is filtered after the search
QUERY_MAX_PIXELS = 16_000_000  # query images: a bound of their own, far below the embed job's
LEGACY_META = "meta.parquet"  # one metadata file for all shards (versions published before per-shard files)


_OPERATOR = re.compile(r"(?:^|\s)([+-])\s+")


def parse_terms(text: str) -> list[tuple[int, str]]:
    """Query arithmetic: "beach + sunset - people" -> [(1, 'beach'), (1, 'sunset'), (-1, 'people')]. An
    operator is a + or - with spaces after it (and before it, unless it starts the query)."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("empty query text")
    trailing = re.search(r"(?:^|\s)([+-])$", text.strip())
    if trailing:
        raise QueryError(f"query arithmetic: nothing after {trailing.group(1)!r} in {text!r}")
    pieces = _OPERATOR.split(" " + text.strip())
    terms = []
    if pieces[0].strip():
        terms.append((1, pieces[0].strip()))
    for op, term in zip(pieces[1::2], pieces[2::2]):
        sign = 1 if op == "+" else -1
        if not term.strip():
            raise QueryError(f"query arithmetic: nothing after {op!r} in {text!r}")
        terms.append((sign, term.strip()))
    if not terms:
        raise QueryError(f"query arithmetic: no terms in {text!r}")
    if all(s < 0 for s, _ in terms):
        raise QueryError(f"query arithmetic: {text!r} only subtracts; give at least one term to add")
    return terms


def query_vector(embed_text, text: str) -> tuple[np.ndarray, list[str]]:
    """A text query's vector and notes, with query arithmetic; `embed_text(term) -> (vector, notes)`.
    The Searcher and the batch query job embed queries with this one function."""
    terms = parse_terms(text)
    if len(terms) == 1 and terms[0][0] > 0:
        return embed_text(terms[0][1])
    notes, total = [], None
    for sign, term in terms:
        vec, term_notes = embed_text(term)
        notes += term_notes
        vec = sign * vec / max(float(np.linalg.norm(vec)), 1e-12)
        total = vec if total is None else total + vec
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("the query's terms cancel out: nothing is left to search for")
    notes.append("query arithmetic: " + " ".join(f"{'+' if s > 0 else '-'}{t!r}" for s, t in terms))
    return (total / norm).astype(np.float32), notes


def check_page(k, offset) -> None:
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise QueryError(f"offset must be an integer >= 0, got {offset!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0 or k + offset > MAX_K:
        raise QueryError(f"k must be an integer between 1 and {MAX_K} (k + offset at most {MAX_K}), "
                         f"got k={k!r}, offset={offset!r}")


def _ranks(ids: pd.Series, ranked, within: dict) -> pd.Series:
    """Each id's rank (from 1) in a ranked id list, or None where it is not in its first within[id] ids."""
    pos = {int(i): r for r, i in enumerate(np.asarray(ranked, np.int64), start=1)}
    ranks = [pos.get(int(i)) for i in ids]
    return pd.Series([r if r is not None and r <= within[int(i)] else None for i, r in zip(ids, ranks)],
                     index=ids.index, dtype=object)


def check_weights(weights, n: int) -> list[float]:
    """Weights of a query's parts (text, image): finite, not negative, not all zero; default equal."""
    if weights is None:
        return [1.0] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        raise QueryError(f"weights must be numbers, got {weights!r}") from None
    if len(w) != n or not all(np.isfinite(x) and x >= 0 for x in w) or not sum(w) > 0:
        raise QueryError(f"weights: give {n} finite numbers >= 0, not all zero (one per query part), got {weights!r}")
    return w


@dataclass
class _Loaded:
    version: str
    manifest: dict
    shards: list
    rerank: list  # per shard: (vectors memmap sorted by id, ids sorted) when the codes are compressed
    meta: MetaStore  # sorted live ids in RAM; their paths looked up in the shards' mapped metadata files
    excluded: list  # per shard: a FAISS selector of the ids it still holds that are not live there, or None
    keep: list  # Python references that keep the selectors' parts alive
    quantizer: object = None  # IVF shards' shared coarse quantizer: lists chosen once per query
    keywords: KeywordSide | None = None  # BM25 index, tags and captions (lakelens index --tags), if built


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
        self._groups: DuplicateGroups | None = None
        self._expect = expect_model.key if isinstance(expect_model, ModelSpec) else expect_model
        self._state = self._load(ix.current_version(self.index_dir))

    @classmethod
    def open(cls, index_dir: str | Path, **kw) -> Searcher:
        return cls(index_dir, **kw)

    # --- loading -------------------------------------------------------------------------------
    def _load(self, version: str | None) -> _Loaded:
        if not self.index_dir.is_dir():
            raise IndexDirError(f"index folder not found: {self.index_dir}")
        if version is None:
            raise IndexDirError(f"no published index in {self.index_dir} (no {ix.CURRENT} file)")
        manifest = ix.read_manifest(self.index_dir, version)
        if self._expect and manifest["model"]["key"] != self._expect:
            raise IndexMismatchError(f"index {self.index_dir} ({version}) was built with model "
                                     f"{manifest['model']['key']}, not {self._expect}")
        folder = self.index_dir / version
        entries = shard_entries(manifest)
        tomb = read_tombstones(folder, manifest)  # read once: for the shards' exclusions and the live ids
        shards, rerank, excluded, keep = open_version(folder, manifest, self.mmap, tomb)
        meta = MetaStore(folder, entries, tomb, legacy=LEGACY_META)
        keywords = KeywordSide(folder) if manifest.get("keywords") and (folder / KEYWORD_DIR).is_dir() else None
        return _Loaded(version, manifest, shards, rerank, meta, excluded, keep, shared_quantizer(shards), keywords)

    def reload(self) -> bool:
        """Load the version CURRENT names now, if it differs from the loaded one. True if switched."""
        latest = ix.current_version(self.index_dir)
        if latest == self._state.version:
            return False
        state = self._load(latest)
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

    # --- embedding queries ---------------------------------------------------------------------
    @property
    def embedder(self) -> Embedder:
        return self._embedder_for(self._state)

    def _embedder_for(self, st: _Loaded) -> Embedder:
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

    def _embed_text(self, st: _Loaded, text: str) -> tuple[np.ndarray, list[str]]:
        if not isinstance(text, str) or not text.strip():
            raise QueryError("empty query text")
        notes = []
        embedder = self._embedder_for(st)
        tokenizer = embedder.loaded.tokenizer
        context = getattr(tokenizer, "context_length", None)
        encode = getattr(tokenizer, "encode", None)
        if context and encode is not None:
            n_tokens = len(encode(text.strip())) + 2  # start and end tokens
            if n_tokens > context:
                notes.append(f"query truncated to the model's {context} tokens (it has {n_tokens})")
        return embedder.embed_texts([text.strip()])[0], notes

    def embed_image(self, image: str | Path | bytes) -> np.ndarray:
        return self._embed_image(self._state, image)

    def _embed_image(self, st: _Loaded, image: str | Path | bytes) -> np.ndarray:
        if isinstance(image, (str, Path)):
            try:
                data = Path(image).read_bytes()
            except OSError as e:
                raise QueryError(f"cannot read query image {image}: {e.strerror or e}") from None
        elif isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        else:
            raise QueryError(f"query image must be a path or bytes, not {type(image).__name__}")
        result = self._embedder_for(st)([data])[0]
        if result.error:
            raise QueryError(f"unusable query image: {result.error}")
        return result.embedding

    # --- search --------------------------------------------------------------------------------
    # Every query takes self._state once and hands it down: reload() may switch versions meanwhile, and
    # a query that read it again would mix two versions (ids of one, paths and tags of the other).
    @property
    def has_keywords(self) -> bool:
        """Whether the live version has a keyword index, tags and captions (lakelens index --tags)."""
        return self._state.keywords is not None

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

    def _search(self, st: _Loaded, text, image, k, weights, mode, tags, not_tags, **kw) -> pd.DataFrame:
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
            w = check_weights(weights, len(parts))
            total = sum(wi * p / max(float(np.linalg.norm(p)), 1e-12) for wi, p in zip(w, parts))
            norm = float(np.linalg.norm(total))
            if norm < 1e-6:
                raise QueryError("the weighted text and image cancel out: nothing is left to search for")
            if len(parts) == 2:
                notes = notes + [f"text and image combined with weights {w[0]:g} and {w[1]:g}"]
            vec = (total / norm).astype(np.float32)
        out = self._query(st, q, vec, mode, k, **kw)
        out.attrs["notes"] = notes + out.attrs.get("notes", [])
        return out

    def _query(self, st: _Loaded, q: ParsedQuery, vec, mode: str, k: int = 10, min_score: float | None = None,
               path_prefix: str | None = None, nprobe: int | None = None, ef_search: int | None = None,
               offset: int = 0, collapse_duplicates: bool = False) -> pd.DataFrame:
        check_page(k, offset)
        prefix = self._prefix_ids(st, path_prefix) if path_prefix else None
        allowed = allowed_ids(st.keywords, st.version, st.meta, q, prefix)
        words = bool(q.free or q.phrases)
        if mode == "keyword" and not words and not q.has_filters:
            raise QueryError("mode keyword needs words to search for")
        if vec is not None and (mode == "vector" or not words):
            return decorate(st.keywords, self._vector_pages(st, vec[None, :], k, min_score, None, nprobe, ef_search,
                                                            offset, collapse_duplicates, allowed)[0], st.meta)
        side = need(st.keywords, st.version, f"mode {mode}") if words or q.not_phrases else st.keywords
        limited = allowed if (q.paths or q.not_paths or path_prefix) else None

        def ranked(n: int) -> pd.DataFrame:
            """The first n rows of the query's whole list, which a deeper call only extends."""
            if not words:  # filters only: browse what they allow
                scores, ids = browse(st.keywords, q, allowed)
                return self._frame(st, scores[:n], ids[:n], n, None, None)
            depth = n if mode == "keyword" else fused_blocks(n, MAX_K)[-1][1]
            kw_scores, kw_ids = side.index.search(q.free, q.phrases, q.tags, q.not_tags, depth, limited)
            if mode == "keyword":
                return self._frame(st, kw_scores, kw_ids, n, None, None)
            vec_frame = self._vector_pages(st, vec[None, :], depth, min_score, None, nprobe, ef_search, 0, False,
                                           allowed)[0]
            ids, fused, depths = fuse(vec_frame["id"].to_numpy(np.int64), kw_ids, n, MAX_K)
            frame = self._frame(st, fused, ids, n, None, None)
            # each side's rank as the fusion of the image's block saw it: the same on every page
            within = dict(zip(ids.tolist(), depths.tolist()))
            frame["vector_rank"] = _ranks(frame["id"], vec_frame["id"], within)
            frame["keyword_rank"] = _ranks(frame["id"], kw_ids, within)
            if "box" in vec_frame:  # the region the vector side matched, where it did
                boxes = dict(zip(vec_frame["id"], vec_frame["box"]))
                frame["box"] = [boxes.get(i) if r is not None else None for i, r in zip(frame["id"], frame["vector_rank"])]
            frame.attrs["notes"] = vec_frame.attrs.get("notes", [])
            return frame

        frame = self._deepen(st, ranked, q, k + offset, collapse_duplicates)
        page = frame.iloc[offset:offset + k].reset_index(drop=True)
        page.attrs = {"notes": frame.attrs.get("notes", [])}
        return decorate(st.keywords, page, st.meta)

    def _deepen(self, st: _Loaded, ranked, q: ParsedQuery, want: int, collapse_duplicates: bool) -> pd.DataFrame:
        """The first `want` rows of a list `ranked(n)` gives, less the images a subtracted phrase names and,
        with collapse_duplicates, one per duplicate group: deeper (doubling) until enough are left or the
        list ends. Every page of a query thus cuts one list."""
        dups = self._duplicates() if collapse_duplicates else None
        n = min(MAX_K, 4 * want if dups else want)
        while True:
            whole = ranked(n)
            frame = whole
            if q.not_phrases:
                frame = frame[~holding(st.keywords, q.not_phrases, frame["id"].to_numpy(np.int64))].reset_index(drop=True)
                frame["rank"] = np.arange(1, len(frame) + 1)
                frame.attrs = whole.attrs
            if dups is not None:
                frame = dups.collapse(frame, want)
            if len(frame) >= want or len(whole) < n or n >= MAX_K:
                out = frame.iloc[:want]
                out.attrs = whole.attrs
                return out
            n = min(MAX_K, 2 * n)

    def tag_counts(self, text: str | None = None, tags=(), not_tags=(), limit: int = 50, depth: int = 1000,
                   mode: str | None = None) -> dict:
        """Images per tag in the live version (facets), most first: over every image, or over the images a
        query allows (its filters; with words, its best `depth` results)."""
        st = self._state
        side = need(st.keywords, st.version, "tag counts")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_K:
            raise QueryError(f"limit must be an integer between 1 and {MAX_K}, got {limit!r}")
        q = parse_query(text, tags, not_tags)
        if q.has_text:
            found = self._search(st, text, None, min(depth, MAX_K), None, mode, tags, not_tags)
            ids = np.sort(found["id"].to_numpy(np.int64))
            scope = "results"
        else:
            ids = allowed_ids(side, st.version, st.meta, q, None)
            scope = "all" if ids is None else "filtered"
        total = len(st.meta) if ids is None else len(ids)
        return {"version": st.version, "scope": scope, "images": int(total), "tags": side.tags.counts(ids, limit)}

    def details(self, id_: int) -> dict:
        """One indexed image: path, size, its tags with scores and its caption (the page's large view)."""
        st = self._state
        path = st.meta.path_of(int(id_))
        if path is None:
            raise QueryError(f"id {id_} is not in index {st.version}")
        out = {"id": int(id_), "path": path, "version": st.version, "tags": [], "caption": None}
        out.update(st.meta.sizes(int(id_)))
        if st.keywords is not None:
            out["tags"] = st.keywords.tags.details(int(id_))
            out["caption"] = st.keywords.tags.captions_of([int(id_)])[0]
        if out["caption"] is None:  # the source's own caption (a shard's or a table's)
            out["caption"] = st.meta.captions([int(id_)])[0]
        return out

    def search_image(self, image: str | Path | bytes, k: int = 10, **kw) -> pd.DataFrame:
        st = self._state
        return self._vectors(st, self._embed_image(st, image)[None, :], k, **kw)[0]

    def vector_of(self, id_: int) -> np.ndarray | None:
        """The stored vector of an indexed image (exact: the raw vectors beside compressed codes), or None."""
        return self._vector_of(self._state, id_)

    def _vector_of(self, st: _Loaded, id_: int) -> np.ndarray | None:
        i = np.searchsorted(st.meta.ids, id_)
        if i >= len(st.meta.ids) or st.meta.ids[i] != id_:
            return None  # not live in this version (never indexed, or deleted since)
        # the newest generation first: a changed image's current vector lives in the latest delta
        for shard, excluded, raw in reversed(list(zip(st.shards, st.excluded, st.rerank or [None] * len(st.shards)))):
            if excluded is not None and not excluded.is_member(int(id_)):
                continue
            vec = reconstruct(shard, int(id_), raw)
            if vec is not None:
                return vec
        return None

    def vectors_of(self, ids) -> np.ndarray:
        """The stored vectors of indexed images, one row per id, NaN where an id is not live."""
        st = self._state
        out = np.full((len(ids), st.manifest["dim"]), np.nan, np.float32)
        for i, id_ in enumerate(np.asarray(ids, np.int64)):
            vec = self._vector_of(st, int(id_))
            if vec is not None:
                out[i] = vec
        return out

    def rows_of(self, ids) -> pd.DataFrame:
        """id and path (None where an id is not live) of indexed images, with their tags and caption when
        the version has them: what a result row shows, for ids a client already holds."""
        st = self._state
        ids = np.asarray(ids, np.int64)
        return decorate(st.keywords, pd.DataFrame({"id": ids, "path": [st.meta.path_of(int(i)) for i in ids]}),
                        st.meta)

    @property
    def has_duplicate_groups(self) -> bool:
        """Whether `lakelens dedup --index` has written duplicate groups beside the index."""
        return (self.index_dir / GROUPS_FILE).is_file()

    def id_paths(self) -> pd.DataFrame:
        """(id, path) of every image of the live version, sorted by id (every path in memory: for
        whole-collection work such as evaluation, not for queries)."""
        return self._state.meta.frame()

    def search_id(self, id_: int, k: int = 10, **kw) -> pd.DataFrame:
        """Images similar to an indexed image, by its id (its stored vector is the query)."""
        st = self._state
        vec = self._vector_of(st, id_)
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

    def _vectors(self, st: _Loaded, vectors, k: int = 10, min_score=None, path_prefix=None, nprobe=None,
                 ef_search=None, offset: int = 0, collapse_duplicates: bool = False, allowed=None) -> list[pd.DataFrame]:
        check_page(k, offset)
        return [decorate(st.keywords, f, st.meta) for f in self._vector_pages(st, vectors, k, min_score, path_prefix, nprobe,
                                                                     ef_search, offset, collapse_duplicates, allowed)]

    def _vector_pages(self, st: _Loaded, vectors, k, min_score, path_prefix, nprobe, ef_search, offset,
                      collapse_duplicates, allowed) -> list[pd.DataFrame]:
        if path_prefix:
            prefixed = self._prefix_ids(st, path_prefix)
            allowed = prefixed if allowed is None else np.intersect1d(allowed, prefixed, assume_unique=True)
        if collapse_duplicates:
            frames = self._collapsed(st, vectors, k + offset, min_score, allowed, nprobe, ef_search)
        elif not offset:
            return self._search_vectors(st, vectors, k, min_score, allowed, nprobe, ef_search)
        else:
            frames = self._search_vectors(st, vectors, k + offset, min_score, allowed, nprobe, ef_search)
        for i, f in enumerate(frames):
            page = f.iloc[offset:].reset_index(drop=True)
            page.attrs = f.attrs
            frames[i] = page
        return frames

    def _collapsed(self, st: _Loaded, vectors, want, min_score, allowed, nprobe, ef_search) -> list[pd.DataFrame]:
        """The first `want` results with one per duplicate group: searched deeper (x4, doubling while
        groups eat the list) until enough distinct groups or the whole index."""
        dups = self._duplicates()
        fetch = min(MAX_K, 4 * want)
        while True:
            frames = self._search_vectors(st, vectors, fetch, min_score, allowed, nprobe, ef_search)
            out, short = [], False
            for f in frames:
                c = dups.collapse(f, want)
                out.append(c)
                short |= len(c) < want and len(f) == fetch
            if not short or fetch >= min(MAX_K, len(st.meta)):
                return out
            fetch = min(MAX_K, 2 * fetch)

    def _duplicates(self) -> DuplicateGroups:
        """The duplicate groups `lakelens dedup --index` wrote beside the index, read once per version of
        the file (memory-mapped; re-read when it is replaced)."""
        with self._lock:
            cached = self._groups
        groups = read_groups(self.index_dir, cached)
        if groups is not cached:
            with self._lock:
                self._groups = groups
        return groups

    def duplicate_groups(self, offset: int = 0, limit: int = 20) -> dict:
        """Groups of near copies, largest first: {"total", "groups": [{"group", "size", "members": [...]}],
        "index_version", "notes"}; members are (id, path, similarity, representative), representative first."""
        import pyarrow as pa
        import pyarrow.compute as pc

        dups = self._duplicates()
        page = dups.order[offset:offset + limit]
        t = dups.table
        rows = t.filter(pc.is_in(t["group"], pa.array(page, pa.int64()))).to_pandas()
        by_group = dict(tuple(rows.groupby("group")))
        groups = []
        for g in page:
            part = by_group[g].sort_values(["representative", "similarity"], ascending=False)
            groups.append({"group": int(g), "size": dups.size[g],
                           "members": [{"id": int(r.id), "path": r.path, "similarity": round(float(r.similarity), 4),
                                        "representative": bool(r.representative)} for r in part.itertuples()]})
        made_for = (t.schema.metadata or {}).get(b"index_version", b"").decode()
        notes = [] if made_for == self.version else [
            f"the groups were made for index version {made_for}; the live version is {self.version}"]
        return {"total": len(dups.order), "offset": offset, "groups": groups, "index_version": made_for, "notes": notes}

    def _search_vectors(self, st: _Loaded, vectors, k, min_score, allowed, nprobe, ef_search) -> list[pd.DataFrame]:
        dim = st.manifest["dim"]
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != dim:
            raise QueryError(f"query vectors must have shape (n, {dim}), got {q.shape}")
        if not np.isfinite(q).all():
            raise QueryError("query vector has NaN or infinite values")
        q = np.ascontiguousarray(q)
        params = st.manifest.get("search_params", {})
        # a hit is an image or one of its regions, and a list holds each image once: with regions, as many
        # entries as an image has make sure k images come back
        per, entries = st.meta.per_image, len(st.meta.entries)
        notes, selector, fetch = [], None, min(entries or 1, k * per)
        if allowed is not None:
            if len(allowed) < k:
                notes.append(f"only {len(allowed)} indexed image(s) match the filters")
            if not len(allowed):
                return [self._with_notes(self._frame(st, np.zeros(0, np.float32), np.zeros(0, np.int64), k,
                                                     min_score, allowed), notes) for _ in q]
            share = len(allowed) / max(1, len(st.meta))
            if share >= COMMON_PREFIX:
                # a common filter: a plain search deep enough to hold k matches is cheaper than testing
                # every scanned id against a large set; the selector below covers the rare shortfall
                fetch = min(entries, int(np.ceil(4 * k / share)) * per)
                frames = self._run(st, q, fetch, k, min_score, allowed, nprobe, ef_search, None, params, notes)
                if all(len(f) >= min(k, len(allowed)) for f in frames):
                    return frames
            # a rare filter: it runs inside FAISS's scan, so cost and results stay those of a k search
            selector, fetch = self._selector(st, allowed), min(k * per, len(allowed) * per)
        return self._run(st, q, fetch, k, min_score, allowed, nprobe, ef_search, selector, params, notes)

    def _run(self, st, q, fetch, k, min_score, allowed, nprobe, ef_search, selector, params, notes):
        scores, ids = self._search_shards(st, q, fetch, params.get("nprobe") if nprobe is None else nprobe,
                                          params.get("efSearch") if ef_search is None else ef_search, selector)
        return [self._with_notes(self._frame(st, s, i, k, min_score, allowed), notes) for s, i in zip(scores, ids)]

    @staticmethod
    def _with_notes(frame: pd.DataFrame, notes: list[str]) -> pd.DataFrame:
        frame.attrs["notes"] = list(notes)
        return frame

    def _prefix_ids(self, st: _Loaded, prefix: str) -> np.ndarray:
        """Ids of the indexed paths that start with `prefix` (a scan of every path: remembered)."""
        return self._prefix_cache.ids(("prefix", st.version, prefix), lambda: st.meta.with_prefix(prefix))

    def _selector(self, st: _Loaded, allowed: np.ndarray):
        """A FAISS selector of allowed ids (building one costs about as much as a search: remembered)."""
        key = ("selector", st.version, len(allowed), hash(allowed.tobytes()))
        return self._prefix_cache.selector(key, lambda: st.meta.expand(allowed))  # the images' regions pass with them

    def _search_shards(self, st: _Loaded, q: np.ndarray, k: int, nprobe, ef_search, selector=None):
        return search_shards(st.shards, st.rerank, q, k, nprobe, ef_search,
                             int(st.manifest.get("rerank") or 0), self._pool, selector, st.excluded, st.quantizer)

    def _frame(self, st: _Loaded, scores, ids, k, min_score, allowed) -> pd.DataFrame:
        """Best-first hits -> result rows, each image once: a hit on a region is its image, with the box
        of its best entry (the `box` column, when the version holds regions)."""
        keep = ids != -1
        if min_score is not None:
            keep &= scores >= min_score
        entry, images = ids, ids
        if st.meta.has_regions:
            images = st.meta.resolve(ids)[0]
            first = np.zeros(len(ids), bool)
            first[np.unique(images, return_index=True)[1]] = True  # the best entry of each image
            keep &= first
        if allowed is not None and len(ids):
            pos = np.clip(np.searchsorted(allowed, images), 0, max(0, len(allowed) - 1))
            keep &= (allowed[pos] == images) if len(allowed) else False
        scores, ids, entry = scores[keep][:k], images[keep][:k], entry[keep][:k]
        paths = st.meta.paths(entry)
        df = pd.DataFrame({"score": np.asarray(scores, float), "id": ids, "path": paths})
        df.insert(0, "rank", np.arange(1, len(df) + 1))
        if st.meta.has_regions:
            df["box"] = st.meta.boxes(entry)
            return df[[*RESULT_COLUMNS, "box"]]
        return df[RESULT_COLUMNS]


