"""Contrastive (CLIP) fine-tuning on image-caption pairs: held-out split, per-epoch evaluation and
checkpoints, resumable after a kill; its final.pt loads as `model.pretrained` everywhere. A CoCa model
trains with open_clip's CoCaLoss instead: the same contrastive loss plus its text decoder's caption loss."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens.config import FinetuneConfig
from lakelens.errors import DataError, FinetuneError
from lakelens.files import replacing
from lakelens.ingest import images
from lakelens.ingest.embedder import prepare
from lakelens.ingest.paths import to_local, to_stored
from lakelens.ingest.storage import read_located
from lakelens.models import registry as models
from lakelens.models.registry import ModelSpec, is_coca
from lakelens.train import metrics as ev

CHECKPOINTS = "checkpoints"
FINAL = "final.pt"
# Settings that must match for a resumed run to continue the same training.
_RESUME_KEYS = ("model", "pretrained", "batch_size", "lr", "weight_decay", "warmup_steps", "seed", "data",
                "val_fraction")
# open_clip's training defaults for CoCa (--coca-caption-loss-weight, --coca-contrastive-loss-weight)
CAPTION_LOSS_WEIGHT = 2.0
CONTRASTIVE_LOSS_WEIGHT = 1.0


def coca_losses(model, images, tokens, loss_fn) -> tuple:
    """(contrastive, caption) losses of a CoCa on a batch, each times its weight, as open_clip's training
    passes them: the model's forward pass gives the features, the decoder's logits and the shifted labels."""
    out = model(images, tokens)
    return loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])


def coca_loss_fn(model):
    from open_clip.loss import CoCaLoss

    return CoCaLoss(caption_loss_weight=CAPTION_LOSS_WEIGHT, clip_loss_weight=CONTRASTIVE_LOSS_WEIGHT,
                    pad_id=getattr(model, "pad_id", 0))


def split_pairs(pairs: pd.DataFrame, val_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train / held-out split: the table's `split` column if it has one, else a hash of the path, so an
    image with several captions lands on one side only and the split never changes between runs."""
    if "split" in pairs.columns:
        split = pairs["split"].astype(str).str.strip().str.lower()
        unknown = sorted(set(split) - {"train", "val"})
        if unknown:
            raise FinetuneError(f"split column: values must be train or val, got {', '.join(unknown)}")
        return pairs[split == "train"], pairs[split == "val"]
    unit = pairs["path"].map(lambda p: int(hashlib.sha256(str(p).encode()).hexdigest()[:12], 16) / 16 ** 12)
    held_out = unit < val_fraction
    return pairs[~held_out], pairs[held_out]


# An image inside a shard or a table larger than this is not read for training.
MAX_IMAGE_BYTES = 256 * 1024 * 1024


def load_images(paths: list[str], loaded: models.LoadedModel, progress: bool = True, locators=None):
    """Decode and preprocess every image once (float16 keeps a few thousand small images in memory);
    returns the stacked tensor and, per path, an error or None. `locators`: per path, where an image inside a
    shard or a table lives (an embeddings table's pairs, `read_captions`), None for a file."""
    import torch
    from tqdm.auto import tqdm

    tensors, errors = [], []
    locators = locators if locators is not None else [None] * len(paths)
    for p, where in tqdm(zip(paths, locators), total=len(paths), desc="loading images", unit="img",
                         disable=not progress, mininterval=2):
        try:
            data = (read_located(p, where, MAX_IMAGE_BYTES) if isinstance(where, str)
                    else to_local(to_stored(p)).read_bytes())
            tensor, decoded = prepare(loaded.preprocess, loaded.image_size, data)
        except (OSError, DataError) as e:
            tensor, decoded = None, images.Decoded(None, None, None, f"unreadable: {type(e).__name__}")
        if tensor is None:
            errors.append(decoded.error)
            continue
        tensors.append(tensor.half())
        errors.append(None)
    stacked = torch.stack(tensors) if tensors else torch.zeros((0, 3, loaded.image_size, loaded.image_size))
    return stacked, errors


@dataclass
class Split:
    images: object  # (n, 3, s, s) float16 tensor
    tokens: object  # (n, context) int tensor
    captions: list[str]
    paths: list[str]
    langs: list[str] | None = None  # the caption's language per pair, from the pairs' `lang` column


@dataclass
class FinetuneResult:
    out: str
    final_checkpoint: str
    spec_key: str  # the model key of the result: name@OUT/final.pt#digest of its bytes
    epochs_run: int
    resumed_from: int  # epoch of the checkpoint it resumed from; 0: a fresh start
    train_pairs: int
    val_pairs: int
    skipped_pairs: int  # pairs whose image could not be decoded
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _prepare(df: pd.DataFrame, loaded, progress: bool) -> tuple[Split, int]:
    imgs, errors = load_images(df["path"].tolist(), loaded, progress,
                               df["locator"].tolist() if "locator" in df.columns else None)
    ok = [e is None for e in errors]
    kept = df[ok]
    tokens = loaded.tokenizer(kept["caption"].astype(str).tolist())
    langs = kept["lang"].fillna("").astype(str).str.strip().tolist() if "lang" in kept.columns else None
    return Split(imgs, tokens, kept["caption"].tolist(), kept["path"].tolist(), langs), len(df) - int(sum(ok))


def _lr_at(step: int, total: int, conf: FinetuneConfig) -> float:
    if step < conf.warmup_steps:
        return conf.lr * (step + 1) / conf.warmup_steps
    progress = (step - conf.warmup_steps) / max(1, total - conf.warmup_steps)
    return conf.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def evaluate_split(model, split: Split, batch_size: int, ks=(1, 5, 10)) -> dict:
    """Held-out contrastive loss (mean over fixed batches) and text->image Recall@K over the whole split's
    images (an image with several captions is one candidate); with languages, also per language
    (val_<lang>_t2i_recall@K); for a CoCa also its held-out caption loss (val_caption_loss, unweighted
    cross-entropy per token)."""
    import torch
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()
    coca = coca_loss_fn(model) if is_coca(model) else None
    was_training = model.training
    model.eval()
    loss_sum, loss_n, img_vecs, txt_vecs, caption_sum = 0.0, 0, [], [], 0.0
    with torch.inference_mode():
        for start in range(0, len(split.captions), batch_size):
            if coca is not None:
                out = model(split.images[start:start + batch_size].float(), split.tokens[start:start + batch_size])
                img, txt = out["image_features"], out["text_features"]
                caption_sum += float(coca.caption_loss(out["logits"].permute(0, 2, 1), out["labels"])) * len(img)
            else:
                img = model.encode_image(split.images[start:start + batch_size].float(), normalize=True)
                txt = model.encode_text(split.tokens[start:start + batch_size], normalize=True)
            if len(img) > 1:  # a lone pair has nothing to contrast with
                loss_sum += float(loss_fn(img, txt, model.logit_scale.exp())) * len(img)
                loss_n += len(img)
            img_vecs.append(img.numpy())
            txt_vecs.append(txt.numpy())
    model.train(was_training)
    first = {p: i for i, p in reversed(list(enumerate(split.paths)))}  # each image once, by its first pair
    columns = sorted(first.values())
    col_of = {split.paths[i]: c for c, i in enumerate(columns)}
    scores = np.concatenate(txt_vecs) @ np.concatenate(img_vecs)[columns].T
    # A caption's own image, or any image with the same caption, counts as a hit.
    by_caption: dict[str, set[int]] = {}
    for c, p in zip(split.captions, split.paths):
        by_caption.setdefault(c, set()).add(col_of[p])
    ranks = ev.best_ranks(scores, [sorted(by_caption[c]) for c in split.captions])
    out = {"val_loss": loss_sum / max(1, loss_n)}
    if coca is not None:
        out["val_caption_loss"] = caption_sum / max(1, len(split.captions))
    out.update({f"val_t2i_recall@{k}": v for k, v in ev.recall_at_k(ranks, ks).items()})
    if split.langs and len(set(split.langs)) > 1:
        langs = np.array(split.langs)
        for lang in sorted(set(split.langs)):
            out.update({f"val_{lang}_t2i_recall@{k}": v for k, v in ev.recall_at_k(ranks[langs == lang], ks).items()})
    return out


def _atomic_save(obj, path: Path) -> None:
    import torch

    with replacing(path) as tmp:
        torch.save(obj, tmp)


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / CHECKPOINTS).glob("epoch_*.pt"))
    return found[-1] if found else None


def _settings(conf: FinetuneConfig, spec: ModelSpec, data_fingerprint: str, has_split: bool) -> dict:
    # a `split` column decides the held-out images itself: the fraction then changes nothing
    return {"model": spec.name, "pretrained": spec.pretrained, "batch_size": conf.batch_size, "lr": conf.lr,
            "weight_decay": conf.weight_decay, "warmup_steps": conf.warmup_steps, "seed": conf.seed,
            "epochs": conf.epochs, "data": data_fingerprint,
            "val_fraction": None if has_split else conf.val_fraction}


def finetune(pairs: pd.DataFrame, spec: ModelSpec, conf: FinetuneConfig, resume: bool = True,
             progress: bool = True, log: Callable[[str], None] = print,
             on_step: Callable[[int, int], None] | None = None) -> FinetuneResult:
    """Train `spec`'s model on `pairs` (path, caption) with open_clip's ClipLoss (a CoCa: CoCaLoss, whose
    contrastive and weighted caption parts are summed; train_loss is that sum); evaluate on the held-out
    split before training and after each epoch; write checkpoints/epoch_NNN.pt each epoch and final.pt.
    `on_step(epoch, step)` is called after every optimiser step (tests use it to crash on purpose)."""
    import torch
    from open_clip.loss import ClipLoss
    from tqdm.auto import tqdm

    out = Path(conf.out).expanduser().resolve()
    (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    pairs = pairs.dropna(subset=["path", "caption"]).reset_index(drop=True)
    if conf.max_pairs and len(pairs) > conf.max_pairs:
        pairs = pairs.sample(conf.max_pairs, random_state=conf.seed).reset_index(drop=True)
    train_df, val_df = split_pairs(pairs, conf.val_fraction)
    if len(train_df) < 2 or len(val_df) < 2:
        raise FinetuneError(f"need at least 2 training and 2 held-out pairs, got {len(train_df)} and "
                            f"{len(val_df)} (finetune.val_fraction={conf.val_fraction})")
    fingerprint = hashlib.sha256("\n".join(pairs["path"].astype(str) + "\t" + pairs["caption"].astype(str))
                                 .encode()).hexdigest()[:16]
    settings = _settings(conf, spec, fingerprint, "split" in pairs.columns)

    loaded = models.load(spec)
    model = copy.deepcopy(loaded.model)  # the cached model stays as loaded for the embed job and queries
    log(f"[finetune] {spec.key}: {len(train_df)} training pairs, {len(val_df)} held out; loading images")
    train, skipped_train = _prepare(train_df, loaded, progress)
    val, skipped_val = _prepare(val_df, loaded, progress)
    if len(train.captions) < 2 or len(val.captions) < 2:
        raise FinetuneError("fewer than 2 usable images on one side of the split; see the image errors")
    steps_per_epoch = math.ceil(len(train.captions) / conf.batch_size)
    total_steps = steps_per_epoch * conf.epochs

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": conf.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=conf.lr)
    history: list[dict] = []
    start_epoch = 0
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        saved = state["lakelens"]["settings"]
        # a key a checkpoint lacks was not recorded yet when it was written: nothing to compare it with
        differ = [k for k in _RESUME_KEYS if saved.get(k, settings[k]) != settings[k]]
        if differ:
            raise FinetuneError(f"{ckpt} was trained with other settings ({', '.join(differ)}); "
                                f"use a new --out folder or --fresh")
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["lakelens"]["epoch"])
        history = json.loads(state["lakelens"]["history"])
        log(f"[finetune] resuming after epoch {start_epoch} from {ckpt}")
    else:
        for old in (out / CHECKPOINTS).glob("epoch_*.pt"):
            old.unlink()
        history.append({"epoch": 0, "train_loss": None, **evaluate_split(model, val, conf.batch_size)})
        log(f"[finetune] before training: {_fmt(history[-1])}")

    coca = coca_loss_fn(model) if is_coca(model) else None
    loss_fn = ClipLoss()
    model.train()
    for epoch in range(start_epoch + 1, conf.epochs + 1):
        t0 = time.time()
        order = torch.randperm(len(train.captions), generator=torch.Generator().manual_seed(conf.seed * 7919 + epoch))
        running, seen, caption_running = 0.0, 0, 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{conf.epochs}", unit="step",
                   disable=not progress, mininterval=2)
        for step in bar:
            idx = order[step * conf.batch_size:(step + 1) * conf.batch_size]
            if len(idx) < 2:
                continue  # one pair has nothing to contrast with
            global_step = (epoch - 1) * steps_per_epoch + step
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(global_step, total_steps, conf)
            if coca is not None:
                contrastive, caption = coca_losses(model, train.images[idx].float(), train.tokens[idx], coca)
                loss = contrastive + caption
                caption_running += float(caption.detach()) / CAPTION_LOSS_WEIGHT * len(idx)
            else:
                img = model.encode_image(train.images[idx].float(), normalize=True)
                txt = model.encode_text(train.tokens[idx], normalize=True)
                loss = loss_fn(img, txt, model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():  # as in CLIP: the temperature may not go below 1/100
                model.logit_scale.clamp_(0, math.log(100))
            running += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{running / seen:.3f}")
            if on_step:
                on_step(epoch, step)
        bar.close()
        row = {"epoch": epoch, "train_loss": running / max(1, seen), "seconds": round(time.time() - t0, 1)}
        if coca is not None:
            row["train_caption_loss"] = caption_running / max(1, seen)
        history.append({**row, **evaluate_split(model, val, conf.batch_size)})
        log(f"[finetune] epoch {epoch}: {_fmt(history[-1])}")
        meta = {"epoch": epoch, "settings": settings, "history": json.dumps(history), "model": spec.name}
        _atomic_save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "lakelens": meta},
                     out / CHECKPOINTS / f"epoch_{epoch:03d}.pt")
    model.eval()
    final = out / FINAL
    _atomic_save({"state_dict": model.state_dict(),
                  "lakelens": {"epoch": conf.epochs, "settings": settings, "model": spec.name}}, final)
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    plot_history(history, out / "training.png", f"fine-tuning {spec.name} from "
                  + ("random init" if spec.pretrained == models.RANDOM_INIT else Path(spec.pretrained).name))
    key = ModelSpec(spec.name, str(final)).with_digest().key
    return FinetuneResult(str(out), str(final), key, conf.epochs - start_epoch, start_epoch,
                          len(train.captions), len(val.captions), skipped_train + skipped_val, history)


def _fmt(row: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                     if k != "epoch" and v is not None)


def plot_history(history: list[dict], path: Path, title: str) -> Path:
    """Held-out loss and Recall@K per epoch (epoch 0 = before training), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["val_loss"] for h in history], marker="o", label="held-out")
    trained = [h for h in history if h.get("train_loss") is not None]
    a.plot([h["epoch"] for h in trained], [h["train_loss"] for h in trained], marker=".", label="training")
    if "val_caption_loss" in history[0]:  # a CoCa: its decoder's loss too
        a.plot(epochs, [h["val_caption_loss"] for h in history], marker="s", label="held-out caption")
    a.set_xlabel("epoch")
    a.set_ylabel("contrastive loss" + (" / caption loss" if "val_caption_loss" in history[0] else ""))
    a.legend()
    for key in [k for k in history[0] if k.startswith("val_t2i_recall@")]:
        b.plot(epochs, [h[key] for h in history], marker="o", label=key.replace("val_t2i_", "text->image "))
    b.set_xlabel("epoch")
    b.set_ylabel("held-out recall")
    b.set_ylim(0, 1.02)
    b.legend()
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
