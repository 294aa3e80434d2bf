"""Image bytes -> generated captions with a CoCa model: the pure batch core of `lakelens caption`.

`Captioner(spec)` loads the model once; `captioner(contents)` turns a batch of encoded image files into
one Caption each: the text the CoCa's text decoder writes (greedy, or beam search), and its score, the
cosine between the image's contrastive vector and the caption's text vector from the same model (the
vectors the embed job and the index use). An undecodable file gets an error, never an exception.

Decoding is done here rather than by open_clip's `CoCa.generate`: that needs `transformers`' generation
classes, and the beam search it imports (`BeamSearchScorer`) is gone from transformers 5. The loop below
is the same teacher-free decoding over the model's own forward pass, each image's tokens depending only on
that image, so a caption does not change with the batch it came in."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lakelens.errors import ConfigError
from lakelens.ingest import images
from lakelens.ingest.embedder import prepare
from lakelens.models import registry as models
from lakelens.models.registry import ModelSpec, is_coca

DEFAULT_MAX_TOKENS = 20  # tokens written per caption, start and end included
DEFAULT_BEAMS = 1  # 1: greedy


@dataclass
class Caption:
    text: str | None  # None on error
    score: float | None  # cosine(image vector, caption's text vector); None on error
    error: str | None  # images.decode's reason ("not an image", "truncated", ...), else None


class Captioner:
    """Load a CoCa model once in __init__; caption a batch of encoded image files in __call__.
    max_tokens: the longest caption in tokens (start and end included), at most the text context.
    beams: 1 for greedy decoding, more for beam search (length-normalised log-likelihood).
    threads: torch threads while captioning (Spark tasks pass their cores); None leaves torch's setting."""

    def __init__(self, spec: ModelSpec, max_tokens: int = DEFAULT_MAX_TOKENS, beams: int = DEFAULT_BEAMS,
                 batch_size: int = 16, threads: int | None = None, max_pixels: int = 89_478_485,
                 draft: bool = True):
        self.spec = spec
        self.loaded = models.load(spec)
        model = self.loaded.model
        if not is_coca(model):
            raise ConfigError(f"caption.model: {spec.name} has no text decoder, so it cannot write captions; "
                              "use a CoCa architecture (e.g. lakelens-tiny-coca, coca_ViT-B-32)")
        context = int(model.text.positional_embedding.shape[0]) - (1 if model.text.cls_emb is not None else 0)
        if not 2 <= max_tokens <= context:
            raise ConfigError(f"caption.max_tokens: must be between 2 and the model's text context ({context}), "
                              f"got {max_tokens}")
        if beams < 1:
            raise ConfigError(f"caption.beams: must be >= 1, got {beams}")
        tok = self.loaded.tokenizer
        if not all(hasattr(tok, a) for a in ("sot_token_id", "eot_token_id", "decode")):
            raise ConfigError(f"caption.model: the tokenizer of {spec.name} ({type(tok).__name__}) cannot decode "
                              "generated tokens; captions need open_clip's CLIP tokenizer")
        self.sot, self.eot, self.pad = int(tok.sot_token_id), int(tok.eot_token_id), int(getattr(model, "pad_id", 0))
        self.max_tokens, self.beams, self.batch_size = max_tokens, beams, max(1, batch_size)
        self.threads, self.max_pixels, self.draft = threads, max_pixels, draft
        self.transform = self.loaded.transform or (lambda img: self.loaded.preprocess(img).numpy())

    def __call__(self, contents: Sequence[bytes]) -> list[Caption]:
        import torch

        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        out: list[Caption | None] = [None] * len(contents)
        ok, arrays = [], []
        for i, data in enumerate(contents):
            try:
                array, decoded = prepare(self.transform, self.loaded.image_size, data, self.max_pixels, self.draft)
            except Exception as e:  # a reader's failure on one file is that file's error
                array, decoded = None, images.Decoded(None, None, None, f"unreadable: {type(e).__name__}")
            if array is None:
                out[i] = Caption(None, None, decoded.error or "not an image")
            else:
                ok.append(i)
                arrays.append(np.asarray(array, np.float32))
        for start in range(0, len(ok), self.batch_size):
            x = torch.from_numpy(np.stack(arrays[start:start + self.batch_size]))
            for i, caption in zip(ok[start:start + self.batch_size], self.caption_tensor(x)):
                out[i] = caption
        return out  # type: ignore[return-value]

    def caption_tensor(self, x) -> list[Caption]:
        """Captions and scores of a batch of preprocessed images (n, 3, s, s)."""
        import torch

        model = self.loaded.model
        with torch.inference_mode():
            latent, embs = model._encode_image(x, normalize=True)
            tokens = self._greedy(x, latent, embs) if self.beams == 1 else self._beam(x, latent, embs)
            texts = [self.decode(t) for t in tokens]
            text_vecs = model.encode_text(self.loaded.tokenizer(texts), normalize=True)
            scores = (latent * text_vecs).sum(-1).tolist()
        return [Caption(t, float(s), None) for t, s in zip(texts, scores)]

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids after the start token, up to the end token -> text."""
        ids = [int(i) for i in ids]
        if ids and ids[0] == self.sot:
            ids = ids[1:]
        if self.eot in ids:
            ids = ids[:ids.index(self.eot)]
        return " ".join(self.loaded.tokenizer.decode([i for i in ids if i != self.pad]).split())

    def _next_logprobs(self, x, latent, embs, seq):
        """log p(next token | image, seq) for every row; the start and pad tokens are never written."""
        import torch

        logits = self.loaded.model(x, seq, image_latent=latent, image_embs=embs, output_labels=False)["logits"][:, -1]
        logits = logits.float()
        logits[:, [self.sot, self.pad]] = -math.inf
        if seq.shape[1] == 1:  # at least one word before the end
            logits[:, self.eot] = -math.inf
        return torch.log_softmax(logits, dim=-1)

    def _greedy(self, x, latent, embs) -> list[list[int]]:
        import torch

        n = x.shape[0]
        seq = torch.full((n, 1), self.sot, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        for step in range(self.max_tokens - 1):
            nxt = self._next_logprobs(x, latent, embs, seq).argmax(-1)
            if step == self.max_tokens - 2:
                nxt = torch.full_like(nxt, self.eot)  # the last place ends the caption
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            seq = torch.cat([seq, nxt[:, None]], 1)
            done |= nxt == self.eot
            if done.all():
                break
        return seq.tolist()

    def _beam(self, x, latent, embs) -> list[list[int]]:
        """Beam search per image: `beams` hypotheses, finished ones carried along unchanged; the best by
        mean log-probability per token."""
        import torch

        n, b = x.shape[0], self.beams
        rep = functools.partial(torch.repeat_interleave, repeats=b, dim=0)
        x, latent, embs = rep(x), rep(latent), rep(embs)
        seq = torch.full((n * b, 1), self.sot, dtype=torch.long)
        score = torch.full((n, b), -math.inf)
        score[:, 0] = 0.0  # one live hypothesis at the start
        score = score.view(-1)
        length = torch.zeros(n * b)
        done = torch.zeros(n * b, dtype=torch.bool)
        for step in range(self.max_tokens - 1):
            logp = self._next_logprobs(x, latent, embs, seq)
            if step == self.max_tokens - 2:  # the last place ends the caption
                logp = torch.full_like(logp, -math.inf)
                logp[:, self.eot] = 0.0
            # a finished hypothesis continues only with pad, at no cost
            logp = torch.where(done[:, None], -math.inf, logp)
            logp[:, self.pad] = torch.where(done, 0.0, -math.inf)
            vocab = logp.shape[1]
            cand = (score[:, None] + logp).view(n, b * vocab)
            best, index = cand.topk(b, dim=1)
            origin = (index // vocab + torch.arange(n)[:, None] * b).view(-1)
            token = (index % vocab).view(-1)
            seq = torch.cat([seq[origin], token[:, None]], 1)
            length = length[origin] + (~done[origin]).float()
            done = done[origin] | (token == self.eot)
            score = best.view(-1)
            if done.all():
                break
        mean = (score / length.clamp(min=1)).view(n, b)
        pick = mean.argmax(1) + torch.arange(n) * b
        return seq[pick].tolist()


@functools.lru_cache(maxsize=2)
def cached_captioner(spec: ModelSpec, max_tokens: int = DEFAULT_MAX_TOKENS, beams: int = DEFAULT_BEAMS,
                     batch_size: int = 16, threads: int | None = None, max_pixels: int = 89_478_485,
                     draft: bool = True) -> Captioner:
    """One Captioner per Python worker process and setting; lives in this importable module so that
    Spark's reused workers keep it between tasks instead of rebuilding the model."""
    return Captioner(spec, max_tokens, beams, batch_size, threads, max_pixels, draft)
