"""Stored paths: the one spelling of an image's location that the table, ids, the index, thumbnails,
evaluation and fine-tuning share, and the conversions to and from it.

The stored spelling is Hadoop's `Path.toString()`, which is what Spark's file scan puts in its `path`
column: `file:/data/a b#1.jpg` for a local file (no authority, nothing percent-encoded) and
`s3a://bucket/key with spaces.jpg` for object storage. Spark's file index (`DataFrame.inputFiles()`)
spells the same files as URIs (`file:///data/a%20b%231.jpg`); `from_uri` turns those into the stored
spelling. A stored path is never parsed as a URL: `#`, `?` and `%` are characters of the file name."""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path
from urllib.parse import unquote

from lakelens.errors import DataError

LOCAL_SCHEME = "file:"
REMOTE_SCHEMES = ("s3a://", "s3://", "s3n://")
GLOB_CHARS = "\\*?[]{}"
# The error of a file whose name (or a folder's on its path) is not valid UTF-8 (Linux names are bytes).
NAME_NOT_UTF8 = "name not UTF-8"


def from_uri(uri: str) -> str:
    """A URI as Spark's file index spells it -> the stored spelling (Hadoop Path.toString())."""
    if uri.startswith("file://"):
        rest = uri[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        return LOCAL_SCHEME + unquote(rest)
    if uri.startswith("file:"):
        return LOCAL_SCHEME + unquote(uri[len("file:"):])
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    authority, slash, key = rest.partition("/")
    return f"{scheme}://{authority}{slash}{unquote(key)}"


def to_stored(path: str | os.PathLike) -> str:
    """A local file system path or a URI given by a user -> the stored spelling. Local paths are made
    absolute (not resolved: a symlinked file keeps its own name)."""
    text = os.fspath(path)
    if is_remote(text):
        return text
    if text.startswith(LOCAL_SCHEME):
        return text if not text.startswith("file://") else from_uri(text)
    return LOCAL_SCHEME + os.path.abspath(os.path.expanduser(text))


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith(LOCAL_SCHEME)


def is_local(path: str) -> bool:
    return path.startswith(LOCAL_SCHEME) or path.startswith("/")


def to_local(path: str) -> Path:
    """A stored local path (`file:/x`, or a plain absolute path) -> the file system path, character for
    character. Raises DataError for remote or relative paths."""
    if path.startswith("file://"):
        path = from_uri(path)
    if path.startswith(LOCAL_SCHEME):
        path = path[len(LOCAL_SCHEME):]
    elif is_remote(path):
        raise DataError(f"not a local path: {path}")
    if not path.startswith("/"):
        raise DataError(f"not an absolute path: {path}")
    return Path(path)


def readable(path: str) -> str:
    """What to open to read a stored path outside Spark: the local file for `file:` paths, the path
    itself for object storage (pyarrow and fsspec take URIs)."""
    return str(to_local(path)) if not is_remote(path) else path


def glob_escape(path: str) -> str:
    """Escape Hadoop glob characters so a stored path loads as exactly that file in Spark."""
    return "".join("\\" + ch if ch in GLOB_CHARS else ch for ch in path)


def root_of(images: str) -> str:
    """The folder a listing of `images` (a folder, a glob or a URI) stays inside, in the stored
    spelling, ending in '/': the part before the first glob character, cut at its last '/'."""
    stored = to_stored(images)
    cut = min((i for i, ch in enumerate(stored) if ch in "*?[{"), default=None)
    if cut is not None:
        stored = stored[:cut].rsplit("/", 1)[0]
    return stored.rstrip("/") + "/"


def under(path: str, roots: list[str]) -> bool:
    """True when the stored `path` lies inside one of `roots` (stored folder paths), judged on the
    normalised text: a `..` that climbs out, or a root that is only a name prefix, does not count."""
    if ".." in path.split("/"):
        return False
    norm = to_stored(path) if not is_remote(path) else path
    if norm.startswith(LOCAL_SCHEME):
        norm = LOCAL_SCHEME + posixpath.normpath(norm[len(LOCAL_SCHEME):])
    for root in roots:
        root = (to_stored(root) if root and not is_remote(root) else root).rstrip("/") + "/"
        if root != "/" and norm.startswith(root):
            return True
    return False


def common_root(paths: list[str]) -> str:
    """The deepest folder holding every one of `paths` (stored spellings); '' when they share none.
    For many paths pass the lexicographic min and max: their common prefix is everyone's."""
    if not paths:
        return ""
    prefix = os.path.commonprefix([to_stored(p) if not is_remote(p) else p for p in paths])
    return prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""


def escape_undecodable(path: str) -> str:
    """A path as the OS gave it to Python -> one Spark can hold: bytes that are not UTF-8 (which Python
    carries as surrogate escapes, and Spark's strings cannot) spelled `\\xNN`; a UTF-8 path unchanged.
    Hadoop cannot name such a file either, so the spelling only names it: nothing opens it."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def path_id(path: str) -> int:
    """Stable signed 64-bit id of a stored path: the first 8 bytes of sha256(path), big-endian."""
    return int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big", signed=True)
