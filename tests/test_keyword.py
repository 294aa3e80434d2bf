"""The keyword side without Spark: path words, query syntax, reciprocal rank fusion against a hand-computed
case, the tantivy index's incremental update next to the version it came from, and the Searcher's modes
and filters on a real index version (build_local with keyword documents)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lakelens import index as ix
from lakelens.errors import QueryError
from lakelens.index.keyword import KeywordIndex, TagRow, TagStore, build_keywords, path_words, split_word
from lakelens.search import Searcher
from lakelens.search.fusion import rrf
from lakelens.search.query import parse_query


def test_path_words_split_folders_separators_digits_and_camel_case():
    assert path_words("s3a://bucket/2024/HolidayPics/IMG_1234-beachDay.JPG") == [
        "bucket", "2024", "holiday", "pics", "img", "1234", "beach", "day", "jpg"]
    assert split_word("HTMLParser") == ["HTML", "Parser"]
    assert path_words("file:/fotos/praçaDoComércio/verão2023.png") == [
        "fotos", "praça", "do", "comércio", "verão", "2023", "png"]


def test_query_syntax():
    q = parse_query('a red "Bicycle leaning" tag:dog -tag:"Traffic  Light" path:2024/ -path:tmp foo:bar beach + sunset '
                    "- sad people")
    assert q.tags == ["dog"] and q.not_tags == ["traffic light"]
    assert q.paths == ["2024/"] and q.not_paths == ["tmp"]
    assert q.phrases == [["bicycle", "leaning"]]
    assert q.text == "a red Bicycle leaning foo:bar beach + sunset - sad people"  # the vector side's text
    assert q.free == ["a", "red", "foo", "bar", "beach", "sunset"]  # "sad people" is subtracted, not a keyword
    assert parse_query("tag:cat", tags=["Dog"]).tags == ["dog", "cat"]
    minus = parse_query('circle - "red circle" + "blue square"')  # a subtracted phrase is no required one
    assert minus.phrases == [["blue", "square"]] and minus.not_phrases == [["red", "circle"]]
    assert minus.free == ["circle"] and minus.text == "circle - red circle + blue square"
    assert not parse_query("tag:cat").has_text and parse_query("tag:cat").has_filters
    for bad, why in [('"open', "unbalanced quote"), ("tag:", "needs a value"), ("tag:dog -tag:dog", "both")]:
        with pytest.raises(QueryError, match=why):
            parse_query(bad)


def test_rrf_hand_computed():
    # vector list 10, 20, 30; keyword list 30, 40, 10 (k = 60):
    # 10: 1/61 + 1/63; 20: 1/62; 30: 1/63 + 1/61; 40: 1/62 -> 10 and 30 tie (10 first seen), then 20, 40
    ids, scores = rrf([np.array([10, 20, 30]), np.array([30, 40, 10])], k=60)
    assert ids.tolist() == [10, 30, 20, 40]
    assert scores == pytest.approx([1 / 61 + 1 / 63, 1 / 63 + 1 / 61, 1 / 62, 1 / 62])


def docs_for(ids, paths, tag_of, caption_of):
    return [(int(i), p, [TagRow(tag_of(j), 0.2 + 0.001 * j, "zero-shot")], [(caption_of(j), 0.3)])
            for j, (i, p) in enumerate(zip(ids, paths))]


def test_incremental_keyword_update_leaves_the_old_version_intact(tmp_path):
    old, new = tmp_path / "v1", tmp_path / "v2"
    old.mkdir()
    new.mkdir()
    docs = [(1, "/x/dog_park.jpg", [TagRow("dog", 0.3, "zero-shot")], [("a brown dog on grass", 0.2)]),
            (2, "/x/cat.jpg", [TagRow("cat", 0.31, "zero-shot"), TagRow("dog", 0.1, "zero-shot")], []),
            (3, "/x/beachDay.jpg", [], [("red bicycle leaning on a wall", 0.25)])]
    info = build_keywords(old, docs)
    assert info["documents"] == 3 and info["build"] == "full"
    for f in old.iterdir():
        if f.is_file():
            os.link(f, new / f.name)
    info = build_keywords(new, [(2, "/x/cat.jpg", [TagRow("cat", 0.4, "zero-shot")], [])], base=old,
                          delete_ids=np.array([2, 3]))
    assert (info["documents"], info["added"], info["deleted"], info["build"]) == (2, 1, 2, "incremental")
    before, after = KeywordIndex(old), KeywordIndex(new)
    assert sorted(before.search([], [], ["dog"], [], 10)[1]) == [1, 2]  # the live version is untouched
    assert sorted(after.search([], [], ["dog"], [], 10)[1]) == [1]
    assert after.search([], [["red", "bicycle"]], [], [], 10)[1].tolist() == []
    assert before.search([], [["red", "bicycle"]], [], [], 10)[1].tolist() == [3]
    assert before.search([], [["bicycle", "red"]], [], [], 10)[1].tolist() == []  # a phrase keeps its order
    assert TagStore(new).counts() == [{"tag": "cat", "count": 1}, {"tag": "dog", "count": 1}]
    assert TagStore(new).captions_of([1, 2, 3]) == ["a brown dog on grass", None, None]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """200 random vectors; ids with j % 3 == 0 are tagged dog (else cat), captions name the tag and j,
    odd j live under 2024/."""
    rng = np.random.default_rng(0)
    n, dim = 200, 16
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids = np.arange(1000, 1000 + n)
    kind = ["dog" if j % 3 == 0 else "cat" for j in range(n)]
    paths = [f"/data/{2024 if j % 2 else 2023}/img{j}_{kind[j]}.jpg" for j in range(n)]
    docs = docs_for(ids, paths, lambda j: kind[j], lambda j: f"a photo of a {kind[j]} number {j}")
    folder = tmp_path_factory.mktemp("kw") / "index"
    ix.build_local(folder, ids, v, paths, ix.Choice("Flat", "test", False), shards=2, keywords=docs)
    return Searcher.open(folder), v, ids, kind, paths


def test_searcher_filters_and_browse(tagged):
    s, v, ids, kind, paths = tagged
    assert s.default_mode == "vector" and s.has_keywords
    dogs_2024 = {int(ids[j]) for j in range(len(ids)) if kind[j] == "dog" and "2024/" in paths[j]}
    browsed = s.search(text="tag:dog path:2024/", k=100)
    assert set(browsed["id"]) == dogs_2024
    assert list(browsed["score"]) == sorted(browsed["score"], reverse=True)  # best tag score first
    assert all(t == ["dog"] for t in browsed["tags"])
    vec = s.search_vector(v[3], k=5, allowed=np.array(sorted(dogs_2024)))
    exact = sorted(dogs_2024, key=lambda i: -float(v[i - 1000] @ v[3]))[:5]
    assert vec["id"].tolist() == exact
    no_cats = s.search(text="-tag:cat", k=100)
    assert set(no_cats["id"]) == {int(ids[j]) for j in range(len(ids)) if kind[j] == "dog"}


def test_searcher_keyword_and_hybrid_modes(tagged):
    s, v, ids, kind, paths = tagged
    kw = s._query(s._state, parse_query('"number 33"'), None, "keyword", 5)
    assert kw["id"].tolist() == [1033] and kw["caption"][0] == "a photo of a dog number 33"
    # hybrid = RRF of the vector list and the keyword list; the first 50 results from lists 100 deep
    hyb = s._query(s._state, parse_query("dog"), v[3], "hybrid", 10)
    vec_ids = s.search_vector(v[3], k=100)["id"].to_numpy()
    kw_ids = s._query(s._state, parse_query("dog"), None, "keyword", 100)["id"].to_numpy()
    expect, _ = rrf([vec_ids, kw_ids])
    assert hyb["id"].tolist() == expect[:10].tolist()
    assert hyb["vector_rank"][0] == 1  # the image's own vector
    with pytest.raises(QueryError, match="mode must be"):
        s.search_text("dog", mode="fuzzy")
    counts = s.tag_counts(text="path:2024/")
    assert counts["scope"] == "filtered" and counts["images"] == 100
    assert {c["tag"]: c["count"] for c in counts["tags"]} == {
        t: sum(1 for j in range(len(ids)) if kind[j] == t and "2024/" in paths[j]) for t in ("dog", "cat")}
    d = s.details(1003)
    assert d["tags"][0]["tag"] == "dog" and d["caption"] == "a photo of a dog number 3"


def test_a_subtracted_phrase_excludes_the_images_that_hold_it(tagged):
    s, v, ids, kind, paths = tagged
    cats = [int(i) for i, t in zip(ids, kind) if t == "cat"]
    kw = s.search_text('photo - "a dog"', k=200, mode="keyword")
    assert sorted(kw["id"]) == cats  # every photo but the dogs' ("a photo of a dog number 3")
    assert [r for r in kw["rank"]] == list(range(1, len(cats) + 1))
    # hybrid: the vector side's list holds dogs too, and they go as well
    hyb = s._query(s._state, parse_query('photo - "a dog"'), v[3], "hybrid", 120)
    assert len(hyb) == 120 and set(hyb["id"]) <= set(cats) and list(hyb["rank"]) == list(range(1, 121))
    pages = [s._query(s._state, parse_query('photo - "a dog"'), v[3], "hybrid", 30, offset=o) for o in range(0, 120, 30)]
    assert [i for p in pages for i in p["id"]] == list(hyb["id"])
    one = s.search_text('number - "dog number 3" - "cat number 4"', k=200, mode="keyword")
    assert set(ids) - set(one["id"]) == {1003, 1004}


def test_version_without_keywords_says_how_to_build_them(tmp_path):
    v = np.eye(4, dtype=np.float32)
    ix.build_local(tmp_path / "i", np.arange(4), v, [f"/p/{i}.jpg" for i in range(4)], ix.Choice("Flat", "t", False))
    s = Searcher.open(tmp_path / "i")
    assert s.default_mode == "vector"
    with pytest.raises(QueryError, match="lakelens index --tags"):
        s.search(text="tag:dog")
    assert "tags" not in s.search_vector(v[0], k=2).columns


def test_cli_search_modes_tags_and_json_rows(tagged, capsys):
    import json

    from lakelens.cli import main

    s = tagged[0]
    assert main(["search", "--index", str(s.index_dir), "--tag", "dog", "--tag=-cat", "--json", "-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "vector" and len(out["results"]) == 3
    assert all(r["tags"] == ["dog"] and r["caption"].startswith("a photo of a dog") for r in out["results"])
    assert main(["search", "--index", str(s.index_dir), '"number 12"', "--mode", "keyword"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith('img12_dog.jpg  [dog]  "a photo of a dog number 12"')
    assert main(["search", "--index", str(s.index_dir), "tag:", "--mode", "keyword"]) == 2
    assert "tag: needs a value" in capsys.readouterr().err
