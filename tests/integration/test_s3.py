"""Images and tables on object storage (s3a://) end to end, against moto's S3 server on loopback: the embed job
into a Delta table on s3a (incremental re-run), the index job on it, search, and thumbnails of s3a images
served by the web server through pyarrow's S3 client."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import requests
from conftest import ROOT, encode, noise_image
from PIL import Image

from lakelens import EmbedJob, IndexJob, Searcher, config, path_id
from lakelens.ingest.storage import S3Settings, StorageError
from lakelens.spark import find_jars, find_s3_jars, submit_jars_arg, uses_s3a
from lakelens.web import create_app, make_server
from lakelens.web.thumbs import render

pytestmark = pytest.mark.skipif(not find_s3_jars(), reason="no s3a jars in build/jars/s3: run `make setup`")


@pytest.fixture(scope="module")
def s3():
    from s3server import MotoS3

    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture
def s3_spark(spark, s3):
    """The shared session with the s3a settings on its Hadoop configuration."""
    from lakelens.spark import is_connect

    if not is_connect(spark):  # a Connect server carries its own jars (the test run's has the s3a ones)
        assert spark._jvm.org.apache.spark.util.Utils.classIsLoadable("org.apache.hadoop.fs.s3a.S3AFileSystem")
    with s3.hadoop_settings(spark):
        yield spark


def image_bytes(i: int) -> bytes:
    img = noise_image(500 + i, size=(64 + 4 * i, 48 + 2 * i))
    return encode(img, "PNG") if i % 2 else encode(img, "JPEG", quality=90)


def table_rows(spark, table: str) -> dict:
    return {r["path"]: r for r in spark.read.format("delta").load(table).collect()}


def test_s3a_jars_only_for_configs_that_use_s3a():
    local = config.load(ROOT / "conf" / "local.yaml")
    assert not uses_s3a(local) and not uses_s3a(local.spark)
    assert uses_s3a(config.load(None, ["embed.table=s3a://lake/t"]))
    example = config.load(ROOT / "conf" / "s3.example.yaml")
    assert uses_s3a(example.spark)
    settings = S3Settings.from_config(example)
    assert (settings.endpoint, settings.scheme, settings.path_style) == ("minio.internal:9000", "http", True)
    jars = find_s3_jars()
    names = {j.rsplit("/", 1)[1] for j in jars}
    assert "hadoop-aws-3.5.0.jar" in names and "s3-2.35.4.jar" in names
    # none of the SDK's bundle, nor second copies of jars pyspark ships (netty, httpclient, slf4j)
    assert not any(n.startswith(("bundle-", "netty-common", "netty-buffer", "httpclient", "slf4j")) for n in names)
    assert not set(jars) & set(find_jars())  # Delta's folder alone carries no s3a jar
    assert submit_jars_arg()[1].split(",") == find_jars()
    assert submit_jars_arg(s3=True)[1].split(",") == find_jars() + jars


def test_s3_settings_read_bounded_objects(s3):
    bucket = s3.bucket()
    settings = S3Settings.from_config(config.load(None, spark={"extra": s3.extra}))
    assert settings.endpoint == s3.endpoint.split("://")[1] and settings.scheme == "http" and settings.path_style
    assert "secret" not in repr(settings)
    assert S3Settings.from_config(config.load(None)) is None  # no fs.s3a keys: no object storage
    # keys are Hadoop Path strings: '#', '?', '%' and spaces are characters of the name, never escapes
    for key in ("a b.jpg", "q?x#1%20.png"):
        assert settings.read(s3.put(bucket, key, key.encode()), 100) == key.encode()
    assert settings.read(s3.put(bucket, "empty.png", b""), 100) == b""
    big = s3.put(bucket, "big.png", b"x" * 1000)
    for path, status in ((big, 413), (f"s3a://{bucket}/missing.png", 404), (f"s3a://{bucket}-gone/x.png", 404),
                         (f"s3a://{bucket}/", 404)):
        with pytest.raises(StorageError) as e:
            settings.read(path, 100)
        assert e.value.status == status, path
    assert settings.read(big, 1000) == b"x" * 1000


def test_embed_index_search_and_thumbnails_on_s3a(s3_spark, s3, tmp_path, local_conf):
    spark, bucket = s3_spark, s3.bucket()
    images, table = f"s3a://{bucket}/photos", f"s3a://{bucket}/lake/embeddings"
    data = {"im0.jpg": image_bytes(0), "im1.png": image_bytes(1), "with space 2.jpg": image_bytes(2),
            "sub/im3.png": image_bytes(3), "empty.jpg": b""}
    for key, body in data.items():
        s3.put(bucket, f"photos/{key}", body)
    conf = local_conf(images, table, f"index.table={table}", f"index.index={tmp_path / 'index'}",
                      spark={"extra": s3.extra})

    first = EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (first.new, first.embedded, first.failed) == (5, 4, 1)
    rows = table_rows(spark, table)
    assert set(rows) == {f"{images}/{key}" for key in data}  # Hadoop's spelling: the space stays a space
    for path, r in rows.items():
        key = path[len(images) + 1:]
        assert r["id"] == path_id(path) and r["size_bytes"] == len(data[key])
        if key == "empty.jpg":
            assert r["error"] == "empty file" and r["embedding"] is None
        else:
            assert r["error"] is None and abs(np.linalg.norm(r["embedding"]) - 1) < 1e-5
            assert (r["width"], r["height"]) == Image.open(io.BytesIO(data[key])).size

    # one object added, one deleted: only the new one is embedded, the deleted one's row goes
    data["im4.jpg"] = image_bytes(4)
    s3.put(bucket, "photos/im4.jpg", data["im4.jpg"])
    s3.delete(bucket, "photos/im1.png")
    del data["im1.png"]
    second = EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (second.new, second.changed, second.embedded, second.deleted, second.unchanged) == (1, 0, 1, 1, 4)
    after = table_rows(spark, table)
    assert set(after) == {f"{images}/{key}" for key in data}
    for path in set(after) & set(rows):
        assert after[path]["embedded_at"] == rows[path]["embedded_at"]  # untouched

    result = IndexJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert result.rows == 4
    searcher = Searcher.open(tmp_path / "index")
    for key in ("with space 2.jpg", "im4.jpg"):
        hits = searcher.search_image(data[key], k=3)
        assert hits.iloc[0]["path"] == f"{images}/{key}"
        assert hits.iloc[0]["score"] > 0.999

    # thumbnails of s3a images, read with the S3 settings of the same config
    app = create_app(tmp_path / "index", s3=S3Settings.from_config(conf))
    server = make_server(app, "127.0.0.1", 0, threads=2)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.effective_port}"
        for key in ("with space 2.jpg", "sub/im3.png"):
            got = requests.get(f"{base}/thumb/{path_id(f'{images}/{key}')}", timeout=30)
            assert got.status_code == 200 and got.headers["Content-Type"].startswith("image/jpeg")
            assert got.content == render(data[key])  # exactly that object's thumbnail
        s3.delete(bucket, "photos/im0.jpg")  # gone from the bucket since it was indexed
        gone = requests.get(f"{base}/thumb/{path_id(f'{images}/im0.jpg')}", timeout=30)
        assert gone.status_code == 404
        # without S3 settings the server cannot read object storage, and says so with a 404
        bare = create_app(tmp_path / "index")
        with bare.server.test_client() as client:
            assert client.get(f"/thumb/{path_id(f'{images}/im4.jpg')}").status_code == 404
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=5)


def test_webdataset_shards_on_s3a_embed_and_serve_members_by_ranged_reads(s3_spark, s3, tmp_path, local_conf):
    """img2dataset's shards in a bucket: the Python workers read each shard from object storage, and a
    thumbnail reads one member's bytes by offset (a ranged GET), as the same member's render."""
    from webdataset import member_bytes, write_shard

    from lakelens.web.thumbs import ThumbCache

    spark, bucket = s3_spark, s3.bucket()
    local = tmp_path / "shards"
    for n, keys in ((0, [0, 1]), (1, [10000, 0])):
        shard = write_shard(local, n, keys)
        s3.put(bucket, f"laion part/{shard.name}", shard.read_bytes())
        s3.put(bucket, f"laion part/{n:05d}.parquet", (local / f"{n:05d}.parquet").read_bytes())
    images, table = f"s3a://{bucket}/laion part", f"s3a://{bucket}/lake/emb"
    conf = local_conf(images, table, f"index.table={table}", f"index.index={tmp_path / 'index'}",
                      spark={"extra": s3.extra})
    stats = EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (stats.new, stats.embedded, stats.failed) == (2, 4, 0)
    rows = table_rows(spark, table)
    assert set(rows) == {f"{images}/00000.tar/00000000{k}.jpg" for k in (0, 1)} | {
        f"{images}/00001.tar/{k:09d}.jpg" for k in (10000, 0)}
    assert rows[f"{images}/00001.tar/000010000.jpg"]["caption"] == "a photo number 10000"
    again = EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    assert (again.unchanged, again.embedded) == (2, 0)
    assert IndexJob(spark=spark, conf=conf, log=lambda *_: None).launch().rows == 4
    searcher = Searcher.open(tmp_path / "index")
    cache = ThumbCache(s3=S3Settings.from_config(conf))
    for shard, name in (("00001.tar", "000010000.jpg"), ("00000.tar", "000000001.jpg")):
        got = cache.get(searcher, path_id(f"{images}/{shard}/{name}"))
        assert got == render(member_bytes(local / shard, name))
