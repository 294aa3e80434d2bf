"""Richer queries on a real index of synth images (tiny random-init model, exact Flat shards): query
arithmetic, a text and an image together with weights, pages (offset); checked against vectors
computed here by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webindex

from lakelens import QueryError, Searcher
from lakelens.cli import main
from lakelens.search.searcher import parse_terms


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
