"""The index job on Spark local[2]: Delta table -> sharded FAISS versions -> queries."""

import json
import shutil
import threading

import numpy as np
import pytest
from conftest import ROOT, local_config, write_images

from lakelens import EmbedJob, IndexJob, Searcher
from lakelens import index as ix
from lakelens.cli import main


def quiet(*_):
    pass


def embed_folder(spark, local_conf, folder):
    img = folder / "img"
    write_images(img, 30)
    (img / "broken.jpg").write_bytes(b"not an image")
    conf = local_conf(img, folder / "table")
    EmbedJob(spark=spark, conf=conf, log=quiet).launch()
    return img, folder / "table", conf


@pytest.fixture(scope="module")
def embedded(spark, tmp_path_factory):
    """31 files embedded once for the tests that only read the folder and the table (each writes its
    indexes under its own tmp_path); a test that changes them embeds its own (`own_embedded`)."""
    return embed_folder(spark, local_config, tmp_path_factory.mktemp("embedded"))


@pytest.fixture
def own_embedded(spark, tmp_path, local_conf):
    return embed_folder(spark, local_conf, tmp_path)


def index_conf(local_conf, img, table, index, *overrides):
    return local_conf(img, table, f"index.table={table}", f"index.index={index}", *overrides)


def test_images_to_delta_to_index_to_query(spark, tmp_path, local_conf, embedded):
    img, table, _ = embedded
    conf = index_conf(local_conf, img, table, tmp_path / "index", "index.shards=3")
    result = IndexJob(spark=spark, conf=conf, log=quiet).launch()
    assert result.built and result.rows == 30 and result.shards == 3 and result.factory == "Flat"
    manifest = ix.read_manifest(tmp_path / "index")
    assert manifest["source"]["version"] == 1 and manifest["model"]["key"] == "lakelens-tiny@none"
    assert sum(s["count"] for s in manifest["shards"]) == 30 and manifest["dim"] == 128

    query = tmp_path / "copy.jpg"  # an exact copy, outside the indexed folder
    original = sorted(img.glob("*.jpg"))[4]
    shutil.copy(original, query)
    s = Searcher.open(tmp_path / "index")
    hits = s.search_image(query, k=5)
    assert hits.iloc[0]["path"] == f"file:{original}" and hits.iloc[0]["score"] > 0.9999
    assert not hits["path"].str.contains("broken").any()  # error rows are not indexed
    assert len(s.search_text("a photo of noise", k=7)) == 7


def test_reindex_is_a_noop_until_the_table_changes_then_prunes(spark, tmp_path, local_conf, own_embedded):
    img, table, embed_conf = own_embedded
    conf = index_conf(local_conf, img, table, tmp_path / "index", "index.prune=2")
    assert IndexJob(spark=spark, conf=conf, log=quiet).launch().version == "v0001"
    again = IndexJob(spark=spark, conf=conf, log=quiet).launch()
    assert not again.built and again.version == "v0001" and ix.versions(tmp_path / "index") == ["v0001"]
    for round_ in range(2):
        write_images(img, 2, seed=9 + round_, start=200 + 10 * round_)
        EmbedJob(spark=spark, conf=embed_conf, log=quiet).launch()
        IndexJob(spark=spark, conf=conf, log=quiet).launch()
    assert ix.versions(tmp_path / "index") == ["v0002", "v0003"]  # v0001 pruned
    assert ix.read_manifest(tmp_path / "index")["rows"] == 34
    old = IndexJob(spark=spark, conf=index_conf(local_conf, img, table, tmp_path / "old", "index.version=1"),
                   log=quiet).launch()
    assert old.rows == 30  # an older Delta version on request (time travel)


def test_a_reader_during_two_rebuilds_never_errors(spark, tmp_path, local_conf, embedded):
    img, table, _ = embedded
    conf = index_conf(local_conf, img, table, tmp_path / "index", "index.force=true", "index.shards=2")
    IndexJob(spark=spark, conf=conf, log=quiet).launch()
    s = Searcher.open(tmp_path / "index")
    probe = s.search_id(int(s.ids[0]), k=1)
    errors, versions, stop = [], set(), threading.Event()

    def reader():
        while not stop.is_set():
            try:
                s.reload()
                versions.add(s.version)
                hit = s.search_vector(np.asarray(s.embed_image(probe_path)), k=3)
                assert len(hit) == 3
            except Exception as e:
                errors.append(repr(e))

    probe_path = probe.iloc[0]["path"][len("file:"):]
    t = threading.Thread(target=reader)
    t.start()
    for _ in range(2):
        IndexJob(spark=spark, conf=conf, log=quiet).launch()
    stop.set()
    t.join()
    assert errors == [] and {"v0001", "v0002"} <= versions  # it queried across a switch, without errors
    assert s.reload() in (True, False) and s.version == "v0003"


def test_index_and_search_cli(spark, tmp_path, embedded, capsys):
    img, table, _ = embedded
    assert main(["index", "--table", str(table), "--index", str(tmp_path / "index"), "--shards", "2",
                 "--factory", "IVF4,Flat", "--conf", str(ROOT / "conf" / "local.yaml"), "--json"]) == 0
    built = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert built["factory"] == "IVF4,Flat" and built["rows"] == 30
    target = sorted(img.glob("*.png"))[0]
    assert main(["search", "--index", str(tmp_path / "index"), "--image", str(target), "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["results"][0]["path"] == f"file:{target}" and len(out["results"]) == 3
    assert main(["search", "--index", str(tmp_path / "index"), "red bicycle", "-k", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["search", "--index", str(tmp_path / "index"), "   "]) == 2
    assert "empty query" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "missing"), "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "index"), "--image", str(tmp_path / "nope.jpg")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["search", "--index", str(tmp_path / "index"), "x", "-k", "0"]) == 2
