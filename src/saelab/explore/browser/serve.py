"""Serve a built feature browser site over HTTP on the loopback address only (127.0.0.1).

The server is Python's ``http.server`` restricted to the site folder; it binds 127.0.0.1 so other
machines cannot reach it, sends no-cache headers (a rebuilt site shows at once) and logs nothing
per request. Since any web page the user opens can also send requests to 127.0.0.1, it answers only:

- requests whose ``Host`` is ``127.0.0.1:PORT``, ``localhost:PORT`` or ``[::1]:PORT`` (a DNS-rebinding
  page names its own host and is refused, 403);
- requests from the site itself or typed/bookmarked/followed links (``Sec-Fetch-Site``): another site's
  ``<script src>`` cannot load the data files, which are scripts, and read them (403);
- files inside the site folder after symlinks are resolved (403 otherwise); no directory listings (404);
- files as the site's site.json records them (:class:`SiteFiles`, checked as each is served: a file written over
  since the build, or one the build did not write, is answered 409 with a one-line text naming it and
  ``--overwrite``); a site rebuilt in place while served is read again from its new site.json.

Every response carries :func:`security_headers`: the pages' Content-Security-Policy, ``nosniff`` and
``no-referrer``, and a same-origin resource policy.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import io
import os
import threading
from http import HTTPStatus
from pathlib import Path
from typing import Any

from saelab.errors import SaelabError
from saelab.sae.config import SITE_MANIFEST

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


REBUILD = "rebuild it with `saelab browse` and --overwrite"


class SiteFiles:
    """The files of a served site, as its site.json records them, checked as each is served: a file whose size
    and modification time are those it had when last found as recorded is served at once; another is hashed
    (only then) and served when it still matches its record. Where site.json itself changed (the site was
    rebuilt), its record is read again first."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        """``manifest``: the site's site.json; the size and time of each file now are taken as checked (the
        start-up scan, before the server's start checks every file's hash)."""
        self.root, self.lock = root, threading.Lock()
        self._read(manifest)
        self.seen = {name: _stat_of(self.root / name) for name in (*self.records, SITE_MANIFEST)}

    def _read(self, manifest: dict[str, Any]) -> None:
        """Take ``manifest``'s record of the files; none of them is taken as checked yet."""
        from saelab.explore.browser.site import FILES, implied_files

        recorded = manifest.get(FILES)
        # a site.json from before it recorded hashes: the files it implies, checked by size and time only
        self.records = recorded if isinstance(recorded, dict) else dict.fromkeys(implied_files(manifest) or [])
        self.manifest_stat = _stat_of(self.root / SITE_MANIFEST)
        self.seen: dict[str, tuple[int, int] | None] = {SITE_MANIFEST: self.manifest_stat}

    def why_not(self, name: str, f) -> str | None:
        """Why the site's file ``name`` (a path relative to the site, open as ``f``) is not served, or None."""
        with self.lock:
            why = self._check(name, f)
            if why is not None and self._reread():  # rebuilt since: checked against its new record
                why = self._check(name, f)
        return why

    def missing(self, name: str) -> str | None:
        """The refusal of a request for a listed file that is not there, or None where none is listed."""
        return f"{name} is missing since the site was built; {REBUILD}" if name in self.records else None

    def _check(self, name: str, f) -> str | None:
        if name != SITE_MANIFEST and name not in self.records:
            return f"{name} is not one of the site's files (its site.json lists none such); {REBUILD}"
        st = os.fstat(f.fileno())
        now = (st.st_size, st.st_mtime_ns)
        if self.seen.get(name) == now:
            return None
        record = self.records.get(name)
        if record is not None and record[0] == st.st_size and _sha256_16(f) == record[1]:
            self.seen[name] = now  # touched or copied back, same bytes: served at once from now on
            return None
        return f"{name} changed since the site was built; {REBUILD}"

    def _reread(self) -> bool:
        """Read site.json again where it changed since it was read; whether it did and holds a finished site (each
        of whose files is then hashed when next served)."""
        from saelab.explore.browser.site import read_site_manifest

        if _stat_of(self.root / SITE_MANIFEST) == self.manifest_stat:
            return False
        manifest = read_site_manifest(self.root)
        if manifest is None:
            return False
        self._read(manifest)
        return True


def _stat_of(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _sha256_16(f) -> str:
    """The first 16 hex digits of the sha256 of open file ``f`` (as site.json records files), read from its start."""
    f.seek(0)
    digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    f.seek(0)
    return digest


class _Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".js": "text/javascript; charset=utf-8", ".json": "application/json",
                      ".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8"}

    def __init__(self, *args, site_files: SiteFiles, **kwargs) -> None:
        self.site_files = site_files  # before the base class's __init__, which answers the request
        super().__init__(*args, **kwargs)

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
            asked = self.translate_path(self.path)
            if status == HTTPStatus.NOT_FOUND and not asked.endswith("/") and not os.path.lexists(asked):
                missing = self.site_files.missing(self._site_name(asked))  # a file the build wrote, deleted since
                if missing:
                    return self._refuse(missing)
            self.send_error(status, "outside the site" if status == HTTPStatus.FORBIDDEN else "not found")
            return None
        try:
            f = open(real, "rb")
        except OSError:
            self.send_error(HTTPStatus.NOT_FOUND, "not found")
            return None
        try:
            why = self.site_files.why_not(self._site_name(real), f)  # checked as the file opened is, not its name
            if why is not None:
                f.close()
                return self._refuse(why)
            size = os.fstat(f.fileno()).st_size
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", self.guess_type(real))
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return f
        except BaseException:
            f.close()
            raise

    def _site_name(self, path: str) -> str:
        """``path`` (a real path inside the site) as site.json names the site's files."""
        return Path(os.path.relpath(path, os.path.realpath(self.directory))).as_posix()

    def _refuse(self, line: str) -> io.BytesIO:
        """A 409 whose body is ``line``: the page's file is not the one the site was built with."""
        body = (line + "\n").encode("utf-8")
        self.send_response(HTTPStatus.CONFLICT)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

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
    files = SiteFiles(site.resolve(), manifest)  # sizes and times before the hashes: a file changed between is hashed
    damage = site_damage(site, manifest)
    if damage is not None:
        raise ServeError(f"{site} holds a feature browser site, but {damage}; build it again with `saelab browse` "
                         "and --overwrite before serving it")
    if not 0 <= int(port) <= 65535:
        raise ServeError(f"port must be in 0..65535, got {port}")
    handler = functools.partial(_Handler, directory=str(site.resolve()), site_files=files)
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
