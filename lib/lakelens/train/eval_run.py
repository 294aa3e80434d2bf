"""`lakelens eval`: an index + a captions table (path, caption[, label]) -> retrieval metrics JSON and a recall plot."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from lakelens.index.meta import MetaStore
from lakelens.index.shards import dead_ids, merge_topk, open_version, prepare_direct_map, read_tombstones, shard_entries, top_rows
from lakelens.ingest.paths import to_stored
from lakelens.ingest.small_tables import read_small_table, spark_table, table_format
from lakelens.ingest.table import with_source_columns
from lakelens.search import Searcher
from lakelens.spark import owned_session
from lakelens.train import metrics as ev


def read_captions(path: str, spark_conf=None) -> pd.DataFrame:
    """A Delta table (read with Spark), or a CSV or Parquet file/folder, with columns path, caption and
    optionally label, split and lang (the caption's language, e.g. en, pt). An embeddings table whose images
    came from shards or tables is a captions table too: its embedded rows with a caption, each with where
    its image lives (`locator`, for fine-tuning)."""
    if table_format(path) == "delta":
        with owned_session(spark_conf) as spark:
            df = spark_table(spark, path, "delta")
            if {"container", "caption", "embedding", "error"} <= set(df.columns):
                return (with_source_columns(df).where(F.col("caption").isNotNull() & F.col("error").isNull())
                        .select("path", "caption", "locator").toPandas())
    return read_small_table(path, ("path", "caption"), ("label", "split", "lang"), what="captions table",
                            spark_conf=spark_conf)


def _stored_vectors(shard, raw, rows: int = 16_384):
    """(ids, float32 vectors) of every vector a shard holds, in chunks: the raw vectors beside compressed
    codes where the index keeps them (what its re-ranking scores), else the index's own vectors (decoded
    from its codes)."""
    if raw is not None:
        vectors, ids = raw
        for i in range(0, len(ids), rows):
            yield np.asarray(ids[i:i + rows]), np.asarray(vectors[i:i + rows], dtype=np.float32)
        return
    inner = faiss.downcast_index(shard)
    if isinstance(inner, faiss.IndexIDMap):  # Flat and HNSW: the ids beside the index, in insertion order
        ids = faiss.vector_to_array(inner.id_map)
        for i in range(0, len(ids), rows):
            yield ids[i:i + rows], inner.index.reconstruct_n(i, min(rows, len(ids) - i))
        return
    ivf = faiss.extract_index_ivf(shard)
    lists, held = ivf.invlists, []
    for lst in range(ivf.nlist):
        n = lists.list_size(lst)
        if n:
            ptr = lists.get_ids(lst)
            held.append(faiss.rev_swig_ptr(ptr, n).copy())
            lists.release_ids(lst, ptr)
    ids = np.concatenate(held) if held else np.zeros(0, np.int64)
    prepare_direct_map(shard)
    for i in range(0, len(ids), rows):
        yield ids[i:i + rows], shard.reconstruct_batch(ids[i:i + rows])


def exact_top_images(searcher: Searcher, queries: np.ndarray, k: int, block: int = 1024) -> list[np.ndarray]:
    """Exact top-k image ids per query over every live vector of the searcher's index version, ranked as
    its searches rank them (an image by its best entry, its regions included): what the ANN index's
    results are measured against. Scores are matrix products over chunks of the stored vectors."""
    folder, manifest = searcher.index_dir / searcher.version, searcher.manifest
    tomb = read_tombstones(folder, manifest)
    entries = shard_entries(manifest)
    meta = MetaStore(folder, entries, tomb)
    shards, raw, _, keep = open_version(folder, manifest, tomb=tomb)
    # an image has at most per_image entries, so the best k x per_image entries hold its k best images
    fetch = max(1, min(k * meta.per_image, len(meta.entries)))
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), fetch), -np.inf, np.float32)
    best_i = np.full((len(q), fetch), -1, np.int64)
    for shard, vectors, entry in zip(shards, raw, entries):
        dead = dead_ids(tomb, entry.get("generation", 0))  # replaced or deleted since this shard was built
        for ids, vecs in _stored_vectors(shard, vectors):
            gone = np.isin(ids, dead) if len(dead) else None
            for b in range(0, len(q), block):  # bounds the score matrix whatever the number of captions
                scores = q[b:b + block] @ vecs.T
                if gone is not None:
                    scores[:, gone] = -np.inf
                s, cols = top_rows(scores, fetch)
                found = (s, np.where(np.isneginf(s), -1, ids[cols]))
                best_s[b:b + block], best_i[b:b + block] = merge_topk((best_s[b:b + block], best_i[b:b + block]),
                                                                      found, fetch)
    del keep
    out = []
    for row in best_i:
        images = meta.resolve(row[row != -1])[0]
        first = np.sort(np.unique(images, return_index=True)[1])  # each image at its best entry
        out.append(images[first][:k])
    return out


def evaluate_index(index_dir: str, captions: pd.DataFrame, ks=(1, 5, 10)) -> dict:
    """Text->image and image->text Recall@K over the captioned images, top-K accuracy, precision@K by
    label, and the ANN index's recall against exact search on the same text queries. With a `lang`
    column, every metric also per language under `by_lang` (image->text among that language's captions)."""
    searcher = Searcher.open(index_dir)
    captions = captions.reset_index(drop=True)
    uris = captions["path"].map(to_stored)
    images = list(dict.fromkeys(uris))  # the captioned images, in order
    known = searcher.id_paths()
    path_to_id = dict(zip(known["path"], known["id"]))
    vectors, present = [], []
    for uri in images:
        vec = None
        if uri in path_to_id:
            vec = searcher.vector_of(int(path_to_id[uri]))
        present.append(vec is not None)
        vectors.append(vec if vec is not None else np.zeros(searcher.manifest["dim"], np.float32))
    image_vecs = np.stack(vectors)
    text_vecs = np.concatenate([searcher.embedder.embed_texts(captions["caption"].iloc[i:i + 256].tolist())
                                for i in range(0, len(captions), 256)])
    col = {uri: j for j, uri in enumerate(images)}
    image_of = np.array([col[u] for u in uris])
    present = np.array(present)
    scores = text_vecs @ image_vecs.T
    scores[:, ~present] = -np.inf  # images missing from the index cannot be retrieved
    kmax = max(ks)
    exact_top = exact_top_images(searcher, text_vecs, kmax)
    ann_top = [f["id"].to_numpy() for f in searcher.search_vectors(text_vecs, k=kmax)]
    labels = None
    if "label" in captions.columns:
        image_labels = captions.assign(uri=uris).drop_duplicates("uri").set_index("uri").loc[images, "label"]
        labels = (captions["label"].tolist(), image_labels.tolist())

    def metrics_of(rows: np.ndarray) -> dict:
        """The metrics of the caption rows `rows` as queries (and, image->text, as the candidates)."""
        sub = scores[rows]
        targets = np.where(present[image_of[rows]], image_of[rows], -1)
        t2i = ev.recall_at_k(ev.ranks_of_targets(sub, targets), ks)
        caption_rows: dict[int, list[int]] = {}
        for pos, j in enumerate(image_of[rows]):
            caption_rows.setdefault(int(j), []).append(pos)
        queried = sorted(caption_rows)  # images with a caption among the rows
        i2t = ev.recall_at_k(ev.best_ranks(sub.T[queried], [caption_rows[j] if present[j] else [-1] for j in queried]), ks)
        out = {"queries": int(len(rows)), "images": int(len(queried)),
               "missing_images": int(sum(not present[j] for j in queried))}
        for k in ks:
            out[f"t2i_recall@{k}"] = t2i[k]
            out[f"t2i_top{k}_accuracy"] = t2i[k]
            out[f"i2t_recall@{k}"] = i2t[k]
        if labels is not None:
            prec = ev.precision_at_k(sub, [labels[0][i] for i in rows], labels[1], ks)
            out.update({f"t2i_precision@{k}": prec[k] for k in ks})
        out[f"ann_recall@{kmax}"] = ev.ann_recall([ann_top[i] for i in rows], [exact_top[i] for i in rows], kmax)
        return out

    overall = metrics_of(np.arange(len(captions)))
    metrics = {**{k: overall[k] for k in ("queries", "images", "missing_images")}, "index_version": searcher.version,
               "model": searcher.manifest["model"]["key"], **overall}
    if "lang" in captions.columns:
        langs = captions["lang"].fillna("").astype(str).str.strip()
        metrics["by_lang"] = {lang: metrics_of(np.flatnonzero(langs.to_numpy() == lang))
                              for lang in sorted(set(langs))}
    return metrics


def format_by_lang(metrics: dict, ks=(1, 5, 10)) -> str:
    """The per-language table of `lakelens eval` (text), one row per language and one for all."""
    rows = [("all", metrics)] + sorted(metrics.get("by_lang", {}).items())
    names = [f"t2i_recall@{k}" for k in ks] + [f"i2t_recall@{k}" for k in ks]
    names += [n for n in (f"t2i_precision@{max(ks)}",) if n in metrics]
    lines = ["lang   queries  " + "  ".join(f"{n:>16}" for n in names)]
    for lang, m in rows:
        lines.append(f"{lang or '(none)':<6} {m['queries']:>7}  " + "  ".join(f"{m[n]:>16.3f}" for n in names))
    return "\n".join(lines)


def run_eval(index_dir: str, captions_path: str, ks=(1, 5, 10), out: str | None = None,
             plot: str | None = None, spark_conf=None) -> dict:
    metrics = evaluate_index(index_dir, read_captions(captions_path, spark_conf), ks)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metrics, indent=2) + "\n")
    if plot:
        curves = {"text -> image": {k: metrics[f"t2i_recall@{k}"] for k in ks},
                  "image -> text": {k: metrics[f"i2t_recall@{k}"] for k in ks}}
        curves.update({f"text -> image, {lang}": {k: m[f"t2i_recall@{k}"] for k in ks}
                       for lang, m in metrics.get("by_lang", {}).items()})
        ev.plot_recall(curves, plot,
                       f"Recall@K, {metrics['model']} ({metrics['queries']} captions)")
    return metrics
