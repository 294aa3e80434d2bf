"""Captions: the Captioner core on a random-init tiny CoCa (strings, batch-independent, per-image errors),
and CoCa fine-tuning (CoCaLoss) lowering the held-out caption loss."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import encode, noise_image

from lakelens.config import FinetuneConfig
from lakelens.errors import ConfigError
from lakelens.ingest.embedder import Embedder
from lakelens.models import registry
from lakelens.models.registry import ModelSpec
from lakelens.tags.captions import Captioner
from lakelens.train import synth
from lakelens.train.finetune import finetune

COCA = ModelSpec("lakelens-tiny-coca")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coca") / "images"
    return pd.read_csv(synth.write_dataset(folder, 28, seed=9, px=64))


def test_captions_are_strings_scored_and_batch_independent(shapes):
    contents = [open(p, "rb").read() for p in shapes["path"][:4]]
    contents.insert(2, b"not an image at all")
    contents.append(encode(noise_image(1), "PNG")[:200])  # truncated
    for beams in (1, 2):
        captioner = Captioner(COCA, max_tokens=8, beams=beams)
        batch = captioner(contents)
        assert [c.error is None for c in batch] == [True, True, False, True, True, False]
        assert batch[2].text is None and batch[2].score is None and batch[2].error == "not an image"
        for c in (b for b in batch if b.error is None):
            assert isinstance(c.text, str) and c.text.strip() and "<" not in c.text  # no start or end token left
            assert -1.0 <= c.score <= 1.0
        for i in (0, 4):  # alone, the same caption as in the batch
            alone = captioner([contents[i]])[0]
            assert alone.text == batch[i].text and alone.score == pytest.approx(batch[i].score, abs=1e-5)
    # the score is the cosine of the embedding path's vectors: the image's and the caption's text vector
    embedder = Embedder(COCA, engine="torch")
    image_vec = embedder([contents[0]])[0].embedding
    text_vec = embedder.engine.encode_text(registry.load(COCA).tokenizer([batch[0].text]))[0]
    assert float(image_vec @ text_vec) == pytest.approx(batch[0].score, abs=1e-4)
    with pytest.raises(ConfigError, match="no text decoder"):
        Captioner(ModelSpec("lakelens-tiny"))


def test_random_init_coca_is_the_same_in_every_process():
    # open_clip leaves the decoder's output projection uninitialised (torch.empty); the registry draws it
    registry.clear_cache()
    proj = registry.load(COCA).model.text_decoder.text_projection.detach().clone()
    registry.clear_cache()
    assert torch.equal(proj, registry.load(COCA).model.text_decoder.text_projection) and proj.std() > 0.01


def test_coca_fine_tuning_lowers_the_caption_loss(shapes, tmp_path):
    conf = FinetuneConfig(out=str(tmp_path / "ft"), epochs=2, batch_size=8, lr=2e-3, warmup_steps=2,
                          val_fraction=0.25)
    result = finetune(shapes, COCA, conf, progress=False, log=lambda _: None)
    first, last = result.history[0], result.history[-1]
    assert last["val_caption_loss"] < 0.8 * first["val_caption_loss"]  # the decoder learns the captions
    assert last["train_caption_loss"] > 0 and last["val_loss"] > 0
    assert (tmp_path / "ft" / "training.png").read_bytes()[:4] == b"\x89PNG"
    tuned = ModelSpec(COCA.name, result.final_checkpoint).with_digest()
    caption = Captioner(tuned, max_tokens=6)([open(shapes["path"][0], "rb").read()])[0]
    assert caption.error is None and caption.text
