"""The duplicates page (/duplicates): groups of near copies side by side, largest first, from the groups
`lakelens dedup --index` wrote beside the index. Server-rendered HTML; every path is escaped."""

from __future__ import annotations

from html import escape

from flask import Flask, request

from lakelens.search import QueryError
from lakelens.web.api import parse_int, thumb_url
from lakelens.web.live import LiveSearcher

PER_PAGE = 20

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
.page { max-width: 1200px; margin: 0 auto; padding: 16px 24px; }
h1 { font-size: 22px; margin: 4px 0 12px; }
.group { background: #fff; border-radius: 6px; padding: 8px; margin: 10px 0; box-shadow: 0 1px 2px #0002; }
.group h2 { font-size: 14px; margin: 0 0 6px; color: #444; }
.members { display: flex; gap: 10px; overflow-x: auto; }
.member { width: 170px; flex: 0 0 170px; }
.member img { width: 170px; height: 150px; object-fit: contain; background: #eee; display: block; }
.member.rep img { outline: 3px solid #3a6ee8; }
.member .sim { font-size: 12px; margin-top: 4px; font-variant-numeric: tabular-nums; }
.member .path { font-size: 11px; color: #666; overflow-wrap: anywhere; }
.note { color: #8a5a00; font-size: 13px; }
nav a { margin-right: 16px; }
"""


def render(found: dict, offset: int, per_page: int) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>lakelens duplicates</title><style>{CSS}</style>"
             "</head><body><div class='page'>",
             f"<h1>Duplicate groups <small>({found['total']} groups, index {escape(found['version'])})</small></h1>",
             "<nav><a href='/'>search</a></nav>"]
    parts += [f"<p class='note'>{escape(n)}</p>" for n in found["notes"]]
    if not found["groups"]:
        parts.append("<p class='empty'>no groups on this page</p>")
    for g in found["groups"]:
        parts.append(f"<section class='group' data-group='{g['group']}'><h2>{g['size']} images</h2><div class='members'>")
        for m in g["members"]:
            label = "representative" if m["representative"] else f"similarity {m['similarity']:.3f}"
            parts.append(f"<div class='member{' rep' if m['representative'] else ''}' data-id='{m['id']}'>"
                         f"<img src='{escape(thumb_url(m['id'], found['version']))}' alt='' loading='lazy'>"
                         f"<div class='sim'>{label}</div><div class='path'>{escape(m['path'])}</div></div>")
        parts.append("</div></section>")
    nav = []
    if offset > 0:
        nav.append(f"<a href='/duplicates?offset={max(0, offset - per_page)}'>previous</a>")
    if offset + per_page < found["total"]:
        nav.append(f"<a id='next' href='/duplicates?offset={offset + per_page}'>next</a>")
    parts.append(f"<nav>{''.join(nav)}</nav></div></body></html>")
    return "".join(parts)


def register(server: Flask, live: LiveSearcher) -> None:
    @server.get("/duplicates")
    def duplicates_page():
        offset = parse_int(request.args.get("offset"), "offset", 0, 10**9, 0)
        s = live.get()
        try:
            found = s.duplicate_groups(offset, PER_PAGE)
        except QueryError as e:
            return (f"<!DOCTYPE html><html><body><p>{escape(str(e))}</p></body></html>", 404,
                    {"Content-Type": "text/html; charset=utf-8"})
        return render({**found, "version": s.version}, offset, PER_PAGE), 200, {"Content-Type": "text/html; charset=utf-8"}
