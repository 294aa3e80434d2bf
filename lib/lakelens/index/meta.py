"""Per-shard image metadata (id, path, width, height, image, box): written beside each shard as an Arrow
IPC file sorted by id, and read back memory-mapped, so the query driver looks paths up on demand instead
of holding one table of every path in RAM. Versions published before these files (Parquet metadata) are
still read, into memory.

An index entry is a whole image (image = id, box null) or one of its regions (embed.regions: its own id,
the image's id in `image`, its box as fractions of the image); files written before regions existed
have neither column and hold whole images only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lakelens.files import write_sorted_arrow

# what an image row gives its entries: caption, the source's own (a shard's or a table's), and locator,
# where the query side reads an image inside a shard or a table (ingest.table.locator), are null for files
META_COLUMNS = ["id", "path", "width", "height", "caption", "locator"]
ENTRY_COLUMNS = [*META_COLUMNS, "image", "box"]
META_SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.large_string()), ("width", pa.int32()),
                         ("height", pa.int32()), ("caption", pa.large_string()), ("locator", pa.large_string()),
                         ("image", pa.int64()), ("box", pa.list_(pa.float32()))])


def write_meta(path: str | Path, meta: pd.DataFrame) -> None:
    """One shard's metadata, sorted by id, as one uncompressed Arrow record batch (memory-mappable)."""
    meta = meta.reindex(columns=ENTRY_COLUMNS).sort_values("id", kind="stable")
    ids = meta["id"].to_numpy(np.int64)
    meta["image"] = np.where(meta["image"].isna().to_numpy(), ids,  # whole images: their own id (int64 exact)
                             meta["image"].fillna(0).to_numpy().astype(np.int64))
    for column in ("box", "caption", "locator"):
        if meta[column].dtype != object:  # none among them: a column of nulls, not of NaN
            meta[column] = pd.Series([None] * len(meta), index=meta.index, dtype=object)
    write_sorted_arrow(path, pa.Table.from_pandas(meta, schema=META_SCHEMA, preserve_index=False))


def read_meta(path: str | Path, columns=None) -> pa.Table:
    """A shard's metadata as an Arrow table sorted by id: memory-mapped for Arrow files, read into memory
    (and sorted) for the Parquet files of older versions."""
    path = Path(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path, columns=columns)
        return table.sort_by("id").combine_chunks()
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    return table.select(columns) if columns else table


def _numpy(column) -> np.ndarray:
    chunks = column.chunks
    if len(chunks) == 1:
        return chunks[0].to_numpy(zero_copy_only=False)
    return column.to_numpy()


class _Part:
    __slots__ = ("generation", "ids", "paths", "alive", "table", "whole")

    def __init__(self, generation: int, ids: np.ndarray, paths, alive: np.ndarray | None, table: pa.Table,
                 whole: np.ndarray | None):
        self.generation, self.ids, self.paths, self.alive, self.table = generation, ids, paths, alive, table
        self.whole = whole  # which entries are whole images (None: all of them)


class MetaStore:
    """The live images of a version: sorted live ids in RAM (8 bytes each), paths in the shards' mapped
    metadata files, found by binary search in the newest shard that holds the id. With regions, `ids`
    are the images and `entries` every live entry; each region's image and box are kept in RAM
    (sorted by region id, about 28 bytes a region)."""

    def __init__(self, folder: Path, entries: list[dict], tombstones: pd.DataFrame, legacy: str | None = None):
        tomb_ids = tombstones["id"].to_numpy(np.int64)
        tomb_gen = tombstones["generation"].to_numpy(np.int64)
        self.parts: list[_Part] = []
        sources = [(folder / e["meta"], int(e.get("generation", 0))) for e in entries if "meta" in e]
        if not sources and legacy:
            sources = [(folder / legacy, 0)]
        regions = []  # (region ids, their images, their boxes) of live regions, per part
        for file, generation in sources:
            table = read_meta(file)
            ids = _numpy(table.column("id")).astype(np.int64, copy=False)
            dead = tomb_ids[tomb_gen > generation]
            alive = ~np.isin(ids, dead) if len(dead) else None
            whole = None
            if "image" in table.column_names:
                images = _numpy(table.column("image")).astype(np.int64, copy=False)
                whole = images == ids
                if whole.all():
                    whole = None
                else:
                    live_region = ~whole if alive is None else ~whole & alive
                    boxes = table.column("box").take(pa.array(np.flatnonzero(live_region))).combine_chunks()
                    regions.append((ids[live_region], images[live_region],
                                    boxes.flatten().to_numpy(zero_copy_only=False).reshape(-1, 4)))
            self.parts.append(_Part(generation, ids, table.column("path"), alive, table, whole))
        self.parts.sort(key=lambda p: p.generation)  # stable: shards of one generation keep their order
        live = [p.ids if p.alive is None else p.ids[p.alive] for p in self.parts]
        self.entries = np.unique(np.concatenate(live)) if live else np.zeros(0, np.int64)
        if regions:
            rid = np.concatenate([r[0] for r in regions])
            order = np.argsort(rid, kind="stable")
            self.region_ids, self.region_images = rid[order], np.concatenate([r[1] for r in regions])[order]
            self.region_boxes = np.concatenate([r[2] for r in regions]).astype(np.float32)[order]
            self.ids = np.setdiff1d(self.entries, self.region_ids, assume_unique=True)
            self.per_image = 1 + int(np.unique(self.region_images, return_counts=True)[1].max())
        else:
            self.per_image = 1  # entries an image has at most: itself and its regions
            self.region_ids = self.region_images = np.zeros(0, np.int64)
            self.region_boxes = np.zeros((0, 4), np.float32)
            self.ids = self.entries

    @property
    def has_regions(self) -> bool:
        return bool(len(self.region_ids))

    def resolve(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Entry ids -> (their images' ids, is-a-region mask); whole images map to themselves."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.has_regions or not len(ids):
            return ids, np.zeros(len(ids), bool)
        pos = np.clip(np.searchsorted(self.region_ids, ids), 0, len(self.region_ids) - 1)
        hit = self.region_ids[pos] == ids
        return np.where(hit, self.region_images[pos], ids), hit

    def boxes(self, ids: np.ndarray) -> list:
        """Each entry's box ([x0, y0, x1, y1] fractions) or None for a whole image."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.has_regions:
            return [None] * len(ids)
        pos = np.clip(np.searchsorted(self.region_ids, ids), 0, len(self.region_ids) - 1)
        hit = self.region_ids[pos] == ids
        return [[round(float(v), 6) for v in self.region_boxes[p]] if h else None for p, h in zip(pos, hit)]

    def expand(self, images: np.ndarray) -> np.ndarray:
        """Sorted image ids -> the sorted entry ids of those images (the images and their regions): what a
        filter on images lets FAISS see."""
        if not self.has_regions:
            return images
        mine = self.region_ids[np.isin(self.region_images, images)]
        return np.union1d(images, mine)

    def __len__(self) -> int:
        return int(len(self.ids))

    def paths(self, ids: np.ndarray) -> np.ndarray:
        """Paths of live ids (object array; None for an id no shard holds)."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), None, dtype=object)
        todo = np.arange(len(ids))
        for part in reversed(self.parts):  # a changed image's live row is in the newest generation holding it
            if not len(todo):
                break
            if not len(part.ids):
                continue
            want = ids[todo]
            pos = np.minimum(np.searchsorted(part.ids, want), len(part.ids) - 1)
            hit = part.ids[pos] == want
            if hit.any():
                out[todo[hit]] = part.paths.take(pa.array(pos[hit])).to_pylist()
                todo = todo[~hit]
        return out

    def path_of(self, id_: int) -> str | None:
        i = np.searchsorted(self.ids, id_)
        if i >= len(self.ids) or self.ids[i] != id_:
            return None
        return self.paths(np.array([id_]))[0]

    def sizes(self, id_: int) -> dict:
        """width and height of a live image (None where unknown)."""
        return self.row(id_, ("width", "height"))

    def row(self, id_: int, columns) -> dict:
        """`columns` of a live image's metadata (None where unknown, and for files written before a column)."""
        for part in reversed(self.parts):
            i = int(np.searchsorted(part.ids, id_)) if len(part.ids) else 0
            if i < len(part.ids) and part.ids[i] == id_ and (part.alive is None or part.alive[i]):
                return {c: part.table.column(c)[i].as_py() if c in part.table.column_names else None
                        for c in columns}
        return dict.fromkeys(columns)

    def captions(self, ids) -> list:
        """The source's own caption of each id (None for files, unknown ids, versions written before)."""
        return [self.row(int(i), ("caption",))["caption"] for i in ids]

    def with_prefix(self, prefix: str) -> np.ndarray:
        """Sorted live ids whose path starts with `prefix` (a scan of the mapped path columns)."""
        return self._matching(lambda paths: pc.starts_with(paths, prefix))

    def with_substring(self, text: str) -> np.ndarray:
        """Sorted live ids whose path holds `text` (path: filters; a scan of the mapped path columns)."""
        return self._matching(lambda paths: pc.match_substring(paths, text))

    def _matching(self, test) -> np.ndarray:
        found = []
        for part in self.parts:
            if not len(part.ids):
                continue
            mask = test(part.paths).to_numpy(zero_copy_only=False)
            if part.alive is not None:
                mask &= part.alive
            if part.whole is not None:  # filters select images; their regions follow (expand)
                mask &= part.whole
            found.append(part.ids[mask])
        return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)

    def frame(self) -> pd.DataFrame:
        """(id, path) of every live image, sorted by id: all paths in memory, for whole-collection work
        (evaluation, benchmarks), never for a query."""
        return pd.DataFrame({"id": self.ids, "path": self.paths(self.ids)})
