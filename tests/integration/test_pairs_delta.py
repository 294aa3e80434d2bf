"""Captions / pairs tables in Delta: `lakelens eval` and `lakelens finetune` read them through Spark."""

import json

import pandas as pd
import pytest

from lakelens import EmbedJob, IndexJob
from lakelens.cli import main
from lakelens.errors import DataError
from lakelens.ingest.small_tables import read_small_table
from lakelens.train import synth


def quiet(*_):
    pass


def test_eval_and_finetune_read_delta_pairs(spark, tmp_path, local_conf, capsys):
    images = tmp_path / "images"
    pairs = pd.read_csv(synth.write_dataset(images, 48, seed=9, px=64))
    pairs["split"] = ["val" if i % 4 == 0 else "train" for i in range(len(pairs))]
    delta = tmp_path / "pairs_delta"
    spark.createDataFrame(pairs).write.format("delta").save(str(delta))
    # a second Delta version with one caption changed: the readers take the latest
    spark.createDataFrame(pairs.assign(caption=pairs["caption"].where(pairs.index != 0, "changed"))) \
        .write.format("delta").mode("overwrite").save(str(delta))

    conf = local_conf(images, tmp_path / "table", f"index.table={tmp_path / 'table'}",
                      f"index.index={tmp_path / 'index'}")
    EmbedJob(spark=spark, conf=conf, log=quiet).launch()
    IndexJob(spark=spark, conf=conf, log=quiet).launch()
    out = tmp_path / "m.json"
    assert main(["eval", "--index", str(tmp_path / "index"), "--captions", str(delta), "-k", "1,48",
                 "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert (m["queries"], m["images"], m["missing_images"]) == (48, 48, 0)
    assert m["t2i_recall@48"] == 1.0 and "t2i_precision@1" in m  # the label column came through

    assert main(["finetune", "--pairs", str(delta), "--model", "lakelens-tiny", "--pretrained", "none",
                 "--out", str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["train_pairs"], result["val_pairs"]) == (36, 12)  # the split column decided
    assert (tmp_path / "ft" / "final.pt").is_file()


def test_a_delta_table_is_read_at_a_version_with_the_columns_asked_for(spark, tmp_path):
    delta = str(tmp_path / "labels")
    spark.createDataFrame(pd.DataFrame({"path": ["/a.jpg"], "tags": ["red"], "extra": [1]})).write.format("delta") \
        .save(delta)
    spark.createDataFrame(pd.DataFrame({"path": ["/a.jpg"], "tags": ["blue"], "extra": [1]})).write.format("delta") \
        .mode("overwrite").save(delta)
    first = read_small_table(delta, ("path", "tags"), ("lang",), version=0, spark=spark)
    assert first.to_dict("list") == {"path": ["/a.jpg"], "tags": ["red"]}
    assert read_small_table(delta, ("path", "tags"), spark=spark)["tags"].tolist() == ["blue"]
    with pytest.raises(DataError, match=r"labels table .* lacks column\(s\) caption"):
        read_small_table(delta, ("path", "caption"), what="labels table", spark=spark)
    assert spark.getActiveSession() is not None  # a session it did not start is not stopped
