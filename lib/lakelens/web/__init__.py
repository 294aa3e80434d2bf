"""Search web page (Dash) and JSON API over the query driver: `lakelens serve --index INDEX`."""

from .api import Limits
from .server import create_app, make_server, serve

__all__ = ["Limits", "create_app", "make_server", "serve"]
