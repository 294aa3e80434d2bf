"""Duplicate groups of an index (`duplicates.arrow`, written beside it by `lakelens dedup --index`): what
collapse_duplicates and the duplicates listing look up, read once per version of the file."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lakelens.errors import QueryError
from lakelens.index.layout import GROUPS_FILE
from lakelens.search.results import MAX_K


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

    def collapsed_search(self, search, want: int, total: int) -> list[pd.DataFrame]:
        """The first `want` results of each query of `search(n) -> [result rows]` with one per group: searched
        deeper (x4, doubling while groups eat the list) until enough distinct groups or all `total` images."""
        fetch = min(MAX_K, 4 * want)
        while True:
            frames = search(fetch)
            out, short = [], False
            for f in frames:
                c = self.collapse(f, want)
                out.append(c)
                short |= len(c) < want and len(f) == fetch
            if not short or fetch >= min(MAX_K, total):
                return out
            fetch = min(MAX_K, 2 * fetch)

    def listing(self, offset: int, limit: int, live_version: str) -> dict:
        """Groups of near copies, largest first: {"total", "groups": [{"group", "size", "members": [...]}],
        "index_version", "notes"}; members are (id, path, similarity, representative), representative first."""
        import pyarrow as pa
        import pyarrow.compute as pc

        page = self.order[offset:offset + limit]
        t = self.table
        rows = t.filter(pc.is_in(t["group"], pa.array(page, pa.int64()))).to_pandas()
        by_group = dict(tuple(rows.groupby("group")))
        groups = []
        for g in page:
            part = by_group[g].sort_values(["representative", "similarity"], ascending=False)
            groups.append({"group": int(g), "size": self.size[g],
                           "members": [{"id": int(r.id), "path": r.path, "similarity": round(float(r.similarity), 4),
                                        "representative": bool(r.representative)} for r in part.itertuples()]})
        made_for = (t.schema.metadata or {}).get(b"index_version", b"").decode()
        notes = [] if made_for == live_version else [
            f"the groups were made for index version {made_for}; the live version is {live_version}"]
        return {"total": len(self.order), "offset": offset, "groups": groups, "index_version": made_for, "notes": notes}

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


class GroupsFile:
    """The groups file beside an index as queries from many threads read it: read again only when it is
    replaced (memory-mapped)."""

    def __init__(self, index_dir: Path):
        self.index_dir = Path(index_dir)
        self._cached: DuplicateGroups | None = None
        self._lock = threading.Lock()

    def exists(self) -> bool:
        return (self.index_dir / GROUPS_FILE).is_file()

    def read(self) -> DuplicateGroups:
        with self._lock:
            cached = self._cached
        groups = read_groups(self.index_dir, cached)
        if groups is not cached:
            with self._lock:
                self._cached = groups
        return groups
