"""Thumbnails of indexed images: id -> path from the index meta -> resized JPEG, in an LRU cache."""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lakelens.ingest.images import decode

ID_RE = re.compile(r"^-?[0-9]{1,20}$")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_SIDE = 256
MAX_FILE_BYTES = 64 * 1024 * 1024  # an indexed file this large is not worth decoding for a thumbnail


class ThumbError(Exception):
    """A thumbnail cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def parse_id(text: str) -> int:
    """A decimal signed 64-bit image id; anything else is a malformed request (400)."""
    if not isinstance(text, str) or not ID_RE.match(text):
        raise ThumbError(400, "id must be a decimal 64-bit integer")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ThumbError(400, "id must be a decimal 64-bit integer")
    return value


def local_file(uri: str) -> Path:
    """The local file behind an index path: `file:/x`, `file:///x`, `file://localhost/x` or a plain
    absolute path. Other schemes (s3a:, hdfs:) are not readable by this server."""
    if uri.startswith("file:"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ThumbError(404, "image is on another host")
        path = Path(parts.path)
        # Hadoop may percent-encode names (spaces as %20); the literal name wins if it exists
        if not path.exists() and Path(unquote(parts.path)).exists():
            path = Path(unquote(parts.path))
    elif uri.startswith("/"):
        path = Path(uri)
    else:
        raise ThumbError(404, "image is not on a local file system")
    if not path.is_absolute():
        raise ThumbError(404, "image path is not absolute")
    return path


def render(path: Path, max_side: int = MAX_SIDE) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ThumbError(404, "image file too large for a thumbnail")
        data = path.read_bytes()
    except OSError:
        raise ThumbError(404, "image file is gone") from None
    decoded = decode(data, target_size=max_side)
    if decoded.error:
        raise ThumbError(404, f"image cannot be decoded: {decoded.error}")
    img = decoded.image
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


class ThumbCache:
    """LRU of rendered thumbnails keyed by (index version, id): a new version never serves an old
    version's entry, and old entries age out as new ones arrive."""

    def __init__(self, max_entries: int = 2048, max_side: int = MAX_SIDE):
        self.max_entries, self.max_side = max_entries, max_side
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, searcher, id_: int) -> bytes:
        version = searcher.version
        key = (version, id_)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        # the path comes only from the index meta, never from the request: nothing else is readable
        uri = searcher.path_of(id_)
        if uri is None:
            raise ThumbError(404, f"id {id_} is not in index {version}")
        data = render(local_file(uri), self.max_side)  # outside the lock: decoding takes milliseconds
        with self._lock:
            self.misses += 1
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return data
