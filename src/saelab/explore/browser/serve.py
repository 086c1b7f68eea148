"""Serve a built feature browser site over HTTP on the loopback address only (127.0.0.1).

The server is Python's ``http.server`` restricted to the site folder; it binds 127.0.0.1 so other
machines cannot reach it, sends no-cache headers (a rebuilt site shows at once) and logs nothing
per request. Since any web page the user opens can also send requests to 127.0.0.1, it answers only:

- requests whose ``Host`` is ``127.0.0.1:PORT``, ``localhost:PORT`` or ``[::1]:PORT`` (a DNS-rebinding
  page names its own host and is refused, 403);
- requests from the site itself or typed/bookmarked/followed links (``Sec-Fetch-Site``): another site's
  ``<script src>`` cannot load the data files, which are scripts, and read them (403);
- files inside the site folder after symlinks are resolved (403 otherwise); no directory listings (404).

Every response carries :func:`security_headers`: the pages' Content-Security-Policy, ``nosniff`` and
``no-referrer``, and a same-origin resource policy.
"""

from __future__ import annotations

import errno
import functools
import http.server
import os
import threading
from http import HTTPStatus
from pathlib import Path

from saelab.errors import SaelabError

HOST = "127.0.0.1"


class ServeError(SaelabError, OSError):
    """The site cannot be served (not a site, port in use)."""


def security_headers() -> dict[str, str]:
    """Headers sent with every response: the page policy (plus no framing, which only a header can say),
    no MIME sniffing, no Referer to other hosts, and no use of the site's files by other origins."""
    from saelab.explore.browser.site import PAGE_CSP

    return {"Content-Security-Policy": f"{PAGE_CSP}; frame-ancestors 'none'", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cross-Origin-Resource-Policy": "same-origin",
            "X-Frame-Options": "DENY"}


def allowed_hosts(port: int) -> set[str]:
    """``Host`` header values (lower case) of requests meant for this server on ``port``."""
    names = ("127.0.0.1", "localhost", "[::1]")
    return {f"{n}:{port}" for n in names} | (set(names) if port == 80 else set())


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript; charset=utf-8", ".json": "application/json",
                      ".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8"}

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        for name, value in security_headers().items():
            self.send_header(name, value)
        super().end_headers()

    def _refusal(self) -> str | None:
        """Why this request is not answered (403), or None."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or hosts[0].strip().lower() not in allowed_hosts(self.server.server_address[1]):
            return "host not allowed; open the site at 127.0.0.1 or localhost with its port"
        fetch_site = self.headers.get("Sec-Fetch-Site")
        navigation = self.headers.get("Sec-Fetch-Mode") == "navigate" and self.headers.get("Sec-Fetch-Dest") == "document"
        if fetch_site not in (None, "same-origin", "none") and not navigation:
            return "request from another site"
        return None

    def _site_file(self) -> tuple[str | None, HTTPStatus]:
        """The real path of the file a GET names inside the site (a folder URL: its index.html), or why not."""
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            path = os.path.join(path, "index.html")  # only the site's root has one; never a listing
        elif path.endswith("/"):
            return None, HTTPStatus.NOT_FOUND  # "file/" is no file
        real, root = os.path.realpath(path), os.path.realpath(self.directory)
        if os.path.commonpath([real, root]) != root:
            return None, HTTPStatus.FORBIDDEN  # a symlink out of the site
        return (real, HTTPStatus.OK) if os.path.isfile(real) else (None, HTTPStatus.NOT_FOUND)

    def send_head(self):
        why = self._refusal()
        if why:
            self.send_error(HTTPStatus.FORBIDDEN, why)
            return None
        real, status = self._site_file()
        if real is None:
            self.send_error(status, "outside the site" if status == HTTPStatus.FORBIDDEN else "not found")
            return None
        try:
            f = open(real, "rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return None
        try:
            size = os.fstat(f.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", self.guess_type(real))
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return f
        except BaseException:
            f.close()
            raise

    def list_directory(self, path):  # never reached through send_head; refused should anything call it
        self.send_error(HTTPStatus.NOT_FOUND, "not found")
        return None

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        pass


def make_server(site: str | os.PathLike, port: int = 8000) -> http.server.ThreadingHTTPServer:
    """An HTTP server for ``site`` bound to 127.0.0.1:``port`` (0 picks a free port); not started. A site whose
    files are not those its site.json records (one written over or deleted since) is refused, before the port is
    bound: its pages would show other numbers than the build's, or fail to load."""
    from saelab.explore.browser.site import read_site_manifest, site_damage

    site = Path(site)
    manifest = read_site_manifest(site)
    if manifest is None:
        raise ServeError(f"{site}: not a finished feature browser site (no site.json); build it with `saelab browse`")
    damage = site_damage(site, manifest)
    if damage is not None:
        raise ServeError(f"{site} holds a feature browser site, but {damage}; build it again with `saelab browse` "
                         "and --overwrite before serving it")
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
