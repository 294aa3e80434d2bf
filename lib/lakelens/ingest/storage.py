"""Reading one stored image outside Spark (thumbnails, query-by-id, evaluation), bounded and confined.

A read is allowed only for a stored path under one of the given roots, only of a regular file (a FIFO
or a device in an image folder is refused without blocking), and never of more than `max_bytes`.
Local files are opened with O_NONBLOCK and checked with fstat on the open descriptor, so a file swapped
for something else between a check and the read is still caught. Object storage (s3a://) is read with
pyarrow's S3 client, configured from the same `spark.hadoop.fs.s3a.*` keys the Spark jobs use."""

from __future__ import annotations

import os
import stat

from lakelens.errors import DataError
from lakelens.ingest.paths import is_remote, to_local, under


class StorageError(DataError):
    """A stored image cannot be read: `status` is the HTTP status a server answers with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def read_bounded(path: str, max_bytes: int, roots: list[str] | None = None, s3=None) -> bytes:
    """The bytes of the file at stored `path`. Raises StorageError (404 gone, not allowed or unusable;
    413 over `max_bytes`). `roots`: stored folder paths the file must lie under (None: no restriction).
    `s3`: an S3Settings for s3a:// paths."""
    if roots is not None and not under(path, roots):
        raise StorageError(404, "image is outside the image folders of the index")
    if is_remote(path):
        if s3 is None:
            raise StorageError(404, "image is on object storage and no S3 settings were given (--conf)")
        return s3.read(path, max_bytes)
    try:
        local = to_local(path)
    except DataError as e:
        raise StorageError(404, str(e)) from None
    try:
        fd = os.open(local, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        raise StorageError(404, "image file is gone") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(404, "image path is not a regular file")
        if st.st_size > max_bytes:
            raise StorageError(413, f"image file is larger than {max_bytes} bytes")
        chunks, left = [], max_bytes + 1
        while left > 0:
            block = os.read(fd, min(left, 1 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
        data = b"".join(chunks)
        if len(data) > max_bytes:  # grew since fstat
            raise StorageError(413, f"image file is larger than {max_bytes} bytes")
        return data
    finally:
        os.close(fd)
