"""One assembly path for a version, used by the local builder and the Spark index job alike: train on a
sample that leaves out the tuning queries, build every shard (with its own metadata file) in a staging
folder, check the counts, tune nprobe, write the manifest, publish; the staging folder goes on failure."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens.errors import IndexDirError
from lakelens.index.factory import Choice, train, training_rows
from lakelens.index.keyword import build_keywords
from lakelens.index.layout import TRAINED, delta_file, delta_meta_file, meta_file, shard_file
from lakelens.index.meta import ENTRY_COLUMNS, META_COLUMNS, write_meta
from lakelens.index.shards import ShardWriter, build_shard, shard_of, tune_nprobe
from lakelens.index.versions import index_lock, prune_locked, publish, staging_dir
from lakelens.ingest.paths import common_root, to_stored

TUNING_QUERIES = 200


def write_shard(trained: bytes, s: int, ids: np.ndarray, vectors: np.ndarray, meta: pd.DataFrame,
                staged: str | Path, rerank: bool, generation: int = 0) -> int:
    """One shard's FAISS file and its metadata (id, path, width, height; Arrow, sorted by id, memory-mapped
    by the query driver) in the staging folder, from arrays in memory (local builds, empty shards; the
    index job streams batches through `build_batches`). Generation 0 is a base shard; generation G > 0 a
    delta shard of the G-th incremental version."""
    staged = Path(staged)
    names = shard_names(s, generation)
    count = build_shard(trained, ids, vectors, staged / names[0], rerank)
    write_meta(staged / names[1], meta)
    return count


def shard_names(s: int, generation: int = 0) -> tuple[str, str]:
    """(FAISS file, metadata file) of shard s: a base shard (generation 0) or a delta of generation G."""
    return (shard_file(s), meta_file(s)) if generation == 0 else (delta_file(generation, s),
                                                                  delta_meta_file(generation, s))


def build_batches(trained: bytes, staged: str | Path, rerank: bool, batches, generation: int = 0):
    """Spark's mapInPandas body for building shards on an executor: batches of entries (shard, id, path,
    width, height, image, box, embedding) -> each shard seen gets its files in the staging folder, built batch by
    batch (memory: the shard's codes and paths, never its raw vectors); yields one (shard, count) frame
    per shard, all that goes back to the driver."""
    writers, metas = {}, {}
    for pdf in batches:
        for s, part in pdf.groupby("shard", sort=False):
            s = int(s)
            if s not in writers:
                writers[s] = ShardWriter(trained, Path(staged) / shard_names(s, generation)[0], rerank)
                metas[s] = []
            writers[s].add(part["id"].to_numpy(np.int64), np.stack(part["embedding"].to_numpy()))
            metas[s].append(part.reindex(columns=ENTRY_COLUMNS))
    for s, writer in writers.items():
        count = writer.close()
        write_meta(Path(staged) / shard_names(s, generation)[1], pd.concat(metas.pop(s), ignore_index=True))
        yield pd.DataFrame({"shard": [s], "count": [count]})


def make_manifest(model_key: str, dim: int, choice: Choice, counts: list[int], source: dict, settings: dict,
                  **extra) -> dict:
    name, _, pretrained = model_key.partition("@")
    pretrained, _, digest = pretrained.partition("#")
    return {
        "model": {"name": name, "pretrained": pretrained, "digest": digest, "key": model_key},
        "dim": dim, "metric": "inner_product", "rows": int(sum(counts)),
        "factory": choice.factory, "reason": choice.reason, "search_params": choice.search_params,
        "rerank": choice.rerank,
        "shards": [{"file": shard_file(s), "meta": meta_file(s), "count": int(c), "factory": choice.factory}
                   for s, c in enumerate(counts)],
        "source": source, "settings": settings, "trained": TRAINED, "generation": 0, "deltas": [],
        "tombstones": None, **extra,
    }


def assemble(index_dir: str | Path, *, dim: int, choice: Choice, shards: int, rows: int, model_key: str,
             sample: np.ndarray | None, probe: tuple[np.ndarray, np.ndarray],
             build: Callable[[bytes, Path], dict], source: dict, settings: dict, prune: int = 0,
             log: Callable[[str], None] = lambda _: None, trained: bytes | None = None, kind: str = "full",
             why: str = "", finish: Callable[[Path], dict] | None = None, **extra) -> tuple[str, Choice, list[str]]:
    """Train (unless `trained`, the empty trained index of a compaction, is given), build the shards with
    `build(trained, staged) -> {shard: count}`, tune, publish and prune. The caller holds the folder's
    lock (versions.index_lock). The trained empty index is kept in the version, so later incremental
    versions encode their deltas with it. `finish(staged) -> manifest entries` adds parts (the keyword
    index) before publishing. Returns (version, the choice with its tuned parameters, pruned)."""
    trained = train(dim, choice, sample) if trained is None else trained
    staged = staging_dir(index_dir)
    try:
        (staged / TRAINED).write_bytes(trained)
        counts = dict(build(trained, staged))
        empty = pd.DataFrame({c: [] for c in META_COLUMNS})
        for s in range(shards):  # a shard that got no rows still gets (empty) files
            if s not in counts:
                counts[s] = write_shard(trained, s, np.zeros(0, np.int64), np.zeros((0, dim), np.float32),
                                        empty, staged, bool(choice.rerank))
        if sum(counts.values()) != rows:
            raise IndexDirError(f"shards hold {sum(counts.values())} vectors, the source {rows}")
        if choice.needs_training:  # IVF: the smallest nprobe that reaches the recall target
            choice = Choice(choice.factory, choice.reason, choice.needs_training,
                            tune_nprobe(staged, [shard_file(s) for s in range(shards)], choice, *probe),
                            choice.rerank)
            log(f"lakelens index: tuned {choice.search_params}")
        manifest = make_manifest(model_key, dim, choice, [counts[s] for s in range(shards)], source, settings,
                                 build=kind, build_reason=why or choice.reason, **extra)
        if finish is not None:
            manifest.update(finish(staged))
        version = publish(index_dir, staged, manifest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    pruned = prune_locked(index_dir, prune) if prune else []
    return version, choice, pruned


def build_local(index_dir: str | Path, ids: np.ndarray, vectors: np.ndarray, paths: list[str],
                choice: Choice, shards: int = 1, model_key: str = "", train_sample: int = 100_000,
                source: dict | None = None, sizes: tuple | None = None, keywords=None, vocab=None) -> str:
    """Build and publish a version from in-memory arrays, without Spark (benchmarks, tests, notebooks):
    the assembly path of the index job, with the shards built in this process. `keywords`: documents
    (id, path, [TagRow], [(caption, score)]) for the version's keyword index (lakelens.index.keyword)."""
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float32)
    meta = pd.DataFrame({"id": ids, "path": list(paths),
                         "width": sizes[0] if sizes else None, "height": sizes[1] if sizes else None})
    order = np.random.default_rng(0).permutation(len(vectors))
    # tuning queries are rows the quantizer was not trained on, as real queries are
    probe = order[:TUNING_QUERIES] if len(vectors) > 2 * TUNING_QUERIES else order[:0]
    rest = order[len(probe):]
    sample = vectors[rest[:training_rows(choice, len(rest), train_sample)]] if choice.needs_training else None
    owner = shard_of(ids, shards)

    def build(trained, staged):
        counts = {}
        for s in range(shards):
            mask = owner == s
            counts[s] = write_shard(trained, s, ids[mask], vectors[mask], meta[mask], staged, bool(choice.rerank))
        return counts

    with index_lock(index_dir):
        version, _, _ = assemble(
            index_dir, dim=int(vectors.shape[1]), choice=choice, shards=shards, rows=len(ids), model_key=model_key,
            sample=sample, probe=(vectors[probe], ids[probe]), build=build,
            source=source or {"table": None, "format": None, "version": None, "fingerprint": None,
                              "image_roots": [common_root(sorted({to_stored(p) for p in paths}))] if len(paths) else []},
            settings={},
            finish=None if keywords is None else lambda staged: {"keywords": {
                **build_keywords(staged, keywords, vocab), "table": None, "tags_version": None,
                "vocab": vocab.digest if vocab else None}})
    return version
