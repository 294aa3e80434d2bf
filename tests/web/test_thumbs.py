"""Thumbnail paths, ids and the LRU cache; the live searcher's reload rules."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from lakelens import index as ix
from lakelens.ingest.storage import StorageError, read_bounded
from lakelens.web.live import LiveSearcher
from lakelens.web.thumbs import ThumbCache, ThumbError, parse_id


def test_ids_are_decimal_signed_64_bit():
    assert parse_id("0") == 0 and parse_id("-9223372036854775808") == -(2**63)
    assert parse_id("9223372036854775807") == 2**63 - 1
    for bad in ("", " 1", "1 ", "+1", "9223372036854775808", "1e3", "../1", "0b1", "١"):
        with pytest.raises(ThumbError) as e:
            parse_id(bad)
        assert e.value.status == 400


def test_reads_are_confined_to_regular_files_under_the_roots_and_bounded(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    root = [f"file:{imgs}/"]
    for name, data in (("a#b.png", b"AB"), ("a", b"A"), ("q?x.png", b"QX"), ("q", b"Q"), ("..%2Fsecret.png", b"ENC"),
                       ("a%20b.png", b"PCT"), ("a b.png", b"SPACE")):
        (imgs / name).write_bytes(data)
    (tmp_path / "secret.png").write_bytes(b"SECRET")
    (tmp_path / "imgs-secret").mkdir()
    (tmp_path / "imgs-secret" / "x.png").write_bytes(b"SECRET2")
    # a stored path is a file name, never a URL: '#', '?' and '%' are characters of the name
    assert read_bounded(f"file:{imgs}/a#b.png", 100, root) == b"AB"
    assert read_bounded(f"file:{imgs}/q?x.png", 100, root) == b"QX"
    assert read_bounded(f"file:{imgs}/..%2Fsecret.png", 100, root) == b"ENC"
    assert read_bounded(f"file:{imgs}/a%20b.png", 100, root) == b"PCT"
    assert read_bounded(f"file:{imgs}/a b.png", 100, root) == b"SPACE"
    for outside in (f"file:{imgs}/../secret.png", f"file:{tmp_path}/secret.png", f"file:{tmp_path}/imgs-secret/x.png",
                    "/etc/passwd", "s3a://bucket/x.png"):
        with pytest.raises(StorageError) as e:
            read_bounded(outside, 100, root)
        assert e.value.status == 404
    with pytest.raises(StorageError) as e:
        read_bounded(f"file:{imgs}/a#b.png", 1, root)  # over the byte bound
    assert e.value.status == 413
    # a FIFO and a link to /dev/zero in an image folder: refused at once, never read
    os.mkfifo(imgs / "pipe.png")
    os.symlink("/dev/zero", imgs / "zero.png")
    for special in ("pipe.png", "zero.png"):
        with pytest.raises(StorageError, match="not a regular file"):
            read_bounded(f"file:{imgs}/{special}", 1 << 30, root)
    os.symlink(imgs / "a#b.png", imgs / "link.png")  # a symlinked image is still served
    assert read_bounded(f"file:{imgs}/link.png", 100, root) == b"AB"


class FakeSearcher:
    """Just the facts the cache asks a searcher for."""

    def __init__(self, version, paths, roots=None):
        self.version, self.paths = version, paths
        self.manifest = {"source": {"image_roots": roots}}

    def path_of(self, id_):
        return self.paths.get(id_)

    def locator_of(self, id_):  # files only: images inside shards are tests/integration/test_shards.py's
        return None


def test_cache_is_keyed_by_version_and_evicts_the_least_recent(tmp_path):
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (400, 300), colour).save(tmp_path / f"{i}.png")
    cache = ThumbCache(max_entries=2, max_side=64)
    s1 = FakeSearcher("v0001", {i: f"file:{tmp_path}/{i}.png" for i in range(3)})
    assert Image.open(io.BytesIO(cache.get(s1, 0))).size == (64, 48)
    cache.get(s1, 1), cache.get(s1, 0)  # 0 is now the most recent
    cache.get(s1, 2)  # evicts 1
    assert (cache.hits, cache.misses) == (1, 3)
    cache.get(s1, 0)
    cache.get(s1, 1)
    assert (cache.hits, cache.misses) == (2, 4)
    s2 = FakeSearcher("v0002", {0: f"file:{tmp_path}/2.png"})  # a new version: never the old entry
    green = Image.open(io.BytesIO(cache.get(s2, 0))).getpixel((5, 5))
    assert cache.misses == 5 and green[1] > 100 > green[0]  # v0002's image, not v0001's red one
    with pytest.raises(ThumbError) as e:
        cache.get(s2, 1)
    assert e.value.status == 404
    (tmp_path / "gone.png").write_bytes(b"not an image")
    with pytest.raises(ThumbError, match="cannot be decoded"):
        cache.get(FakeSearcher("v0003", {5: f"file:{tmp_path}/gone.png"}), 5)
    with pytest.raises(ThumbError, match="gone"):
        cache.get(FakeSearcher("v0003", {6: f"file:{tmp_path}/missing.png"}), 6)


def test_live_searcher_follows_current_and_keeps_serving_after_a_broken_publish(tmp_path, caplog):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(8, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    flat = ix.Choice("Flat", "test", False)
    ix.build_local(tmp_path, np.arange(4), vecs[:4], [f"/p/{i}" for i in range(4)], flat, model_key="m@none")
    live = LiveSearcher(tmp_path)
    assert live.get().version == "v0001" and len(live.get()) == 4
    ix.build_local(tmp_path, np.arange(8), vecs, [f"/p/{i}" for i in range(8)], flat, model_key="m@none")
    assert live.get().version == "v0002" and len(live.get()) == 8 and live.last_error is None
    (tmp_path / ix.CURRENT).write_text("v0009\n")  # names a version that does not exist
    assert live.get().version == "v0002" and "v0009" not in live.last_error  # clients see no paths
    assert "could not load the new index version" in live.last_error and "v0009" in caplog.text  # the log does
    assert live.get().path_of(7) == "/p/7"
