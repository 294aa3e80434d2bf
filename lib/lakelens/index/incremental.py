"""Re-indexing at a cost proportional to the change: what the next version of an index must be (nothing,
an incremental version, a compaction, or a full rebuild, with the reason), the rows the table's change
feed touched, and the staging of an incremental version that shares the live version's files.

An incremental version of generation G holds hard links to every file of the live version (base
shards, earlier deltas, metadata, the trained empty index), one or more delta shards of generation G
built from the new and changed rows with the live version's trained structures (no retraining), and
tombstones: (id, G) for every id the live version held that the change feed deleted or replaced, so
each older shard drops its stale copy.
No Spark here (local builds and the query path import this module); reading the change feed is the
index job's."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens.index.layout import MANIFEST, TOMBSTONES


@dataclass
class Decision:
    kind: str  # incremental | compaction | full; "changes" while only the change feed can decide
    reason: str


def index_kind(factory: str) -> str:
    """The family of a factory string: Flat, HNSW, IVF-Flat, IVF-SQ, IVF-PQ (what `auto` chooses between)."""
    if factory.startswith("HNSW"):
        return "HNSW"
    m = re.match(r"IVF\d+,(\w+?)(\d*)$", factory)
    if m:
        return f"IVF-{m.group(1)}"
    return factory


def link_version(src: Path, staged: Path) -> None:
    """Hard-link every file of a published version into a staging folder (the manifest and tombstones
    are written anew). A file system without hard links between the two gets copies, said in the log."""
    for f in src.iterdir():
        if f.name in (MANIFEST, TOMBSTONES) or not f.is_file():
            continue
        try:
            os.link(f, staged / f.name)
        except OSError:
            shutil.copy2(f, staged / f.name)


def write_tombstones(staged: Path, previous: pd.DataFrame, ids: np.ndarray, generation: int) -> pd.DataFrame:
    """The previous tombstones plus (id, generation) for every deleted or replaced id; returns them all."""
    tomb = pd.concat([previous, pd.DataFrame({"id": ids.astype(np.int64),
                                              "generation": np.full(len(ids), generation, np.int64)})],
                     ignore_index=True)
    tomb.to_parquet(staged / TOMBSTONES, index=False)
    return tomb


def stored_rows(manifest: dict) -> int:
    """Vectors the version's shard files hold, live or not."""
    return int(sum(s["count"] for s in manifest["shards"]) + sum(d["count"] for d in manifest.get("deltas", [])))
