"""Fine-tuning: the held-out loss falls, a crashed run resumes to the same weights, final.pt loads everywhere."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from lakelens import Embedder, ModelSpec
from lakelens.cli import main
from lakelens.config import FinetuneConfig
from lakelens.train import synth
from lakelens.train.finetune import FinetuneError, finetune, split_pairs

TINY = ModelSpec("lakelens-tiny")


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs") / "images"
    return pd.read_csv(synth.write_dataset(folder, 160, seed=5, px=64))


def conf(out, **kw) -> FinetuneConfig:
    return FinetuneConfig(out=str(out), **{"epochs": 3, "batch_size": 32, "lr": 1e-3, "warmup_steps": 4,
                                           "val_fraction": 0.25, **kw})


def test_split_is_stable_and_keeps_an_image_on_one_side(pairs):
    train, val = split_pairs(pairs, 0.25)
    assert len(train) + len(val) == len(pairs) and 20 < len(val) < 60
    again = pd.concat([pairs, pairs.assign(caption="another caption")]).sample(frac=1, random_state=1)
    train2, val2 = split_pairs(again, 0.25)
    assert set(val2["path"]) == set(val["path"]) and not set(train2["path"]) & set(val2["path"])
    explicit = pairs.assign(split=["val" if i % 2 else "train" for i in range(len(pairs))])
    assert len(split_pairs(explicit, 0.9)[1]) == len(pairs) // 2  # the split column wins over the fraction
    with pytest.raises(FinetuneError, match="train or val"):
        split_pairs(pairs.assign(split="test"), 0.1)


def test_loss_falls_and_a_crashed_run_resumes_to_the_same_weights(pairs, tmp_path):
    full = finetune(pairs, TINY, conf(tmp_path / "full"), progress=False)
    h = full.history
    assert [r["epoch"] for r in h] == [0, 1, 2, 3] and full.resumed_from == 0
    assert h[-1]["val_loss"] < 0.9 * h[0]["val_loss"]  # the held-out contrastive loss falls
    assert h[-1]["val_t2i_recall@10"] > h[0]["val_t2i_recall@10"]
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == \
        ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    assert json.loads((tmp_path / "full" / "history.json").read_text()) == h
    assert (tmp_path / "full" / "training.png").read_bytes()[:4] == b"\x89PNG"

    def crash(epoch, step):
        if (epoch, step) == (2, 1):
            raise Crash("killed mid-epoch")

    with pytest.raises(Crash):
        finetune(pairs, TINY, conf(tmp_path / "crashed"), progress=False, on_step=crash)
    assert [p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()] == ["epoch_001.pt"]
    resumed = finetune(pairs, TINY, conf(tmp_path / "crashed"), progress=False)
    assert (resumed.resumed_from, resumed.epochs_run) == (1, 2)
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in h]
    a = torch.load(full.final_checkpoint, weights_only=True)["state_dict"]
    b = torch.load(resumed.final_checkpoint, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Other settings in the same folder are refused rather than mixed into the old run.
    with pytest.raises(FinetuneError, match="lr"):
        finetune(pairs, TINY, conf(tmp_path / "crashed", lr=5e-3, epochs=4), progress=False)


def test_a_resume_under_another_val_fraction_is_refused(pairs, tmp_path):
    # images trained on before the kill would count as held out afterwards
    pairs = pairs.iloc[:64]

    def crash(epoch, step):
        if (epoch, step) == (2, 0):
            raise Crash("killed mid-epoch")

    with pytest.raises(Crash):
        finetune(pairs, TINY, conf(tmp_path / "ft", epochs=2, val_fraction=0.3), progress=False, on_step=crash)
    with pytest.raises(FinetuneError, match="val_fraction") as e:
        finetune(pairs, TINY, conf(tmp_path / "ft", epochs=2, val_fraction=0.5), progress=False)
    assert "\n" not in str(e.value) and "--fresh" in str(e.value)
    # a split column decides the held-out images itself: the fraction does not change them
    split = pairs.assign(split=["val" if i % 4 == 0 else "train" for i in range(len(pairs))])
    with pytest.raises(Crash):
        finetune(split, TINY, conf(tmp_path / "split", epochs=2, val_fraction=0.3), progress=False, on_step=crash)
    resumed = finetune(split, TINY, conf(tmp_path / "split", epochs=2, val_fraction=0.5), progress=False)
    assert (resumed.resumed_from, resumed.val_pairs) == (1, len(pairs) // 4)


def test_final_checkpoint_loads_as_pretrained_and_embeds_with_the_trained_weights(pairs, tmp_path):
    result = finetune(pairs, TINY, conf(tmp_path / "ft", epochs=1), progress=False)
    spec = ModelSpec.from_config(type("M", (), {"name": "lakelens-tiny", "pretrained": result.final_checkpoint})())
    assert spec.key == result.spec_key
    trained, random_init = Embedder(spec), Embedder(TINY)
    texts = ["a small red circle on the left of a grey background"]
    assert not np.allclose(trained.embed_texts(texts), random_init.embed_texts(texts))
    state = torch.load(result.final_checkpoint, weights_only=True)["state_dict"]
    loaded = trained.loaded.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    vec = trained([open(pairs["path"][0], "rb").read()])[0].embedding
    assert vec is not None and np.linalg.norm(vec) == pytest.approx(1, abs=1e-5)


def test_cli_finetune_and_its_errors(pairs, tmp_path, capsys):
    csv = tmp_path / "pairs.csv"
    pairs.to_csv(csv, index=False)
    out = tmp_path / "cli"
    assert main(["finetune", "--pairs", str(csv), "--model", "lakelens-tiny", "--pretrained", "none",
                 "--out", str(out), "--epochs", "1", "--batch-size", "32", "--json"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert (out / "final.pt").is_file() and result["final_checkpoint"] == str(out / "final.pt")
    assert f"--pretrained {out / 'final.pt'}" in printed
    assert main(["finetune", "--out", str(out)]) == 2
    assert "finetune.pairs: required" in capsys.readouterr().err
    assert main(["finetune", "--pairs", str(csv), "--out", str(out), "--lr", "-1"]) == 2
    assert "finetune.lr" in capsys.readouterr().err
    pairs[["path"]].to_csv(tmp_path / "nocaption.csv", index=False)
    assert main(["finetune", "--pairs", str(tmp_path / "nocaption.csv"), "--out", str(out)]) == 2
    assert "caption" in capsys.readouterr().err
