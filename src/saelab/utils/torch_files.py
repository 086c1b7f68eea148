"""torch.load of the torch files saelab reads (from anyone): plain tensors and containers only, never code."""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import torch

from saelab.errors import PICKLE_HEAD


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
