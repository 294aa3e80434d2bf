"""The search page (Dash): query box, K / min-score / path-prefix controls, image upload, and a thumbnail grid."""

from __future__ import annotations

import base64
import binascii
import json
import logging

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html
from dash.exceptions import PreventUpdate

from lakelens.search import QueryError
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
#status { margin: 8px 0; font-size: 14px; min-height: 20px; }
#status .error { color: #b00020; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.hit { background: #fff; border-radius: 6px; padding: 6px; cursor: pointer; box-shadow: 0 1px 2px #0002; }
.hit:hover { box-shadow: 0 0 0 2px #3a6ee8; }
.hit img { width: 100%; height: 160px; object-fit: contain; background: #eee; display: block; }
.hit .score { font-size: 12px; color: #333; margin-top: 4px; font-variant-numeric: tabular-nums; }
.hit .path { font-size: 11px; color: #666; overflow-wrap: anywhere; max-height: 3.6em; overflow: hidden; }
.empty { color: #777; font-style: italic; padding: 20px 0; }
footer { margin-top: 24px; font-size: 12px; color: #888; }
"""

INDEX_STRING = """<!DOCTYPE html>
<html>
  <head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>""" + CSS + """</style></head>
  <body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body>
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


def result_grid(results, version: str):
    if results.empty:
        return html.Div("No results", className="empty")
    cards = []
    for r in results.itertuples():
        id_text, path = str(int(r.id)), str(r.path)
        # paths are shown as text children and attributes: React escapes both, so a file name with
        # markup in it renders as those characters and never as HTML
        cards.append(html.Div(
            id={"type": "hit", "index": id_text}, className="hit", n_clicks=0,
            title=f"find images similar to {path}", **{"data-id": id_text, "data-rank": str(int(r.rank))},
            children=[html.Img(src=thumb_url(int(r.id), version), alt=path.rsplit("/", 1)[-1]),
                      html.Div(f"#{int(r.rank)} · score {float(r.score):.4f}", className="score"),
                      html.Div(path, className="path")]))
    return cards


def _clicked_hit() -> str | None:
    """The id of the result card the user clicked, or None when the trigger was not a real click
    (new cards appearing in the grid fire the pattern-matching input with n_clicks 0)."""
    for t in ctx.triggered:
        component, _, prop = t["prop_id"].rpartition(".")
        if prop == "n_clicks" and component.startswith("{") and t["value"]:
            return json.loads(component)["index"]
    return None


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
                       children=html.Div("Drop an image here, or click to choose one, to search by image")),
            html.Div(id="status"),
            html.Div(id="results", className="grid"),
            html.Footer(id="index-info",
                        children=f"index {s.version} · {len(s)} images · model {s.manifest['model']['name']}"),
        ])

    app.layout = layout  # a function: every page load shows the version that is live now

    @app.callback(Output("results", "children"), Output("status", "children"),
                  Input("search", "n_clicks"), Input("query", "n_submit"), Input("upload", "contents"),
                  Input({"type": "hit", "index": ALL}, "n_clicks"),
                  State("query", "value"), State("k", "value"), State("min-score", "value"),
                  State("prefix", "value"), State("upload", "filename"), prevent_initial_call=True)
    def run_search(_clicks, _submits, upload, _hit_clicks, query, k, min_score, prefix, filename):
        trigger = ctx.triggered_id
        hit = _clicked_hit() if isinstance(trigger, dict) else None
        if isinstance(trigger, dict) and hit is None:
            raise PreventUpdate
        s = live.get()
        try:
            opts = {"k": parse_k(k, limits), "min_score": parse_min_score(min_score),
                    "path_prefix": parse_prefix(prefix, limits)}
            if hit is not None:
                id_ = int(hit)
                source = s.path_of(id_)
                if source is None:
                    raise QueryError(f"image {id_} is no longer in index {s.version}")
                results, what = s.search_id(id_, **opts), ["images similar to ", html.Span(source, className="q")]
            elif trigger == "upload":
                if not upload:
                    raise PreventUpdate
                results = s.search_image(decode_upload(upload, limits), **opts)
                what = ["uploaded image ", html.Span(filename or "", className="q")]
            else:
                q = parse_query(query, limits)
                results, what = s.search_text(q, **opts), ["“", html.Span(q, className="q"), "”"]
        except QueryError as e:
            return [], html.Span(str(e), className="error")
        except PreventUpdate:
            raise
        except Exception as e:  # shown on the page rather than as a silent failed callback
            log.exception("search failed")
            return [], html.Span(f"search failed: {type(e).__name__}", className="error")
        n = len(results)
        head = f"{n} result{'s' if n != 1 else ''} for " if n else "No results for "
        notes = [html.Div(note, className="note") for note in results.attrs.get("notes", [])]
        return result_grid(results, s.version), [html.Span([head, *what, f" · index {s.version}"]), *notes]

    return app
