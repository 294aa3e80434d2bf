"""The page's search in its URL (?q=...&mode=...&tag=red&tag=-square&k=...&similar=ID), so a search can be
shared, reloaded, and gone back to with the browser's back button. Values from a URL are untrusted: the page
checks them as it checks its own inputs when it runs the search."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode

# URL parameter -> field; the tag list is the repeated "tag" parameter ("-" in front: excluded)
_FIELDS = {"q": "q", "mode": "mode", "similar": "similar", "k": "k", "min_score": "min_score", "prefix": "prefix"}


@dataclass(frozen=True)
class PageQuery:
    q: str | None = None  # None: no text asked for (a blank page, a tag browse, or images similar to one)
    mode: str | None = None  # None: the index's default
    tags: tuple = ()  # "red" to require a tag, "-square" to exclude one
    similar: str | None = None  # an image id: images similar to it
    k: str | None = None
    min_score: str | None = None
    prefix: str | None = None

    @property
    def empty(self) -> bool:
        return self.q is None and not self.tags and self.similar is None

    @property
    def required(self) -> list[str]:
        return [t for t in self.tags if not t.startswith("-")]

    @property
    def excluded(self) -> list[str]:
        return [t[1:] for t in self.tags if t.startswith("-")]

    def with_tag(self, tag: str, exclude: bool = False) -> PageQuery:
        """This search narrowed by a tag (a search by image id becomes a browse of the tag)."""
        kept = tuple(t for t in self.tags if t.removeprefix("-") != tag)  # asking for it replaces excluding it
        return dataclasses.replace(self, similar=None, tags=(*kept, f"-{tag}" if exclude else tag))

    def without_tag(self, entry: str) -> PageQuery:
        return dataclasses.replace(self, tags=tuple(t for t in self.tags if t != entry))


def from_url(search: str | None) -> PageQuery:
    """'?q=red+circle&tag=-square' -> PageQuery(q='red circle', tags=('-square',))."""
    args = parse_qs((search or "").lstrip("?"), keep_blank_values=True)
    values = {field: args[name][-1] for name, field in _FIELDS.items() if name in args}
    return PageQuery(tags=tuple(t for t in args.get("tag", []) if t.strip()), **values)


def to_url(pq: PageQuery) -> str:
    """The URL's query string ('?...'), or '' for a blank page; from_url(to_url(pq)) == pq."""
    pairs = [(name, getattr(pq, field)) for name, field in _FIELDS.items() if getattr(pq, field) is not None]
    pairs += [("tag", t) for t in pq.tags]
    return "?" + urlencode(pairs) if pairs else ""
