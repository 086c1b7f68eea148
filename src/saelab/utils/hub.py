"""Whether the Hugging Face hub can be reached: offline mode, or a host name that does not resolve.

Without a network huggingface_hub retries every file it is asked for (five tries over ~25 s), and
loading one model asks for several, so an unknown or uncached model failed only after about a minute
of retry warnings. When the hub's host name does not resolve (or offline mode is on), loaders look
in the local Hugging Face cache only and fail at once if the files are not there.
"""

from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def local_path(spec: str | None) -> Path | None:
    """The absolute path of a file or folder on this disk that ``spec`` names; None for a URL, or for
    a hub id or any other name that names nothing here."""
    if not spec or "://" in spec or not Path(spec).expanduser().exists():
        return None
    return Path(spec).expanduser().resolve()


def public_name(value: str | None) -> str | None:
    """A local file or folder by its base name (no path of the user's disk in shared files); a URL, a hub
    id or a name as given."""
    if local_path(value) is None:
        return value
    # by the path as given, not where a link leads: two links to one model are two names, as typed
    return Path(os.path.abspath(Path(value).expanduser())).name


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached ("offline mode is on", "huggingface.co does not resolve"), or None
    when it may be reachable (a failed download then still reports its own error)."""
    from huggingface_hub import constants  # lazy: only hub users pay the import

    if constants.is_offline_mode():
        return "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)"
    endpoint = urlparse(constants.ENDPOINT)
    host = endpoint.hostname or constants.ENDPOINT
    proxies = urllib.request.getproxies()
    if (proxies.get(endpoint.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host):
        return None  # the proxy resolves the host itself
    return None if _resolves(host) else f"{host} does not resolve: no network?"


_RESOLVED: set[str] = set()


def _resolves(host: str) -> bool:
    """Whether the host name resolves. A success is remembered for the process; a failure is asked
    again next time (the network may come back in a long session)."""
    if host not in _RESOLVED:
        try:
            socket.getaddrinfo(host, 443)
        except OSError:
            return False
        _RESOLVED.add(host)
    return True


def hub_kwargs() -> dict[str, Any]:
    """Keyword arguments for hub loaders: the local cache only when the hub cannot be reached."""
    return {"local_files_only": True} if hub_unreachable_reason() else {}
