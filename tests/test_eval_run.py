import json

import numpy as np
import pandas as pd

from lakelens import Embedder, ModelSpec, path_id
from lakelens import index as ix
from lakelens.cli import main
from lakelens.train import synth


def test_eval_on_an_index_of_captioned_images(tmp_path, capsys):
    captions_csv = synth.write_dataset(tmp_path / "img", 30, seed=5)
    captions = pd.read_csv(captions_csv)
    emb = Embedder(ModelSpec("lakelens-tiny"))
    indexed = captions.iloc[:29]  # the last image is missing from the index, as if it failed to embed
    vecs = np.stack([r.embedding for r in emb([open(p, "rb").read() for p in indexed["path"]])])
    uris = [f"file:{p}" for p in indexed["path"]]
    ix.build_local(tmp_path / "index", np.array([path_id(u) for u in uris]), vecs, uris,
                   ix.Choice("Flat", "test", False), shards=2, model_key="lakelens-tiny@none")

    out, plot = tmp_path / "m.json", tmp_path / "recall.png"
    assert main(["eval", "--index", str(tmp_path / "index"), "--captions", str(captions_csv), "-k", "1,5,100",
                 "--out", str(out), "--plot", str(plot)]) == 0
    m = json.loads(out.read_text())
    assert (m["queries"], m["images"], m["missing_images"]) == (30, 30, 1)
    # K beyond the image count: every present image's caption finds it, the missing one never
    assert m["t2i_recall@100"] == m["i2t_recall@100"] == 29 / 30
    assert m["t2i_recall@1"] <= m["t2i_recall@5"] <= m["t2i_recall@100"]
    assert m["t2i_top5_accuracy"] == m["t2i_recall@5"]
    assert 0 <= m["t2i_precision@5"] <= 1 and m["ann_recall@100"] == 1.0  # Flat is exact
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out)["t2i_recall@100"] == m["t2i_recall@100"]
    assert main(["eval", "--index", str(tmp_path / "index"), "--captions", str(captions_csv), "-k", "0"]) == 2
    assert main(["eval", "--index", str(tmp_path / "index"), "--captions", str(tmp_path / "no.csv")]) == 2


def test_text_queries_say_when_they_are_truncated(tmp_path):
    import pytest

    from lakelens import QueryError, Searcher

    emb = Embedder(ModelSpec("lakelens-tiny"))
    vecs = emb.embed_texts(["a red circle", "a blue square", "a green star"])
    ix.build_local(tmp_path / "index", np.arange(3), vecs, ["a", "b", "c"], ix.Choice("Flat", "test", False),
                   model_key="lakelens-tiny@none")
    s = Searcher.open(tmp_path / "index")
    assert s.search_text("a red circle", k=1).attrs["notes"] == []
    assert s.search_text("a red circle", k=1)["path"].tolist() == ["a"]  # the same text embeds the same
    long = s.search_text("a red circle " * 40, k=2)
    assert len(long) == 2 and "truncated to the model's 32 tokens" in long.attrs["notes"][0]
    with pytest.raises(QueryError, match="empty"):
        s.search_text(" \n\t", k=1)
    with pytest.raises(QueryError, match="unusable"):
        s.search_image(b"definitely not an image", k=1)


def test_captions_tables_are_told_apart_by_content_not_by_name(tmp_path, monkeypatch):
    from lakelens.train.eval_run import _is_delta, read_captions

    # a relative CSV path whose name starts like a cloud scheme is still a CSV
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "s3_captions.csv"
    local.write_text("path,caption\n/x.jpg,a red circle\n")
    assert read_captions("s3_captions.csv")["caption"].tolist() == ["a red circle"]
    (tmp_path / "table" / "_delta_log").mkdir(parents=True)
    assert _is_delta(str(tmp_path / "table")) and _is_delta(f"file:{tmp_path / 'table'}")
    assert _is_delta("s3a://bucket/pairs") and not _is_delta("s3a://bucket/pairs.csv")
    assert not _is_delta(str(local)) and not _is_delta(str(tmp_path))
