"""Thumbnails of indexed images: id -> path from the index meta -> resized JPEG, in an LRU cache."""

from __future__ import annotations

import io
import re
import threading
from collections import OrderedDict

from lakelens.errors import LakelensError
from lakelens.ingest.images import decode
from lakelens.ingest.storage import StorageError, read_located

ID_RE = re.compile(r"^-?[0-9]{1,20}$")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_SIDE = 256
MAX_FILE_BYTES = 64 * 1024 * 1024  # an indexed file this large is not worth decoding for a thumbnail
MAX_PIXELS = 16_000_000  # thumbnails decode at most this many pixels (the embed job allows more)


class ThumbError(LakelensError):
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


def render(data: bytes, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS) -> bytes:
    """An image file's bytes -> a JPEG thumbnail of at most max_side pixels a side."""
    decoded = decode(data, target_size=max_side, max_pixels=max_pixels)
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

    def __init__(self, max_entries: int = 2048, max_side: int = MAX_SIDE, max_pixels: int = MAX_PIXELS,
                 max_file_bytes: int = MAX_FILE_BYTES, s3=None):
        self.max_entries, self.max_side = max_entries, max_side
        self.max_pixels, self.max_file_bytes, self.s3 = max_pixels, max_file_bytes, s3
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
        # the path comes only from the index meta, never from the request, and is read only if it is a
        # regular file under the image folders the index was built from, and not too large
        uri = searcher.path_of(id_)
        if uri is None:
            raise ThumbError(404, f"id {id_} is not in index {version}")
        roots = searcher.manifest.get("source", {}).get("image_roots")
        try:
            data = read_located(uri, searcher.locator_of(id_), self.max_file_bytes, roots, self.s3)
        except StorageError as e:
            raise ThumbError(404, e.reason) from None
        data = render(data, self.max_side, self.max_pixels)  # outside the lock: decoding takes milliseconds
        with self._lock:
            self.misses += 1
            self._items[key] = data
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return data
