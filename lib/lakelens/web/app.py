"""The search page (Dash): query box, mode (vector / keyword / hybrid), K / min-score / path-prefix controls, a
query image (alone or with the text, balanced by a weights slider), a thumbnail grid with tag chips and captions
that loads the next page when scrolled to its end, tag facets beside it, and a large view of one image.
The search lives in the page's URL (urlstate): a reload or a shared link shows it again, and the browser's back
button returns to the search before."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import uuid

from dash import ALL, MATCH, Dash, Input, Output, Patch, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from lakelens.search import MAX_K, QueryError
from lakelens.search.query import MODES
from lakelens.web.api import (
    Limits,
    has_keywords,
    image_details,
    parse_k,
    parse_min_score,
    parse_mode,
    parse_prefix,
    parse_query,
    parse_tags,
)
from lakelens.web.live import LiveSearcher
from lakelens.web.thumbs import ThumbError, parse_id
from lakelens.web.urlstate import PageQuery, from_url, to_url
from lakelens.web.views import CSS, chunk, facets, more_line, plural, result_grid, viewer_body

FACETS = 30  # tags listed beside the results

log = logging.getLogger(__name__)

# Scrolling near the end of the results clicks their "Load more" button: the next page comes from the
# server callback, appended in place. Only a scroll asks, so a page shorter than the window never loads
# on its own (the button is in view there). `asked` remembers the search (its element's id) and the card
# count a request was made at, so one page is asked for once however many scroll events arrive before it.
# A picture's frame takes the shape of its image when it loads, so a region's outline in percentages of
# the frame is on the image (views.outline); load events do not bubble and never reach the window, hence
# a capturing listener on the document.
PAGE_JS = """
addEventListener('scroll', function () {
  var more = document.querySelector('#results .more.open');
  if (!more || more.getBoundingClientRect().top > innerHeight + 200) return;
  var mark = more.id + ' ' + document.querySelectorAll('#results .hit').length;
  if (more.dataset.asked === mark) return;
  more.dataset.asked = mark;
  more.querySelector('button').click();
}, {passive: true});
document.addEventListener('load', function (e) {
  var img = e.target, pic = img.parentNode;
  if (img.tagName === 'IMG' && pic.classList.contains('pic') && img.naturalHeight)
    pic.style.setProperty('--r', img.naturalWidth / img.naturalHeight);
}, true);
addEventListener('keydown', function (e) {
  if (e.key === 'Escape' && document.querySelector('#viewer.open')) document.getElementById('viewer-close').click();
});
"""

INDEX_STRING = """<!DOCTYPE html>
<html>
  <head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>""" + CSS + """</style></head>
  <body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}<script>""" + PAGE_JS + """</script></footer></body>
</html>"""


def decode_upload(contents: str, limits: Limits) -> bytes:
    """dcc.Upload hands over a data URL (data:<type>;base64,<payload>)."""
    head, _, payload = (contents or "").partition(",")
    if not head.startswith("data:") or ";base64" not in head:
        raise QueryError("the upload is not a file")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise QueryError("the upload is not valid base64") from None
    if len(data) > limits.max_upload_bytes:
        raise QueryError(f"image is larger than the {limits.max_upload_bytes} byte limit")
    return data


def upload_digest(contents: str) -> str:
    # a later page checks that the query image is still the one its first page was searched with
    return hashlib.sha256((contents or "").encode()).hexdigest()


def balance_weights(balance) -> list[float]:
    """The slider's position (0 = all text, 1 = all image) -> [text weight, image weight]."""
    try:
        image = float(balance)
    except (TypeError, ValueError):
        raise QueryError(f"the text/image balance must be a number between 0 and 1, got {balance!r}") from None
    if not 0.0 <= image <= 1.0:
        raise QueryError(f"the text/image balance must be a number between 0 and 1, got {balance!r}")
    return [round(1.0 - image, 6), round(image, 6)]


def next_k(k: int, shown: int) -> int:
    """How many results the next page asks for: K, or what is left under the Searcher's MAX_K bound on
    k + offset; 0 when that bound is reached."""
    return max(0, min(k, MAX_K - shown))


def _clicked_hit() -> str | None:
    """The id of the result the user clicked, or None when the trigger was not a real click (new cards
    appearing in the grid fire the pattern-matching input with n_clicks 0)."""
    for t in ctx.triggered:
        component, _, prop = t["prop_id"].rpartition(".")
        if prop == "n_clicks" and component.startswith("{") and t["value"]:
            return json.loads(component)["index"]
    return None


def run_query(s, query: dict, upload, opts: dict, limits: Limits):
    """One page of a search described by `query` (kind id, image or text), as the JSON API runs it."""
    if query["kind"] == "id":
        id_ = int(query["id"])
        if s.path_of(id_) is None:
            raise QueryError(f"image {id_} is no longer in index {s.version}")
        return s.search_id(id_, **opts)
    kw = {"mode": query["mode"], "tags": query["tags"], "not_tags": query["not_tags"]}
    if query["kind"] == "image":
        return s.search(text=query["text"], image=decode_upload(upload, limits), weights=query["weights"], **kw, **opts)
    return s.search(text=query["text"], **kw, **opts)


def describe(s, query: dict) -> list:
    if query["kind"] == "id":
        return ["images similar to ", html.Span(s.path_of(int(query["id"])) or query["id"], className="q")]
    filters = [f"tag:{t}" for t in query["tags"]] + [f"-tag:{t}" for t in query["not_tags"]]
    shown = [" with ", html.Span(" ".join(filters), className="q")] if filters else []
    text = ["“", html.Span(query["text"], className="q"), "”"] if query["text"] is not None else []
    if query["kind"] == "text":
        return [*text, *shown] if text else ["images", *shown]
    image = ["uploaded image ", html.Span(query["filename"], className="q")]
    return [*text, " and ", *image, *shown] if text else [*image, *shown]


def page_query(s, pq: PageQuery, upload, balance, filename: str | None, limits: Limits) -> tuple[dict, dict]:
    """The search a page query asks for (kind id, image or text) and its options, checked as the API checks them."""
    opts = {"k": parse_k(pq.k, limits), "min_score": parse_min_score(pq.min_score),
            "path_prefix": parse_prefix(pq.prefix, limits)}
    if pq.similar is not None:
        try:
            return {"kind": "id", "id": str(parse_id(pq.similar))}, opts
        except ThumbError:
            raise QueryError(f"similar must be an image id (a decimal 64-bit integer), got {pq.similar!r}") from None
    tags, not_tags = parse_tags(pq.tags, limits)
    query = {"mode": parse_mode(pq.mode) or s.default_mode, "tags": tags, "not_tags": not_tags}
    has_text = bool(pq.q and pq.q.strip())
    text = parse_query(pq.q, limits) if has_text or not (tags or not_tags or upload) else None
    if upload:  # an attached image is part of every search until it is removed
        return {**query, "kind": "image", "text": text, "weights": balance_weights(balance) if has_text else None,
                "image": upload_digest(upload), "filename": filename or ""}, opts
    return {**query, "kind": "text", "text": text}, opts


def tag_facets(s, query: dict) -> dict | None:
    """Tag counts beside the results: of the text query's best results, or of what the filters allow."""
    if not has_keywords(s):
        return None
    if query["kind"] == "id":
        return s.tag_counts(limit=FACETS)
    text = query["text"] if query["kind"] == "text" else None
    return s.tag_counts(text, query["tags"], query["not_tags"], limit=FACETS, mode=query["mode"])


def box_values(s, pq: PageQuery, limits: Limits) -> tuple:
    """The query box, mode and options as a URL sets them (a value the URL gets wrong is left as it is)."""
    def number(value, kind, default):
        if value is None:
            return default
        try:
            return kind(value)
        except ValueError:
            return no_update
    return (pq.q or "", pq.mode if pq.mode in MODES else s.default_mode, number(pq.k, int, limits.default_k),
            number(pq.min_score, float, None), pq.prefix or "")


def build_page(server, live: LiveSearcher, limits: Limits) -> Dash:
    app = Dash(__name__, server=server, title="lakelens", update_title=None, serve_locally=True,
               assets_folder="no-assets")  # no CDN (machines may be offline) and no assets folder to scan
    app.index_string = INDEX_STRING

    def layout():
        s = live.get()
        words = has_keywords(s)
        return html.Div(className="page", children=[
            dcc.Location(id="url", refresh=False),
            html.H1("lakelens image search"),
            html.Div(className="controls search-row", children=[
                dcc.Input(id="query", type="text", placeholder="describe an image, e.g. a red circle  (tag:red, "
                          "-tag:square, path:2024/, \"a phrase\")", debounce=True, n_submit=0, autoFocus=True),
                html.Button("Search", id="search", n_clicks=0),
            ]),
            html.Div(className="controls options", children=[
                html.Label(["mode", dcc.RadioItems(
                    id="mode", value=s.default_mode, inline=True, className="mode",
                    options=[{"label": m, "value": m, "disabled": m != "vector" and not words} for m in MODES])],
                    title="vector: by meaning; keyword: tags, captions and path words; hybrid: both, fused"
                    + ("" if words else " (this index has no keyword index: lakelens index --tags)")),
                html.Label(["K", dcc.Input(id="k", type="number", min=1, max=limits.max_k, step=1,
                                           value=limits.default_k)]),
                html.Label(["min score", dcc.Input(id="min-score", type="number", min=-1, max=1, step=0.01)]),
                html.Label(["path prefix", dcc.Input(id="prefix", type="text", placeholder="file:/data/photos/")],
                           className="prefix"),
            ]),
            dcc.Upload(id="upload", accept="image/*", multiple=False, max_size=limits.max_upload_bytes,
                       children=html.Div("Drop an image here, or click to choose one, to search by image "
                                         "(with the text too, when there is one)")),
            html.Div(id="image-row", className="controls image-row none", children=[
                html.Span(id="image-name", children="no query image"),
                html.Button("Remove image", id="remove-image", n_clicks=0),
                html.Label(["text", dcc.Slider(id="weights", min=0, max=1, step=0.05, value=0.5,
                                               marks={0: "0", 0.5: "0.5", 1: "1"}), "image"],
                           className="weights", title="the weights of the text and the image when both are searched"),
            ]),
            html.Div(id="status"),
            html.Div(className="main", children=[
                html.Aside(id="facets", children=facets(s.tag_counts(limit=FACETS) if words else None, PageQuery())),
                html.Div(id="results")]),
            html.Div(id="viewer", className="viewer closed", children=[
                html.Div(id="viewer-backdrop", className="backdrop", n_clicks=0),
                html.Div(className="dialog", role="dialog", children=[
                    html.Button("×", id="viewer-close", n_clicks=0, title="close (Esc)"),
                    html.Div(id="viewer-body", style={"display": "contents"})])]),
            html.Footer(id="index-info",
                        children=f"index {s.version} · {len(s)} images · model {s.manifest['model']['name']}"),
        ])

    app.layout = layout  # a function: every page load shows the version that is live now

    @app.callback(Output("image-row", "className"), Output("image-name", "children"),
                  Input("upload", "contents"), State("upload", "filename"))
    def show_image(contents, filename):
        if not contents:
            return "controls image-row none", "no query image"
        return "controls image-row", ["query image: ", html.Span(filename or "", className="q")]

    @app.callback(Output("upload", "contents"), Output("upload", "filename"),
                  Input("remove-image", "n_clicks"), prevent_initial_call=True)
    def remove_image(_clicks):
        return None, None

    @app.callback(Output("url", "search"), Output("results", "children"), Output("status", "children"),
                  Output("facets", "children"), Output("query", "value"), Output("mode", "value"),
                  Output("k", "value"), Output("min-score", "value"), Output("prefix", "value"),
                  Input("search", "n_clicks"), Input("query", "n_submit"), Input("mode", "value"),
                  Input("url", "search"), Input("upload", "contents"), Input("weights", "value"),
                  State("query", "value"), State("k", "value"), State("min-score", "value"),
                  State("prefix", "value"), State("upload", "filename"), prevent_initial_call=True)
    def run_search(_clicks, _submits, mode, search, upload, balance, text, k, min_score, prefix, filename):
        """A search from the page's inputs (its URL pushed: the back button returns to the one before), or
        from the URL (a link followed, a page opened or reloaded, back or forward: the inputs set from it)."""
        trigger, here, s = ctx.triggered_id, from_url(search), live.get()
        url, boxes = no_update, (no_update,) * 5
        from_boxes = PageQuery(q=text or "", mode=mode, tags=here.tags,
                               k=None if k in (None, "") or k == limits.default_k else str(k),
                               min_score=None if min_score in (None, "") else str(min_score), prefix=prefix or None)
        if trigger in ("search", "query"):
            pq = from_boxes
            url = to_url(pq) if to_url(pq) != (search or "") else no_update
        elif trigger == "mode":
            if here.empty or here.similar is not None or (here.mode or s.default_mode) == mode:
                raise PreventUpdate  # nothing searched yet, or a search the mode does not change
            pq = dataclasses.replace(here, mode=mode)
            url = to_url(pq)
        elif trigger == "url":
            pq, boxes = here, box_values(s, here, limits)
            if pq.empty:  # back to the page as it opens
                return (no_update, [], "", facets(tag_facets(s, {"kind": "id"}), pq), *boxes)
            upload = None if pq.similar is not None else upload
        else:  # the query image attached or removed, or the text/image balance moved
            if trigger == "upload" and not upload:
                raise PreventUpdate  # the image was removed: the results shown stay until the next search
            if trigger == "weights" and not (upload and text and text.strip()):
                raise PreventUpdate  # the balance matters only while a text and an image are searched together
            pq = dataclasses.replace(from_boxes, similar=None)
        try:
            query, opts = page_query(s, pq, upload, balance, filename, limits)
            results = run_query(s, query, upload, opts, limits)
            what = describe(s, query)
            counts = tag_facets(s, query)
        except QueryError as e:
            return url, [], html.Span(str(e), className="error"), [], *boxes
        except Exception as e:  # shown on the page rather than as a silent failed callback
            log.exception("search failed")
            return url, [], html.Span(f"search failed: {type(e).__name__}", className="error"), [], *boxes
        n, qid = len(results), uuid.uuid4().hex
        state = {"query": query, "opts": opts, "version": s.version, "shown": n, "pages": 1, "url": to_url(pq),
                 "done": n < opts["k"] or next_k(opts["k"], n) == 0}
        count = html.Span(plural(n) if n else "No results", id={"type": "count", "query": qid})
        notes = [html.Div(note, className="note") for note in results.attrs.get("notes", [])]
        mode_note = "" if query["kind"] == "id" else f" · {query['mode']}"
        return (url, result_grid(results, s.version, qid, state, pq),
                [html.Span([count, " for ", *what, f"{mode_note} · index {s.version}"]), *notes],
                facets(counts, pq), *boxes)

    @app.callback(Output("viewer", "className"), Output("viewer-body", "children"),
                  Input({"type": "hit", "index": ALL}, "n_clicks"), Input("viewer-close", "n_clicks"),
                  Input("viewer-backdrop", "n_clicks"), Input("url", "search"),
                  State({"type": "box", "index": ALL}, "data"), prevent_initial_call=True)
    def view(_hits, _close, _backdrop, search, _boxes):
        """A click on a result opens it large; closing it, or any new search, closes it."""
        hit = _clicked_hit() if isinstance(ctx.triggered_id, dict) else None
        if isinstance(ctx.triggered_id, dict) and hit is None:
            raise PreventUpdate
        if hit is None:
            return "viewer closed", []
        try:
            found = image_details(live.get(), int(hit))
        except (ThumbError, QueryError) as e:
            return "viewer open", [html.Div(str(e), className="error")]
        # the region that matched, kept beside the card (views.cards); None for a whole-image hit
        box = next((b["value"] for b in ctx.states_list[0] if b["id"]["index"] == hit), None)
        return "viewer open", viewer_body(found, from_url(search), box)

    @app.callback(Output({"type": "pages", "query": MATCH}, "children"),
                  Output({"type": "state", "query": MATCH}, "data"),
                  Output({"type": "count", "query": MATCH}, "children"),
                  Output({"type": "more", "query": MATCH}, "className"),
                  Output({"type": "more-note", "query": MATCH}, "children"),
                  Input({"type": "load", "query": MATCH}, "n_clicks"),
                  State({"type": "state", "query": MATCH}, "data"), State("upload", "contents"),
                  prevent_initial_call=True)
    def load_more(clicks, state, upload):
        """The next page of the search shown (offset = the number of results shown), appended below it."""
        if not clicks or not state or state["done"]:
            raise PreventUpdate

        def stop(reason: str):
            return no_update, {**state, "done": True}, no_update, "more done", reason

        s, query, shown = live.get(), state["query"], state["shown"]
        if s.version != state["version"]:  # ranks and cards of two versions must not mix
            return stop(f"index {s.version} is live now: search again to see its results")
        if query["kind"] == "image" and (not upload or upload_digest(upload) != query["image"]):
            return stop("the query image was removed or replaced: search again")
        asked = next_k(state["opts"]["k"], shown)
        try:
            results = run_query(s, query, upload, {**state["opts"], "k": asked, "offset": shown}, limits)
        except QueryError as e:
            return stop(str(e))
        except Exception as e:
            log.exception("loading more results failed")
            return stop(f"loading more failed: {type(e).__name__}")
        pages = no_update
        if len(results):
            # assigned to the page's own slot, not appended: a page asked for twice is shown once
            pages = Patch()
            pages[state["pages"]] = chunk(results, s.version, from_url(state["url"]))
        shown += len(results)
        done = len(results) < asked or next_k(state["opts"]["k"], shown) == 0
        return (pages, {**state, "shown": shown, "pages": state["pages"] + 1, "done": done}, plural(shown),
                "more done" if done else "more open", more_line(shown, done))

    return app
