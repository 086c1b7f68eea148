"""What names a language model and a hook before any model loads. No torch here: the command line's parser
and the settings it builds (a harvest's hook) check these words first."""

from __future__ import annotations

import re
from typing import Any

from saelab.errors import ConfigError

MODEL_SPECS = "a Hugging Face hub id, a model folder, a .gguf file or 'default'"
"""What names a language model wherever one is asked for (``load_model``'s ``spec``, ``--model``)."""

HOOK_KINDS = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
"""Hook kinds in the order the forward pass produces them within one layer."""

HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")


def hook_form_problem(name: Any) -> str | None:
    """What makes ``name`` a hook no model has (checked before a model loads; the layer range needs
    the model), or None."""
    match = HOOK_RE.match(name) if isinstance(name, str) else None
    if match is None or match.group(2) not in HOOK_KINDS:
        return f"expected blocks.{{L}}.hook_{{{'|'.join(HOOK_KINDS)}}}, e.g. blocks.9.hook_resid_post"
    return None


def check_hook_form(hook: str) -> None:
    """Refuse a name no model has a hook of (``hook_form_problem``); needs no model, so it runs first."""
    problem = hook_form_problem(hook)
    if problem:
        raise ConfigError(f"hook {hook!r}: {problem}")


def hook_layer(name: Any) -> int | None:
    """The layer of a well-formed ``blocks.L.hook_KIND`` name, or None."""
    match = HOOK_RE.match(name) if isinstance(name, str) else None
    return int(match.group(1)) if match else None
