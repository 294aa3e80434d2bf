"""The zero-shot tag job on Spark local[2] with real Delta: tags from the table's stored vectors equal tags
computed from freshly embedded images; incremental re-runs by the change feed (add, change, delete; an
unchanged table does nothing; a new vocabulary or calibrated thresholds re-tag everything), other sources'
rows left alone."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, write_images

from lakelens import config, delta_sql, path_id
from lakelens.cli import main
from lakelens.ingest.embed_job import EmbedJob
from lakelens.ingest.embedder import Embedder
from lakelens.ingest.paths import to_stored
from lakelens.ingest.table import SCHEMA, EmbeddingsTable
from lakelens.models.registry import ModelSpec
from lakelens.tags import calibrate as cal
from lakelens.tags.job import TagJob
from lakelens.tags.table import read_tags, replace_rows
from lakelens.tags.vocab import load_vocab, tag_vectors, vocab_path

NOW = datetime(2026, 1, 1)
SHAPES = "shapes"  # the built-in vocabulary
LOCAL = ROOT / "conf" / "local.yaml"


def tag_conf(table, tags, vocab, *overrides):
    return config.load(LOCAL, [f"tag.table={table}", f"tag.tags={tags}", f"tag.vocab={vocab}", *overrides])


def tags_by_path(spark, tags, source="zero-shot"):
    df = read_tags(spark, str(tags)).where(f"source = '{source}'").toPandas().sort_values(["path", "score"],
                                                                                         ascending=[True, False])
    return {p: list(part["tag"]) for p, part in df.groupby("path")}, df


def test_tags_from_stored_vectors_equal_tags_of_freshly_embedded_images(spark, tmp_path, local_conf):
    files = write_images(tmp_path / "img", 5)
    conf = local_conf(tmp_path / "img", tmp_path / "t", "embed.engine=torch")
    EmbedJob(spark=spark, conf=conf, log=lambda *_: None).launch()
    result = TagJob(spark=spark, conf=tag_conf(tmp_path / "t", tmp_path / "tags", SHAPES, "tag.threshold=-1",
                                               "tag.max_tags=3"), log=print).launch()
    assert result.mode == "full" and result.scored == 5 and result.tag_rows == 15
    got, df = tags_by_path(spark, tmp_path / "tags")

    spec = ModelSpec.from_config(conf.model)
    embedder = Embedder(spec, engine="torch")
    fresh = np.stack([r.embedding for r in embedder([f.read_bytes() for f in files])])
    vocab = load_vocab(SHAPES)
    scores = fresh @ tag_vectors(vocab, spec).T
    rows, cols = cal.select_tags(scores, np.full(len(vocab), -1.0), 3)
    expected = {}
    for r, c in zip(rows, cols):
        expected.setdefault(to_stored(str(files[r])), []).append(vocab.tags[c])
    assert got == expected
    stored = df.set_index(["path", "tag"])["score"]
    for r, c in zip(rows, cols):
        assert abs(stored[(to_stored(str(files[r])), vocab.tags[c])] - scores[r, c]) < 1e-5
    assert set(df["model"]) == {spec.key} and set(df["vocab"]) == {vocab.digest} and set(df["source"]) == {"zero-shot"}


def rows_for(names_to_vec, error=()):
    out = []
    for name, vec in names_to_vec.items():
        path = f"file:/lake/{name}.jpg"
        bad = name in error
        out.append((path_id(path), path, f"{abs(hash(name)):064x}"[:64], 100, NOW, 64, 64, "lakelens-tiny@none",
                    None if bad else [float(x) for x in vec], "truncated" if bad else None, NOW, None))
    return out


def test_incremental_tagging_by_the_change_feed(spark, tmp_path, capsys):
    vocab_file = tmp_path / "shapes.csv"
    shutil.copy(vocab_path(SHAPES), vocab_file)
    vocab = load_vocab(vocab_file)
    text = tag_vectors(vocab, ModelSpec("lakelens-tiny"))
    # image i is tag i's own text vector: its best tag is i (max_tags 1, no threshold)
    items = {f"im{i}": text[i] for i in range(8)}
    table, tags = tmp_path / "t", tmp_path / "tags"
    delta_sql.create(spark, str(table), SCHEMA, {"delta.enableChangeDataFeed": "true"})
    emb = EmbeddingsTable(spark, str(table))
    emb.upsert(spark.createDataFrame(rows_for({**items, "broken": None}, error=("broken",)), SCHEMA))

    args = ["tag", "--table", str(table), "--tags", str(tags), "--vocab", str(vocab_file), "--conf", str(LOCAL),
            "--threshold", "-1", "--max-tags", "1"]
    assert main(args) == 0
    first = SimpleNamespace(**json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert first.mode == "full" and first.scored == 8 and first.tag_rows == 8 and first.model == "lakelens-tiny@none"
    expect = {f"file:/lake/im{i}.jpg": [vocab.tags[i]] for i in range(8)}
    assert tags_by_path(spark, tags)[0] == expect

    # another writer's rows (a caption of im0) are never touched by zero-shot runs
    caption = spark.createDataFrame([(path_id("file:/lake/im0.jpg"), "file:/lake/im0.jpg", "a red circle", 0.3,
                                      "caption", "coca", None)], "id long, path string, tag string, score float, "
                                     "source string, model string, vocab string")
    replace_rows(spark, str(tags), caption, caption.select("id"), "caption", {"model": "coca"})

    conf = tag_conf(table, tags, vocab_file, "tag.threshold=-1", "tag.max_tags=1")
    before = delta_sql.version(spark, str(tags))
    same = TagJob(spark=spark, conf=conf, log=print).launch()
    assert same.mode == "none" and delta_sql.version(spark, str(tags)) == before

    # add two, change one, delete one: only those three are scored
    emb.upsert(spark.createDataFrame(rows_for({"im8": text[8], "im9": text[9], "im1": text[12]}), SCHEMA))
    spark.sql(f"DELETE FROM {delta_sql.table_ref(str(table))} WHERE " + f"id = {path_id('file:/lake/im2.jpg')}")
    inc = TagJob(spark=spark, conf=conf, log=print).launch()
    assert inc.mode == "incremental" and inc.scored == 3 and inc.removed == 2 and inc.tag_rows == 3
    expect.update({"file:/lake/im8.jpg": [vocab.tags[8]], "file:/lake/im9.jpg": [vocab.tags[9]],
                   "file:/lake/im1.jpg": [vocab.tags[12]]})
    del expect["file:/lake/im2.jpg"]
    assert tags_by_path(spark, tags)[0] == expect
    last = delta_sql.version(spark, str(tags))
    inserted = (spark.read.format("delta").option("readChangeFeed", "true").option("startingVersion", last)
                .load(str(tags)).where("_change_type = 'insert'").select("path").toPandas())
    assert sorted(inserted["path"]) == ["file:/lake/im1.jpg", "file:/lake/im8.jpg", "file:/lake/im9.jpg"]

    # a vocabulary change (one synonym) re-tags every image, and says why
    vocab_file.write_text(vocab_file.read_text().replace(",violet", ",violet|lilac"))
    full = TagJob(spark=spark, conf=conf, log=print).launch()
    assert full.mode == "full" and "the vocabulary changed" in full.reason and full.scored == 9
    assert tags_by_path(spark, tags)[0] == expect
    assert tags_by_path(spark, tags, "caption")[0] == {"file:/lake/im0.jpg": ["a red circle"]}

    # calibrated thresholds (beside the vocabulary, for this model) apply and re-tag everything
    labels = tmp_path / "labels.csv"
    labels.write_text("path,tags\n" + "".join(f"{p},{'|'.join(t)}\n" for p, t in expect.items()))
    assert main(["tag", "--calibrate", str(labels), "--table", str(table), "--vocab", str(vocab_file), "--conf",
                 str(LOCAL), "--set", "tag.min_positives=1", "--max-tags", "1"]) == 0
    calibrated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calibrated["labelled_images"] == 9 and calibrated["micro"]["precision"] >= 0.9
    assert (tmp_path / "shapes.thresholds.json").is_file() and (tmp_path / "shapes.calibration.json").is_file()
    # the next run applies them: made for this model, vocabulary and templates (tests/test_tags.py checks the rule)
    thresholds = json.loads((tmp_path / "shapes.thresholds.json").read_text())
    assert thresholds["model"] == "lakelens-tiny@none" and thresholds["vocab_digest"] == load_vocab(vocab_file).digest
    assert cal.thresholds_for(load_vocab(vocab_file), "lakelens-tiny@none", "simple", 1.0)[1].startswith("calibrated")


@pytest.mark.connect_covered("test_tags_job.py::test_incremental_tagging_by_the_change_feed")
def test_a_run_that_keeps_no_tag_is_remembered(spark, tmp_path):
    """A threshold no image reaches (cosine 1; the images are the tags' opposites) writes no tag row: the
    run is still the last run, so the next one on the unchanged table does nothing and a later one scores
    only the new image (Delta skips the commit of an empty write, and the run's state rides in a commit)."""
    vocab = load_vocab(SHAPES)
    text = tag_vectors(vocab, ModelSpec("lakelens-tiny"))
    table, tags = tmp_path / "t", tmp_path / "tags"
    delta_sql.create(spark, str(table), SCHEMA, {"delta.enableChangeDataFeed": "true"})
    emb = EmbeddingsTable(spark, str(table))
    emb.upsert(spark.createDataFrame(rows_for({f"im{i}": -text[i] for i in range(3)}), SCHEMA))
    conf = tag_conf(table, tags, SHAPES, "tag.threshold=1")
    first = TagJob(spark=spark, conf=conf, log=print).launch()
    assert (first.mode, first.scored, first.tag_rows) == ("full", 3, 0)
    again = TagJob(spark=spark, conf=conf, log=print).launch()
    assert again.mode == "none", again.reason
    emb.upsert(spark.createDataFrame(rows_for({"im3": -text[3]}), SCHEMA))
    later = TagJob(spark=spark, conf=conf, log=print).launch()
    assert (later.mode, later.scored, later.tag_rows) == ("incremental", 1, 0), later.reason
    assert TagJob(spark=spark, conf=conf, log=print).launch().mode == "none"
    assert read_tags(spark, str(tags)).count() == 0


def test_tag_eval_of_a_tags_table_counts_predicted_tags_for_their_ancestors(spark, tmp_path):
    import pandas as pd

    from lakelens.tags.evaluate import evaluate_tags_table

    vocab_file = tmp_path / "v.csv"
    vocab_file.write_text("tag,parent\nshape,\ncircle,shape\nsquare,shape\nstripes,\n")
    paths = [f"file:/lake/im{i}.jpg" for i in range(3)]
    stored = [(path_id(p), p, t, 0.3, "zero-shot", "m@none", "d") for p, t in zip(paths, ["circle", "square", "stripes"])]
    spark.createDataFrame(stored, "id long, path string, tag string, score float, source string, model string, "
                                  "vocab string").write.format("delta").save(str(tmp_path / "tags"))
    labels = pd.DataFrame({"path": paths, "tags": [["circle"], ["square"], ["stripes"]]})
    report = evaluate_tags_table(spark, str(tmp_path / "tags"), labels, load_vocab(vocab_file))
    # the table holds the tags themselves; the circle and square images are shapes to labels and tags alike
    assert report["per_tag"]["shape"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2, "predicted": 2}
    assert report["micro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0} and report["untagged_images"] == 0
