"""Offline feature browser and feature families across dictionary sizes.

- :mod:`.build`: the one pass over text (LM forward, SAE encode, per-latent statistics) and what every
  number on the pages means; :mod:`.stats`: the vectorised accumulators it uses.
- :mod:`.site`: the static site (local HTML/JS/CSS and data files, no external URL).
- :mod:`.serve`: serve it on 127.0.0.1.
- :mod:`.families`: match latents across SAE sizes (decoder cosine and co-activation), the family tree.
- :mod:`.make`: ``build_browser`` / ``build_families``, what ``saelab browse`` / ``saelab families`` run.
"""

from saelab.explore.config import BrowseConfig
from saelab.utils.lazy import lazy_names

# Each imported with its module (torch) when first used: .serve, which the port check reads, needs no torch.
lazy_names(__name__, {
    "saelab.explore.browser.build": ("SAESource", "open_sae_source"),
    "saelab.explore.browser.make": ("build_browser", "build_families"),
    "saelab.explore.browser.serve": ("make_server", "serve_in_thread", "serve_site"),
})

__all__ = [
    "BrowseConfig",
    "SAESource",
    "build_browser",
    "build_families",
    "make_server",
    "open_sae_source",
    "serve_in_thread",
    "serve_site",
]
