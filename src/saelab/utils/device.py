"""Which device work runs on: one rule for every verb and every public function."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from saelab.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a device is resolved: the command line checks its options first
    import torch

DEVICE_ENV = "SAELAB_DEVICE"
"""Environment variable naming the device that ``device=None`` means (default: auto)."""


SUPPORTED_TYPES = ("cpu", "cuda")
"""The device types saelab runs on; torch names others (meta, xpu, hpu) that its kernels and loaders do not,
and MPS lacks the float64 that its initialisation and evaluations reduce in."""


def resolve_device(device: str | torch.device | None = None, named: str | None = None) -> torch.device:
    """``None``: ``$SAELAB_DEVICE`` if set, else ``"auto"``. ``"auto"``: CUDA when available, else the
    CPU; otherwise the device named (``"cpu"``, ``"cuda"``, ``"cuda:1"``), refused with a
    one-line error when it is another or absent. ``named``: how that error names ``device`` (the
    command line's ``"--device cuda:-1"``; default ``"device='cuda:-1'"``)."""
    import torch

    if named is None:
        named = f"${DEVICE_ENV} {os.environ.get(DEVICE_ENV)!r}" if device is None else f"device={device!r}"
    device = _asked(device)
    if _is_auto(device):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in SUPPORTED_TYPES:
        raise ConfigError(f"{named}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{named}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{named}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _asked(device: str | torch.device | None) -> str | torch.device:
    """The device ``device`` asks for: None means ``$SAELAB_DEVICE`` if set, else auto."""
    return (os.environ.get(DEVICE_ENV) or "auto") if device is None else device


def _is_auto(device: str | torch.device) -> bool:
    return isinstance(device, str) and device.strip().lower() == "auto"


def may_refuse(device: str | torch.device | None) -> bool:
    """Whether resolve_device may refuse ``device``: never auto (what None means without ``$SAELAB_DEVICE``) nor
    cpu. The command line resolves only such a device before a verb's own checks, which then run without torch."""
    asked = _asked(device)
    return not (_is_auto(asked) or asked == "cpu")


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two devices are the same one; ``cuda`` (no index) is the current CUDA device, as torch places
    a tensor sent there."""
    return _indexed(a) == _indexed(b)


def _indexed(device: torch.device | str) -> torch.device:
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
