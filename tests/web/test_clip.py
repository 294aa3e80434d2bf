"""clip-retrieval's back-end API (/knn-service, /indices-list, /metadata) on the real server (waitress,
loopback) over small indexes of real images, queried with clip-retrieval's own ClipClient from its wheel;
compared with what `lakelens search` prints for the same queries."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import clipret
import numpy as np
import pytest
import requests
import webindex
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "clip-test-token"
FRONT_END_KEYS = {"use_mclip": False, "deduplicate": True, "use_safety_model": True, "use_violence_detector": True,
                  "aesthetic_score": "", "aesthetic_weight": "0.5", "modality": "image"}


@pytest.fixture(scope="module")
def clip_client():
    return clipret.client_module(clipret.wheel())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The page's index ("index", 43 distinct images) and a second one served to clip clients only ("dups":
    five of those images and two byte-identical copies of the first)."""
    root = tmp_path_factory.mktemp("clip")
    data = webindex.build(root)
    copies = []
    for name in ("copy-a.png", "copy-b.png"):
        copies.append(str(root / "img" / name))
        shutil.copy(data.paths[0], copies[-1])
    data.dups = webindex.publish(root / "dups", data.paths[:5] + copies)
    data.live = webindex.publish(root / "live", data.paths[:10])  # republished by a test
    server = webindex.ThreadServer(data.index, clip_indices=(("dups", str(root / "dups")), ("live", str(root / "live"))))
    data.base, data.server = server.base, server
    yield data
    server.close()


def knn(site, body, base=None, **kw):
    return requests.post((base or site.base) + "/knn-service", data=json.dumps(body), timeout=60, **kw)


def reason(resp, status: int) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == status and body["reason"]
    return body["reason"]


def lakelens_search(index: Path, *args) -> list[dict]:
    """`lakelens search ... --json`: the command line's results, to compare with."""
    res = subprocess.run([sys.executable, "-m", "lakelens.cli", "search", "--index", str(index), "--json", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=os.environ)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["results"]


def same_results(got: list[dict], expected: list[dict]) -> None:
    assert [r["id"] for r in got] == [int(r["id"]) for r in expected]
    assert [r["similarity"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def folded(rows: list[dict], vector_of: dict) -> list[int]:
    """The ids clip_back keeps of a result list: of each set of results linked by cosine >= 0.94 (directly or
    through others), the best ranked (a union-find, written apart from the server's own folding)."""
    parent = list(range(len(rows)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = vector_of[rows[i]["id"]], vector_of[rows[j]["id"]]
            if float(a @ b) / float(np.linalg.norm(a) * np.linalg.norm(b)) >= 0.94:
                parent[max(root(i), root(j))] = min(root(i), root(j))
    return [r["id"] for i, r in enumerate(rows) if root(i) == i]


def test_clip_client_text_image_and_embedding_queries_give_lakelens_search_results(site, clip_client):
    client = clip_client.ClipClient(f"{site.base}/knn-service", "index", num_images=7, deduplicate=False)
    text = client.query(text="a red circle")
    same_results(text, lakelens_search(site.index, "a red circle", "-k", "7"))
    image = client.query(image=site.paths[9])  # ClipClient reads the file and sends it in base64
    same_results(image, lakelens_search(site.index, "--image", site.paths[9], "-k", "7"))
    assert image[0]["id"] == int(site.ids[9]) and image[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    from lakelens.search import Searcher

    vector = Searcher.open(site.index).embed_text("a red circle")[0]
    embedded = client.query(embedding_input=[float(x) for x in vector])
    assert [r["id"] for r in embedded] == [r["id"] for r in text]
    assert [r["similarity"] for r in embedded] == pytest.approx([r["similarity"] for r in text], abs=1e-5)

    by_id = {int(i): u for i, u in zip(site.ids, site.uris)}
    for row in text:
        assert set(row) == {"id", "similarity", "url", "image_path", "caption"}
        assert row["image_path"] == by_id[row["id"]] and row["caption"] == ""  # no tags or captions here
        assert row["url"].startswith(f"{site.base}/thumb/{row['id']}?v=v0001")  # absolute: a browser shows it
    shown = requests.get(text[0]["url"], timeout=60)
    assert shown.headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(shown.content)).size == (96, 96)


def test_the_keys_clip_back_reads_are_accepted_as_clients_send_them(site, clip_client):
    # ClipClient's defaults: deduplicate, the safety model, the violence detector, aesthetic score 9
    # (the tiny random-init model puts many different images this close: they are folded as clip_back would)
    rows = clip_client.ClipClient(f"{site.base}/knn-service", "index", num_images=12).query(text="a blue square")
    every = knn(site, {"text": "a blue square", "num_images": 12, "indice_name": "index"}).json()
    vector_of = {int(i): v for i, v in zip(site.ids, site.vectors)}
    assert [r["id"] for r in rows] == folded(every, vector_of) and all(r["url"] for r in rows)
    # the front end's body: text/plain, every input present (the unused ones null or "")
    body = {"text": "", "image": None, "image_url": None, "embedding_input": list(map(float, site.vectors[3])),
            "num_images": 3, "num_result_ids": 3, "indice_name": "index", **FRONT_END_KEYS}
    r = knn(site, body, headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert r.status_code == 200 and r.json()[0]["id"] == int(site.ids[3])
    assert requests.get(site.base + "/indices-list", timeout=60).json() == ["index", "dups", "live"]


def test_num_images_pages_and_metadata_fills_in_the_rest(site):
    body = {"text": "a shape", "num_images": 5, "num_result_ids": 20, "indice_name": "index"}
    rows = knn(site, body).json()
    whole = knn(site, {**body, "num_images": 20}).json()
    assert len(rows) == 20 and [r["id"] for r in rows] == [r["id"] for r in whole]
    assert all("url" in r for r in rows[:5]) and all(set(r) == {"id", "similarity"} for r in rows[5:])
    # the front end asks for the rest as the user scrolls, sending the ids back (big ones as strings)
    ids = [r["id"] for r in rows[5:12]]
    asked = [str(i) if n % 2 else i for n, i in enumerate(ids)] + [123]
    metas = requests.post(site.base + "/metadata", data=json.dumps({"ids": asked, "indice_name": "index"}),
                          timeout=60).json()
    assert [m["id"] for m in metas] == [*ids, 123] and metas[-1]["metadata"] is None  # 123 is no image here
    assert [m["metadata"] for m in metas[:-1]] == [{k: r[k] for k in ("url", "image_path", "caption")}
                                                   for r in whole[5:12]]
    assert requests.post(site.base + "/metadata", data='{"ids": []}', timeout=60).json() == []


def test_two_indices_deduplicate_and_groups(site):
    from lakelens.dedup.job import write_groups_arrow
    from lakelens.index.layout import GROUPS_FILE

    dups = site.dups
    query = {"embedding_input": list(map(float, dups.vectors[0])), "num_images": 7, "indice_name": "dups"}
    plain = knn(site, query).json()
    assert sorted(r["id"] for r in plain) == sorted(int(i) for i in dups.ids)  # only the second index's images
    assert sorted(r["id"] for r in plain[:3]) == sorted(int(i) for i in (dups.ids[0], dups.ids[5], dups.ids[6]))
    assert all(r["url"].startswith(f"{site.base}/clip/dups/thumb/") for r in plain)
    assert requests.get(plain[1]["url"], timeout=60).headers["Content-Type"] == "image/jpeg"
    # the copies have the first image's vector: folded into it, as clip_back folds them
    kept = [r["id"] for r in knn(site, {**query, "deduplicate": True}).json()]
    assert kept == folded(plain, {int(i): v for i, v in zip(dups.ids, dups.vectors)})
    assert plain[0]["id"] in kept and not {plain[1]["id"], plain[2]["id"]} & set(kept)
    # with groups from `lakelens dedup --index`, one per group
    import pyarrow as pa

    group = [int(dups.ids[1]), int(dups.ids[2])]
    write_groups_arrow(pa.table({"group": [group[0]] * 2, "id": group, "path": [dups.uris[1], dups.uris[2]],
                                 "similarity": pa.array([1.0, 0.9], pa.float32()),
                                 "representative": [True, False]}), dups.index, dups.version, 0)
    try:
        grouped = [r["id"] for r in knn(site, {**query, "deduplicate": True}).json()]
        first = min(plain.index(next(r for r in plain if r["id"] == g)) for g in group)
        expected = [r["id"] for i, r in enumerate(plain) if r["id"] not in group or i == first]
        assert grouped == expected
    finally:
        (dups.index / GROUPS_FILE).unlink()
    # a result's url sent back as image_url (the front end's "search by this image"): its stored vector
    again = knn(site, {"image_url": plain[4]["url"], "num_images": 3, "indice_name": "dups"}).json()
    assert again[0]["id"] == plain[4]["id"] and again[0]["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_bad_requests_are_400_with_a_reason(site):
    base = {"num_images": 3, "indice_name": "index"}
    assert "not valid base64" in reason(knn(site, {**base, "image": "not base64!"}), 400)
    assert "unusable query image" in reason(knn(site, {**base, "image": base64.b64encode(b"xx").decode()}), 400)
    assert "list of 128 numbers" in reason(knn(site, {**base, "embedding_input": [0.1] * 5}), 400)
    assert "list of 128 numbers" in reason(knn(site, {**base, "embedding_input": ["a"] * 128}), 400)
    assert "'photos'" in reason(knn(site, {**base, "text": "x", "indice_name": "photos"}), 400)
    assert "'index', 'dups', 'live'" in reason(knn(site, {**base, "text": "x", "indice_name": "photos"}), 400)
    assert "modality" in reason(knn(site, {**base, "text": "x", "modality": "text"}), 400)
    assert "give one of" in reason(knn(site, base), 400)
    assert "give one of" in reason(knn(site, {**base, "text": "  ", "image": None}), 400)
    assert "not text and image" in reason(knn(site, {**base, "text": "x", "image": "eA=="}), 400)
    assert "num_images" in reason(knn(site, {**base, "text": "x", "num_images": 0}), 400)
    assert "num_result_ids" in reason(knn(site, {**base, "text": "x", "num_result_ids": 10**6}), 400)
    assert "deduplicate" in reason(knn(site, {**base, "text": "x", "deduplicate": "maybe"}), 400)
    assert "fetches images from no host" in reason(knn(site, {**base, "image_url": "http://example.org/a.jpg"}), 400)
    assert "JSON object" in reason(requests.post(site.base + "/knn-service", data="text=x", timeout=60), 400)
    assert "JSON object" in reason(requests.post(site.base + "/knn-service", data="[1]", timeout=60), 400)
    assert "POST" in reason(requests.get(site.base + "/knn-service", timeout=60), 405)
    assert "ids" in reason(requests.post(site.base + "/metadata", data='{"ids": [1.5]}', timeout=60), 400)
    assert "ids" in reason(requests.post(site.base + "/metadata", data='{"ids": "1"}', timeout=60), 400)
    # numbers and nesting Python's json reads but no vector or query holds: reasons, not internal errors
    huge = "1" + "0" * 400
    assert "not finite" in reason(requests.post(site.base + "/knn-service", timeout=60, data=(
        '{"embedding_input": [' + ", ".join([huge] * 128) + "]}")), 400)
    for route in ("/knn-service", "/metadata"):
        assert "JSON" in reason(requests.post(site.base + route, data="[" * 100_000 + "]" * 100_000, timeout=60), 400)
    # a query that finds nothing is an empty list
    assert knn(site, {**base, "text": "path:nowhere/ a shape"}).json() == []


def test_image_url_is_fetched_only_from_allowed_hosts(site, tmp_path):
    folder = Path(site.paths[9]).parent

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(folder), **kw)

        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/away":
                self.send_response(302)
                self.send_header("Location", "http://localhost.localdomain/x.png")
                self.end_headers()
                return
            if self.path == "/ftp":  # an allowed host, another scheme
                self.send_response(302)
                self.send_header("Location", f"ftp://127.0.0.1:{self.server.server_address[1]}/x.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *a):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    server = webindex.ThreadServer(site.index, clip_fetch_hosts=("127.0.0.1",))
    try:
        url = f"http://127.0.0.1:{files.server_address[1]}/{Path(site.paths[9]).name}"
        rows = knn(site, {"image_url": url, "num_images": 3}, base=server.base).json()
        assert rows[0]["id"] == int(site.ids[9])
        assert "not a host" in reason(knn(site, {"image_url": url.replace("127.0.0.1", "localhost")},
                                          base=server.base), 400)
        assert "HTTP 404" in reason(knn(site, {"image_url": url + ".missing"}, base=server.base), 400)
        away = f"http://127.0.0.1:{files.server_address[1]}/away"
        assert "redirects to localhost.localdomain" in reason(knn(site, {"image_url": away}, base=server.base), 400)
        assert "http or https" in reason(knn(site, {"image_url": "file:///etc/passwd"}, base=server.base), 400)
        ftp = f"http://127.0.0.1:{files.server_address[1]}/ftp"
        assert "http or https" in reason(knn(site, {"image_url": ftp}, base=server.base), 400)
    finally:
        server.close()
        files.shutdown()


def test_cors_token_and_base64_images(site, clip_client):
    front = "http://127.0.0.1:8000"
    r = requests.get(site.base + "/indices-list", headers={"Origin": front}, timeout=60)
    assert r.headers["Access-Control-Allow-Origin"] == front
    r = requests.get(site.base + "/indices-list", headers={"Origin": "https://elsewhere.example"}, timeout=60)
    assert "Access-Control-Allow-Origin" not in r.headers  # a page elsewhere cannot read a loopback server
    server = webindex.ThreadServer(site.index, token=TOKEN, clip_base64=True, clip_cors_origins=("*",),
                                   allowed_hosts=("127.0.0.1",))
    try:
        pre = requests.options(server.base + "/knn-service", timeout=60, headers={
            "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "https://elsewhere.example"
        assert pre.headers["Access-Control-Allow-Headers"] == "content-type"
        assert "access token" in reason(knn(site, {"text": "x"}, base=server.base), 401)
        denied = knn(site, {"text": "x"}, base=server.base, headers={"Origin": "https://elsewhere.example"})
        assert denied.status_code == 401 and denied.headers["Access-Control-Allow-Origin"]  # the reason is readable
        # ClipClient posts to exactly the URL it is given: the token rides in it
        client = clip_client.ClipClient(f"{server.base}/knn-service?token={TOKEN}", "index", num_images=2,
                                        deduplicate=False)
        rows = client.query(text="a green triangle")
        assert len(rows) == 2 and rows[0]["url"].endswith(f"&token={TOKEN}")
        assert requests.get(rows[0]["url"], timeout=60).content == base64.b64decode(rows[0]["image"])
        assert Image.open(io.BytesIO(base64.b64decode(rows[0]["image"]))).format == "JPEG"
        assert requests.post(f"{server.base}/knn-service", data='{"text": "x"}', timeout=60,
                             headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    finally:
        server.close()


def test_a_new_index_version_while_a_client_pages(site):
    """The front end asks /metadata for later pages of an answer; a version published meanwhile answers
    for the images it still holds, null for the ones it dropped, and queries running across the switch
    all succeed."""
    live = site.live
    query = {"embedding_input": list(map(float, live.vectors[0])), "num_images": 2, "num_result_ids": 10,
             "indice_name": "live", "deduplicate": False}
    rows = knn(site, query).json()
    assert len(rows) == 10 and rows[0]["url"].endswith("?v=v0001")
    errors = []

    def client():
        for _ in range(15):
            r = knn(site, query)
            if r.status_code != 200 or not r.json():
                errors.append(r.text)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    webindex.publish(live.index, live.paths[:6])  # v0002: the last four images gone
    for t in threads:
        t.join()
    assert errors == []
    kept = {int(i) for i in live.ids[:6]}
    metas = requests.post(site.base + "/metadata", data=json.dumps({"ids": [r["id"] for r in rows[2:]],
                                                                    "indice_name": "live"}), timeout=60).json()
    for m in metas:
        if m["id"] in kept:
            assert m["metadata"]["url"].endswith("?v=v0002")
            assert requests.get(m["metadata"]["url"], timeout=60).headers["Content-Type"] == "image/jpeg"
        else:
            assert m["metadata"] is None
    assert {r["id"] for r in knn(site, query).json()} == kept


def test_images_over_the_upload_limit_are_413(site):
    server = webindex.ThreadServer(site.index, max_upload_bytes=100_000)
    try:
        for size in (100_001, 120_000):  # just over (its base64 is within the base64 form of the limit) and more
            body = {"image": base64.b64encode(b"\0" * size).decode()}
            assert "100000 byte limit" in reason(knn(site, body, base=server.base), 413)
        with open(site.paths[9], "rb") as f:  # under the limit: searched
            rows = knn(site, {"image": base64.b64encode(f.read()).decode(), "num_images": 1}, base=server.base).json()
        assert rows[0]["id"] == int(site.ids[9])
    finally:
        server.close()


def test_fetch_hosts_and_cors_origins_that_could_never_match_are_config_errors(site):
    """`--clip-fetch-host http://example.org` (a URL, not a host) or `--clip-cors-origin front.example.org`
    (no scheme) would match no request: the server refuses to start, naming the option."""
    from lakelens.errors import ConfigError
    from lakelens.web import Limits, create_app

    for limits in ({"clip_fetch_hosts": ("http://example.org",)}, {"clip_fetch_hosts": ("example.org:8080",)},
                   {"clip_fetch_hosts": ("",)}):
        with pytest.raises(ConfigError, match="--clip-fetch-host"):
            create_app(site.index, Limits(**limits))
    for origin in ("front.example.org", "https://front.example.org/app", "ftp://front.example.org"):
        with pytest.raises(ConfigError, match="--clip-cors-origin"):
            create_app(site.index, Limits(clip_cors_origins=(origin,)))
    # what they are meant to be: host names (an IPv6 address with or without brackets), origins, * and null
    create_app(site.index, Limits(clip_fetch_hosts=("Images.Example.org", "127.0.0.1", "[::1]"),
                                  clip_cors_origins=("https://front.example.org/", "http://localhost:3000", "null")))


def test_folding_near_identical_results_holds_no_n_by_n_matrix():
    """deduplicate is ClipClient's default, and num_result_ids may be 10,000: folding that many results must
    not hold an n x n similarity matrix per request (400 MB at 10,000), and keeps what clip_back keeps."""
    import tracemalloc

    from lakelens.web.clip import fold_near_identical

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((60, 32)).astype(np.float32)
    small = np.repeat(centres, 4, axis=0) + rng.normal(0, 0.12, (240, 32)).astype(np.float32)  # chains near 0.94
    small = small[rng.permutation(len(small))]
    small[7] = np.nan  # a vector not found: kept
    keep = fold_near_identical(small)
    rows = [{"id": i} for i in range(len(small))]
    expected = folded(rows, {i: np.nan_to_num(v) + (1e-9 if i == 7 else 0) for i, v in enumerate(small)})
    assert 60 < keep.sum() < 240 and np.flatnonzero(keep).tolist() == expected

    many = rng.standard_normal((5000, 64)).astype(np.float32)
    tracemalloc.start()
    try:
        fold_near_identical(many)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB to fold 5000 results"
