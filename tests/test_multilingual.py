"""Languages: a model folder with a Hugging Face tokenizer (trained here, loaded offline), Portuguese captions,
bilingual fine-tuning, ONNX text tower of such a model, and per-language evaluation."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
import torch

from lakelens import Embedder, IndexMismatchError, ModelLoadError, ModelSpec, path_id
from lakelens import index as ix
from lakelens.cli import main
from lakelens.config import ConfigError, FinetuneConfig, ModelConfig
from lakelens.ingest.paths import to_stored
from lakelens.models import engines, local_dir
from lakelens.models import registry as models
from lakelens.train import metrics as ev
from lakelens.train import synth
from lakelens.train.eval_run import format_by_lang
from lakelens.train.finetune import finetune

QUERY_PT = "um grande círculo vermelho à esquerda"


@pytest.fixture(scope="module")
def tokenizer():
    texts = [s.caption_in(lang) for s in synth.samples(400, seed=3) for lang in synth.LANGS]
    return local_dir.train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("model") / "bpe"
    local_dir.write_model_folder(path, tokenizer)
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: nothing may reach a model hub."""
    def refuse(self, address):
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_portuguese_captions_agree_in_gender():
    assert synth.Sample("red", "circle", "large", "left", "grey").caption_pt == \
        "um grande círculo vermelho à esquerda num fundo cinzento"
    assert synth.Sample("blue", "star", "small", "center", "striped").caption_pt == \
        "uma pequena estrela azul no centro num fundo listrado"
    assert synth.Sample("white", "star", "large", "top", "dotted").caption_in("pt") == \
        "uma grande estrela branca em cima num fundo pontilhado"
    with pytest.raises(ValueError, match="en, pt"):
        synth.samples(1)[0].caption_in("fr")


def test_hf_tokenizer_folder_loads_offline(folder, tokenizer, no_network):
    models.clear_cache()
    spec = ModelSpec.from_config(ModelConfig(f"local-dir:{folder}", "none"))
    # the key carries a digest of the folder's config and tokenizer: another vocabulary is another model
    assert spec.key == f"local-dir:{folder.resolve()}@none#{spec.digest}" and len(spec.digest) == 16
    loaded = models.load(spec)
    tokens = loaded.tokenizer([QUERY_PT, "a large red circle on the left"])
    assert tokens.shape == (2, 32) and tokens.dtype == torch.int64
    # the trained vocabulary holds every caption word whole: the ids are those of its words, in <s> ... </s>
    words = QUERY_PT.split()
    expected = [2] + [tokenizer.token_to_id(w + "</w>") for w in words] + [3]
    assert None not in expected and tokens[0, :len(expected)].tolist() == expected
    assert tokens[0, len(expected):].eq(0).all()  # padded with <pad> = 0
    assert loaded.tokenizer.tokenizer.decode(expected, skip_special_tokens=True) == QUERY_PT
    vecs = Embedder(spec, engine="torch").embed_texts([QUERY_PT, "uma pequena estrela azul no centro"])
    assert vecs.shape == (2, 128) and np.allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)
    assert float(vecs[0] @ vecs[1]) < 0.9999  # different texts, different vectors

    # the folder's own weights: --pretrained folder names its checkpoint file, digest and all
    torch.save(loaded.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    try:
        own = ModelSpec.from_config(ModelConfig(f"local-dir:{folder}", "folder"))
        assert own.pretrained == str((folder / "open_clip_pytorch_model.bin").resolve()) and own.digest
        weights = models.load(own).model.state_dict()
        assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())
    finally:
        (folder / "open_clip_pytorch_model.bin").unlink()

    # a tokenizer rewritten in place: a new key, and vectors of the old one are refused
    original = (folder / "tokenizer.json").read_bytes()
    try:
        (folder / "tokenizer.json").write_bytes(original.replace(b"</w>", b"</W>"))
        assert ModelSpec.from_config(ModelConfig(f"local-dir:{folder}", "none")).key != spec.key
        with pytest.raises(IndexMismatchError, match="model folder .* changed"):
            spec.check_weights()
    finally:
        (folder / "tokenizer.json").write_bytes(original)
    spec.check_weights()  # restored: the same model again


def test_model_folder_missing_files_say_what_goes_where(folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"model folder {broken} lacks tokenizer.json: put the Hugging Face"):
        models.load(ModelSpec.from_config(ModelConfig(f"local-dir:{broken}", "none")))
    (broken / "open_clip_config.json").unlink()
    with pytest.raises(ModelLoadError, match="lacks open_clip_config.json"):
        models.load(ModelSpec(f"local-dir:{broken}"))
    with pytest.raises(ModelLoadError, match="lacks the weights file: put the checkpoint there as open_clip_model"):
        ModelSpec.from_config(ModelConfig(f"local-dir:{folder}", "folder"))
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        models.load(ModelSpec.from_config(ModelConfig(f"local-dir:{folder}", str(tmp_path / "gone.pt"))))
    with pytest.raises(ModelLoadError, match="not found"):
        models.load(ModelSpec(f"local-dir:{tmp_path / 'nowhere'}"))
    with pytest.raises(ConfigError, match="allowed: folder"):
        ModelSpec(f"local-dir:{folder}", "laion2b_s34b_b79k").validate()


def test_onnx_text_tower_of_an_hf_tokenizer_model_equals_torch(folder, tmp_path):
    spec = ModelSpec(f"local-dir:{folder.resolve()}")
    loaded = models.load(spec)
    tokens = loaded.tokenizer([QUERY_PT, "a small blue star on the center of a striped background", "um"])
    onnx = engines.OnnxEngine(spec, cache_dir=tmp_path / "onnx")
    ref = engines.TorchEngine(loaded).encode_text(tokens)
    got = onnx.encode_text(tokens)
    assert got.shape == ref.shape and (got * ref).sum(1).min() > 0.9999


def test_bilingual_pairs_train_one_model_with_per_language_held_out_recall(folder, tmp_path):
    captions = synth.write_dataset(tmp_path / "img", 32, seed=4, px=64, langs=("en", "pt"))
    pairs = pd.read_csv(captions)
    assert pairs["lang"].value_counts().to_dict() == {"en": 32, "pt": 32}
    spec = ModelSpec.from_config(ModelConfig(f"local-dir:{folder}", "none"))
    conf = FinetuneConfig(out=str(tmp_path / "out"), epochs=1, batch_size=32, lr=1e-3, warmup_steps=2, val_fraction=0.3)
    result = finetune(pairs, spec, conf, progress=False, log=lambda _: None)
    last = result.history[-1]
    for k in (1, 5, 10):
        both = [last[f"val_{lang}_t2i_recall@{k}"] for lang in ("en", "pt")]
        assert last[f"val_t2i_recall@{k}"] == pytest.approx(np.mean(both))  # as many en as pt pairs
    tuned = ModelSpec.from_key(result.spec_key)
    assert tuned.name == spec.name and tuned.pretrained == result.final_checkpoint
    state = torch.load(result.final_checkpoint, weights_only=True)["state_dict"]
    weights = models.load(tuned).model.state_dict()
    assert all(torch.equal(state[k], weights[k]) for k in state)


def test_eval_reports_every_metric_per_language(tmp_path):
    """The "images" are the English captions' own vectors: every English query finds its image first,
    Portuguese queries rank as their scores say, computed here directly."""
    spec = ModelSpec("lakelens-tiny")
    en = ["a red circle", "a blue square", "a green star", "a black triangle"]
    pt = ["um círculo vermelho", "um quadrado azul", "uma estrela verde", "um triângulo preto"]
    emb = Embedder(spec)
    image_vecs = emb.embed_texts(en)
    paths = [str(tmp_path / f"img{i}.png") for i in range(4)]
    uris = [to_stored(p) for p in paths]
    ix.build_local(tmp_path / "index", np.array([path_id(u) for u in uris]), image_vecs, uris,
                   ix.Choice("Flat", "test", False), model_key=spec.key)
    table = pd.DataFrame({"path": paths * 2, "caption": en + pt, "lang": ["en"] * 4 + ["pt"] * 4,
                          "label": ["circle", "square", "star", "triangle"] * 2})
    table.to_csv(tmp_path / "captions.csv", index=False)

    out = tmp_path / "m.json"
    assert main(["eval", "--index", str(tmp_path / "index"), "--captions", str(tmp_path / "captions.csv"),
                 "-k", "1,2", "--out", str(out)]) == 0
    m = json.loads(out.read_text())
    by = m["by_lang"]
    assert sorted(by) == ["en", "pt"] and by["en"]["queries"] == by["pt"]["queries"] == 4
    assert by["en"]["t2i_recall@1"] == by["en"]["i2t_recall@1"] == by["en"]["t2i_precision@1"] == 1.0
    pt_scores = emb.embed_texts(pt) @ image_vecs.T
    ranks = ev.ranks_of_targets(pt_scores, [0, 1, 2, 3])
    i2t = ev.ranks_of_targets(pt_scores.T, [0, 1, 2, 3])  # an image's only Portuguese caption is its own
    for k in (1, 2):
        assert by["pt"][f"t2i_recall@{k}"] == pytest.approx(np.mean(ranks <= k))
        assert by["pt"][f"i2t_recall@{k}"] == pytest.approx(np.mean(i2t <= k))
        assert m[f"t2i_recall@{k}"] == pytest.approx((by["en"][f"t2i_recall@{k}"] + by["pt"][f"t2i_recall@{k}"]) / 2)
        assert by["pt"][f"t2i_top{k}_accuracy"] == by["pt"][f"t2i_recall@{k}"]
    assert by["pt"]["ann_recall@2"] == 1.0 and by["pt"]["images"] == 4
    table = format_by_lang(m, (1, 2))  # the text `lakelens eval` prints beside the JSON
    rows = {line.split()[0]: line.split() for line in table.splitlines()}
    assert {"lang", "all", "en", "pt"} <= set(rows)
    assert float(rows["pt"][2]) == pytest.approx(by["pt"]["t2i_recall@1"], abs=5e-4)


def test_a_hugging_face_text_tower_loads_from_its_folder_and_exports_to_onnx(tokenizer, tmp_path, no_network):
    """An xlm-roberta-style text tower (open_clip's HFTextEncoder), its config in a local folder: built
    offline, and its ONNX text graph gives torch's vectors."""
    from transformers import XLMRobertaConfig

    folder = tmp_path / "xlmr"
    local_dir.save_tokenizer(tokenizer, folder)
    XLMRobertaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                     max_position_embeddings=40).save_pretrained(folder / "text-model")
    base = json.loads((models.MODEL_CONFIG_DIR / "lakelens-tiny.json").read_text())
    text_cfg = {"hf_model_name": str(folder / "text-model"), "hf_tokenizer_name": "xlmr-bpe", "hf_proj_type": "linear",
                "hf_pooler_type": "mean_pooler", "context_length": 32}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**base, "text_cfg": text_cfg}}))
    spec = ModelSpec(f"local-dir:{folder}")
    loaded = models.load(spec)
    assert type(loaded.model).__name__ == "CustomTextCLIP"
    tokens = loaded.tokenizer([QUERY_PT, "a small blue star", "um"])
    ref = engines.TorchEngine(loaded).encode_text(tokens)
    got = engines.OnnxEngine(spec, cache_dir=tmp_path / "onnx").encode_text(tokens)
    assert ref.shape == (3, 128) and (got * ref).sum(1).min() > 0.9999

    text_cfg["hf_model_name"] = str(tmp_path / "no-such-model")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {**base, "text_cfg": text_cfg}}))
    with pytest.raises(ModelLoadError, match="must name a local folder"):
        models.load(ModelSpec(f"local-dir:{folder}"))
