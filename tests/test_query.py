"""Richer queries on a real index of synth images (tiny random-init model, exact Flat shards): query
arithmetic, a text and an image together with weights, pages (offset); checked against vectors
computed here by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import webindex

from lakelens import QueryError, Searcher
from lakelens.cli import main
from lakelens.search.query_vectors import parse_terms


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return webindex.build(tmp_path_factory.mktemp("query"))


def unit(v):
    return v / np.linalg.norm(v)


def exact(site, vec, k):
    """Ids and scores of the top k by inner product over every indexed vector (numpy)."""
    scores = site.vectors @ vec
    order = np.argsort(-scores, kind="stable")[:k]
    return site.ids[order], scores[order]


def text_vec(text):
    return webindex.embedder().embed_texts([text])[0]


def test_parse_terms():
    assert parse_terms("beach + sunset - people") == [(1, "beach"), (1, "sunset"), (-1, "people")]
    assert parse_terms("a red t-shirt") == [(1, "a red t-shirt")]  # a hyphen inside a word is no operator
    assert parse_terms("black-and-white - cat") == [(1, "black-and-white"), (-1, "cat")]
    assert parse_terms("- people + beach") == [(-1, "people"), (1, "beach")]
    assert parse_terms("  +  big red circle ") == [(1, "big red circle")]
    for bad, words in [("", "empty"), ("cat -  ", "nothing after"), ("- cat", "only subtracts")]:
        with pytest.raises(QueryError, match=words):
            parse_terms(bad)


def test_arithmetic_is_the_signed_sum_of_unit_term_vectors(site):
    s = Searcher.open(site.index)
    want = unit(unit(text_vec("a red circle")) + unit(text_vec("on the left")) - unit(text_vec("blue")))
    got = s.search_text("a red circle + on the left - blue", k=8)
    ids, scores = exact(site, want, 8)
    assert list(got["id"]) == list(ids) and np.allclose(got["score"], scores, atol=1e-5)
    assert any("query arithmetic" in n for n in got.attrs["notes"])
    plain = s.search_text("a red circle", k=8)  # one term: the text's own vector, no arithmetic
    assert np.allclose(plain["score"], exact(site, text_vec("a red circle"), 8)[1], atol=1e-5)
    with pytest.raises(QueryError, match="cancel out"):
        s.search_text("a red circle - a red circle")


def test_text_and_image_together_with_weights(site):
    s = Searcher.open(site.index)
    image = open(site.paths[5], "rb").read()
    img_vec = webindex.embedder()([image])[0].embedding
    for weights in [(0.7, 0.3), (1, 0), (0, 2)]:
        got = s.search(text="a green square", image=image, weights=weights, k=6)
        want = unit(weights[0] * unit(text_vec("a green square")) + weights[1] * unit(img_vec))
        ids, scores = exact(site, want, 6)
        assert list(got["id"]) == list(ids) and np.allclose(got["score"], scores, atol=1e-5)
    assert s.search(image=site.paths[5], k=1)["id"][0] == site.ids[5]  # the image alone: itself first
    for bad in [(1,), (1, -1), (0, 0), ("a", 1), (1, float("nan"))]:
        with pytest.raises(QueryError, match="weights"):
            s.search(text="x", image=image, weights=bad)
    with pytest.raises(QueryError, match="text, an image"):
        s.search()


def test_pages_of_results_join_up_to_one_long_list(site):
    s = Searcher.open(site.index)
    whole = s.search_text("a small yellow triangle", k=12)
    pages = [s.search_text("a small yellow triangle", k=4, offset=o) for o in (0, 4, 8)]
    assert [list(p["rank"]) for p in pages] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert sum((list(p["id"]) for p in pages), []) == list(whole["id"])
    assert len(s.search_text("a small yellow triangle", k=10, offset=len(s) - 3)) == 3  # the last page is short
    for bad in [-1, 1.5, True]:
        with pytest.raises(QueryError, match="offset"):
            s.search_text("x", k=4, offset=bad)
    with pytest.raises(QueryError, match="k \\+ offset"):
        s.search_text("x", k=10, offset=9_995)


def test_command_line_takes_arithmetic_both_kinds_of_query_and_offset(site, capsys):
    assert main(["search", "--index", str(site.index), "a red circle + on the left", "--image", site.paths[5],
                 "--weights", "0.5,0.5", "-k", "3", "--offset", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = unit(0.5 * unit(unit(text_vec("a red circle")) + unit(text_vec("on the left")))
                + 0.5 * unit(webindex.embedder()([open(site.paths[5], "rb").read()])[0].embedding))
    ids, _ = exact(site, want, 5)
    assert [r["id"] for r in out["results"]] == list(ids[2:]) and [r["rank"] for r in out["results"]] == [3, 4, 5]
    assert main(["search", "--index", str(site.index), "x", "--image", site.paths[5], "--weights", "1,-1"]) == 2
    assert "weights" in capsys.readouterr().err


# --- an index of 303 images with tags and captions (webindex.keyword_docs) --------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return webindex.build(tmp_path_factory.mktemp("shapes"), n=300, keywords=True)


def write_groups(site, sizes=(1, 2, 3, 4)):
    """Duplicate groups beside the index, as `lakelens dedup --index` writes them: the ids in a shuffled order,
    cut into groups of 1, 2, 3, 4, 1, 2, ... images (a group's id is its first member's)."""
    import pyarrow as pa

    from lakelens.index.layout import GROUPS_FILE

    order = np.random.default_rng(3).permutation(len(site.ids))
    rows, at, j = [], 0, 0
    while at < len(order):
        members = order[at:at + sizes[j % len(sizes)]]
        rows += [(int(site.ids[members[0]]), int(site.ids[m]), site.uris[m], m == members[0]) for m in members]
        at, j = at + len(members), j + 1
    group, ids, paths, rep = zip(*sorted(rows, key=lambda r: r[1]))
    table = pa.table({"group": pa.array(group, pa.int64()), "id": pa.array(ids, pa.int64()), "path": list(paths),
                      "similarity": pa.array([1.0] * len(ids), pa.float32()), "representative": list(rep)},
                     metadata={"index_version": site.version, "table_version": "0"})
    import pyarrow.ipc as ipc

    with pa.OSFile(str(site.index / GROUPS_FILE), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return dict(zip(ids, group))


def joined(s, text, n, size, **kw):
    """Pages of `size` (offset 0, size, 2 x size, ...) up to n results, joined."""
    pages = [s.search_text(text, k=min(size, n - o), offset=o, **kw) for o in range(0, n, size)]
    return pd.concat(pages, ignore_index=True)


def test_hybrid_pages_join_up_to_one_long_list(shapes):
    """Pages of a hybrid query hold exactly the results of one query as long as the pages together, also
    across the depths at which the two sides' lists are fused, and with collapse_duplicates."""
    s = Searcher.open(shapes.index)
    for n, size in [(120, 20), (160, 7), (230, 23)]:
        whole = s.search_text("blue circle", k=n, mode="hybrid")
        pages = joined(s, "blue circle", n, size, mode="hybrid")
        assert whole["id"].is_unique and len(whole) == n
        assert list(pages["id"]) == list(whole["id"]), (n, size)
        assert list(pages["rank"]) == list(range(1, n + 1))
        assert np.allclose(pages["score"], whole["score"])
        assert list(pages["vector_rank"]) == list(whole["vector_rank"])
        assert list(pages["keyword_rank"]) == list(whole["keyword_rank"])
    group_of = write_groups(shapes)
    try:
        for mode in ("hybrid", "keyword"):
            every = s.search_text("blue circle", k=len(s), mode=mode)["id"]
            best_of_groups = list(every[~every.map(group_of).duplicated()])[:100]
            whole = s.search_text("blue circle", k=100, mode=mode, collapse_duplicates=True)
            pages = joined(s, "blue circle", 100, 20, mode=mode, collapse_duplicates=True)
            assert list(whole["id"]) == best_of_groups, mode
            assert list(pages["id"]) == best_of_groups, mode
            assert list(pages["rank"]) == list(range(1, len(whole) + 1))
    finally:
        (shapes.index / "duplicates.arrow").unlink()


class ReloadsMidQuery(Searcher):
    """Switches to the newest published version when its vector side starts, after the query's keyword
    side and filters were worked out: what a reload() from another thread (the server's watcher) can do."""

    armed = False

    def _search_vectors(self, *args, **kw):
        if self.armed:
            self.armed = False
            assert self.reload()
        return super()._search_vectors(*args, **kw)


def test_a_query_finishes_on_the_version_it_started_with(tmp_path):
    """A reload between the parts of a query (filters, keyword side, vector side, tags and captions) leaves
    the query on the version it started with: every result is an image of that version, with its path
    and tags, whatever the mode."""
    from lakelens import index as ix

    first = webindex.build(tmp_path / "a", n=20, keywords=True)
    second = webindex.publish(first.index, webindex.make_images(tmp_path / "b", 20, seed=12), keywords=True)
    assert not set(first.ids.tolist()) & set(second.ids.tolist())
    path_of = dict(zip(first.ids.tolist(), first.uris))
    tags_of = {id_: [t.tag for t in sorted(tags, key=lambda t: -t.score)] for id_, _, tags, _ in first.docs}
    for query in [dict(text="red circle", mode="hybrid", k=15), dict(text="red circle", mode="vector", k=5),
                  dict(text="a shape tag:red", mode="vector", k=2), dict(text="circle", mode="hybrid", k=10, offset=5),
                  dict(text="circle", mode="hybrid", k=10, path_prefix="file:" + str(tmp_path))]:
        (first.index / ix.CURRENT).write_text(first.version)
        s = ReloadsMidQuery.open(first.index)
        (first.index / ix.CURRENT).write_text(second.version)  # published while the server runs
        s.armed = True
        got = s.search(**query)
        assert not s.armed and s.version == second.version, query  # it switched during the query
        assert len(got) == query["k"], query
        assert got["path"].notna().all() and set(got["id"]) <= set(path_of), query  # every result from the first version
        assert [path_of[i] for i in got["id"]] == list(got["path"]), query
        assert [tags_of[i] for i in got["id"]] == list(got["tags"]), query


def test_path_prefixes_keep_only_their_ids_within_the_cache_byte_bound(site):
    """Each distinct prefix= is remembered as its ids alone (no FAISS selector it does not use), and what is
    remembered stays within the cache's byte bound, however many prefixes clients send."""
    import faiss

    folder = "file:" + str(Path(site.paths[0]).parent)
    prefixes = [folder[:n] for n in range(len(folder) - 30, len(folder) + 1)]  # each held by 42 of the 43 images
    s = Searcher.open(site.index)
    for p in prefixes:
        got = s.search_text("a red circle", k=3, path_prefix=p)
        assert len(got) == 3 and all(path.startswith(p) for path in got["path"])
    kept = [part for entry in s._prefix_cache.values() for part in (entry if isinstance(entry, tuple) else [entry])]
    assert kept and not any(isinstance(part, faiss.IDSelector) for part in kept)
    assert s._prefix_cache.nbytes == sum(part.nbytes for part in kept) == len(kept) * 42 * 8

    small = Searcher.open(site.index, id_cache_bytes=1000)
    for p in prefixes:
        assert len(small.search_text("a red circle", k=3, path_prefix=p)) == 3
        assert 0 < small._prefix_cache.nbytes <= 1000 and len(small._prefix_cache) <= 2  # 336 bytes each
    rare = small.search_text("a red circle", k=3, path_prefix=site.uris[7])  # one image: filtered inside FAISS's scan
    assert list(rare["id"]) == [site.ids[7]] and small._prefix_cache.nbytes <= 1000
    assert any(isinstance(part, faiss.IDSelector) for part in small._prefix_cache.values())  # the one it used


def test_numpy_integers_for_k_and_offset_page_like_python_ints(site):
    """k and offset taken from numpy (a DataFrame's column, np.arange) give the same page as Python ints, on
    every kind of query, not a FAISS TypeError."""
    s = Searcher.open(site.index)
    image = open(site.paths[5], "rb").read()
    queries = [lambda **kw: s.search_text("a red circle", **kw), lambda **kw: s.search_id(int(site.ids[3]), **kw),
               lambda **kw: s.search_vector(site.vectors[3], **kw), lambda **kw: s.search_image(image, **kw)]
    for query in queries:
        want = list(query(k=5, offset=2)["id"])
        assert list(query(k=np.int64(5), offset=np.int32(2))["id"]) == want
        assert list(query(k=np.int64(7))["id"])[2:] == want
    assert s.search_text("a red circle", k=np.uint8(3), collapse_duplicates=False)["rank"].tolist() == [1, 2, 3]


def test_malformed_arguments_of_the_python_api_are_query_errors(site):
    s = Searcher.open(site.index)
    with pytest.raises(QueryError, match="query text must be a string"):
        s.search(text=123)
    with pytest.raises(QueryError, match="query text must be a string"):
        s.search_text(["a red circle"])
    with pytest.raises(QueryError, match="id must be an integer"):
        s.details("abc")
    assert s.details(np.int64(site.ids[2]))["id"] == site.ids[2]


def test_a_version_with_a_missing_file_is_refused_in_one_line(tmp_path, capsys):
    """A published version whose shard or metadata file is gone: opening it, reloading to it and the search
    command name the version and the file (IndexDirError, one line), and a Searcher that reloads keeps
    answering on the version it had."""
    from lakelens import index as ix
    from lakelens.errors import IndexDirError

    first = webindex.build(tmp_path / "a", n=6)
    s = Searcher.open(first.index)
    want = list(s.search_text("a red circle", k=3)["id"])
    for name in ("shard-0001.faiss", "meta-0000.arrow"):
        second = webindex.publish(first.index, webindex.make_images(tmp_path / name, 6, seed=12))
        (first.index / second.version / name).unlink()
        with pytest.raises(IndexDirError, match=f"{second.version}.*{name}"):
            s.reload()
        assert s.version == first.version and list(s.search_text("a red circle", k=3)["id"]) == want
        with pytest.raises(IndexDirError, match=name):
            Searcher.open(first.index)
        assert main(["search", "--index", str(first.index), "a red circle"]) == 2
        err = capsys.readouterr().err
        assert name in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        (first.index / ix.CURRENT).write_text(first.version)


def test_duplicate_groups_pages_refuse_a_negative_offset_or_a_limit_below_one(site):
    """The listing's page arguments are checked as a search's are: a bad one is a QueryError, not an empty
    page that reads as "no more groups"."""
    write_groups(site, sizes=(2, 3))
    try:
        s = Searcher.open(site.index)
        whole = s.duplicate_groups(0, 100)
        pages = [s.duplicate_groups(o, 4)["groups"] for o in range(0, whole["total"] + 4, 4)]
        assert sum(pages, []) == whole["groups"] and not pages[-1]  # past the end: an empty page
        for offset, limit in [(-1, 5), (0, 0), (5, -1), (1.5, 5), (0, True)]:
            with pytest.raises(QueryError, match="offset|limit"):
                s.duplicate_groups(offset, limit)
    finally:
        (site.index / "duplicates.arrow").unlink()
