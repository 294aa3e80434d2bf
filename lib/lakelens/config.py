"""The whole config tree as dataclasses, loaded from YAML plus `section.key=value` overrides."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lakelens.errors import ConfigError


def defaults_text() -> str:
    """Every config key with its default and what it does: package data lakelens/data/default.yaml
    (`lakelens config --defaults` prints it)."""
    return (resources.files("lakelens") / "data" / "default.yaml").read_text(encoding="utf-8")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'4G', '512M', '1.5g', 1024 -> bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 512M, 4G)")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " "))


@dataclass
class SparkConfig:
    master: str = ""  # empty: spark-submit's --master, else local[*]
    remote: str = ""  # Spark Connect server (sc://host:port); empty: $SPARK_REMOTE, else a classic session
    app_name: str = "lakelens"
    jars_dir: str = ""  # empty: $LAKELENS_JARS_DIR, else a checkout's build/jars, else Maven (packages)
    packages: str = ""  # spark.jars.packages when no jars dir is found (clusters)
    shuffle_partitions: int = 8
    extra: dict = field(default_factory=dict)  # any other spark.* settings, passed as is


@dataclass
class ModelConfig:
    name: str = "lakelens-tiny"
    pretrained: str = "none"  # open_clip tag | local checkpoint path | none (random init, seed 0)


@dataclass
class EmbedConfig:
    images: str = ""
    table: str = ""
    format: str = "delta"
    batch_size: int = 32
    chunk_size: int = 2000  # files in the first chunk (and in each, when chunk_seconds is 0)
    chunk_seconds: float = 60.0  # later chunks grow to about this many seconds of embedding each; 0: fixed
    partitions: int = 0
    path_glob: str = ""
    max_file_bytes: int = 256 * 1024 * 1024
    max_pixels: int = 89_478_485
    decode_threads: int = 2
    draft: bool = True
    engine: str = "onnx-int8"  # onnx-int8 | onnx | torch | torch-bf16 (engines.py)
    device: str = "auto"  # auto: the task's GPU if Spark assigned one, else cuda:0 if present, else cpu
    onnx_cache: str = ""  # exported ONNX graphs; empty: $LAKELENS_CACHE_DIR/onnx or ~/.cache/lakelens/onnx
    lock_wait: float = 0.0  # seconds to wait for another run on the same table; 0: exit at once
    commit_retries: int = 5  # a chunk's Delta commit is retried this often after a concurrent-write conflict
    regions: bool = False  # also embed crops (a grid and the centre) of each image, kept in its row's `regions`
    region_grid: int = 2  # the crops: region_grid x region_grid cells plus the centre (2: five crops)
    source: str = "auto"  # files | webdataset | table | auto (ingest: shard_job, table_source)
    caption_key: str = "txt"  # webdataset: the member extension holding a sample's caption
    image_column: str = ""  # table: the image bytes (default: the one binary jpg/png/webp/image/content, or Image struct)
    caption_column: str = ""  # table: the caption (default: caption, txt or text where present)
    key_column: str = ""  # table: what identifies a row (default: key, else the Image struct's path)


@dataclass
class IndexConfig:
    table: str = ""
    index: str = ""
    format: str = "delta"
    version: int = -1
    shards: int = 0
    factory: str = "auto"
    memory_budget: str = "4G"
    exact_max_rows: int = 50_000
    hnsw_max_rows: int = 300_000
    train_sample: int = 100_000
    prune: int = 0
    force: bool = False
    lock_wait: float = 0.0  # seconds to wait for another build in the same index folder; 0: exit at once
    full: bool = False  # rebuild from every row, retraining, even where an incremental version would do
    max_deltas: int = 10  # delta shard generations before a compaction merges them into base shards
    max_deleted_fraction: float = 0.2  # tombstones / vectors held before a compaction
    min_recall: float = 0.9  # IVF drift probe: below this recall@10 of new rows, retrain (full build)
    tags: str = ""  # the tags table (Delta, lakelens tag / caption): each version gets a keyword index of it
    vocab: str = ""  # the vocabulary file whose synonyms and parents the keyword index adds to each tag


@dataclass
class FinetuneConfig:
    pairs: str = ""  # (path, caption[, label][, split]) table: Delta, Parquet or CSV
    out: str = ""  # checkpoints/, final.pt, history.json and training.png go here
    epochs: int = 5
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    val_fraction: float = 0.1  # held out by a hash of the path unless the table has a `split` column
    seed: int = 0
    max_pairs: int = 0  # 0: all; else a seeded sample of this many pairs


@dataclass
class DedupConfig:
    table: str = ""  # the embeddings table
    out: str = ""  # the duplicates table (Delta): group, id, path, similarity, representative
    index: str = ""  # search this index's live version (scales); empty: exact blockwise search of the table
    format: str = "delta"  # the embeddings table's format
    threshold: float = 0.99  # cosine similarity at or above which two images are near copies
    guard: float = 0.96  # every member of a group is at least this similar to its representative (no chains)
    neighbors: int = 32  # index path: nearest neighbours looked at per image (pairs over the threshold among them)
    block_rows: int = 4096  # exact path: rows per block of the blockwise self-join
    full: bool = False  # search every image again instead of only new and changed ones


@dataclass
class TagConfig:
    table: str = ""  # the embeddings table whose stored vectors are scored
    tags: str = ""  # the tags table (Delta): id, path, tag, score, source, model, vocab
    vocab: str = ""  # the vocabulary file (CSV: tag[, prompts][, synonyms][, parent]), or a built-in one by name: photo
    format: str = "delta"  # the embeddings table's format
    threshold: float = 0.25  # cosine at or above which a tag is kept, where no calibrated threshold applies
    max_tags: int = 10  # tags kept per image, best first; 0: no cap
    templates: str = "simple"  # prompt templates of tags without prompts: simple (7) | openai (80)
    thresholds: str = ""  # calibrated thresholds file; empty: VOCAB.thresholds.json beside the vocabulary
    target_precision: float = 0.9  # calibration: per tag, the lowest threshold with this precision on the labels
    min_positives: int = 5  # calibration: tags with fewer labelled images keep `threshold`
    full: bool = False  # score every image again instead of only new and changed ones


@dataclass
class CaptionConfig:
    table: str = ""  # the embeddings table: its rows without error are captioned
    tags: str = ""  # the tags table (Delta) the captions are written to, source = caption
    images: str = ""  # only the table's images under this folder or URI prefix; "": the whole table
    format: str = "delta"  # the embeddings table's format (parquet: no change feed, every run is full)
    model: str = ""  # a CoCa architecture (or local-dir:FOLDER); empty: model.name
    pretrained: str = ""  # its weights; empty: model.pretrained when caption.model is empty, else none
    max_tokens: int = 20  # longest caption in tokens, start and end included
    beams: int = 1  # 1: greedy decoding; more: beam search
    batch_size: int = 16  # images per model batch and per Arrow batch
    partitions: int = 0  # tasks; 0: two per core
    max_pixels: int = 89_478_485
    full: bool = False  # caption every image again instead of only new and changed ones


@dataclass
class Config:
    spark: SparkConfig = field(default_factory=SparkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tag: TagConfig = field(default_factory=TagConfig)
    caption: CaptionConfig = field(default_factory=CaptionConfig)


# Allowed values and lower bounds, checked after every load; the key names the failing setting.
CHOICES = {"embed.format": ("delta", "parquet"), "index.format": ("delta", "parquet"), "dedup.format": ("delta", "parquet"),
           "tag.format": ("delta", "parquet"), "tag.templates": ("simple", "openai"),
           "caption.format": ("delta", "parquet"),
           "embed.engine": ("torch", "torch-bf16", "onnx", "onnx-int8"),
           "embed.source": ("auto", "files", "webdataset", "table"), "embed.device": ("auto", "cpu", "cuda")}
MINIMUMS = {
    "spark.shuffle_partitions": 1,
    "embed.batch_size": 1,
    "embed.chunk_size": 1,
    "embed.chunk_seconds": 0.0,
    "embed.partitions": 0,
    "embed.max_file_bytes": 1,
    "embed.max_pixels": 1,
    "embed.decode_threads": 1,
    "embed.region_grid": 1,
    "index.version": -1,
    "index.shards": 0,
    "index.exact_max_rows": 0,
    "index.hnsw_max_rows": 0,
    "index.train_sample": 1,
    "index.prune": 0,
    "finetune.epochs": 1,
    "finetune.batch_size": 2,
    "finetune.lr": 0.0,
    "finetune.weight_decay": 0.0,
    "finetune.warmup_steps": 0,
    "finetune.val_fraction": 0.0,
    "finetune.max_pairs": 0,
    "embed.lock_wait": 0.0,
    "embed.commit_retries": 0,
    "index.lock_wait": 0.0,
    "index.max_deltas": 1,
    "index.max_deleted_fraction": 0.0,
    "index.min_recall": 0.0,
    "dedup.threshold": -1.0,
    "dedup.guard": -1.0,
    "dedup.neighbors": 1,
    "dedup.block_rows": 1,
    "tag.threshold": -1.0,
    "tag.max_tags": 0,
    "tag.target_precision": 0.0,
    "tag.min_positives": 1,
    "caption.max_tokens": 2,
    "caption.beams": 1,
    "caption.batch_size": 1,
    "caption.partitions": 0,
    "caption.max_pixels": 1,
}


# Keys naming a table, folder or file. A relative local path among them is made absolute once, when the
# config is loaded, against the working folder: Delta's SQL names a table by an absolute path only
# (delta.`T` is read as a table T in a database delta), and the same path must name the same place in
# every stage of a run.
PATH_KEYS = ("spark.jars_dir", "embed.images", "embed.table", "embed.onnx_cache", "index.table", "index.index",
             "index.tags", "index.vocab", "finetune.pairs", "finetune.out", "dedup.table", "dedup.out", "dedup.index",
             "tag.table", "tag.tags", "tag.vocab", "tag.thresholds", "caption.table", "caption.tags", "caption.images")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


VOCAB_KEYS = ("index.vocab", "tag.vocab")


def bare_name(value: str) -> bool:
    """A word without a folder or an extension (`photo`): a built-in vocabulary's name (tags.vocab.vocab_path)."""
    return bool(value) and not any(sep and sep in value for sep in ("/", os.sep, os.altsep)) \
        and not os.path.splitext(value)[1]


def has_scheme(path: str) -> bool:
    """Whether `path` is a URI (s3a://, file:, dbfs:/), not a local path."""
    return bool(_SCHEME.match(path))


def absolute_path(path: str) -> str:
    """A local path made absolute against the working folder ('~' expanded); '' and anything with a URI
    scheme (s3a://, file:, dbfs:/) stay as they are, as does an absolute path (its spelling is the user's)."""
    if not path or _SCHEME.match(path):
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.abspath(path)


def check_utf8(key: str, path: str) -> str:
    """`path` when it is valid UTF-8. Linux names are bytes, and Python carries those that are not UTF-8
    as surrogate escapes that no Spark or Hadoop string can hold: such a folder cannot be a table or an
    image root, so it is refused here, naming `key`, rather than deep in a job."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise ConfigError(f"{key}: {shown} is not valid UTF-8 (bytes shown as \\xNN); Spark and Hadoop cannot "
                          f"name it: rename it") from None
    return path


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                return float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if typ is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    raise TypeError(f"unsupported config type for {key}: {typ}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; allowed: {', '.join(prefix + n for n in names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value if value is not None else {}, full + ".")
        elif hints[key] is dict and isinstance(value, dict):
            getattr(obj, key).update(_coerce(full, value, dict))
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _validate(conf: Config) -> None:
    try:
        if parse_size(conf.index.memory_budget) <= 0:
            raise ValueError("must be positive")
    except ValueError as e:
        raise ConfigError(f"index.memory_budget: {e}") from None
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(conf, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    for key, low in MINIMUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(conf, section), name)
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")
    if not conf.dedup.threshold <= 1:
        raise ConfigError(f"dedup.threshold: a cosine similarity, at most 1, got {conf.dedup.threshold}")
    if not conf.dedup.guard <= conf.dedup.threshold:
        raise ConfigError(f"dedup.guard: must not exceed dedup.threshold ({conf.dedup.threshold}), got {conf.dedup.guard}")
    if not conf.tag.threshold <= 1:
        raise ConfigError(f"tag.threshold: a cosine similarity, at most 1, got {conf.tag.threshold}")
    if not 0 < conf.tag.target_precision <= 1:
        raise ConfigError(f"tag.target_precision: a precision in (0, 1], got {conf.tag.target_precision}")
    if not conf.finetune.val_fraction < 1:
        raise ConfigError(f"finetune.val_fraction: must be below 1, got {conf.finetune.val_fraction}")


def parse_override(text: str) -> dict:
    """`embed.batch_size=16` -> {"embed": {"batch_size": 16}}; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key part")
    value: Any = yaml.safe_load(raw) if raw.strip() else ""
    for part in reversed(parts):
        value = {part: value}
    return value


def load(path: str | Path | None = None, overrides: list[str] | tuple = (), **sections: dict) -> Config:
    """Defaults, then the YAML file, then `overrides` strings, then keyword sections (from CLI flags)."""
    conf = Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        _apply(conf, data)
    for text in overrides:
        _apply(conf, parse_override(text))
    for section, values in sections.items():
        _apply(conf, {section: {k: v for k, v in values.items() if v is not None}})
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(conf, section), name)
        if key in VOCAB_KEYS and bare_name(value):
            continue  # `photo` names a built-in vocabulary, not a file in the working folder
        setattr(getattr(conf, section), name, check_utf8(key, absolute_path(value)))
    _validate(conf)
    return conf


def to_dict(conf: Config) -> dict:
    return dataclasses.asdict(conf)
