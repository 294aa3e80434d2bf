"""Duplicate groups of an index (`duplicates.arrow`, written beside it by `lakelens dedup --index`): what
collapse_duplicates and the duplicates listing look up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens.errors import QueryError
from lakelens.index.layout import GROUPS_FILE


@dataclass
class DuplicateGroups:
    """The groups file of an index (`duplicates.arrow`, sorted by id) and what queries look up in it."""

    stamp: tuple  # the file's mtime and size when read
    table: object  # pyarrow Table: group, id, path, similarity, representative
    ids: np.ndarray  # sorted
    group: np.ndarray  # of each id
    size: dict  # group -> its members
    order: list  # groups, largest first, then by group id

    @classmethod
    def of(cls, table, stamp: tuple) -> DuplicateGroups:
        ids, group = table.column("id").to_numpy(), table.column("group").to_numpy()
        names, counts = np.unique(group, return_counts=True)
        size = {int(g): int(n) for g, n in zip(names, counts)}
        return cls(stamp, table, ids, group, size, sorted(size, key=lambda g: (-size[g], g)))

    def collapse(self, frame: pd.DataFrame, want: int) -> pd.DataFrame:
        """The first `want` rows with one per group (its best), re-ranked, with a `duplicates` column
        counting the group's other members."""
        key, member = self.key_of(frame["id"].to_numpy(np.int64))
        _, first = np.unique(key, return_index=True)
        keep = np.sort(first)[:want]
        c = frame.iloc[keep].reset_index(drop=True)
        c["rank"] = np.arange(1, len(c) + 1)
        c["duplicates"] = [self.size[g] - 1 if m else 0 for g, m in zip(key[keep], member[keep])]
        c.attrs = frame.attrs
        return c

    def key_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each id's group, or the id itself where it is in none; and whether it is in one."""
        if not len(self.ids):
            return ids, np.zeros(len(ids), bool)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, len(self.ids) - 1)
        member = self.ids[pos] == ids
        return np.where(member, self.group[pos], ids), member


def read_groups(index_dir: Path, cached: DuplicateGroups | None) -> DuplicateGroups:
    """The groups file beside the index: `cached` while the file is the one it was read from, else read
    again (memory-mapped)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    path = Path(index_dir) / GROUPS_FILE
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise QueryError(f"no duplicate groups for {index_dir}: run lakelens dedup --index {index_dir} "
                         "first") from None
    stamp = (stat.st_mtime_ns, stat.st_size)
    if cached is not None and cached.stamp == stamp:
        return cached
    return DuplicateGroups.of(ipc.open_file(pa.memory_map(str(path))).read_all(), stamp)
