"""A package's public names imported with their module when first read (PEP 562's module ``__getattr__``).

``import saelab`` and the command line's parser import no torch: the packages they pass through (saelab,
saelab.sae, saelab.models, ...) name their classes and functions here instead of importing them, and a
name's module (with torch) is imported only when the name is used: ``from saelab import TopKSAE`` as before.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package whose public names are imported from their modules when first read."""

    _lazy: dict[str, str]
    """Each public name, with the module that defines it."""

    def __getattr__(self, name: str) -> Any:  # only for a name not set yet
        if name not in self._lazy:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(self._lazy[name]), name)
        setattr(self, name, value)  # read once: later reads find it without this call
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        # Importing a submodule binds it on its package: saelab.explore.spliced would hide the function spliced
        # that the package gives (an eager `from .spliced import spliced` rebound it after the import).
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}" \
                and self._lazy.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._lazy))


def lazy_names(package: str, modules: dict[str, tuple[str, ...]]) -> None:
    """Make the package ``package`` (its ``__name__``) give each name of ``modules`` ({module: the names the
    package gives of it}), imported from its module when first read."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module._lazy = {name: source for source, names in modules.items() for name in names}
