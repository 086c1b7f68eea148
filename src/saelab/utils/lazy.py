"""A package's public names imported with their module when first read (PEP 562's module ``__getattr__``).

``import saelab`` and the command line's parser import no torch: the packages they pass through (saelab,
saelab.sae, saelab.models, ...) name their classes and functions here instead of importing them, and a
name's module (with torch) is imported only when the name is used: ``from saelab import TopKSAE`` as before.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_names(package: str, modules: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any],
                                                                            Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for the package ``package`` (its ``__name__``): each name of ``modules``
    ({module: the names the package gives of it}) is imported from its module when first read, then kept on
    the package."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name]), name)
        setattr(sys.modules[package], name, value)  # read once: later reads find it without this call
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
