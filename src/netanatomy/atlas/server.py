"""A read-only static server for an atlas folder that never serves a file outside it.

`http.server` already drops `..` segments, but a symlink inside the folder can still point out
of it, and a handler's `translate_path` is easy to get subtly wrong. Here every request is
resolved to a real path (symlinks followed, percent-encoding decoded once) and served only when
that path lies inside the folder's own real path; anything else is 404, as if it did not exist.
Only GET and HEAD are answered (the default handler already refuses the other methods).
"""
from __future__ import annotations

import http.server
import os
import threading
import urllib.parse
from functools import partial
from pathlib import Path

from ..errors import UsageError

__all__ = ["AtlasHandler", "inside", "make_server", "resolve_request", "serve_in_thread"]


def inside(root: Path, path: Path) -> bool:
    """True when `path` (already resolved) is `root` or lies under it."""
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def resolve_request(root: Path, url_path: str) -> Path | None:
    """The real file or folder a request path names inside `root`, or None when it leaves `root`.

    The query and fragment are dropped and the path is decoded once; any `..` segment, absolute
    component, backslash or NUL is refused outright rather than normalized away.
    """
    path = urllib.parse.urlsplit(url_path).path
    decoded = urllib.parse.unquote(path, errors="strict") if "%" in path else path
    if "\x00" in decoded or "\\" in decoded:
        return None
    parts = [p for p in decoded.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    candidate = root.joinpath(*parts) if parts else root
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return real if inside(root, real) else None


class AtlasHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files under `directory` only; directory listings are off (index.html or 404)."""

    server_version = "netanatomy-atlas"

    def __init__(self, *args, directory: str, quiet: bool = True, **kwargs):
        self._root = Path(directory).resolve()
        self._quiet = quiet
        super().__init__(*args, directory=str(self._root), **kwargs)

    def translate_path(self, path: str) -> str:
        real = resolve_request(self._root, path)
        # send_head refuses None before the base class opens anything; keep a harmless value here
        return str(real) if real is not None else str(self._root)

    def list_directory(self, path):  # no listings: an atlas has index pages
        self.send_error(404, "File not found")
        return None

    def send_head(self):
        real = resolve_request(self._root, self.path)
        if real is not None and real.is_dir():
            index = resolve_request(self._root, urllib.parse.urlsplit(self.path).path.rstrip("/") + "/index.html")
            if index is None or not index.is_file():
                real = None  # no listings, and an index.html that links out counts as missing
        if real is None:
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def end_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-cache")
        super().end_headers()

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if not self._quiet:
            super().log_message(format, *args)


def make_server(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
                quiet: bool = True) -> http.server.ThreadingHTTPServer:
    """A server for `folder` bound to host:port (port 0 picks a free one); not yet serving."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder (make an atlas with 'netanatomy survey ... --out DIR')")
    handler = partial(AtlasHandler, directory=str(root), quiet=quiet)
    try:
        return http.server.ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve_in_thread(folder: str | os.PathLike, host: str = "127.0.0.1", port: int = 0):
    """Start a server in a daemon thread (for tests and notebooks); returns (server, base URL)."""
    server = make_server(folder, host, port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}"

