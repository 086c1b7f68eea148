"""Serve a built feature browser site over HTTP on the loopback address only (127.0.0.1).

The server is Python's ``http.server`` restricted to the site folder; it binds 127.0.0.1 so other
machines cannot reach it, sends no-cache headers (a rebuilt site shows at once) and logs nothing
per request.
"""

from __future__ import annotations

import errno
import functools
import http.server
import os
import threading
from pathlib import Path

from saelab.errors import SaelabError

HOST = "127.0.0.1"


class ServeError(SaelabError, OSError):
    """The site cannot be served (not a site, port in use)."""


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript; charset=utf-8", ".json": "application/json",
                      ".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8"}

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        pass


def make_server(site: str | os.PathLike, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``site`` bound to 127.0.0.1:``port`` (0 picks a free port); not started."""
    from saelab.explore.browser.site import read_site_manifest

    site = Path(site)
    if read_site_manifest(site) is None:
        raise ServeError(f"{site}: not a finished feature browser site (no site.json); build it with `saelab browse`")
    if not 0 <= int(port) <= 65535:
        raise ServeError(f"port must be in 0..65535, got {port}")
    handler = functools.partial(_Handler, directory=str(site.resolve()))
    try:
        server = http.server.ThreadingHTTPServer((HOST, int(port)), handler)
    except OSError as e:
        if e.errno in (errno.EADDRINUSE, errno.EACCES):
            why = "is in use" if e.errno == errno.EADDRINUSE else "needs privileges"
            raise ServeError(f"port {port} on {HOST} {why}; pass another --port (or 0 for any free port)") from e
        raise
    server.daemon_threads = True
    return server


def site_url(server: http.server.HTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def serve_in_thread(site: str | os.PathLike, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, threading.Thread]:
    """Start serving in a background thread (for tests and notebooks); stop with ``server.shutdown()``."""
    server = make_server(site, port)
    thread = threading.Thread(target=server.serve_forever, name="saelab-browse", daemon=True)
    thread.start()
    return server, thread


def serve_site(site: str | os.PathLike, port: int = 8000) -> None:
    """Serve ``site`` on 127.0.0.1 until interrupted (Ctrl-C)."""
    server = make_server(site, port)
    print(f"feature browser: {site_url(server)}  (serving {site} on {HOST} only; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
