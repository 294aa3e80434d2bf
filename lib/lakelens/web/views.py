"""The search page's pieces: result cards (thumbnail, score, path, tag chips, caption), the tag facets beside
them, and the large view of one image; a hit on a region (embed.regions) has the region outlined on both.
Every text from the index (paths, tags, captions) is a text child or an attribute, which React escapes: a
name with markup in it shows as those characters and never as HTML.
Tag chips, facets and "more like this" are links to the search's URL with the change (urlstate): a click
navigates within the page, and the URL can be opened in a new tab or shared."""

from __future__ import annotations

from dash import dcc, html

from lakelens.search import MAX_K
from lakelens.web.api import box_list, thumb_url
from lakelens.web.urlstate import PageQuery, to_url

MAX_CHIPS = 8  # tag chips under one result; the large view lists them all

CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f6f6f4; color: #222; }
.page { max-width: 1200px; margin: 0 auto; padding: 16px 24px; }
h1 { font-size: 22px; margin: 4px 0 12px; }
.controls { display: flex; flex-wrap: wrap; gap: 10px 18px; align-items: center; margin-bottom: 8px; }
.controls label { font-size: 13px; color: #555; display: flex; align-items: center; gap: 6px; white-space: nowrap; }
.search-row .dash-input-container { flex: 1 1 380px; }
#query { font-size: 16px; padding: 6px 8px; }
#search { font-size: 15px; padding: 6px 16px; }
.options .dash-input-container { width: 120px; }
.options .prefix .dash-input-container { width: 340px; }
#upload { margin: 10px 0; padding: 10px; border: 1px dashed #999; border-radius: 6px; text-align: center;
          font-size: 13px; color: #555; cursor: pointer; }
.image-row { font-size: 13px; color: #555; }
.image-row.none #remove-image { display: none; }
.image-row .weights > div { width: 380px; }  /* wider than 300 px: Dash shows the number box */
#status { margin: 8px 0; font-size: 14px; min-height: 20px; }
#status .error { color: #b00020; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.chunk { display: contents; }
.hit { background: #fff; border-radius: 6px; padding: 6px; box-shadow: 0 1px 2px #0002; }
.hit:hover { box-shadow: 0 0 0 2px #3a6ee8; }
.hit .open { cursor: zoom-in; }
.thumb { height: 160px; background: #eee; display: flex; align-items: center; }
/* the picture's frame has the image's own shape (--r, set by the page's script once it loads), so a
   region's outline, placed in percentages of the frame, lands on the image wherever it is letterboxed */
.pic { position: relative; margin: 0 auto; aspect-ratio: var(--r, 1); }
.thumb .pic { width: min(100%, calc(160px * var(--r, 1))); }
.pic img { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain; display: block; }
.outline { position: absolute; box-sizing: border-box; border: 2px solid #ffd400; outline: 1px solid #000a;
           pointer-events: none; }
.hit .score { font-size: 12px; color: #333; margin-top: 4px; font-variant-numeric: tabular-nums; }
.path { font-size: 11px; color: #666; overflow-wrap: anywhere; }
.hit .path { max-height: 3.6em; overflow: hidden; }
.chips { display: flex; flex-wrap: wrap; gap: 3px; margin-top: 4px; }
.chip, .filter { font-size: 11px; background: #e8eefc; color: #234; border-radius: 9px; padding: 1px 7px;
                 text-decoration: none; overflow-wrap: anywhere; }
.chip:hover, .filter:hover { background: #c9d7fa; }
.caption { font-size: 12px; color: #444; margin-top: 4px; overflow-wrap: anywhere; }
.mode label { margin-right: 8px; }
.main { display: flex; gap: 18px; align-items: flex-start; }
#facets { flex: 0 0 190px; font-size: 13px; }
#facets:empty { display: none; }
#facets h3 { font-size: 13px; margin: 6px 0 4px; color: #444; }
#facets .scope { font-size: 11px; color: #777; margin-bottom: 4px; }
.filters { display: flex; flex-wrap: wrap; gap: 4px; }
.facet-list { list-style: none; padding: 0; margin: 0; }
.facet { display: flex; gap: 6px; align-items: baseline; padding: 1px 0; }
.facet-tag { flex: 1; overflow-wrap: anywhere; color: #234; text-decoration: none; }
.facet-tag.active { font-weight: 600; }
.facet .count { color: #777; font-variant-numeric: tabular-nums; }
.facet-not { color: #a33; text-decoration: none; padding: 0 3px; }
#results { flex: 1; min-width: 0; }
.viewer.closed { display: none; }
.viewer.open { position: fixed; inset: 0; z-index: 10; }
.viewer .backdrop { position: absolute; inset: 0; background: #000a; }
.viewer .dialog { position: relative; margin: 4vh auto; max-width: 1000px; max-height: 88vh; overflow: auto;
                  background: #fff; border-radius: 8px; padding: 16px; display: flex; gap: 16px; }
.viewer .frame { flex: 0 0 60%; background: #eee; display: flex; align-items: center; }
.viewer .frame .pic { width: min(100%, calc(82vh * var(--r, 1))); }  /* small images scaled up */
.viewer .facts { flex: 1; display: flex; flex-direction: column; gap: 8px; font-size: 13px; }
.viewer .path { font-size: 13px; color: #333; }
.viewer-tags { list-style: none; padding: 0; margin: 0; }
.viewer-tags li { display: flex; gap: 8px; align-items: baseline; margin: 2px 0; }
.tag-score { color: #666; font-variant-numeric: tabular-nums; }
#viewer-close { position: absolute; top: 6px; right: 8px; border: none; background: none; font-size: 22px;
                cursor: pointer; }
.more { display: flex; gap: 12px; align-items: center; justify-content: center; margin: 16px 0;
        font-size: 13px; color: #777; }
.more.done button { display: none; }
.empty { color: #777; font-style: italic; padding: 20px 0; }
footer { margin-top: 24px; font-size: 12px; color: #888; }
"""


def plural(n: int) -> str:
    return f"{n} result{'s' if n != 1 else ''}"


def more_line(shown: int, done: bool) -> str:
    if not done:
        return "scroll down for more"
    if shown >= MAX_K:
        return f"the first {MAX_K:,} results are shown, the most one search returns"
    return "end of results"


def tag_link(tag: str, base: PageQuery, class_name: str = "chip", exclude: bool = False, text=None):
    verb = "exclude" if exclude else "filter by"
    return dcc.Link(tag if text is None else text, href=to_url(base.with_tag(tag, exclude)), className=class_name,
                    title=f"{verb} tag {tag}")


def score_line(r) -> html.Div:
    ranks = [f"{side} rank {getattr(r, f'{side}_rank')}" for side in ("vector", "keyword")
             if getattr(r, f"{side}_rank", None) is not None]
    return html.Div(f"#{int(r.rank)} · score {float(r.score):.4f}", className="score",
                    title=", ".join(ranks) or None)  # hybrid: where each side ranked it


def outline(box) -> list:
    """The outline of a region hit over its picture (fractions of the image -> percentages of the frame),
    or nothing for a whole-image hit."""
    if box is None:
        return []
    x0, y0, x1, y1 = (100 * float(v) for v in box)
    return [html.Div(className="outline", title="the part of the image that matched", style={
        "left": f"{x0:.4g}%", "top": f"{y0:.4g}%", "width": f"{x1 - x0:.4g}%", "height": f"{y1 - y0:.4g}%"})]


def picture(src: str, alt: str, box=None, class_name: str | None = None) -> html.Div:
    return html.Div(className="pic", children=[html.Img(src=src, alt=alt, className=class_name), *outline(box)])


def cards(results, version: str, base: PageQuery) -> list:
    out = []
    boxes = [box_list(b) for b in results["box"]] if "box" in results.columns else [None] * len(results)
    for r, box in zip(results.itertuples(), boxes):
        id_text, path = str(int(r.id)), str(r.path)
        tags = list(getattr(r, "tags", None) or [])
        caption = getattr(r, "caption", None)
        extra = []
        if tags:
            extra.append(html.Div(className="chips", children=[tag_link(t, base) for t in tags[:MAX_CHIPS]]))
        if isinstance(caption, str):
            extra.append(html.Div(caption, className="caption"))
        if box is not None:  # the large view draws it too
            extra.append(dcc.Store(id={"type": "box", "index": id_text}, data=box))
        # the chips are links outside the clickable part: a click on one filters, it does not open the image
        out.append(html.Div(className="hit", **{"data-id": id_text, "data-rank": str(int(r.rank))}, children=[
            html.Div(id={"type": "hit", "index": id_text}, className="open", n_clicks=0, title=f"open {path}",
                     children=[html.Div(className="thumb", children=picture(
                                   thumb_url(int(r.id), version), path.rsplit("/", 1)[-1], box)),
                               score_line(r), html.Div(path, className="path")]),
            *extra]))
    return out


def chunk(results, version: str, base: PageQuery):
    # one page of cards; `display: contents` puts them straight into the grid
    return html.Div(className="chunk", children=cards(results, version, base))


def result_grid(results, version: str, qid: str, state: dict, base: PageQuery):
    """The first page of a search. Everything a later page touches carries the search's own id (qid),
    so a page that arrives after a new search has replaced this one finds nothing to update."""
    if results.empty:
        return html.Div("No results", className="empty")
    done = state["done"]
    return [html.Div(id={"type": "pages", "query": qid}, className="grid", children=[chunk(results, version, base)]),
            html.Div(id={"type": "more", "query": qid}, className="more done" if done else "more open", children=[
                html.Button("Load more", id={"type": "load", "query": qid}, n_clicks=0),
                html.Span(more_line(len(results), done), id={"type": "more-note", "query": qid})]),
            dcc.Store(id={"type": "state", "query": qid}, data=state)]


def scope_line(counts: dict) -> str:
    n = counts["images"]
    if counts["scope"] == "results":
        return f"in the best {n:,} result{'s' if n != 1 else ''}"
    if counts["scope"] == "filtered":
        return f"in the {n:,} image{'s' if n != 1 else ''} the filters allow"
    return f"in all {n:,} images"


def facets(counts: dict | None, base: PageQuery) -> list:
    """The active tag filters (each with a link that removes it) and the tags of the images in scope,
    most first, with their counts: a tag's link narrows the search to it, its "−" excludes it."""
    if counts is None:
        return []
    out = []
    if base.tags:
        out += [html.H3("Filters"), html.Div(className="filters", children=[
            dcc.Link([f"{'-' if t.startswith('-') else ''}tag:{t.removeprefix('-')}", html.Span(" ×", className="x")],
                     href=to_url(base.without_tag(t)), className="filter", title="remove this filter")
            for t in base.tags])]
    active = set(base.tags)
    rows = []
    for c in counts["tags"]:
        tag, n = c["tag"], c["count"]
        name = html.Span(tag, className="facet-tag active") if tag in active else tag_link(tag, base, "facet-tag")
        rows.append(html.Li(className="facet", children=[
            name, html.Span(f"{n:,}", className="count"), tag_link(tag, base, "facet-not", exclude=True, text="−")]))
    out += [html.H3("Tags"), html.Div(scope_line(counts), className="scope"),
            html.Ul(rows, className="facet-list") if rows else html.Div("no tags", className="empty")]
    return out


def size_text(width, height) -> str:
    return f"{width} × {height} px" if width and height else "size unknown"


def viewer_body(d: dict, base: PageQuery, box=None) -> list:
    """The large view of one image (api.image_details): the picture (with the outline of the region that
    matched, `box`), its path, size, tags with their scores, caption, and a link to the images most like it."""
    similar = PageQuery(similar=d["id"], k=base.k, min_score=base.min_score, prefix=base.prefix)
    tags = [html.Li([tag_link(t["tag"], PageQuery(mode=base.mode), "chip"),
                     html.Span("" if t["score"] is None else f"{t['score']:.2f}", className="tag-score")])
            for t in d["tags"]]
    return [html.Div(className="frame", children=picture(d["large"], d["path"].rsplit("/", 1)[-1], box, "large")),
            html.Div(className="facts", children=[
                html.Div(d["path"], className="path", id="viewer-path"),
                html.Div(size_text(d["width"], d["height"]), className="size", id="viewer-size"),
                html.Ul(tags, className="viewer-tags", id="viewer-tags") if tags else html.Div(
                    "no tags", className="empty", id="viewer-tags"),
                html.Div(d["caption"] or "", className="caption", id="viewer-caption"),
                dcc.Link("more like this", href=to_url(similar), id="more-like-this", className="more-like")])]
