"""torch.load of the torch files saelab reads (from anyone): plain tensors and containers only, never code."""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch

from saelab.errors import PICKLE_HEAD

SNIFF_BYTES = 9
"""How much of a file's start is_safetensors needs."""


def is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes that starts with ``head`` (its first SNIFF_BYTES) is a safetensors file: an
    8-byte little-endian length, then a JSON header of that length that fits the file. Its first byte is that
    length's lowest, which can be a pickle's 0x80."""
    return (len(head) >= SNIFF_BYTES and head[8:9] == b"{"
            and SNIFF_BYTES - 1 + int.from_bytes(head[:8], "little") <= size)


def load_plain_tensors(path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True, mmap=mmap)``. A failure on a file in the pickle format carries
    ``stopped_at``, the byte where torch stopped reading: a refused global whose name torch read to the end of
    the file is a class name cut short (``errors.torch_load_reason`` reads it)."""
    # torch warns about files it then reads or refuses (a pickle protocol it did not write, a TorchScript archive):
    # noise above the one line saelab words a failure in. Only torch's warnings, some of which it files under its
    # caller, this module; catch_warnings sets the process's filters, so another thread's warnings from torch are
    # not shown meanwhile either (saelab loads before its own threads start).
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=rf"(torch|{re.escape(__name__)})(\.|$)")
        if f.read(1) != PICKLE_HEAD:  # a zip archive, read by path as torch maps it, or no torch file at all
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        f.seek(0)
        try:
            return torch.load(f, map_location=map_location, weights_only=True, mmap=mmap)
        except Exception as err:
            err.stopped_at = f.tell()  # the pickle reader reads through the file's own buffered read and readline
            raise
