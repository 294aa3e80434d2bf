"""Wires the page and the API onto one Flask server over a live index, and serves it with waitress."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flask import Flask

from lakelens.web import api
from lakelens.web.api import Limits
from lakelens.web.live import LiveSearcher
from lakelens.web.thumbs import ThumbCache

log = logging.getLogger(__name__)


def create_app(index_dir: str | Path, limits: Limits | None = None, live: LiveSearcher | None = None):
    """The Dash app (page + callbacks) with the JSON API on its Flask server: `app.server` is the WSGI app."""
    from lakelens.web.app import build_page

    limits = limits or Limits()
    live = live or LiveSearcher(index_dir)
    server = Flask("lakelens.web")
    # base64 in the page's upload callback inflates a file by 4/3; the API checks the raw size itself
    server.config["MAX_CONTENT_LENGTH"] = limits.max_upload_bytes * 4 // 3 + 64 * 1024
    thumbs = ThumbCache(limits.thumb_cache, limits.thumb_side)
    api.register(server, live, limits, thumbs)
    app = build_page(server, live, limits)
    app.live, app.limits, app.thumbs = live, limits, thumbs
    return app


def make_server(app, host: str = "127.0.0.1", port: int = 8050, threads: int = 8):
    """A waitress server bound now (port 0 picks a free one: `server.effective_port`); call `.run()`."""
    from waitress import create_server

    # Flask enforces the upload limit and answers 413 as JSON; waitress's own cap (a plain-text 413)
    # sits far above it and only bounds what a client can make the server buffer
    return create_server(app.server, host=host, port=port, threads=threads, ident="lakelens",
                         max_request_body_size=app.server.config["MAX_CONTENT_LENGTH"] * 16,
                         clear_untrusted_proxy_headers=True)


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8050, threads: int = 8,
          limits: Limits | None = None) -> None:
    app = create_app(index_dir, limits)
    app.live.warm()  # model built before the first request, not inside it (and not by two threads at once)
    server = make_server(app, host, port, threads)
    s = app.live.searcher
    print(f"lakelens: serving index {index_dir} ({s.version}, {len(s)} images, model "
          f"{s.manifest['model']['key']}) on http://{host}:{server.effective_port}/", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print("lakelens: server stopped", file=sys.stderr, flush=True)
