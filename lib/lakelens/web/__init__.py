"""Search web page (Dash) and JSON API over the query driver: `lakelens serve --index INDEX`."""

from lakelens.web.api import Limits
from lakelens.web.server import create_app, make_server, serve

__all__ = ["Limits", "create_app", "make_server", "serve"]
