"""The offline end-to-end demo: a captioned image set -> Spark embed job (Delta) -> index -> eval with the
random-init model; fine-tune on the training split; embed, index and eval again; example queries and a
contact sheet. `shapes-pt`: English and Portuguese captions, and a model folder (`local-dir:`) whose
tokenizer the demo trains on them (Hugging Face `tokenizers`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from lakelens import config
from lakelens.index.job import IndexJob
from lakelens.ingest.embed_job import EmbedJob
from lakelens.ingest.paths import path_id, to_local, to_stored
from lakelens.models import local_dir
from lakelens.models.registry import ModelSpec
from lakelens.search import Searcher
from lakelens.spark import owned_session
from lakelens.tags.caption_job import CaptionJob
from lakelens.tags.job import TagJob
from lakelens.train import metrics as ev
from lakelens.train import synth
from lakelens.train.datasets import write_fashion_mnist
from lakelens.train.eval_run import read_captions, run_eval
from lakelens.train.finetune import finetune

DATASETS = ("shapes", "shapes-pt", "fashion-mnist")
# Per data set: the metric the demo reports, and the example text queries it shows.
HEADLINE = {"shapes": "t2i_recall@10", "shapes-pt": "t2i_recall@10", "fashion-mnist": "t2i_precision@10"}
QUERIES = {"shapes": ["a large red circle on the left of a grey background",
                      "a small blue star on the top of a striped background",
                      "a large yellow triangle on the bottom of a dotted background"],
           "shapes-pt": ["um grande círculo vermelho à esquerda", "uma pequena estrela azul no centro",
                         "um grande triângulo amarelo em baixo num fundo pontilhado",
                         "a large red circle on the left"],
           "fashion-mnist": ["a photo of a sneaker", "a photo of a trouser", "a photo of a bag",
                             "a photo of a dress"]}
VOCABS = {"shapes": "shapes", "shapes-pt": "shapes", "fashion-mnist": "fashion-mnist"}  # built-in vocabularies
CAPTION_MODEL = "lakelens-tiny-coca"
CAPTION_PAIRS, CAPTION_EPOCHS = 1500, 4  # the caption model's budget (bench/captions.py: 2000 pairs, 4 epochs)
# the hybrid query the demo shows: words for both sides, a tag filter for the keyword side's tags
HYBRID = {"shapes": "a red circle on a striped background", "shapes-pt": "um círculo vermelho num fundo listrado",
          "fashion-mnist": "a photo of a sneaker"}
DEFAULT_SIZES = {"shapes": (3000, 1000, 5), "shapes-pt": (1500, 1000, 5),  # train, held-out, epochs
                 "fashion-mnist": (12000, 2000, 4)}


def _write_data(dataset: str, train_dir: Path, images: Path, n_train: int, n_images: int) -> tuple[Path, Path]:
    if dataset.startswith("shapes"):
        langs = synth.LANGS if dataset == "shapes-pt" else ("en",)  # shapes-pt: an en and a pt caption per image
        train = synth.write_dataset(train_dir, n_train, seed=1, langs=langs)
        held_out = synth.write_dataset(images, n_images, seed=2, langs=langs)
    else:

        train = write_fashion_mnist(train_dir, "train", n_train, seed=1, varied_captions=True)
        held_out = write_fashion_mnist(images, "test", n_images, seed=2)
    # A damaged file in the lake: the job records it as a row with an error and goes on.
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return train, held_out


def contact_sheet(rows: list[tuple[str, object]], path: Path, thumb: int = 96, text_width: int = 300) -> Path:
    """One row per query: its text, then its top results as thumbnails with their scores."""
    from PIL import Image, ImageDraw

    cols = max((len(r) for _, r in rows), default=0)
    sheet = Image.new("RGB", (text_width + cols * (thumb + 8), len(rows) * (thumb + 24) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (query, results) in enumerate(rows):
        y = 8 + i * (thumb + 24)
        words, line, lines = query.split(), "", []
        for w in words:  # wrap the query text to the text column
            if draw.textlength(f"{line} {w}".strip()) > text_width - 16 and line:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        draw.multiline_text((8, y), "\n".join(lines), fill="black")
        for j, r in enumerate(results.itertuples()):
            x = text_width + j * (thumb + 8)
            with Image.open(to_local(str(r.path))) as img:
                sheet.paste(img.convert("RGB").resize((thumb, thumb)), (x, y))
            draw.text((x, y + thumb + 4), f"#{r.rank} {r.score:.3f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _tags_captions_keywords(spark, conf_path, overrides, sections: dict, dataset: str, out_dir: Path,
                            train_captions: Path, caption_epochs: int) -> dict:
    """Zero-shot tags from the stored vectors; captions by a small CoCa fine-tuned on the training captions
    (caption_epochs > 0); then the index job again with the tags table: a version with a keyword index
    that shares the vectors of the live one."""
    vocab = VOCABS[dataset]
    tags = str(out_dir / "tags")
    conf = config.load(conf_path, list(overrides), **sections, tag={"table": sections["embed"]["table"],
                                                                    "tags": tags, "vocab": vocab})
    print(f"[demo] tag job: the stored vectors against the built-in vocabulary {vocab} ({conf.tag.templates} prompt templates)")
    tagged = TagJob(spark=spark, conf=conf).launch()
    out = {"tag_run": tagged.to_dict()}
    if caption_epochs:
        pairs = read_captions(str(train_captions))
        n = min(len(pairs), CAPTION_PAIRS)
        print(f"[demo] fine-tuning {CAPTION_MODEL} on {n} training captions ({caption_epochs} epochs) to write captions")
        ft = config.load(conf_path, list(overrides), finetune={"out": str(out_dir / "caption-model"),
                                                               "epochs": caption_epochs, "batch_size": 16,
                                                               "lr": 0.002, "max_pairs": n})
        coca = finetune(pairs, ModelSpec(CAPTION_MODEL), ft.finetune)
        conf = config.load(conf_path, list(overrides), **sections,
                           caption={"table": sections["embed"]["table"], "tags": tags, "model": CAPTION_MODEL,
                                    "pretrained": coca.final_checkpoint})
        print("[demo] caption job: a caption per embedded image, into the tags table")
        out["caption_run"] = CaptionJob(spark=spark, conf=conf).launch().to_dict()
    conf = config.load(conf_path, list(overrides), **{**sections, "index": {**sections["index"], "tags": tags,
                                                                            "vocab": vocab}})
    print("[demo] index job with the tags table: a version with a keyword index (BM25 over tags, captions, paths)")
    out["index_keywords"] = IndexJob(spark=spark, conf=conf).launch().to_dict()
    return out


def _show_tags(searcher: Searcher, dataset: str, paths: list[str]) -> None:
    for p in paths:
        d = searcher.details(path_id(to_stored(p)))
        tags = ", ".join(f"{t['tag']} {t['score']:.2f}" for t in d["tags"][:5]) or "(none over their threshold)"
        print(f"[demo] {Path(p).name}: tags {tags}; caption {d['caption']!r}")
    q = HYBRID[dataset]
    for mode in ("hybrid", "vector", "keyword"):
        found = searcher.search_text(q, k=5, mode=mode)
        print(f"[demo] {mode} query {q!r}:")
        for r in found.itertuples():
            print(f"  {r.rank}  {r.score:.4f}  {Path(r.path).name}  [{', '.join(r.tags)}]  {r.caption!r}")


def _embed_index_eval(spark, conf, captions: Path, eval_dir: Path, tag: str) -> dict:

    embedded = EmbedJob(spark=spark, conf=conf).launch()
    built = IndexJob(spark=spark, conf=conf).launch()
    metrics = run_eval(conf.index.index, str(captions), (1, 5, 10, 50), out=str(eval_dir / f"{tag}.json"))
    return {"embed": embedded.to_dict(), "index": built.to_dict(), "metrics": metrics}


def run_demo(out: str = "build/demo", dataset: str = "shapes", n_train: int | None = None,
             n_images: int | None = None, epochs: int | None = None, conf_path: str | None = None,
             overrides=(), master: str | None = None, with_captions: bool = True) -> dict:

    if dataset not in DATASETS:
        raise config.ConfigError(f"--dataset: {dataset!r} is not one of {', '.join(DATASETS)}")
    d_train, d_images, d_epochs = DEFAULT_SIZES[dataset]
    n_train, n_images, epochs = n_train or d_train, n_images or d_images, epochs or d_epochs
    t0 = time.time()
    out_dir = Path(out).resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    images, table, index_dir, eval_dir = (out_dir / "images", out_dir / "embeddings", out_dir / "index",
                                          out_dir / "eval")
    eval_dir.mkdir(parents=True)
    print(f"[demo] {dataset}: writing {n_train} training and {n_images} held-out captioned images under {out_dir}")
    train_captions, captions = _write_data(dataset, out_dir / "train", images, n_train, n_images)
    sections = {"spark": {"master": master}, "embed": {"images": str(images), "table": str(table)},
                "index": {"table": str(table), "index": str(index_dir)}}
    if dataset == "shapes-pt":
        tokenizer = local_dir.train_tokenizer(read_captions(str(train_captions))["caption"], vocab_size=1000)
        folder = local_dir.write_model_folder(out_dir / "model-folder", tokenizer)
        print(f"[demo] a tokenizer of {tokenizer.get_vocab_size()} pieces trained on the training captions; "
              f"model {folder}")
        sections["model"] = {"name": folder, "pretrained": "none"}
    conf = config.load(conf_path, list(overrides), **sections)
    spec = ModelSpec.from_config(conf.model)
    phases = {}
    with owned_session(conf.spark) as spark:
        print(f"[demo] embed job + index job + eval with {spec.key} (before fine-tuning)")
        t = time.time()
        before = _embed_index_eval(spark, conf, captions, eval_dir, "before")
        phases["before_seconds"] = round(time.time() - t, 1)
        print("[demo] the embed job again: nothing changed, so nothing is embedded")
        rerun = EmbedJob(spark=spark, conf=conf).launch()

        print(f"[demo] fine-tuning {spec.name} on the captions of {n_train} training images ({epochs} epochs)")
        t = time.time()
        ft_conf = config.load(conf_path, list(overrides), **sections,
                              finetune={"out": str(out_dir / "model"), "epochs": epochs})
        tuned = finetune(read_captions(str(train_captions)), spec, ft_conf.finetune)
        phases["finetune_seconds"] = round(time.time() - t, 1)

        print(f"[demo] embed job + index job + eval with the fine-tuned weights {tuned.final_checkpoint}")
        t = time.time()
        sections["model"] = {**sections.get("model", {}), "pretrained": tuned.final_checkpoint}
        conf = config.load(conf_path, list(overrides), **sections)
        after = _embed_index_eval(spark, conf, captions, eval_dir, "after")
        phases["after_seconds"] = round(time.time() - t, 1)

        t = time.time()
        keywords = _tags_captions_keywords(spark, conf_path, overrides, sections, dataset, out_dir, train_captions,
                                           min(CAPTION_EPOCHS, epochs) if with_captions else 0)
        phases["tags_captions_keywords_seconds"] = round(time.time() - t, 1)

    ks = (1, 5, 10, 50)
    curves = {f"{name}, {tag}": {k: m["metrics"][f"{name}_recall@{k}"] for k in ks}
              for tag, m in (("random init", before), ("fine-tuned", after)) for name in ("t2i", "i2t")}
    ev.plot_recall(curves, str(eval_dir / "recall.png"), f"Recall@K on {n_images} held-out {dataset} images")
    searcher = Searcher.open(index_dir)
    query_image = Path(read_captions(str(captions))["path"].iloc[0])
    same = searcher.search_image(query_image, k=3)
    print(f"[demo] image -> image, query {query_image.name} (an image is its own nearest neighbour):")
    print(same.to_string(index=False))
    rows = []
    for q in QUERIES[dataset]:
        found = searcher.search_text(q, k=5, mode="vector")
        rows.append((q, found))
        print(f"[demo] text -> image: {q!r}")
        print(found[["rank", "score", "path"]].to_string(index=False))
    sheet = contact_sheet(rows, out_dir / "contact_sheet.png")
    _show_tags(searcher, dataset, list(read_captions(str(captions))["path"][:3]))
    head = HEADLINE[dataset]
    b, a = before["metrics"][head], after["metrics"][head]
    result = {"dataset": dataset, "train_pairs": tuned.train_pairs, "held_out_images": n_images,
              "epochs": epochs, "model_before": spec.key, "model_after": tuned.spec_key,
              "headline": head, "before": b, "after": a, "ratio": round(a / b, 2) if b else None,
              "metrics_before": before["metrics"], "metrics_after": after["metrics"],
              "first_run": before["embed"], "rerun": rerun.to_dict(), "after_run": after["embed"],
              "index_before": before["index"], "index_after": after["index"],
              "finetune_history": tuned.history, **keywords, **phases, "seconds": round(time.time() - t0, 1)}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"[demo] {head} on the held-out images: random init {b:.3f} -> fine-tuned {a:.3f}"
          + (f" ({a / b:.1f}x)" if b else ""))
    for lang, m in after["metrics"].get("by_lang", {}).items():
        print(f"[demo]   {lang}: {head} random init {before['metrics']['by_lang'][lang][head]:.3f} -> fine-tuned {m[head]:.3f}")
    print(f"[demo] metrics: {eval_dir}/before.json, after.json; recall plot {eval_dir}/recall.png; "
          f"training curves {tuned.out}/training.png; contact sheet {sheet}")
    print(f"[demo] done in {result['seconds']} s")
    return result
