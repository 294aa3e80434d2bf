"""The JSON API and thumbnails over HTTP against the real server (waitress, loopback) on an index of real images."""

from __future__ import annotations

import http.client
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import requests
import webindex
from PIL import Image

LIMIT = 200_000  # a small upload limit, so over-limit uploads stay small


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = webindex.build(root)
    secret = root / "secret.txt"  # a file outside the index that must never come back
    secret.write_text("root:x:0:0:SECRET-CONTENT")
    data.secret = secret
    server = webindex.ThreadServer(data.index, max_upload_bytes=LIMIT)
    data.base, data.server, data.port = server.base, server, server.server.effective_port
    yield data
    server.close()


def get(site, path: str, **params):
    return requests.get(site.base + path, params=params, timeout=60)


def raw_get(site, path: str):
    """The path exactly as given: requests (urllib3) would normalise ../ segments before sending."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=60)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, resp.getheader("Content-Type"), body


def reason(resp, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert body["error"] == status and body["reason"]
    return body["reason"]


def test_health_reports_version_model_and_count(site):
    h = get(site, "/api/health").json()
    assert (h["status"], h["index_version"], h["count"]) == ("ok", "v0001", 43)
    assert h["model"] == {"name": "lakelens-tiny", "weights": "none", "digest": None}
    assert (h["dim"], h["factory"], h["shards"], h["reload_error"]) == (128, "Flat", 2, None)


def test_text_search_rows_are_ranked_and_their_thumbnails_load(site):
    body = get(site, "/api/search", q="a red circle", k=7).json()
    assert (body["index_version"], body["model"]["name"], body["notes"]) == ("v0001", "lakelens-tiny", [])
    assert body["query"] == {"text": "a red circle", "k": 7, "min_score": None, "path_prefix": None, "offset": 0,
                             "mode": "vector", "tags": [], "not_tags": []}  # no keyword index: vector by default
    rows = body["results"]
    assert all(r["tags"] == [] and r["caption"] is None and "vector_rank" not in r for r in rows)
    assert not any("box" in r for r in rows)  # a version without regions (integration/test_web_regions.py)
    assert [r["rank"] for r in rows] == list(range(1, 8))
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    by_id = {str(i): u for i, u in zip(site.ids, site.uris)}
    assert all(by_id[r["id"]] == r["path"] for r in rows)  # ids travel as strings: 64-bit exact
    for r in rows[:3]:
        t = requests.get(site.base + r["thumb"], timeout=60)
        assert t.status_code == 200 and t.headers["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(t.content)).size == (96, 96)  # small images keep their size


def test_filters_k_min_score_and_prefix(site):
    img_dir = str(Path(site.paths[0]).parent)
    prefix = f"file:{img_dir}/img00001"  # img000010 .. img000019
    rows = get(site, "/api/search", q="a shape", k=50, prefix=prefix).json()["results"]
    assert sorted(r["path"] for r in rows) == sorted(u for u in site.uris if u.startswith(prefix))
    assert len(rows) == 10
    all_rows = get(site, "/api/search", q="a shape", k=50).json()["results"]
    assert all_rows[5]["score"] > all_rows[6]["score"]
    cut = (all_rows[5]["score"] + all_rows[6]["score"]) / 2  # between two rows: rounding cannot matter
    kept = get(site, "/api/search", q="a shape", k=50, min_score=cut).json()["results"]
    assert [r["id"] for r in kept] == [r["id"] for r in all_rows[:6]]
    assert get(site, "/api/search", q="a shape", k=5, min_score=0.99).json()["results"] == []


def test_similar_puts_the_image_itself_first(site):
    for i in (0, 17, 42):
        rows = get(site, f"/api/similar/{int(site.ids[i])}", k=3).json()["results"]
        assert rows[0]["id"] == str(int(site.ids[i])) and rows[0]["path"] == site.uris[i]
        assert rows[0]["score"] == pytest.approx(1.0, abs=1e-5) and rows[1]["score"] < rows[0]["score"]


def test_image_upload_finds_the_same_image_first(site):
    with open(site.paths[9], "rb") as f:
        r = requests.post(site.base + "/api/search/image", files={"image": ("q.jpg", f)}, data={"k": "4"},
                          timeout=60)
    body = r.json()
    assert r.status_code == 200 and body["query"]["image"] == "q.jpg" and len(body["results"]) == 4
    assert body["results"][0]["id"] == str(int(site.ids[9]))
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    post = lambda **kw: requests.post(site.base + "/api/search/image", timeout=60, **kw)  # noqa: E731
    assert "unusable query image: not an image" in reason(post(files={"image": ("x.png", b"not an image")}), 400)
    assert "field named 'image'" in reason(post(files={"photo": ("x.png", b"x")}), 400)


def test_uploads_over_the_limit_are_refused_with_413(site):
    post = lambda data: requests.post(site.base + "/api/search/image",  # noqa: E731
                                      files={"image": ("big.png", data)}, timeout=60)
    assert "200000 byte limit" in reason(post(b"\0" * (LIMIT + 1)), 413)  # the API's own check of the file
    # a whole request over the largest legitimate body (an upload in the page's base64 form) is refused
    # by waitress before it is buffered: its cap is Flask's, not a multiple of it
    cap = site.server.app.server.config["MAX_CONTENT_LENGTH"]
    assert site.server.server.adj.max_request_body_size == cap < LIMIT * 2
    whole = post(b"\0" * (LIMIT * 10))
    assert whole.status_code == 413 and "Too Large" in whole.text
    with open(site.paths[9], "rb") as f:
        assert post(f.read()).status_code == 200  # the server still answers after refusing


@pytest.mark.parametrize("params, words", [
    ({"q": "x", "k": "abc"}, "k must be an integer"), ({"q": "x", "k": "0"}, "between 1 and 1000"),
    ({"q": "x", "k": "100000"}, "between 1 and 1000"), ({"q": "x", "k": "2.5"}, "k must be"),
    ({"q": ""}, "empty query"), ({"q": "  \t"}, "empty query"), ({}, "empty query"),
    ({"q": "x", "min_score": "abc"}, "min_score"), ({"q": "x", "min_score": "nan"}, "min_score"),
    ({"q": "x", "min_score": "2"}, "min_score"), ({"q": "x" * 2001}, "longer than 2000"),
    ({"q": "x", "mode": "fast"}, "mode must be one of vector, keyword, hybrid"), ({"q": "x", "tag": "-"}, "tag must name"),
    ({"q": "x", "tag": ["a"] * 33}, "at most 32 tag"), ({"q": "x", "mode": "keyword"}, "has none: build it with"),
    ({"tag": "red"}, "has none: build it with"),
])
def test_malformed_parameters_are_400_with_a_reason(site, params, words):
    assert words in reason(get(site, "/api/search", **params), 400)


def test_unknown_and_malformed_ids(site):
    unknown = next(i for i in range(1, 1000) if i not in set(site.ids.tolist()))
    assert "not in index v0001" in reason(get(site, f"/api/similar/{unknown}"), 404)
    assert "not in index v0001" in reason(get(site, f"/thumb/{unknown}"), 404)
    for bad in ("abc", "1.5", "0x10", "99999999999999999999", "-"):
        assert "64-bit integer" in reason(get(site, f"/thumb/{bad}"), 400)
        assert "64-bit integer" in reason(get(site, f"/api/similar/{bad}"), 400)
    assert "no such API endpoint" in reason(get(site, "/api/nothing"), 404)


def test_nothing_outside_the_indexed_images_can_be_read(site):
    secret, indexed = str(site.secret), site.paths[3]
    for path in ["/thumb/../../etc/passwd", "/thumb/..%2f..%2fetc%2fpasswd", "/thumb/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
                 "/thumb//etc/passwd", "/thumb/%2Fetc%2Fpasswd", "/thumb/file:%2Fetc%2Fpasswd",
                 f"/thumb/{secret}", f"/thumb/file:{secret}", f"/thumb/{indexed}", "/thumb/1/../2",
                 "/api/similar/../../etc/passwd", f"/api/similar/{secret}", "/thumb/%00", "/thumb/1%0a"]:
        status, ctype, body = raw_get(site, path)
        assert status in (400, 404), (path, status)
        assert ctype.startswith("application/json") and b'"reason"' in body, path
        assert b"root:" not in body and b"SECRET" not in body and b"JFIF" not in body, path


def test_thumbnails_are_resized_cached_and_served_for_plain_paths_too(site):
    big_id, _ = site.by_name["big.png"]
    thumbs = site.server.app.thumbs
    hits_before = thumbs.hits
    first = get(site, f"/thumb/{big_id}")
    assert Image.open(io.BytesIO(first.content)).size == (256, 256)  # 600 px drawn, 256 px max side served
    again = get(site, f"/thumb/{big_id}")
    assert again.content == first.content and thumbs.hits == hits_before + 1
    plain_id = int(site.ids[1])
    assert not site.uris[1].startswith("file:")  # stored as a plain path by webindex.build
    assert Image.open(io.BytesIO(get(site, f"/thumb/{plain_id}").content)).size == (96, 96)


def test_names_with_markup_come_back_verbatim_as_json(site):
    img_dir = str(Path(site.paths[0]).parent)
    for name in webindex.HOSTILE:
        r = get(site, "/api/search", q="x", prefix=f"file:{img_dir}/{name}")
        assert r.headers["Content-Type"].startswith("application/json")
        assert [row["path"] for row in r.json()["results"]] == [f"file:{img_dir}/{name}"]


def test_a_newly_published_version_is_served_without_restart(tmp_path):
    paths = webindex.make_images(tmp_path, n=12)
    first = webindex.publish(tmp_path / "index", paths[:6])
    server = webindex.ThreadServer(first.index)
    try:
        h = requests.get(server.base + "/api/health", timeout=60).json()
        assert (h["index_version"], h["count"]) == ("v0001", 6)
        new_id = int(webindex.publish(tmp_path / "index", paths).ids[10])
        h = requests.get(server.base + "/api/health", timeout=60).json()
        assert (h["index_version"], h["count"], h["reload_error"]) == ("v0002", len(paths), None)
        assert requests.get(f"{server.base}/thumb/{new_id}", timeout=60).status_code == 200
        rows = requests.get(f"{server.base}/api/similar/{new_id}", params={"k": 1}, timeout=60).json()
        assert rows["index_version"] == "v0002" and rows["results"][0]["id"] == str(new_id)
    finally:
        server.close()


def test_the_page_and_its_live_layout_are_served(site):
    page = get(site, "/")
    assert page.status_code == 200 and "<title>lakelens</title>" in page.text
    layout = get(site, "/_dash-layout")
    assert layout.status_code == 200
    assert "index v0001 · 43 images · model lakelens-tiny" in json.dumps(layout.json(), ensure_ascii=False)


def test_serve_command_refuses_a_missing_index_and_bad_settings(tmp_path, capsys):
    from lakelens.cli import main

    assert main(["serve", "--index", str(tmp_path / "none")]) == 2
    assert "index folder not found" in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path), "--threads", "0"]) == 2
    assert "--threads >= 1" in capsys.readouterr().err


def test_pages_arithmetic_and_text_with_image(site):
    """offset pages join up to one list; q may add and subtract terms; an upload may carry a text and
    weights; bad values are 400s that name the parameter."""
    whole = get(site, "/api/search", q="a red circle + on the left", k=9).json()
    assert any("query arithmetic" in n for n in whole["notes"])
    pages = [get(site, "/api/search", q="a red circle + on the left", k=3, offset=o).json() for o in (0, 3, 6)]
    assert [r["id"] for p in pages for r in p["results"]] == [r["id"] for r in whole["results"]]
    assert [r["rank"] for r in pages[2]["results"]] == [7, 8, 9] and pages[1]["query"]["offset"] == 3
    with open(site.paths[9], "rb") as f:
        data = f.read()
    post = lambda **form: requests.post(site.base + "/api/search/image", files={"image": ("q.jpg", data)},  # noqa: E731
                                        data=form, timeout=60)
    image_only = post(k="3").json()
    leaning = post(k="3", q="a blue square", weights="0.05,0.95").json()  # mostly the image: it stays first
    assert leaning["results"][0]["id"] == image_only["results"][0]["id"] == str(int(site.ids[9]))
    assert leaning["query"]["text"] == "a blue square" and leaning["query"]["weights"] == [0.05, 0.95]
    assert leaning["results"][0]["score"] < image_only["results"][0]["score"]  # the text moved the query
    assert "weights" in reason(post(q="x", weights="1,-1"), 400)
    assert "weights" in reason(post(q="x", weights="a,b"), 400)
    assert "offset" in reason(get(site, "/api/search", q="x", offset="-1"), 400)
    assert "offset" in reason(get(site, "/api/search", q="x", offset="9001"), 400)
    assert "cancel out" in reason(get(site, "/api/search", q="cat - cat"), 400)


def test_a_blank_text_beside_an_image_is_the_image_alone(site):
    with open(site.paths[9], "rb") as f:
        data = f.read()
    post = lambda **form: requests.post(site.base + "/api/search/image", files={"image": ("q.jpg", data)},  # noqa: E731
                                        data=form, timeout=60)
    alone = post(k="3").json()
    for form in [{"q": "  "}, {"q": ""}, {"q": " \t", "weights": "0.5,0.5"}]:
        blank = post(k="3", **form)
        assert blank.status_code == 200, (form, blank.text)
        assert blank.json()["results"] == alone["results"] and blank.json()["query"] == alone["query"]
    assert alone["results"][0]["id"] == str(int(site.ids[9])) and "text" not in alone["query"]


def test_duplicates_api_page_and_collapsed_results(site):
    """Groups written beside the index (as `lakelens dedup --index` writes them) are listed by the API and
    the page, largest first, and collapse search results to one per group."""
    import pyarrow as pa

    from lakelens.dedup.job import write_groups_arrow
    from lakelens.index.layout import GROUPS_FILE

    assert "lakelens dedup" in reason(get(site, "/api/duplicates"), 400)
    hostile = next(i for i, u in enumerate(site.uris) if "__xss=2" in u)  # a name with markup in it
    ids = [int(site.ids[i]) for i in (0, 1, 2, 5, hostile)]
    groups = pa.table({"group": [ids[0]] * 3 + [ids[3]] * 2, "id": ids,
                       "path": [site.uris[i] for i in (0, 1, 2, 5, hostile)],
                       "similarity": pa.array([1.0, 0.99, 0.98, 1.0, 0.975], pa.float32()),
                       "representative": [True, False, False, True, False]})
    write_groups_arrow(groups, site.index, site.version, 0)
    try:
        listed = get(site, "/api/duplicates").json()
        assert listed["total"] == 2 and listed["notes"] == []
        assert [g["size"] for g in listed["groups"]] == [3, 2] and listed["groups"][0]["group"] == str(ids[0])
        first = listed["groups"][0]["members"]
        assert [m["id"] for m in first] == [str(i) for i in ids[:3]] and first[0]["representative"]
        assert get(site, first[1]["thumb"]).headers["Content-Type"] == "image/jpeg"
        assert get(site, "/api/duplicates", offset=1, limit=1).json()["groups"][0]["size"] == 2
        assert "limit" in reason(get(site, "/api/duplicates", limit=0), 400)

        plain = get(site, f"/api/similar/{ids[1]}", k=20).json()["results"]
        collapsed = get(site, f"/api/similar/{ids[1]}", k=5, collapse_duplicates="true").json()["results"]
        group_of = {str(i): str(g) for i, g in zip(ids, groups.column("group").to_pylist())}
        seen, expected = set(), []
        for r in plain:  # the first hit of each group stands for it
            key = group_of.get(r["id"], r["id"])
            if key not in seen:
                seen.add(key)
                expected.append(r["id"])
        assert [r["id"] for r in collapsed] == expected[:5] and [r["rank"] for r in collapsed] == [1, 2, 3, 4, 5]
        assert collapsed[0]["id"] == str(ids[1]) and collapsed[0]["duplicates"] == 2
        assert "collapse_duplicates" in reason(get(site, "/api/search", q="x", collapse_duplicates="maybe"), 400)

        page = get(site, "/duplicates")
        assert page.status_code == 200 and page.text.count("class='group'") == 2
        assert "<script>window.__xss" not in page.text and "&lt;script&gt;window.__xss=2" in page.text
    finally:
        (site.index / GROUPS_FILE).unlink()


# --- an index with tags and captions (webindex.keyword_docs) ------------------------------------------
@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    data = webindex.build(tmp_path_factory.mktemp("tagged"), keywords=True)
    server = webindex.ThreadServer(data.index)
    data.base = server.base
    data.tags_of = {str(id_): [t.tag for t in sorted(tags, key=lambda t: -t.score)] for id_, _, tags, _ in data.docs}
    data.caption_of = {str(id_): caps[0][0] for id_, _, _, caps in data.docs}
    yield data
    server.close()


def test_modes_and_tag_filters_rows_carry_tags_captions_and_ranks(tagged):
    assert get(tagged, "/api/search", q="red circle", k=5).json()["query"]["mode"] == "vector"  # the default
    r = get(tagged, "/api/search", q="red circle", k=20, mode="hybrid")
    assert r.status_code == 200 and "NaN" not in r.text
    body = r.json()
    rows = body["results"]
    for row in rows:
        assert row["tags"] == tagged.tags_of[row["id"]] and row["caption"] == tagged.caption_of[row["id"]]
        ranks = [row["vector_rank"], row["keyword_rank"]]
        assert all(x is None or (isinstance(x, int) and x >= 1) for x in ranks) and ranks != [None, None]
    assert any(row["keyword_rank"] is None
               for row in get(tagged, "/api/search", q="red circle", k=43, mode="hybrid").json()["results"])
    vector = get(tagged, "/api/search", q="red circle", k=5, mode="VECTOR").json()
    assert vector["query"]["mode"] == "vector" and all("keyword_rank" not in row for row in vector["results"])
    keyword = get(tagged, "/api/search", q="triangle", k=43, mode="keyword").json()["results"]
    assert {row["id"] for row in keyword} == {i for i, t in tagged.tags_of.items() if "triangle" in t}

    # tag=red&tag=-circle (no q): every red image that is not a circle, and only those
    wanted = {i for i, t in tagged.tags_of.items() if "red" in t and "circle" not in t}
    browsed = get(tagged, "/api/search", tag=["red", "-circle"], k=50).json()
    assert (browsed["query"]["tags"], browsed["query"]["not_tags"], browsed["query"]["text"]) == (["red"], ["circle"], None)
    assert {row["id"] for row in browsed["results"]} == wanted and wanted
    assert {row["id"] for row in get(tagged, "/api/search", q="tag:red -tag:circle", k=50).json()["results"]} == wanted
    both = get(tagged, "/api/search", q="a shape", tag="red", k=50).json()["results"]
    assert {row["id"] for row in both} == {i for i, t in tagged.tags_of.items() if "red" in t}
    with open(tagged.paths[9], "rb") as f:  # an image query narrowed by tags: form fields, as on /api/search
        up = requests.post(tagged.base + "/api/search/image", files={"image": ("q.jpg", f)},
                           data={"tag": ["red", "-circle"], "k": "50", "mode": "hybrid"}, timeout=60).json()
    assert {row["id"] for row in up["results"]} == wanted and up["query"]["mode"] == "hybrid"
    similar = get(tagged, f"/api/similar/{tagged.ids[5]}", k=3).json()["results"]  # by id: tags and captions too
    assert all(row["tags"] == tagged.tags_of[row["id"]] and row["caption"] for row in similar)
    assert "both asked for and excluded" in reason(get(tagged, "/api/search", tag=["red", "-red"]), 400)


def test_tag_counts_are_the_documents_counts(tagged):
    every = Counter(t for tags in tagged.tags_of.values() for t in tags)
    found = get(tagged, "/api/tags", limit=500).json()
    assert (found["index_version"], found["scope"], found["images"]) == ("v0001", "all", 43)
    assert {c["tag"]: c["count"] for c in found["tags"]} == every
    assert [c["count"] for c in found["tags"]] == sorted(every.values(), reverse=True)
    assert webindex.HOSTILE_TAG in every  # tags come back verbatim, as JSON text

    red = [t for t in tagged.tags_of.values() if "red" in t and "small" not in t]
    filtered = get(tagged, "/api/tags", tag=["red", "-small"], limit=500).json()
    assert (filtered["scope"], filtered["images"]) == ("filtered", len(red))
    assert {c["tag"]: c["count"] for c in filtered["tags"]} == Counter(t for tags in red for t in tags)

    results = get(tagged, "/api/search", q="star", mode="keyword", k=1000).json()["results"]
    scoped = get(tagged, "/api/tags", q="star", mode="keyword", limit=500).json()
    assert (scoped["scope"], scoped["images"]) == ("results", len(results))
    assert {c["tag"]: c["count"] for c in scoped["tags"]} == Counter(t for row in results for t in row["tags"])
    assert len(get(tagged, "/api/tags", limit=3).json()["tags"]) == 3
    assert "limit" in reason(get(tagged, "/api/tags", limit=0), 400)
    assert "mode must be" in reason(get(tagged, "/api/tags", q="x", mode="nope"), 400)


def test_tags_need_a_keyword_index(site):
    assert "has none: build it with lakelens index --tags" in reason(get(site, "/api/tags"), 400)


def test_image_details_and_large_view(tagged):
    hostile = next(i for i, u in zip(tagged.ids, tagged.uris) if u.endswith(webindex.HOSTILE[0]))
    d = get(tagged, f"/api/image/{hostile}").json()
    assert (d["id"], d["index_version"], d["width"], d["height"]) == (str(hostile), "v0001", 96, 96)
    assert d["path"].endswith(webindex.HOSTILE[0]) and d["caption"] == webindex.HOSTILE_CAPTION
    doc = next(tags for id_, _, tags, _ in tagged.docs if id_ == hostile)
    assert d["tags"] == [{"tag": t.tag, "score": round(t.score, 4)} for t in sorted(doc, key=lambda t: -t.score)]
    big_id, _ = tagged.by_name["big.png"]
    big = get(tagged, f"/api/image/{big_id}").json()
    assert (big["width"], big["height"]) == (600, 600)
    assert Image.open(io.BytesIO(get(tagged, big["large"]).content)).size == (600, 600)  # up to 1024 px a side
    assert Image.open(io.BytesIO(get(tagged, big["thumb"]).content)).size == (256, 256)
    assert "size must be large" in reason(get(tagged, f"/thumb/{big_id}", size="huge"), 400)
    unknown = next(i for i in range(1, 1000) if i not in set(tagged.ids.tolist()))
    assert "not in index v0001" in reason(get(tagged, f"/api/image/{unknown}"), 404)
    assert "64-bit integer" in reason(get(tagged, "/api/image/12abc"), 400)
