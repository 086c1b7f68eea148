"""Whether the Hugging Face hub can be reached: offline mode, or a host name that does not resolve.

Without a network huggingface_hub retries every file it is asked for (five tries over ~25 s), and
loading one model asks for several, so an unknown or uncached model failed only after about a minute
of retry warnings. When the hub's host name does not resolve (or offline mode is on), loaders look
in the local Hugging Face cache only and fail at once if the files are not there.
"""

from __future__ import annotations

import functools
import os
import socket
from typing import Any
from urllib.parse import urlparse

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable_reason() -> str | None:
    """Why the hub cannot be reached ("HF_HUB_OFFLINE is set", "huggingface.co does not resolve"), or
    None when it may be reachable (a failed download then still reports its own error)."""
    from huggingface_hub import constants  # lazy: only hub users pay the import

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None  # a proxy resolves the host itself
    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    return None if _resolves(host) else f"{host} does not resolve: no network?"


@functools.cache
def _resolves(host: str) -> bool:
    """Whether the host name resolves (asked once per host and process)."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def hub_kwargs() -> dict[str, Any]:
    """Keyword arguments for hub loaders: the local cache only when the hub cannot be reached."""
    return {"local_files_only": True} if hub_unreachable_reason() else {}
