"""The README's main command, small: both demos run end to end in the shared session."""

import json

import pytest
from conftest import ROOT

from lakelens.demo import run_demo


@pytest.mark.parametrize("dataset, head", [("shapes", "t2i_recall@10"), ("fashion-mnist", "t2i_precision@10")])
def test_demo_end_to_end(spark, tmp_path, capsys, dataset, head):
    out = tmp_path / "demo"
    # captions (a CoCa fine-tuned in the demo) once: the caption job has its own tests
    r = run_demo(out=str(out), dataset=dataset, n_train=120, n_images=40, epochs=1,
                 conf_path=str(ROOT / "conf" / "local.yaml"), with_captions=dataset == "shapes")
    assert (r["first_run"]["embedded"], r["first_run"]["failed"]) == (40, 1)  # one corrupt file on purpose
    assert r["rerun"]["embedded"] == 0 and r["rerun"]["unchanged"] == 41
    # New weights make every row stale: all re-embedded with the fine-tuned model, then re-indexed.
    assert r["after_run"]["embedded"] == 40 and "/model/final.pt#" in r["model_after"]
    assert r["index_after"]["rows"] == 40 and r["index_after"]["version"] != r["index_before"]["version"]
    assert r["metrics_after"]["model"] == r["model_after"] and r["metrics_before"]["queries"] == 40
    assert r["headline"] == head and r["after"] == r["metrics_after"][head]
    assert [h["epoch"] for h in r["finetune_history"]] == [0, 1]
    for png in ("contact_sheet.png", "eval/recall.png", "model/training.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "eval" / "after.json").read_text()) == r["metrics_after"]
    printed = capsys.readouterr().out
    assert "image -> image" in printed and "text -> image" in printed and "random init" in printed
    # tags from the stored vectors, captions, and a keyword index in a version that shares the vectors
    assert r["tag_run"]["scored"] == 40 and r["tag_run"]["mode"] == "full"
    kw = r["index_keywords"]
    assert kw["build"] == "incremental" and kw["build_reason"] == "a keyword index was asked for (--tags)"
    assert kw["rows"] == 40 and "hybrid query" in printed and "caption" in printed
    assert ("caption_run" in r) == (dataset == "shapes")
    if dataset == "shapes":
        assert r["caption_run"]["captioned"] == 40
