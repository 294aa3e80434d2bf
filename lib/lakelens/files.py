"""Files that others read while lakelens writes them (index files, CURRENT, caches, checkpoints, thresholds):
each is written under a unique temporary name in its own folder, synced, then moved over the old one with
os.replace, so a reader sees the old file or the whole new one, and two writers never share a temporary
file. Sorted Arrow files (index metadata, tags, captions, duplicate groups) are written here too."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that needs a file name (FAISS, torch, numpy, a JVM). When
    the block ends, what it wrote there replaces `path`; a block that raises, or leaves no file there,
    replaces nothing (and leaves no temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        if not tmp.exists():
            return
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself, durable too where the file system lets a folder be synced
        _fsync(path.parent)
    except OSError:
        pass


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_sorted_arrow(path: str | os.PathLike, table, key: str = "id") -> None:
    """`table` (pyarrow) sorted by `key` (a stable sort) as an uncompressed Arrow IPC file of one record
    batch, which readers memory-map and search by key; its schema, metadata included, as given."""
    import pyarrow as pa

    table = table.sort_by([(key, "ascending")]).combine_chunks()
    with replacing(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, len(table)))


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
