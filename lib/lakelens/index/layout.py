"""The names of an index folder's files, in one place for every module that writes or reads them (index/,
search/, dedup/, web/; docs/architecture.md "Index folder" says what each holds):

    INDEX/CURRENT                          the live version's name, replaced by rename
    INDEX/.lock, INDEX/.building-*         the build lock; staging folders
    INDEX/duplicates.arrow                 `lakelens dedup --index`'s groups
    INDEX/vNNNN/manifest.json              the version's description
    INDEX/vNNNN/shard-NNNN.faiss, meta-NNNN.arrow, shard-NNNN.{vectors,ids}.npy
    INDEX/vNNNN/delta-GGGG-NNNN.{faiss,arrow}, tombstones.parquet, trained.faiss
    INDEX/vNNNN/keyword/, tags.arrow, captions.arrow
    INDEX/vNNNN/meta.parquet               one metadata file for all shards (versions before per-shard files)
"""

from __future__ import annotations

import re
from pathlib import Path

CURRENT = "CURRENT"
LOCK = ".lock"
STAGING_PREFIX = ".building-"
GROUPS_FILE = "duplicates.arrow"

MANIFEST = "manifest.json"
TRAINED = "trained.faiss"
TOMBSTONES = "tombstones.parquet"
KEYWORD_DIR = "keyword"
TAGS_FILE = "tags.arrow"
CAPTIONS_FILE = "captions.arrow"
LEGACY_META = "meta.parquet"  # read, never written: versions published before per-shard metadata files

VERSION_RE = re.compile(r"^v(\d{4,})$")


def version_name(number: int) -> str:
    return f"v{number:04d}"


def shard_file(s: int) -> str:
    return f"shard-{s:04d}.faiss"


def meta_file(s: int) -> str:
    return f"meta-{s:04d}.arrow"


def delta_file(generation: int, s: int) -> str:
    return f"delta-{generation:04d}-{s:04d}.faiss"


def delta_meta_file(generation: int, s: int) -> str:
    return f"delta-{generation:04d}-{s:04d}.arrow"


def rerank_files(shard_path: str | Path) -> tuple[Path, Path]:
    """Raw vectors and their ids beside a shard, for exact re-ranking of compressed-code candidates."""
    p = Path(shard_path)
    stem = p.name[: -len(".faiss")] if p.name.endswith(".faiss") else p.name
    return p.with_name(stem + ".vectors.npy"), p.with_name(stem + ".ids.npy")
