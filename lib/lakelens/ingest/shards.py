"""WebDataset tar shards (what img2dataset writes): their image members read in one sequential pass, each
with its sample's caption, and the stored spelling of a member's path.

A shard is a plain (uncompressed) tar. Members of one sample share a key, the member name up to the first
'.' of its base name (`000010042.jpg`, `000010042.txt`, `000010042.json`), and lie next to each other,
as webdataset writes and reads them. Every image member is one row; its caption is the same key's
`.txt` member (the caption key is configurable). A member's path is its shard's stored path, '/', and
the member name, so it names where it lives and two shards holding the same key give two ids."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

# Image members, by extension (the part after the key's first dot, its last part for `seg.png`).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp", "ppm", "pgm", "pbm",
                              "ico"})
# A caption member is read up to this many bytes (img2dataset captions are a sentence or two).
MAX_CAPTION_BYTES = 64 * 1024
# The error of a shard's row when reading stopped early (the members read whole before keep their rows).
TRUNCATED_SHARD = "truncated shard"
NOT_A_SHARD = "not a tar shard"
_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_key(name: str) -> tuple[str, str]:
    """A member name -> (sample key, extension), as webdataset splits it: at the first '.' of the base
    name; the extension lower-cased ('' when there is none)."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else (name, "")


def is_image(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS


def member_path(shard: str, member: str) -> str:
    """The stored path of a member: its shard's stored path, '/', the member name."""
    return f"{shard}/{member}"


@dataclass
class Member:
    """One image member: its name, where its bytes start in the shard and how many there are, the bytes
    (None when not read: too large), an error known before decoding, and its sample's caption."""

    name: str
    offset: int
    size: int
    data: bytes | None
    error: str | None = None
    caption: str | None = None


@dataclass
class ShardError:
    """Reading the shard stopped: the members read whole before it came out as Members already."""

    error: str
    detail: str


def _caption(data: bytes) -> str:
    return data[:MAX_CAPTION_BYTES].decode("utf-8", errors="replace").strip()


def read_members(stream, max_bytes: int, caption_key: str = "txt", part: int = 0,
                 parts: int = 1) -> Iterator[Member | ShardError]:
    """The image members of the tar shard read from `stream` (a binary file object, read forward only),
    in shard order, a sample at a time: never more of the shard in memory than one sample's members. A
    member over `max_bytes` is not read (error "too large"). A member name seen again later in the
    shard keeps its first occurrence. When the shard ends early or is not a tar, the samples read whole
    come first, then one ShardError. With `parts` > 1, only every parts-th image member from `part` on
    is read (the others' bytes are passed over): a shard split between tasks, each reading it whole."""
    seen: set[str] = set()
    index = 0  # image members met so far
    key, images, caption = None, [], None

    def flush():
        for m in images:
            m.caption = caption
        return images

    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
    except (tarfile.TarError, EOFError, OSError) as e:
        yield ShardError(NOT_A_SHARD, str(e))
        return
    try:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_key(info.name)
            if k != key:
                yield from flush()
                key, images, caption = k, [], None
            if ext == caption_key:
                caption = _caption(tar.extractfile(info).read(MAX_CAPTION_BYTES))
            elif is_image(ext) and info.name not in seen:
                seen.add(info.name)
                index += 1
                if (index - 1) % parts != part:
                    continue
                if info.size > max_bytes:
                    images.append(Member(info.name, info.offset_data, info.size, None, "too large"))
                    continue
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                images.append(Member(info.name, info.offset_data, info.size, data,
                                     "empty file" if not data else None))
        yield from flush()
    except (tarfile.TarError, EOFError, OSError) as e:
        # the sample being read may lack members that come after the cut: its images are whole all the same
        yield from flush()
        yield ShardError(TRUNCATED_SHARD, str(e) or type(e).__name__)
