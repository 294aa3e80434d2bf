"""Regions (embed.regions): crops embedded beside each image, indexed beside it, a hit on a crop returns
the image and its box; incremental versions tombstone a changed image's regions with it."""

import numpy as np
from conftest import write_images
from PIL import Image

from lakelens import EmbedJob, IndexJob, Searcher
from lakelens import index as ix
from lakelens.ingest import regions
from lakelens.ingest.embedder import Embedder
from lakelens.models.registry import ModelSpec
from lakelens.search.batch import run_batch

BOXES = regions.boxes(2)


def quiet(*_):
    pass


def rows_by_path(spark, table):
    return {r["path"]: r for r in spark.read.format("delta").load(str(table)).collect()}


def test_regions_are_embedded_indexed_found_and_follow_changes(spark, tmp_path, local_conf):
    img, table, index = tmp_path / "img", tmp_path / "table", tmp_path / "index"
    files = write_images(img, 6, seed=3)
    (img / "broken.jpg").write_bytes(b"not an image")
    # regions off first: a table without regions, as tables made before them are
    conf = local_conf(img, table, f"index.table={table}", f"index.index={index}")
    EmbedJob(spark=spark, conf=conf, log=quiet).launch()
    assert all(r["regions"] is None for r in rows_by_path(spark, table).values())

    on = local_conf(img, table, "embed.regions=true", f"index.table={table}", f"index.index={index}",
                    "index.max_deleted_fraction=0.9")
    stats = EmbedJob(spark=spark, conf=on, log=quiet).launch()
    assert stats.changed == 6 and stats.embedded == 6  # rows without regions are embedded again, once
    assert EmbedJob(spark=spark, conf=on, log=quiet).launch().embedded == 0
    rows = rows_by_path(spark, table)
    assert rows[f"file:{img / 'broken.jpg'}"]["regions"] is None
    # each crop's vector is the model's vector of that crop, embedded on its own
    embedder = Embedder(ModelSpec.from_config(on.model), engine=on.embed.engine)
    for f in files[:2]:
        row = rows[f"file:{f}"]
        assert [tuple(np.round(r["box"], 6)) for r in row["regions"]] == [tuple(np.round(b, 6)) for b in BOXES]
        with Image.open(f) as im:
            crops = [embedder.transform(regions.crop(im.convert("RGB"), b)) for b in BOXES]
        fresh = embedder.embed_tensors(crops)
        stored = np.array([r["embedding"] for r in row["regions"]], np.float32)
        assert np.min(np.sum(fresh * stored, axis=1)) > 0.9999
        assert np.sum(np.array(row["embedding"]) * stored[0]) < 0.9999  # a crop is not the whole image

    # the index holds images and regions; a hit on a region is its image, once, with the box
    result = IndexJob(spark=spark, conf=on, log=quiet).launch()
    manifest = ix.read_manifest(index)
    assert result.rows == 6 * (1 + len(BOXES)) and manifest["images"] == 6
    s = Searcher.open(index)
    assert len(s) == 6 and len(s.ids) == 6
    target = rows[f"file:{files[2]}"]
    hits = s.search_vector(np.array(target["regions"][1]["embedding"], np.float32), k=6)
    assert hits.iloc[0]["path"] == f"file:{files[2]}" and hits.iloc[0]["score"] > 0.9999
    assert list(np.round(hits.iloc[0]["box"], 6)) == list(np.round(BOXES[1], 6))
    assert hits["id"].is_unique and len(hits) == 6 and set(hits["path"]) == {f"file:{f}" for f in files}
    whole = s.search_vector(np.array(target["embedding"], np.float32), k=1)
    assert whole.iloc[0]["id"] == target["id"] and whole.iloc[0]["box"] is None
    # a path filter keeps an image's regions with it
    only = s.search_vector(np.array(target["regions"][3]["embedding"], np.float32), k=3,
                           path_prefix=f"file:{files[4]}")
    assert list(only["path"]) == [f"file:{files[4]}"]

    # the batch query job ranks images too: each once, as single queries do
    (tmp_path / "q.txt").write_text("a photo of noise\nstatic\n")
    run_batch(spark, str(index), str(tmp_path / "q.txt"), str(tmp_path / "out"), k=4)
    out = spark.read.format("delta").load(str(tmp_path / "out")).toPandas().sort_values(["query_id", "rank"])
    for qid, text in enumerate(["a photo of noise", "static"]):
        assert list(out[out["query_id"] == qid]["id"]) == list(s.search_text(text, k=4)["id"])

    # change one image, delete another: an incremental version tombstones their regions too
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(files[2], "PNG" if files[2].suffix == ".png" else "JPEG")
    files[5].unlink()
    EmbedJob(spark=spark, conf=on, log=quiet).launch()
    result = IndexJob(spark=spark, conf=on, log=quiet).launch()
    assert result.build == "incremental" and result.rows == 5 * (1 + len(BOXES))
    assert result.tombstones == 2 * (1 + len(BOXES))
    s = Searcher.open(index)
    assert len(s) == 5
    old = s.search_vector(np.array(target["regions"][1]["embedding"], np.float32), k=10)
    assert old["id"].is_unique and len(old) == 5 and f"file:{files[5]}" not in set(old["path"])
    assert old.iloc[0]["score"] < 0.9999  # the changed image's old crop is gone
    new = rows_by_path(spark, table)[f"file:{files[2]}"]
    again = s.search_vector(np.array(new["regions"][4]["embedding"], np.float32), k=1)
    assert again.iloc[0]["path"] == f"file:{files[2]}" and again.iloc[0]["score"] > 0.9999
