"""The atlas: a static site of a model's anatomy, and the read-only server that shows it."""
from .server import make_server, resolve_request, serve_in_thread

__all__ = ["make_server", "resolve_request", "serve_in_thread"]
