import json
import threading

import numpy as np
import pytest
from conftest import clustered, exact_topk, recall_at

from lakelens import IndexMismatchError, QueryError, Searcher
from lakelens import index as ix
from lakelens.config import parse_size


def random_ids(n, seed=0):
    ids = np.random.default_rng(seed).integers(-2**62, 2**62, n, dtype=np.int64)
    assert len(set(ids)) == n
    return ids


def build(tmp_path, vectors, choice, shards=1, ids=None, name="idx"):
    ids = random_ids(len(vectors)) if ids is None else ids
    paths = [f"file:/data/{'a' if i % 2 else 'b'}/img{i}.jpg" for i in range(len(vectors))]
    ix.build_local(tmp_path / name, ids, vectors, paths, choice, shards=shards, model_key="lakelens-tiny@none")
    return tmp_path / name, ids, paths


def test_parse_size():
    assert parse_size("4G") == 4 * 2**30 and parse_size("512m") == 512 * 2**20
    assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size(10) == 10
    with pytest.raises(ValueError):
        parse_size("lots")


def test_auto_ladder_follows_rows_and_budget():
    d = 512
    assert ix.choose_factory(10_000, d, 2**30).factory == "Flat"
    assert ix.choose_factory(100_000, d, 2**30).factory == "HNSW32,Flat"
    assert ix.choose_factory(1_000_000, d, 4 * 2**30).factory == "IVF4000,Flat"
    sq = ix.choose_factory(1_000_000, d, 1 * 2**30)
    assert sq.factory == "IVF4000,SQ8" and sq.rerank
    pq = ix.choose_factory(1_000_000, d, 100 * 2**20)
    assert pq.factory == "IVF4000,PQ64" and pq.rerank
    with pytest.raises(ValueError, match="budget"):
        ix.choose_factory(1_000_000, d, 2**20)


def test_sharded_search_equals_unsharded_exact(tmp_path):
    x = clustered(3000, 32, seed=1)
    index_dir, ids, paths = build(tmp_path, x, ix.choose_factory(len(x), 32, 2**30), shards=4)
    s = Searcher.open(index_dir)
    assert len(s.manifest["shards"]) == 4 and len(s) == 3000
    q = clustered(50, 32, seed=2)
    got = s.search_vectors(q, k=10)
    true_scores, true_ids = exact_topk(q, x, ids, 10)
    for frame, ts, ti in zip(got, true_scores, true_ids):
        assert list(frame["id"]) == list(ti)
        assert np.allclose(frame["score"], ts, atol=1e-5) and list(frame["rank"]) == list(range(1, 11))
    row = got[0].iloc[0]
    assert row["path"] == paths[list(ids).index(row["id"])]


@pytest.mark.parametrize("rows, budget, hnsw_max, expect", [
    (20_000, 2**30, 50_000, "HNSW32,Flat"),
    (20_000, 2**30, 0, "IVF512,Flat"),
    (20_000, 2_000_000, 0, "IVF512,SQ8"),
    # PQ training on 2-dimensional sub-vectors takes FAISS half a minute here: make test runs it
    pytest.param(20_000, 700_000, 0, "IVF512,PQ32", marks=pytest.mark.slow),
])
def test_each_auto_choice_reaches_recall(tmp_path, rows, budget, hnsw_max, expect):
    x = clustered(rows, 64, clusters=200, seed=3, centres_seed=3)
    choice = ix.choose_factory(rows, 64, budget, exact_max_rows=1000, hnsw_max_rows=hnsw_max)
    assert choice.factory == expect
    index_dir, ids, _ = build(tmp_path, x, choice, shards=2)
    manifest = json.loads((index_dir / ix.current_version(index_dir) / "manifest.json").read_text())
    assert manifest["factory"] == expect and manifest["reason"] == choice.reason
    q = clustered(200, 64, clusters=200, seed=4, centres_seed=3)  # held-out queries, same mixture
    found = [f["id"].tolist() for f in Searcher.open(index_dir).search_vectors(q, k=10)]
    assert recall_at(found, exact_topk(q, x, ids, 10)[1]) >= 0.95


def test_search_options_and_bad_queries(tmp_path):
    x = clustered(2000, 16, seed=5, centres_seed=5)
    index_dir, ids, paths = build(tmp_path, x, ix.Choice("IVF32,Flat", "test", True, {"nprobe": 32}))
    s = Searcher.open(index_dir)
    q = x[0]
    full = s.search_vector(q, k=20)
    assert full.iloc[0]["id"] == ids[0] and abs(full.iloc[0]["score"] - 1) < 1e-5
    assert (s.search_vector(q, k=20, min_score=float(full["score"].iloc[4]))["score"] >= full["score"].iloc[4]).all()
    only_a = s.search_vector(q, k=20, path_prefix="file:/data/a/")
    assert len(only_a) == 20 and only_a["path"].str.startswith("file:/data/a/").all()
    assert s.search_vector(q, k=20, path_prefix="file:/nowhere/").empty
    narrow = s.search_vectors(clustered(100, 16, seed=6, centres_seed=5), k=10, nprobe=1)
    wide = s.search_vectors(clustered(100, 16, seed=6, centres_seed=5), k=10, nprobe=32)
    truth = exact_topk(clustered(100, 16, seed=6, centres_seed=5), x, ids, 10)[1]
    assert recall_at([f["id"] for f in narrow], truth) < recall_at([f["id"] for f in wide], truth) == 1.0
    assert list(s.search_id(ids[5], k=1)["id"]) == [ids[5]]
    assert len(s.search_vector(q, k=5000, nprobe=32)) == 2000  # k beyond the index size: everything
    for bad_k in (0, -3, 10_001, 2.5, True):
        with pytest.raises(QueryError, match="k must be"):
            s.search_vector(q, k=bad_k)
    with pytest.raises(QueryError, match="shape"):
        s.search_vector(np.ones(15), k=3)
    with pytest.raises(QueryError, match="NaN"):
        s.search_vector(np.full(16, np.nan), k=3)
    with pytest.raises(QueryError, match="not in index"):
        s.search_id(12345, k=3)


def test_missing_or_foreign_index(tmp_path):
    with pytest.raises(ix.IndexDirError, match="not found"):
        Searcher.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ix.IndexDirError, match="no published index"):
        Searcher.open(tmp_path / "empty")
    index_dir, _, _ = build(tmp_path, clustered(100, 8), ix.Choice("Flat", "test", False))
    with pytest.raises(IndexMismatchError, match="lakelens-tiny@none"):
        Searcher.open(index_dir, expect_model="ViT-B-32@laion2b_s34b_b79k")


def test_publish_is_atomic_for_a_concurrent_reader_and_prune_keeps_the_live(tmp_path):
    x = clustered(3000, 16, seed=7)
    index_dir, ids, _ = build(tmp_path, x[:1000], ix.Choice("Flat", "v1", False), ids=np.arange(1000))
    s = Searcher.open(index_dir)
    errors, seen, stop = [], set(), threading.Event()

    def reader():
        while not stop.is_set():
            try:
                s.reload()
                frame = s.search_vector(x[0], k=5)
                seen.add((s.version, len(frame)))
            except Exception as e:  # any error is a failure of atomic publishing
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    for n in (2000, 3000):
        ix.build_local(index_dir, np.arange(n), x[:n], [f"p{i}" for i in range(n)], ix.Choice("Flat", "vN", False),
                       shards=3)
    stop.set()
    t.join()
    assert errors == [] and {"v0001"} <= {v for v, _ in seen} <= {"v0001", "v0002", "v0003"}
    s.reload()
    assert s.version == "v0003" and len(s) == 3000
    assert ix.prune(index_dir, 1) == ["v0001", "v0002"] and ix.versions(index_dir) == ["v0003"]
    (index_dir / ix.CURRENT).write_text("v0003\n")
    assert Searcher.open(index_dir).search_vector(x[2999], k=1)["id"].iloc[0] == 2999


def test_metadata_is_memory_mapped_and_follows_generations(tmp_path):
    """Shard metadata files are Arrow files sorted by id, mapped rather than read: opening a store
    allocates nothing for the paths. The newest generation holding a live id gives its path; tombstones
    of a later generation hide older copies; a version with the old single Parquet file still opens."""
    import pandas as pd
    import pyarrow as pa

    from lakelens.index.meta import MetaStore, read_meta, write_meta

    n = 20_000
    paths = [f"file:/photos/{i:06d}-{'x' * 60}.jpg" for i in range(n)]
    base = pd.DataFrame({"id": np.arange(n, 0, -1), "path": paths, "width": 64, "height": None})
    write_meta(tmp_path / "meta-0000.arrow", base)
    write_meta(tmp_path / "delta-0001-0000.arrow", pd.DataFrame(
        {"id": [n, 7, n + 1, n + 2], "path": ["file:/new/changed.jpg", "file:/new/deleted-later.jpg",
                                            "file:/new/added.jpg", "file:/new/gone.jpg"]}))
    stored = read_meta(tmp_path / "meta-0000.arrow")
    assert stored.column("id").to_pylist() == sorted(base["id"])  # sorted for binary search
    assert stored.column("width").to_pylist()[:2] == [64, 64] and stored.column("height").null_count == n
    tomb = pd.DataFrame({"id": [n, 7, n + 2, 7], "generation": [1, 1, 2, 2]})
    before = pa.total_allocated_bytes()
    store = MetaStore(tmp_path, [{"meta": "meta-0000.arrow"}, {"meta": "delta-0001-0000.arrow", "generation": 1}], tomb)
    assert pa.total_allocated_bytes() - before < 100_000  # the ~1.5 MB of paths stay in the mapped file
    live = set(range(1, n + 1)) - {7} | {n + 1}
    assert store.ids.tolist() == sorted(live)
    assert store.path_of(n) == "file:/new/changed.jpg" and store.path_of(n + 1) == "file:/new/added.jpg"
    assert store.path_of(7) is None and store.path_of(n + 2) is None and store.path_of(1) == paths[n - 1]
    assert list(store.paths(np.array([3, n, 5]))) == [paths[n - 3], "file:/new/changed.jpg", paths[n - 5]]
    assert store.with_prefix("file:/new/").tolist() == [n, n + 1]
    # id n (file 000000) moved to file:/new/ in generation 1: its old path no longer matches
    assert store.with_prefix("file:/photos/00000").tolist() == [n - i for i in range(9, 0, -1)]
    frame = store.frame()
    assert len(frame) == len(live) and frame["id"].is_monotonic_increasing

    base.to_parquet(tmp_path / "meta.parquet", index=False)  # versions published before per-shard files
    legacy = MetaStore(tmp_path, [{"file": "shard-0000.faiss"}], tomb.iloc[:0], legacy="meta.parquet")
    assert len(legacy) == n and legacy.path_of(5) == paths[n - 5]


@pytest.mark.parametrize("factory,rerank", [("IVF32,Flat", 0), ("IVF32,SQ8", 4)])
def test_exact_topk_over_stored_vectors_equals_brute_force(tmp_path, factory, rerank):
    """The drift probe's exact side: matrix products over IVF-Flat's list codes or the raw vectors beside
    compressed shards, with tombstoned ids left out, equal numpy's exact top-k over the live vectors."""
    import pandas as pd

    from lakelens.index.shards import dead_ids, open_version
    from lakelens.index.shards import exact_topk as stored_topk

    x = clustered(3000, 32, seed=4)
    choice = ix.Choice(factory, "test", True, {"nprobe": 4}, rerank)
    index, ids, _ = build(tmp_path, x, choice, shards=2)
    folder = index / ix.current_version(index)
    manifest = ix.read_manifest(index)
    shards, rr, _, _ = open_version(folder, manifest, direct_map=False)
    dead = ids[::7]
    tomb = pd.DataFrame({"id": dead, "generation": 1})
    q = clustered(20, 32, seed=5)
    scores, found = stored_topk(shards, rr, q, 10, [dead_ids(tomb, 0)] * len(shards))
    live = np.ones(len(ids), bool)
    live[::7] = False
    want_s, want = exact_topk(q, x[live], ids[live], 10)
    assert (found == want).all() and np.allclose(scores, want_s, atol=1e-5)


@pytest.mark.parametrize("n", [5, 300, 2600, 65_536, 70_001])
def test_top_rows_equals_a_full_sort(n):
    from lakelens.index.shards import top_rows

    scores = np.random.default_rng(n).standard_normal((7, n)).astype(np.float32)
    scores[0, :20] = 3.0  # ties across a block boundary
    values, cols = top_rows(scores, 10)
    assert np.array_equal(np.sort(values, axis=1), np.sort(scores, axis=1)[:, -min(10, n):])
    assert np.array_equal(np.take_along_axis(scores, cols, 1), values)
    assert all(len(set(row)) == len(row) for row in cols)  # no column twice


def test_shards_built_batch_by_batch_equal_shards_built_at_once(tmp_path):
    """The index job streams Spark's Arrow batches into the shards (several shards interleaved in one
    partition): the files equal those of a build from whole arrays, raw vectors sorted by id."""
    import pandas as pd

    from lakelens.index.build import build_batches, write_shard
    from lakelens.index.meta import read_meta
    from lakelens.index.shards import rerank_files

    x = clustered(900, 16, seed=3)
    ids = random_ids(900, seed=3)
    choice = ix.Choice("IVF8,SQ8", "test", True, {"nprobe": 8}, rerank=4)
    trained = ix.train(16, choice, x)
    frame = pd.DataFrame({"shard": ix.shard_of(ids, 2), "id": ids, "path": [f"file:/p/{i}.jpg" for i in range(900)],
                          "width": 10, "height": 20, "embedding": list(x)})
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    counts = pd.concat(build_batches(trained, tmp_path / "a", True, (frame.iloc[i:i + 100] for i in range(0, 900, 100))))
    assert dict(zip(counts["shard"], counts["count"])) == {s: int((frame["shard"] == s).sum()) for s in (0, 1)}
    q = clustered(5, 16, seed=4)
    for s in (0, 1):
        part = frame[frame["shard"] == s]
        write_shard(trained, s, part["id"].to_numpy(), np.stack(part["embedding"]), part, tmp_path / "b", True)
        streamed, whole = (ix.load_shard(tmp_path / d / f"shard-{s:04d}.faiss", False)[0] for d in "ab")
        assert streamed.ntotal == whole.ntotal == len(part)
        a, b = streamed.search(q, 10), whole.search(q, 10)
        assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0])
        for fa, fb in zip(*(rerank_files(tmp_path / d / f"shard-{s:04d}.faiss") for d in "ab")):
            assert np.array_equal(np.load(fa), np.load(fb))
        vec, sorted_ids = (np.load(f) for f in rerank_files(tmp_path / "a" / f"shard-{s:04d}.faiss"))
        assert np.array_equal(sorted_ids, np.sort(part["id"])) and np.array_equal(
            vec, np.stack(part.set_index("id").loc[sorted_ids, "embedding"]).astype(np.float32))
        assert read_meta(tmp_path / "a" / f"meta-{s:04d}.arrow").equals(read_meta(tmp_path / "b" / f"meta-{s:04d}.arrow"))
    assert not list(tmp_path.glob("*/*.raw-*"))  # scratch files are gone


@pytest.mark.parametrize("factory,rerank", [("IVF32,Flat", 0), ("IVF32,SQ8", 4)])
def test_lists_chosen_once_for_all_shards_give_the_same_results(tmp_path, factory, rerank):
    """IVF shards of a version share one trained quantizer: searching them with one list assignment per
    query (search_preassigned) returns what searching each shard on its own does, filters included."""
    import faiss

    from lakelens.index.shards import open_version, search_shards, shared_quantizer

    x = clustered(4000, 32, seed=6)
    index, ids, _ = build(tmp_path, x, ix.Choice(factory, "test", True, {"nprobe": 4}, rerank), shards=3)
    shards, rr, _, _ = open_version(index / ix.current_version(index), ix.read_manifest(index))
    quantizer = shared_quantizer(shards)
    assert quantizer is not None
    q = clustered(30, 32, seed=7)
    allowed = faiss.IDSelectorBatch(ids[::3])
    dead = faiss.IDSelectorBatch(ids[1::5])
    excluded = [faiss.IDSelectorNot(dead)] * 3
    for kw in ({}, {"selector": allowed}, {"excluded": excluded}, {"selector": allowed, "excluded": excluded}):
        a = search_shards(shards, rr, q, 10, 6, factor=rerank, **kw)
        b = search_shards(shards, rr, q, 10, 6, factor=rerank, quantizer=quantizer, **kw)
        assert np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], atol=1e-6)
    kept = set(ids[::3]) - set(ids[1::5])
    assert set(b[1].ravel()) - {-1} <= kept
    other, _, _ = build(tmp_path, clustered(4000, 32, seed=8), ix.Choice(factory, "test", True, {"nprobe": 4}, rerank),
                        name="other")
    foreign = open_version(other / ix.current_version(other), ix.read_manifest(other))[0]
    assert shared_quantizer([shards[0], foreign[0]]) is None  # other centroids: each shard chooses its own lists


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "IVF32,PQ8x4", "IVF300,SQ8", "IVF32,PQ8x4fs"])
def test_drift_probe_exact_side_over_codes_without_raw_vectors(tmp_path, factory):
    """An explicit compressed factory keeps no raw vectors: the drift probe's exact side is then the codes
    themselves (decoded; fast-scan's packed codes through FAISS's scan of every list), tombstones left out,
    which equals searching every list of every shard."""
    import faiss
    import pandas as pd

    from lakelens.index.shards import dead_ids, open_version, search_shards
    from lakelens.index.update import exact_over

    x = clustered(3000, 32, seed=4)
    index, ids, _ = build(tmp_path, x, ix.Choice(factory, "test", True, {"nprobe": 4}, 0), shards=2)
    folder, manifest = index / ix.current_version(index), ix.read_manifest(index)
    tomb = pd.DataFrame({"id": ids[::7], "generation": 1})
    q = clustered(20, 32, seed=5)
    scores, found = exact_over(folder, manifest, tomb, q, 10)
    shards, rr, _, _ = open_version(folder, manifest)
    dead = faiss.IDSelectorNot(faiss.IDSelectorBatch(dead_ids(tomb, 0)))
    want_s, want = search_shards(shards, rr, q, 10, faiss.extract_index_ivf(shards[0]).nlist, excluded=[dead] * 2)
    assert not set(found.ravel()) & set(ids[::7])
    assert np.mean([len(set(f) & set(w)) / 10 for f, w in zip(found, want)]) >= 0.99
    assert np.allclose(np.sort(scores, 1), np.sort(want_s, 1), atol=1e-4)
