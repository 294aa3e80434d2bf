"""Hostile requests against the real server (waitress on loopback): pixel bombs, formats, concurrent
id look-ups on IVF, prefix filters, the access token, the Host allowlist, and what health reveals."""

from __future__ import annotations

import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import webindex
from conftest import clustered, encode, noise_image
from PIL import Image

from lakelens import Choice, ModelSpec, Searcher, build_local, path_id
from lakelens.ingest.images import decode
from lakelens.web import Limits
from lakelens.web.server import exposure


def png_claiming(width: int, height: int, bit_depth: int = 16) -> bytes:
    """A valid, tiny PNG whose header claims width x height greyscale pixels (a decompression bomb:
    kilobytes on the wire, gigabytes once decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" + b"\0" * (width * bit_depth // 8)
    body = zlib.compress(row * 4, 9)  # a few rows of data: the decoder never gets that far
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    data = webindex.build(root, n=20)
    server = webindex.ThreadServer(data.index, max_upload_bytes=2_000_000)
    data.base, data.server = server.base, server
    yield data
    server.close()


def reason(resp, status):
    assert resp.status_code == status, resp.text
    return resp.json()["reason"]


def test_query_images_have_their_own_pixel_limit_and_only_the_job_s_formats(site):
    post = lambda name, data: requests.post(site.base + "/api/search/image",  # noqa: E731
                                            files={"image": (name, data)}, timeout=60)
    bomb = png_claiming(9400, 9500)
    assert len(bomb) < 200_000
    assert "too large" in reason(post("bomb.png", bomb), 400)  # refused from its header, not decoded
    # 20 MP: under the embed job's 89 MP limit (decoding goes on, and fails on the truncated data), over
    # the query limit of 16 MP
    assert decode(png_claiming(5000, 4000), max_pixels=89_478_485).error != "too large"
    assert "too large" in reason(post("20mp.png", png_claiming(5000, 4000)), 400)
    assert "not an image" in reason(post("x.eps", EPS), 400)  # no Ghostscript behind an upload
    ok = post("ok.png", encode(noise_image(3, (64, 48)), "PNG"))
    assert ok.status_code == 200 and len(ok.json()["results"]) > 0


def test_sixteen_bit_images_convert_in_integers_exactly():
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    decoded = decode(encode(Image.fromarray(values, "I;16"), "PNG"))
    assert decoded.error is None
    got = np.asarray(decoded.image)[:, :, 0].astype(np.int64)
    want = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.int64)
    assert np.array_equal(got, want)


def test_concurrent_similar_queries_on_ivf_never_fail(tmp_path):
    x = clustered(4000, 32, clusters=40, seed=3)
    ids = np.array([path_id(f"file:/img/{i}.jpg") for i in range(len(x))], dtype=np.int64)
    build_local(tmp_path / "index", ids, x, [f"file:/img/{i}.jpg" for i in range(len(x))],
                Choice("IVF40,Flat", "test", True, {"nprobe": 8}), shards=2, model_key="lakelens-tiny@none")
    server = webindex.ThreadServer(tmp_path / "index")
    try:
        picks = ids[np.random.default_rng(0).choice(len(ids), 160, replace=False)]

        def similar(i):
            r = requests.get(f"{server.base}/api/similar/{int(i)}", params={"k": 5}, timeout=60)
            return r.status_code, r.json()["results"][0]["id"] if r.status_code == 200 else r.text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(similar, picks))
        assert [a[0] for a in answers] == [200] * len(picks)
        assert [a[1] for a in answers] == [str(int(i)) for i in picks]  # each image finds itself first
    finally:
        server.close()


def test_prefix_filters_run_inside_the_search_and_say_when_few_match(tmp_path):
    x = clustered(3000, 32, clusters=30, seed=5)
    paths = [f"file:/photos/{'2024' if i % 100 == 0 else '2023'}/{i}.jpg" for i in range(len(x))]
    ids = np.array([path_id(p) for p in paths], dtype=np.int64)
    build_local(tmp_path / "index", ids, x, paths, Choice("Flat", "test", False), model_key="lakelens-tiny@none")
    s = Searcher.open(tmp_path / "index")
    q = x[7] + 0.01
    hits = s.search_vector(q, k=10, path_prefix="file:/photos/2024/")
    in_2024 = np.array([i % 100 == 0 for i in range(len(x))])
    exact = np.argsort(-(x[in_2024] @ q))[:10]
    assert list(hits["id"]) == list(ids[in_2024][exact])  # the exact top 10 of the 30 matching images
    assert all(p.startswith("file:/photos/2024/") for p in hits["path"]) and hits.attrs["notes"] == []
    common = s.search_vector(q, k=10, path_prefix="file:/photos/2023/")  # 99% of the images: filtered after
    in_2023 = ~in_2024
    assert list(common["id"]) == list(ids[in_2023][np.argsort(-(x[in_2023] @ q))[:10]])
    few = s.search_vector(q, k=50, path_prefix="file:/photos/2024/")
    assert len(few) == 30 and "only 30 indexed image(s)" in few.attrs["notes"][0]
    none = s.search_vector(q, k=10, path_prefix="file:/elsewhere/")
    assert none.empty and "only 0 indexed image(s)" in none.attrs["notes"][0]


def test_token_is_required_everywhere_when_set_and_kept_as_a_cookie(tmp_path):
    data = webindex.build(tmp_path, n=6)
    server = webindex.ThreadServer(data.index, token="s3cret-token")
    try:
        base, some_id = server.base, int(data.ids[0])
        for path in ("/api/health", "/api/search?q=red", f"/thumb/{some_id}", "/", "/_dash-layout"):
            r = requests.get(base + path, timeout=60)
            assert r.status_code == 401 and "access token" in r.json()["reason"], path
        wrong = requests.get(base + "/api/health", headers={"Authorization": "Bearer nope"}, timeout=60)
        assert wrong.status_code == 401
        ok = requests.get(base + "/api/health", headers={"Authorization": "Bearer s3cret-token"}, timeout=60)
        assert ok.status_code == 200 and ok.json()["count"] == len(data.ids)
        browser = requests.Session()  # a browser opens /?token=... once; its later requests carry the cookie
        page = browser.get(base + "/", params={"token": "s3cret-token"}, timeout=60)
        assert page.status_code == 200 and browser.cookies.get("lakelens_token") == "s3cret-token"
        assert browser.get(f"{base}/thumb/{some_id}", timeout=60).headers["Content-Type"] == "image/jpeg"
    finally:
        server.close()


def test_host_allowlist_and_the_warning_for_reachable_addresses(tmp_path):
    data = webindex.build(tmp_path, n=4)
    limits, warning = exposure("127.0.0.1", Limits())
    assert warning is None and "localhost" in limits.allowed_hosts and "127.0.0.1" in limits.allowed_hosts
    server = webindex.ThreadServer(data.index, allowed_hosts=limits.allowed_hosts)
    try:
        evil = requests.get(server.base + "/api/health", headers={"Host": "attacker.example:8050"}, timeout=60)
        assert evil.status_code == 400 and "host name" in evil.json()["reason"]
        good = requests.get(server.base + "/api/health", headers={"Host": "localhost:8050"}, timeout=60)
        assert good.status_code == 200
    finally:
        server.close()
    _, warning = exposure("0.0.0.0", Limits())
    assert "other machines can reach" in warning and "--token" in warning
    _, quiet = exposure("0.0.0.0", Limits(token="t", allowed_hosts=("search.example",)))
    assert "--token" not in quiet and "--allowed-host" not in quiet


def checkpoint_index(tmp_path, ckpt):
    """An exact index whose model key names a checkpoint file (its bytes' digest included)."""
    ckpt.parent.mkdir(exist_ok=True)
    ckpt.write_bytes(b"old weights")
    key = ModelSpec("lakelens-tiny", str(ckpt)).with_digest().key
    x = clustered(10, 16, clusters=2)
    build_local(tmp_path / "index", np.arange(10), x, [f"/p/{i}" for i in range(10)], Choice("Flat", "t", False),
                model_key=key)
    return ckpt, key, x


def test_health_shows_no_absolute_checkpoint_path(tmp_path):
    ckpt, key, _ = checkpoint_index(tmp_path, tmp_path / "models" / "final.pt")
    server = webindex.ThreadServer(tmp_path / "index")
    try:
        text = requests.get(server.base + "/api/health", timeout=60).text
        body = requests.get(server.base + "/api/health", timeout=60).json()
        assert str(tmp_path) not in text and body["model"]["weights"] == "final.pt"
        assert body["model"]["digest"] == key.rsplit("#", 1)[1]
    finally:
        server.close()


def test_a_query_driver_refuses_weights_that_changed_since_the_index(tmp_path):
    ckpt, key, x = checkpoint_index(tmp_path, tmp_path / "final.pt")
    s = Searcher.open(tmp_path / "index")
    assert s.model_spec.digest == key.rsplit("#", 1)[1]
    ckpt.write_bytes(b"new weights, same path")
    from lakelens import IndexMismatchError

    with pytest.raises(IndexMismatchError, match="changed"):
        s.search_text("a red circle")
    assert len(s.search_vector(x[0], k=3)) == 3  # vector queries need no model and still work


def test_thumbnails_are_only_served_from_under_the_image_roots(tmp_path):
    inside = tmp_path / "imgs"
    inside.mkdir()
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (20, 20), "red").save(inside / "a.png")
    Image.new("RGB", (20, 20), "blue").save(outside)
    x = clustered(2, 16, clusters=1)
    uris = [f"file:{inside}/a.png", f"file:{outside}"]
    build_local(tmp_path / "index", np.array([path_id(u) for u in uris]), x, uris, Choice("Flat", "t", False),
                model_key="lakelens-tiny@none",
                source={"table": None, "format": None, "version": None, "image_roots": [f"file:{inside}/"]})
    server = webindex.ThreadServer(tmp_path / "index")
    try:
        assert requests.get(f"{server.base}/thumb/{path_id(uris[0])}", timeout=60).status_code == 200
        r = requests.get(f"{server.base}/thumb/{path_id(uris[1])}", timeout=60)
        assert r.status_code == 404 and "outside the image folders" in r.json()["reason"]
    finally:
        server.close()
