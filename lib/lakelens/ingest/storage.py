"""Reading one stored image outside Spark (thumbnails, query-by-id, evaluation), bounded and confined.

A read is allowed only for a stored path under one of the given roots, only of a regular file (a FIFO
or a device in an image folder is refused without blocking), and never of more than `max_bytes`.
Local files are opened with O_NONBLOCK and checked with fstat on the open descriptor, so a file swapped
for something else between a check and the read is still caught. Object storage (s3a://) is read with
pyarrow's S3 client, configured from the same `spark.hadoop.fs.s3a.*` keys the Spark jobs use."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from dataclasses import dataclass, field

from lakelens.errors import DataError
from lakelens.ingest.paths import REMOTE_SCHEMES, is_remote, to_local, under

log = logging.getLogger(__name__)


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


S3A_PREFIX = "spark.hadoop.fs.s3a."
_FS_LOCK = threading.Lock()


@dataclass(frozen=True)
class S3Settings:
    """How to reach object storage outside Spark (pyarrow's S3 client), from the same Hadoop s3a keys the
    Spark jobs use: `spark.hadoop.fs.s3a.{endpoint, endpoint.region, path.style.access,
    connection.ssl.enabled, access.key, secret.key, session.token, aws.credentials.provider}` in
    `spark.extra`. Without keys, the AWS SDK's own chain (environment, ~/.aws, instance metadata) applies."""

    endpoint: str = ""  # host[:port]; empty: AWS's endpoint for the region
    scheme: str = "https"
    region: str = ""
    path_style: bool = False
    access_key: str = field(default="", repr=False)
    secret_key: str = field(default="", repr=False)
    session_token: str = field(default="", repr=False)
    anonymous: bool = False
    connect_timeout: float = 10.0
    request_timeout: float = 30.0

    @classmethod
    def from_config(cls, conf) -> S3Settings | None:
        """The settings in `conf.spark.extra` (a lakelens.config.Config); None when it has no fs.s3a keys."""
        extra = {k[len(S3A_PREFIX):]: str(v).strip() for k, v in conf.spark.extra.items() if k.startswith(S3A_PREFIX)}
        if not extra:
            return None

        def flag(key: str, default: bool) -> bool:
            value = extra.get(key, "").lower()
            return default if not value else value == "true"

        endpoint, scheme = extra.get("endpoint", ""), "https" if flag("connection.ssl.enabled", True) else "http"
        if "://" in endpoint:  # Hadoop takes a URL too, and then its scheme wins over connection.ssl.enabled
            scheme, endpoint = endpoint.split("://", 1)
        return cls(endpoint=endpoint.rstrip("/"), scheme=scheme.lower(),
                   region=extra.get("endpoint.region") or extra.get("region", ""),
                   path_style=flag("path.style.access", False),
                   access_key=extra.get("access.key", ""), secret_key=extra.get("secret.key", ""),
                   session_token=extra.get("session.token", ""),
                   anonymous="Anonymous" in extra.get("aws.credentials.provider", ""))

    def filesystem(self):
        """A pyarrow S3FileSystem for these settings, made once and shared (it is thread-safe)."""
        fs = self.__dict__.get("_fs")
        if fs is None:
            with _FS_LOCK:
                fs = self.__dict__.get("_fs")
                if fs is None:
                    from pyarrow import fs as pafs

                    keys = {"access_key": self.access_key, "secret_key": self.secret_key,
                            "session_token": self.session_token or None} if self.access_key else {}
                    fs = pafs.S3FileSystem(
                        **keys, anonymous=self.anonymous and not self.access_key,
                        region=self.region or ("us-east-1" if self.endpoint else None),
                        scheme=self.scheme, endpoint_override=self.endpoint or None,
                        # as Hadoop: bucket in the host name unless path-style access is asked for
                        force_virtual_addressing=bool(self.endpoint) and not self.path_style,
                        connect_timeout=self.connect_timeout, request_timeout=self.request_timeout)
                    object.__setattr__(self, "_fs", fs)
        return fs

    def _split(self, path: str) -> tuple[str, str]:
        scheme = next((s for s in REMOTE_SCHEMES if path.startswith(s)), None)
        bucket, _, key = path[len(scheme):].partition("/") if scheme else ("", "", "")
        if not bucket or not key or key.endswith("/"):
            raise StorageError(404, "not an object storage path")
        return bucket, key

    def read_range(self, path: str, offset: int, length: int, where: dict | None = None) -> bytes:
        """`length` bytes at `offset` of the object at stored `path`: one ranged GET. `where`: the locator,
        whose container size the object must still have."""
        bucket, key = self._split(path)
        try:
            with self.filesystem().open_input_file(f"{bucket}/{key}") as f:
                if offset + length > f.size() or not _as_indexed(where or {}, f.size(), None):
                    raise StorageError(404, "image shard changed since it was indexed")
                data = f.read_at(length, offset)
        except StorageError:
            raise
        except FileNotFoundError:
            raise StorageError(404, "image shard is gone") from None
        except (OSError, ValueError) as e:
            log.warning("reading %s from object storage failed: %s", path, e)
            raise StorageError(404, "image could not be read from object storage") from None
        if len(data) != length:
            raise StorageError(404, "image shard changed while it was read")
        return data

    def read(self, path: str, max_bytes: int) -> bytes:
        """The bytes of the object at stored `path` (`s3a://bucket/key`, the key as Hadoop spells it: never
        percent-encoded). StorageError 404 when it is missing or cannot be read, 413 when it is larger than
        `max_bytes` (refused from its size, before any byte is downloaded)."""
        scheme = next((s for s in REMOTE_SCHEMES if path.startswith(s)), None)
        bucket, _, key = path[len(scheme):].partition("/") if scheme else ("", "", "")
        if not bucket or not key or key.endswith("/"):
            raise StorageError(404, "not an object storage path")
        try:
            with self.filesystem().open_input_file(f"{bucket}/{key}") as f:
                size = f.size()
                if size > max_bytes:
                    raise StorageError(413, f"image file is larger than {max_bytes} bytes")
                data = f.read(size)
        except StorageError:
            raise
        except FileNotFoundError:
            raise StorageError(404, "image file is gone") from None
        except (OSError, ValueError) as e:  # access denied, unreachable: the details go to the log, not the client
            log.warning("reading %s from object storage failed: %s", path, e)
            raise StorageError(404, "image could not be read from object storage") from None
        if len(data) != size:
            raise StorageError(404, "image file changed while it was read")
        return data



def _as_indexed(where: dict, size: int, millis: int | None) -> bool:
    """Whether a container still has the size (and, where known, the modification time) it had when its
    images were embedded: a shard rewritten since holds other bytes at the same offsets."""
    if where.get("container_size") is not None and int(where["container_size"]) != size:
        return False
    return millis is None or where.get("container_millis") is None or int(where["container_millis"]) == millis


def read_located(path: str, locator: str | None, max_bytes: int, roots: list[str] | None = None, s3=None) -> bytes:
    """The bytes of an indexed image: a file at stored `path`, or (with `locator`, the JSON that
    ingest.table.with_source_columns writes) a member of a tar shard, read by its offset and length alone
    (a ranged read on object storage, never the whole shard). The same limits as read_bounded: the shard
    must lie under `roots`, a regular file, and the image no larger than `max_bytes`."""
    if not locator:
        return read_bounded(path, max_bytes, roots, s3)
    try:
        where = json.loads(locator)
        shard, length = str(where["path"]), int(where["length"])
        offset = int(where["offset"]) if where.get("offset") is not None else -1
    except (ValueError, KeyError, TypeError):
        raise StorageError(404, "image location is unreadable") from None
    if roots is not None and not under(shard, roots):
        raise StorageError(404, "image is outside the image folders of the index")
    if length > max_bytes:
        raise StorageError(413, f"image file is larger than {max_bytes} bytes")
    if where.get("column"):
        return read_table_row(shard, where, s3)
    if offset < 0 or length < 0:
        raise StorageError(404, "image location is unreadable")
    if is_remote(shard):
        if s3 is None:
            raise StorageError(404, "image is on object storage and no S3 settings were given (--conf)")
        return s3.read_range(shard, offset, length, where)
    try:
        fd = os.open(to_local(shard), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, DataError):
        raise StorageError(404, "image shard is gone") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(404, "image shard is not a regular file")
        if offset + length > st.st_size or not _as_indexed(where, st.st_size, st.st_mtime_ns // 1_000_000):
            raise StorageError(404, "image shard changed since it was indexed")
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise StorageError(404, "image shard changed while it was read")
    return data


# A row group larger than this is not read for one image (its image column chunk, compressed).
MAX_ROW_GROUP_BYTES = 512 * 1024 * 1024


def read_table_row(file: str, where: dict, s3=None) -> bytes:
    """One image from a table's Parquet data file, found through the file's footer: by its row index
    (`offset`), or by its key in `key_column` (Delta rows), reading only that row group's key and image
    column chunks, never the whole file."""
    import pyarrow.parquet as pq

    column, key_column, key = where["column"], where.get("key_column"), where.get("key")
    top = column.split(".", 1)[0]
    try:
        if is_remote(file):
            if s3 is None:
                raise StorageError(404, "image is on object storage and no S3 settings were given (--conf)")
            scheme, _, rest = file.partition("://")
            source = s3.filesystem().open_input_file(rest)
        else:
            source = str(to_local(file))
        with pq.ParquetFile(source) as pf:
            meta, start = pf.metadata, 0
            for g in range(meta.num_row_groups):
                group = meta.row_group(g)
                n = group.num_rows
                if where.get("offset") is not None and key_column is None:
                    if not start <= int(where["offset"]) < start + n:
                        start += n
                        continue
                    i = int(where["offset"]) - start
                else:
                    keys = pf.read_row_group(g, columns=[key_column.split(".", 1)[0]]).column(0)
                    if "." in key_column:
                        keys = keys.combine_chunks().field(key_column.split(".", 1)[1])
                    found = [j for j, k in enumerate(keys.to_pylist()) if k is not None and str(k) == key]
                    if not found:
                        start += n
                        continue
                    i = found[0]
                size = sum(group.column(c).total_compressed_size for c in range(group.num_columns)
                           if group.column(c).path_in_schema.split(".", 1)[0] == top)
                if size > MAX_ROW_GROUP_BYTES:
                    raise StorageError(413, "the image's row group is too large to read for one image")
                value = pf.read_row_group(g, columns=[top]).column(0)[i].as_py()
                data = value.get("bytes") if isinstance(value, dict) else value
                if not data:
                    raise StorageError(404, "the table's row has no image")
                return bytes(data)
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(404, "the table's data file is gone") from None
    except (OSError, ValueError, KeyError) as e:
        log.warning("reading %s from %s failed: %s", column, file, e)
        raise StorageError(404, "image could not be read from its table") from None
    raise StorageError(404, "the table's row is gone")
