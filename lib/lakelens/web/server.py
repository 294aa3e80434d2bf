"""Wires the page and the API onto one Flask server over a live index, and serves it with waitress."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import sys
from pathlib import Path

from flask import Flask

from lakelens.web import api, clip, duplicates
from lakelens.web.api import LOOPBACK_HOSTS, Limits
from lakelens.web.app import build_page
from lakelens.web.live import LiveSearcher
from lakelens.web.thumbs import ThumbCache

log = logging.getLogger(__name__)


def create_app(index_dir: str | Path, limits: Limits | None = None, live: LiveSearcher | None = None, s3=None):
    """The Dash app (page + callbacks) with the JSON API on its Flask server: `app.server` is the WSGI app.
    `s3`: lakelens.ingest.storage.S3Settings, for thumbnails of s3a:// images."""
    limits = limits or Limits()
    live = live or LiveSearcher(index_dir, query_max_pixels=limits.max_pixels)
    server = Flask("lakelens.web")
    # base64 in the page's upload callback inflates a file by 4/3; the API checks the raw size itself
    server.config["MAX_CONTENT_LENGTH"] = limits.max_upload_bytes * 4 // 3 + 64 * 1024
    thumbs = ThumbCache(limits.thumb_cache, limits.thumb_side, max_pixels=limits.max_pixels, s3=s3)
    large = ThumbCache(limits.large_cache, limits.large_side, max_pixels=limits.max_pixels, s3=s3)
    api.register(server, live, limits, thumbs, large)
    served = clip.served_indices(live, limits, thumbs, large)
    clip.register(server, served, limits)
    duplicates.register(server, live)
    app = build_page(server, live, limits)
    app.live, app.limits, app.thumbs, app.served = live, limits, thumbs, served
    return app


def make_server(app, host: str = "127.0.0.1", port: int = 8050, threads: int = 8):
    """A waitress server bound now (port 0 picks a free one: `server.effective_port`); call `.run()`."""
    from waitress import create_server

    # waitress refuses (413) a body over the largest legitimate request, the upload limit in the page's
    # base64 form, before buffering it; under that, the API checks the image's own size (JSON 413)
    return create_server(app.server, host=host, port=port, threads=threads, ident="lakelens",
                         max_request_body_size=app.server.config["MAX_CONTENT_LENGTH"],
                         clear_untrusted_proxy_headers=True)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def exposure(host: str, limits: Limits) -> tuple[Limits, str | None]:
    """The limits to serve `host` with, and a warning when the address is reachable from other machines.
    On loopback the Host allowlist defaults to the loopback names (no DNS rebinding from a web page)."""
    if is_loopback(host):
        if not limits.allowed_hosts:
            limits = dataclasses.replace(limits, allowed_hosts=(*LOOPBACK_HOSTS, host.lower()))
        return limits, None
    return limits, (f"lakelens: warning: serving on {host}, an address other machines can reach: whoever reaches "
                    f"it can search the index and see its images"
                    f"{'' if limits.token else '; set --token (or LAKELENS_TOKEN) to require a token'}"
                    f"{'' if limits.allowed_hosts else '; --allowed-host names the host names to answer for'}")


def serve(index_dir: str | Path, host: str = "127.0.0.1", port: int = 8050, threads: int = 8,
          limits: Limits | None = None, s3=None) -> None:
    limits, warning = exposure(host, limits or Limits())
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = create_app(index_dir, limits, s3=s3)
    for one in app.served.values():  # models built before the first request, not inside it (nor by two threads)
        one.live.warm()
    server = make_server(app, host, port, threads)
    s = app.live.searcher
    print(f"lakelens: serving index {index_dir} ({s.version}, {len(s)} images, model "
          f"{s.manifest['model']['name']}) on http://{host}:{server.effective_port}/", flush=True)
    print(f"lakelens: clip-retrieval clients: http://{host}:{server.effective_port}/knn-service, indice_name "
          f"{', '.join(app.served)}", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print("lakelens: server stopped", file=sys.stderr, flush=True)
