"""Absolute token positions inside hooks, also during generation with a KV cache.

An edit installed at a hook sees only the activation ``[B, T, D]`` of the current forward. In a
plain forward (``lm.logits``, ``lm.cross_entropy``) that is the whole sequence, so index ``t``
is token ``t``. During ``generate`` with a KV cache the first forward covers the prompt and every
later forward covers only the new token(s), so index 0 of the activation is not token 0.

``position_tracker(lm)`` installs a forward pre-hook on the root module that records, for every
forward, the absolute position of its first token: the length of the KV cache passed in
``past_key_values`` (0 without one). The hook is shared and stays installed only while an edit
that uses it (a ``Steering``, an SAE splice, a ``latent_edit``) exists. Edits built by saelab.explore read it, so a
``positions`` argument always means **absolute positions in the full sequence** (prompt tokens
first, BOS included, then generated tokens in order), whether the model is scoring or generating:

- ``None``: every position, prompt and generated tokens alike;
- an int or a list of ints: those positions (a position past the prompt is edited when the
  model reaches it during generation);
- a ``slice`` with non-negative ``start``/``stop`` (``stop=None`` means open-ended, e.g.
  ``slice(1, None)`` = every token but the first, generated ones included) and a ``step`` >= 1
  counted from ``start``, as Python's (``slice(1, None, 2)`` = tokens 1, 3, 5, ...).

Negative positions are refused: during generation "the last position" changes at every step.
The offset is read from the ``past_key_values`` keyword, which is how ``generate`` and every HF
forward pass it; a cache passed positionally is not seen (the offset is then taken as 0).
"""

from __future__ import annotations

import sys
import weakref
from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:  # torch is imported where a mask is made: the command line reads positions without it
    import torch
    from torch import nn

Positions = Union[None, int, slice, Sequence[int]]

_TRACKERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


class _Offset:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class PositionTracker:
    """Absolute position of the first token of the forward currently running on one model.

    The pre-hook it installs lives as long as the tracker: edits that need it hold a reference,
    and once the last of them is gone the hook is removed (the model keeps no hook of ours).
    """

    def __init__(self, model: nn.Module) -> None:
        state = self._state = _Offset()

        def pre_hook(module, args, kwargs):  # holds the state only, never the tracker
            state.value = _cache_length(kwargs.get("past_key_values"))
            return None

        handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        self._finalizer = weakref.finalize(self, handle.remove)

    @property
    def offset(self) -> int:
        return self._state.value

    def remove(self) -> None:
        self._finalizer()


def _cache_length(past) -> int:
    if past is None:
        return 0
    get_len = getattr(past, "get_seq_length", None)
    if callable(get_len):
        return int(get_len())
    try:  # legacy tuple cache: ((k, v), ...) with k [B, H, T, Dh]
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def position_tracker(lm) -> PositionTracker:
    """The tracker of ``lm``'s model: one per model, shared, installed while someone holds it."""
    model = lm.model
    ref = _TRACKERS.get(model)
    tracker = ref() if ref is not None else None
    if tracker is None:
        tracker = PositionTracker(model)
        _TRACKERS[model] = weakref.ref(tracker)
    return tracker


def check_positions(positions: Positions) -> Positions:
    """Validate a positions spec (see the module docstring) and return it, normalized."""
    if positions is None:
        return None
    if isinstance(positions, bool):
        raise TypeError("positions must be None, an int, a list of ints or a slice, not a bool")
    if isinstance(positions, int):
        positions = [positions]
    if isinstance(positions, slice):
        for name in ("start", "stop", "step"):
            v = getattr(positions, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"positions slice {name} must be a non-negative int or None, got {v!r}")
        if positions.step == 0:
            bound = ["" if v is None else v for v in (positions.start, positions.stop)]
            raise ValueError(f"positions {bound[0]}:{bound[1]}:0 has a step of 0; expected a step >= 1")
        if positions.start is not None and positions.stop is not None and positions.stop <= positions.start:
            raise ValueError(f"positions {positions.start}:{positions.stop} is an empty range; expected start < stop")
        return positions
    out = []
    for p in positions:
        if _is_tensor(p):
            p = int(p)
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"positions must be ints, got {p!r}")
        if p < 0:
            raise ValueError(
                f"position {p} is negative; positions are absolute (0 = first token) so that they "
                "mean the same during generation"
            )
        out.append(p)
    return sorted(set(out))


def _is_tensor(value) -> bool:
    torch = sys.modules.get("torch")  # not imported yet: no tensor exists
    return torch is not None and isinstance(value, torch.Tensor)


def position_mask(positions: Positions, offset: int, length: int, device=None) -> torch.Tensor | None:
    """Boolean ``[length]`` mask of the tokens ``offset .. offset+length-1`` selected by ``positions``.

    ``None`` when every token is selected (callers then skip masking).
    """
    import torch

    if positions is None:
        return None
    absolute = torch.arange(offset, offset + length, device=device)
    if isinstance(positions, slice):
        start = positions.start or 0
        step = positions.step or 1
        mask = (absolute >= start) & ((absolute - start) % step == 0)
        if positions.stop is not None:
            mask &= absolute < positions.stop
        return mask
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    for p in positions:
        if offset <= p < offset + length:
            mask[p - offset] = True
    return mask


def first_past(positions: Positions, last: int) -> int | None:
    """The first position of ``positions`` (as ``check_positions`` returns them) after ``last``; None when
    there is none. A range counts by its start: its later positions may lie past ``last``."""
    if positions is None:
        return None
    if isinstance(positions, slice):
        start = positions.start or 0
        return start if start > last else None
    return next((p for p in positions if p > last), None)


def comma_items(text: str, kind: str) -> list[str]:
    """'12,40' -> ['12', '40'] for a list of ``kind`` ("integers", "numbers") typed on the command line; an
    empty item ('1,,2', '5,') is refused: a number was likely left out."""
    items = text.split(",")
    if not all(t.strip() for t in items):
        raise ValueError(f"expected {kind} separated by single commas, got {text!r}")
    return items


def index_list(text: str) -> list[int]:
    """'3,7,9' -> [3, 7, 9]: indices as typed on the command line (latents, token positions), each an
    integer >= 0; ValueError in words for the user, not int()'s."""
    items = comma_items(text, "integers")
    try:
        values = [int(t) for t in items]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise ValueError(f"expected an integer >= 0 or comma-separated integers >= 0, got {text!r}")
    return values


def parse_positions(text: str | None) -> Positions:
    """Positions from command-line text: 'all', '5', '3,7,9', '1:', '2:10' or '1::2' (a step, as Python's
    slices; absolute, 0-based)."""
    if text is None:
        return None
    text = text.strip()
    if text == "all":  # not "": an empty variable in a script is a mistake, not every position
        return None
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) > 3 or any(len(index_list(p)) != 1 for p in parts if p.strip()):
                raise ValueError
            return check_positions(slice(*[index_list(p)[0] if p.strip() else None for p in parts]))
        return check_positions(index_list(text))
    except ValueError as e:
        if str(e) and not str(e).startswith("expected"):  # check_positions's reason (an empty range): read, not a form
            raise
        raise ValueError(
            f"cannot read positions {text!r}: expected 'all', a position '5', positions '3,7,9' or a range '1:' / "
            "'2:10' / '1::2', as integers >= 0 (0 = the first token)"
        ) from None
