"""A published version of an index folder, loaded for queries: its shards (deltas and tombstones
applied), the live ids and their metadata, and its keyword part when it has one. A query takes one
LoadedVersion and reads everything from it, so a reload meanwhile never mixes two versions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lakelens import index as ix
from lakelens.errors import IndexDirError, IndexMismatchError
from lakelens.index.layout import KEYWORD_DIR, LEGACY_META
from lakelens.index.meta import MetaStore
from lakelens.index.shards import open_version, read_tombstones, reconstruct, shard_entries, shared_quantizer
from lakelens.search.keyword_side import KeywordSide


@dataclass
class LoadedVersion:
    version: str
    manifest: dict
    shards: list
    rerank: list  # per shard: (vectors memmap sorted by id, ids sorted) when the codes are compressed
    meta: MetaStore  # sorted live ids in RAM; their paths looked up in the shards' mapped metadata files
    excluded: list  # per shard: a FAISS selector of the ids it still holds that are not live there, or None
    keep: list  # Python references that keep the selectors' parts alive
    quantizer: object = None  # IVF shards' shared coarse quantizer: lists chosen once per query
    keywords: KeywordSide | None = None  # BM25 index, tags and captions (lakelens index --tags), if built


def load_version(index_dir: Path, version: str | None, mmap: bool = True,
                 expect_model: str | None = None) -> LoadedVersion:
    """`version` of the index folder (None: none is published), built with `expect_model` when given."""
    if not index_dir.is_dir():
        raise IndexDirError(f"index folder not found: {index_dir}")
    if version is None:
        raise IndexDirError(f"no published index in {index_dir} (no {ix.CURRENT} file)")
    manifest = ix.read_manifest(index_dir, version)
    if expect_model and manifest["model"]["key"] != expect_model:
        raise IndexMismatchError(f"index {index_dir} ({version}) was built with model "
                                 f"{manifest['model']['key']}, not {expect_model}")
    folder = index_dir / version
    entries = shard_entries(manifest)
    # a file gone from a published version (deleted, a partial copy) is a broken index, not a bug: named
    # in one line rather than as FAISS's or Arrow's own error
    missing = [e[key] for e in entries for key in ("file", "meta") if key in e and not (folder / e[key]).is_file()]
    if missing:
        raise IndexDirError(f"index {index_dir}: version {version} is missing {', '.join(missing)} "
                            "(named in its manifest); publish it again or point CURRENT at another version")
    try:
        tomb = read_tombstones(folder, manifest)  # read once: for the shards' exclusions and the live ids
        shards, rerank, excluded, keep = open_version(folder, manifest, mmap, tomb)
        meta = MetaStore(folder, entries, tomb, legacy=LEGACY_META)
    except FileNotFoundError as e:
        raise IndexDirError(f"index {index_dir}: version {version} is missing a file: {e}") from None
    keywords = KeywordSide(folder) if manifest.get("keywords") and (folder / KEYWORD_DIR).is_dir() else None
    return LoadedVersion(version, manifest, shards, rerank, meta, excluded, keep, shared_quantizer(shards), keywords)


def stored_vector(st: LoadedVersion, id_: int) -> np.ndarray | None:
    """The stored vector of a live image (exact: the raw vectors beside compressed codes), or None."""
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


def stored_vectors(st: LoadedVersion, ids) -> np.ndarray:
    """The stored vectors of images, one row per id, NaN where an id is not live."""
    out = np.full((len(ids), st.manifest["dim"]), np.nan, np.float32)
    for i, id_ in enumerate(np.asarray(ids, np.int64)):
        vec = stored_vector(st, int(id_))
        if vec is not None:
            out[i] = vec
    return out


def image_details(st: LoadedVersion, id_: int) -> dict | None:
    """One live image: path, size, its tags with scores and its caption; None where it is not live."""
    path = st.meta.path_of(int(id_))
    if path is None:
        return None
    out = {"id": int(id_), "path": path, "version": st.version, "tags": [], "caption": None}
    out.update(st.meta.sizes(int(id_)))
    if st.keywords is not None:
        out["tags"] = st.keywords.tags.details(int(id_))
        out["caption"] = st.keywords.tags.captions_of([int(id_)])[0]
    if out["caption"] is None:  # the source's own caption (a shard's or a table's)
        out["caption"] = st.meta.captions([int(id_)])[0]
    return out
