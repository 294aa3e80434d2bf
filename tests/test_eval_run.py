import json

import numpy as np
import pandas as pd
import pytest

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
    from lakelens.ingest.small_tables import is_delta_path as _is_delta
    from lakelens.train.eval_run import read_captions

    # a relative CSV path whose name starts like a cloud scheme is still a CSV
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "s3_captions.csv"
    local.write_text("path,caption\n/x.jpg,a red circle\n")
    assert read_captions("s3_captions.csv")["caption"].tolist() == ["a red circle"]
    (tmp_path / "table" / "_delta_log").mkdir(parents=True)
    assert _is_delta(str(tmp_path / "table")) and _is_delta(f"file:{tmp_path / 'table'}")
    assert _is_delta("s3a://bucket/pairs") and not _is_delta("s3a://bucket/pairs.csv")
    assert not _is_delta(str(local)) and not _is_delta(str(tmp_path))


def test_ann_recall_of_a_flat_index_is_exact_when_few_of_its_images_are_captioned(tmp_path):
    # the exact side searches every image of the index, as the ANN side does, not the captioned ones only
    captions_csv = synth.write_dataset(tmp_path / "img", 21, seed=3)
    captions = pd.read_csv(captions_csv)
    emb = Embedder(ModelSpec("lakelens-tiny"))
    vecs = np.stack([r.embedding for r in emb([open(p, "rb").read() for p in captions["path"]])])
    uris = [f"file:{p}" for p in captions["path"]]
    ix.build_local(tmp_path / "index", np.array([path_id(u) for u in uris]), vecs, uris,
                   ix.Choice("Flat", "test", False), shards=2, model_key="lakelens-tiny@none")
    captions.iloc[:4].to_csv(tmp_path / "four.csv", index=False)
    for ks, key in (("1,5,10", "ann_recall@10"), ("1,2", "ann_recall@2")):
        out = tmp_path / f"m{len(ks)}.json"
        assert main(["eval", "--index", str(tmp_path / "index"), "--captions", str(tmp_path / "four.csv"),
                     "-k", ks, "--out", str(out)]) == 0
        assert json.loads(out.read_text())[key] == 1.0


def test_a_caption_listed_twice_does_not_rank_behind_itself(tmp_path):
    # each "image" is its caption's own text vector: every image's best caption is its own
    texts = ["a red circle", "a blue square", "a green star"]
    vecs = Embedder(ModelSpec("lakelens-tiny")).embed_texts(texts)
    paths = [str(tmp_path / f"im{i}.jpg") for i in range(3)]
    uris = [f"file:{p}" for p in paths]
    ix.build_local(tmp_path / "index", np.array([path_id(u) for u in uris]), vecs, uris,
                   ix.Choice("Flat", "test", False), model_key="lakelens-tiny@none")
    rows = [(paths[0], texts[0]), *zip(paths, texts)]  # image 0's caption twice: both are hits
    pd.DataFrame(rows, columns=["path", "caption"]).to_csv(tmp_path / "captions.csv", index=False)
    out = tmp_path / "m.json"
    assert main(["eval", "--index", str(tmp_path / "index"), "--captions", str(tmp_path / "captions.csv"),
                 "-k", "1", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    assert (m["queries"], m["images"]) == (4, 3)
    assert m["i2t_recall@1"] == 1.0 and m["t2i_recall@1"] == 1.0


@pytest.mark.parametrize("choice", [ix.Choice("HNSW16,Flat", "test", False, {"efSearch": 16}),
                                    ix.Choice("IVF8,Flat", "test", True, {"nprobe": 1}),
                                    ix.Choice("IVF8,SQ8", "test", True, {"nprobe": 1}, rerank=4)],
                         ids=lambda c: c.factory)
def test_the_exact_side_of_eval_searches_every_stored_vector_of_any_index_kind(tmp_path, choice):
    from lakelens import Searcher
    from lakelens.train.eval_run import exact_top_images

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(600, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(600) * 7919 + 1
    ix.build_local(tmp_path / "index", ids, vecs, [f"file:/lake/{i}.jpg" for i in ids], choice, shards=3)
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    got = exact_top_images(Searcher.open(tmp_path / "index"), queries, 10, block=7)
    assert [list(g) for g in got] == [list(ids[np.argsort(-row, kind="stable")[:10]]) for row in queries @ vecs.T]
