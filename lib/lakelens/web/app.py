"""The search page (Dash): query box, K / min-score / path-prefix controls, a query image (alone or with the
text, balanced by a weights slider), and a thumbnail grid that loads the next page when scrolled to its end."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import uuid

from dash import ALL, MATCH, Dash, Input, Output, Patch, State, ctx, dcc, html, no_update
from dash.exceptions import PreventUpdate

from lakelens.search import MAX_K, QueryError
from lakelens.web.api import Limits, parse_k, parse_min_score, parse_prefix, parse_query, thumb_url
from lakelens.web.live import LiveSearcher

log = logging.getLogger(__name__)

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
.hit { background: #fff; border-radius: 6px; padding: 6px; cursor: pointer; box-shadow: 0 1px 2px #0002; }
.hit:hover { box-shadow: 0 0 0 2px #3a6ee8; }
.hit img { width: 100%; height: 160px; object-fit: contain; background: #eee; display: block; }
.hit .score { font-size: 12px; color: #333; margin-top: 4px; font-variant-numeric: tabular-nums; }
.hit .path { font-size: 11px; color: #666; overflow-wrap: anywhere; max-height: 3.6em; overflow: hidden; }
.more { display: flex; gap: 12px; align-items: center; justify-content: center; margin: 16px 0;
        font-size: 13px; color: #777; }
.more.done button { display: none; }
.empty { color: #777; font-style: italic; padding: 20px 0; }
footer { margin-top: 24px; font-size: 12px; color: #888; }
"""

# Scrolling near the end of the results clicks their "Load more" button: the next page comes from the
# server callback, appended in place. Only a scroll asks, so a page shorter than the window never loads
# on its own (the button is in view there). `asked` remembers the search (its element's id) and the card
# count a request was made at, so one page is asked for once however many scroll events arrive before it.
SCROLL_JS = """
addEventListener('scroll', function () {
  var more = document.querySelector('#results .more.open');
  if (!more || more.getBoundingClientRect().top > innerHeight + 200) return;
  var mark = more.id + ' ' + document.querySelectorAll('#results .hit').length;
  if (more.dataset.asked === mark) return;
  more.dataset.asked = mark;
  more.querySelector('button').click();
}, {passive: true});
"""

INDEX_STRING = """<!DOCTYPE html>
<html>
  <head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>""" + CSS + """</style></head>
  <body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}<script>""" + SCROLL_JS + """</script></footer></body>
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


def plural(n: int) -> str:
    return f"{n} result{'s' if n != 1 else ''}"


def more_line(shown: int, done: bool) -> str:
    if not done:
        return "scroll down for more"
    if shown >= MAX_K:
        return f"the first {MAX_K:,} results are shown, the most one search returns"
    return "end of results"


def cards(results, version: str) -> list:
    out = []
    for r in results.itertuples():
        id_text, path = str(int(r.id)), str(r.path)
        # paths are shown as text children and attributes: React escapes both, so a file name with
        # markup in it renders as those characters and never as HTML
        out.append(html.Div(
            id={"type": "hit", "index": id_text}, className="hit", n_clicks=0,
            title=f"find images similar to {path}", **{"data-id": id_text, "data-rank": str(int(r.rank))},
            children=[html.Img(src=thumb_url(int(r.id), version), alt=path.rsplit("/", 1)[-1]),
                      html.Div(f"#{int(r.rank)} · score {float(r.score):.4f}", className="score"),
                      html.Div(path, className="path")]))
    return out


def chunk(results, version: str):
    # one page of cards; `display: contents` puts them straight into the grid
    return html.Div(className="chunk", children=cards(results, version))


def result_grid(results, version: str, qid: str, state: dict):
    """The first page of a search. Everything a later page touches carries the search's own id (qid),
    so a page that arrives after a new search has replaced this one finds nothing to update."""
    if results.empty:
        return html.Div("No results", className="empty")
    done = state["done"]
    return [html.Div(id={"type": "pages", "query": qid}, className="grid", children=[chunk(results, version)]),
            html.Div(id={"type": "more", "query": qid}, className="more done" if done else "more open", children=[
                html.Button("Load more", id={"type": "load", "query": qid}, n_clicks=0),
                html.Span(more_line(len(results), done), id={"type": "more-note", "query": qid})]),
            dcc.Store(id={"type": "state", "query": qid}, data=state)]


def _clicked_hit() -> str | None:
    """The id of the result card the user clicked, or None when the trigger was not a real click
    (new cards appearing in the grid fire the pattern-matching input with n_clicks 0)."""
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
    if query["kind"] == "image":
        return s.search(text=query["text"], image=decode_upload(upload, limits), weights=query["weights"], **opts)
    return s.search_text(query["text"], **opts)


def describe(s, query: dict) -> list:
    if query["kind"] == "id":
        return ["images similar to ", html.Span(s.path_of(int(query["id"])) or query["id"], className="q")]
    text = ["“", html.Span(query["text"], className="q"), "”"] if query["text"] is not None else []
    if query["kind"] == "text":
        return text
    image = ["uploaded image ", html.Span(query["filename"], className="q")]
    return [*text, " and ", *image] if text else image


def build_page(server, live: LiveSearcher, limits: Limits) -> Dash:
    app = Dash(__name__, server=server, title="lakelens", update_title=None, serve_locally=True,
               assets_folder="no-assets")  # no CDN (machines may be offline) and no assets folder to scan
    app.index_string = INDEX_STRING

    def layout():
        s = live.get()
        return html.Div(className="page", children=[
            html.H1("lakelens image search"),
            html.Div(className="controls search-row", children=[
                dcc.Input(id="query", type="text", placeholder="describe an image, e.g. a red circle",
                          debounce=True, n_submit=0, autoFocus=True),
                html.Button("Search", id="search", n_clicks=0),
            ]),
            html.Div(className="controls options", children=[
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
            html.Div(id="results"),
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

    @app.callback(Output("results", "children"), Output("status", "children"),
                  Input("search", "n_clicks"), Input("query", "n_submit"), Input("upload", "contents"),
                  Input("weights", "value"), Input({"type": "hit", "index": ALL}, "n_clicks"),
                  State("query", "value"), State("k", "value"), State("min-score", "value"),
                  State("prefix", "value"), State("upload", "filename"), prevent_initial_call=True)
    def run_search(_clicks, _submits, upload, balance, _hit_clicks, text, k, min_score, prefix, filename):
        trigger = ctx.triggered_id
        hit = _clicked_hit() if isinstance(trigger, dict) else None
        if isinstance(trigger, dict) and hit is None:
            raise PreventUpdate
        if trigger == "upload" and not upload:
            raise PreventUpdate  # the image was removed: the results shown stay until the next search
        has_text = bool(text and text.strip())
        if trigger == "weights" and not (upload and has_text):
            raise PreventUpdate  # the balance matters only while a text and an image are searched together
        s = live.get()
        try:
            opts = {"k": parse_k(k, limits), "min_score": parse_min_score(min_score),
                    "path_prefix": parse_prefix(prefix, limits)}
            if hit is not None:
                query = {"kind": "id", "id": hit}
            elif upload:  # an attached image is part of every search until it is removed
                query = {"kind": "image", "text": parse_query(text, limits) if has_text else None,
                         "weights": balance_weights(balance) if has_text else None,
                         "image": upload_digest(upload), "filename": filename or ""}
            else:
                query = {"kind": "text", "text": parse_query(text, limits)}
            results = run_query(s, query, upload, opts, limits)
            what = describe(s, query)
        except QueryError as e:
            return [], html.Span(str(e), className="error")
        except Exception as e:  # shown on the page rather than as a silent failed callback
            log.exception("search failed")
            return [], html.Span(f"search failed: {type(e).__name__}", className="error")
        n, qid = len(results), uuid.uuid4().hex
        state = {"query": query, "opts": opts, "version": s.version, "shown": n, "pages": 1,
                 "done": n < opts["k"] or next_k(opts["k"], n) == 0}
        count = html.Span(plural(n) if n else "No results", id={"type": "count", "query": qid})
        notes = [html.Div(note, className="note") for note in results.attrs.get("notes", [])]
        return (result_grid(results, s.version, qid, state),
                [html.Span([count, " for ", *what, f" · index {s.version}"]), *notes])

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
            pages[state["pages"]] = chunk(results, s.version)
        shown += len(results)
        done = len(results) < asked or next_k(state["opts"]["k"], shown) == 0
        return (pages, {**state, "shown": shown, "pages": state["pages"] + 1, "done": done}, plural(shown),
                "more done" if done else "more open", more_line(shown, done))

    return app
