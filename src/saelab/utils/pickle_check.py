"""Refuse a torch pickle whose objects would take far more time or memory than its size, before torch reads it.

``torch.load(weights_only=True)`` runs no code, but a pickle of a few hundred bytes can still describe a huge
object: a tuple of two references to one tuple of two references to one tuple ..., 2**d leaves from d levels. Any
later walk over it (hashing it into a set or Counter, deep-copying an optimizer state, formatting it into an error
message, torch.as_tensor) takes 2**d steps. And a legacy tensor constructor or ``bytearray`` called with a large
integer allocates that much at once. torch.save writes neither: it refers again only to things it memoized
(strings, globals, tensors, storages, now and then a small tuple such as Adam's betas).

So this reads the pickle's opcodes, the subset torch's weights-only reader understands (the bytes torch's own zip
reader gives it), keeping for each object on its stack only what kind it is (nothing is built). Which functions a
pickle may call is torch's answer (its allowlist refuses any other global, and the scan leaves that refusal to it);
this adds what torch lets through, the size of what the allowed calls and references make. It refuses:

- any change to a container after a second reference to it (torch.save writes a container whole first); each
  reference (a memo get) counts all that container holds, the containers in it included, toward the budget below
  (one state_dict under two names reads; shared levels that double at each exhaust it in a few);
- a tensor rebuilt with a state of its own (``_rebuild_from_type_v2`` of a function other than torch's tensor
  rebuilds, a parameter with state inside it, a BUILD on a tensor), or with attributes other than names apart from
  a tensor's own (see _attributes): a tensor is the one object referred to again freely;
- a tensor or storage (a persistent id, or what a legacy tensor or storage class or ``bytearray`` makes) passed to
  anything but a tensor rebuild (``set``, ``torch.Size``, ``bytearray`` read it element by element, and a view of
  one stored element has as many as it says), and the rebuilds that copy a tensor while loading
  (``_rebuild_device_tensor_from_cpu_tensor``, ``_from_numpy``);
- a call whose arguments are not a tuple the pickle wrote, also the call inside ``_rebuild_from_type_v2``
  (``bytearray(*storage)`` reads the storage's numbers; torch passes a made set's or OrderedDict's items one by
  one, and the scan keeps none of them);
- ``_codecs.encode`` of anything but a literal text in latin1 (what torch.save writes for bytes), since its
  result fed to another encode doubles with each call;
- a legacy tensor or storage class, or ``bytearray``, called with integers whose product exceeds
  CONSTRUCTED_SIZE_MAX;
- a dict, set or Counter given more than HASHED_ALIKE_MAX keys that may share one hash (keys whose hashes can be
  made equal: integers of 2**61 - 1 or more, whose hash is their remainder; complex numbers; tuples): inserting n
  keys of one hash takes n**2 / 2 comparisons. Texts cannot be made so: their hash is keyed afresh in every
  process. Keys whose value the scan knows (those numbers; tuples of up to _HASHED_ITEMS numbers, floats but NaN,
  None, bools, texts or bytes of up to _HASHED_TEXT_MAX bytes, or such tuples; a torch.Size, hashed as its tuple) are
  counted by their hash itself, as the loading process will hash them (the scan runs in it: a text's hash, or
  None's, which Python 3.11 takes from its address, is the same there): a thousand tuple keys (i, None) or (i, a
  70-character name), or sets of 250 random 64-bit ids, read. Any other such key (holding a device, a NaN, or a
  longer text or tuple) may share its hash with any: a NaN's hash is its float's address (Python 3.10+), the
  loading process's and not the scan's (keys (True x 6, a, b, NaN), b chosen for a, shared one hash 510 at a time
  in torch's reader, their NaNs made 32 bytes apart, while the scan's one reused NaN gave them distinct hashes).
  Each dict given keys, and each
  call that hashes a container's items again (``set``, ``Counter``, ``OrderedDict``, of a list, a dict or what
  another such call made), is also charged, against the budget below, the comparisons those keys take: each with
  the keys before it of its hash, or that may share it, each comparison weighed by what it may walk (_compare_cost:
  a key equal to an earlier one in value but of distinct objects is walked in full, a flat key costs 1). A set of
  256 complex numbers of one hash, made again and again from one list referred to again (8 bytes each), took 32,640
  comparisons each, as did one made again and again of a dict keyed by 256 pairs of integers of one hash;
- a state (BUILD) on anything but an OrderedDict or Counter (torch builds any object of a class it allows, an empty
  state doing nothing: ``set()`` given None; torch.save builds nothing else), or other than attributes named apart
  from its own (``_metadata`` of a state_dict, any a user set: see _attributes);
- a legacy storage id naming a view of its storage (torch keeps each view in a dict by a key of the file's choosing;
  torch.save writes None there);
- over MARKS_OPEN_MAX marks open at once: torch's reader keeps a list for each (10 MB of marks took 740 MiB), and
  torch.save opens one per level of nesting, a few more for a tensor.

The scan stops early, leaving the pickle to torch, only where torch's reader fails at that same opcode (it reads the
bytes, stack, marks and memo as torch does): the bytes end, an opcode the installed torch does not read, a global
it refuses (off its allowlist and the user's safe globals, as torch's reader answers for that global: its refusal
names it, where the scan would name something after it), an item missing from the stack, marks or memo, a number
cut short, a text that is not UTF-8. Anything else it cannot follow is refused, as torch may read on past it; a
PROTO after a pickle's first opcode is refused (torch warns at each).
The calls of a pickle may together make at most MADE_BYTES_PER_FILE_BYTE times the file's size (texts passed, and
texts referred to again past REFERRED_TEXTS_FREE, each reference counted; elements asked for; the bytes of each
storage a persistent id names, under each spelling of its key, which a legacy file allocates as the id says;
CONTAINER_BYTES per list, dict, set or tuple, MADE_CONTAINER_BYTES per container a call makes; the comparisons of
keys that may hash alike; a unit per _COMPARED_BYTES of each text the scan hashes as it reads it; a refusal names the
part that took most and lists each), and a global's name
is at most _NAME_MAX characters (torch searches a refused one's message in time that grows with its square). Around
the pickle, a zip archive must be one that torch's zip reader and Python's zipfile read alike, its records stored
and within the file (torch's reader inflates a record whole before checking its size), and a file that is not a zip
archive must not be a tar archive (torch.load parses a tar's headers first). A TorchScript archive (a
``constants.pkl`` record) is left to torch, which refuses one unread from 2.6 on (pyproject requires it).
What the tensors take once loaded is checked after the load (torch_files.load_plain_tensors: views, compressed or
uninitialised storages, repeated references, tensors that are not dense). The cost is one pass over the pickle's
opcodes: a few thousand for a model's weights (the tensors' bytes are not in the pickle).
"""

from __future__ import annotations

import collections
import functools
import gc
import io
import os
import pickle
import struct
import tarfile
import types
import zipfile
from typing import IO

import torch
from torch import _weights_only_unpickler
from torch._utils import IMPORT_MAPPING, NAME_MAPPING  # the renames torch's reader applies to a global's name

CONSTRUCTED_SIZE_MAX = 2**26
"""The largest allocation (elements or bytes) a legacy tensor class or bytearray may be asked for by its integers."""
NESTING_MAX = 100
"""The deepest a container may nest containers: hashing a tuple nested 160,000 deep (1 byte per level) overflows the C
stack while torch loads it (a dict key), and Python's printing, copying and saving refuse past 1,000 levels."""
MARKS_OPEN_MAX = 2 * NESTING_MAX
"""The most marks a pickle may have open at once: torch's reader keeps a list of its own for each (64 bytes or more
from one byte of the file: 10 MB of marks took 740 MiB and 12.9 s). torch.save opens one per container it is writing
(a tuple, a list's, dict's or set's items) and a few for a tensor (its rebuild's arguments, storage id, sizes,
attributes): a file nested as deep as NESTING_MAX allows opens about NESTING_MAX + 3. Twice that bound, rather than a
charge on each mark, costs what torch.save writes nothing."""
HASHED_ALIKE_MAX = 256
"""The most keys that may share one hash (of one hash, or of unknown value: see _Keys) one dict, set or Counter is
given: 256 of one hash take 32,640 comparisons to insert, charged against the budget (keys referred to again take
2 bytes of the file each)."""


class PickleBombError(pickle.UnpicklingError):
    """A torch pickle that describes an object far larger than the file (see the module docstring)."""


_OWN_NAMES = {"dict": frozenset(dir(collections.OrderedDict)) | frozenset(dir(collections.Counter)),
              "tensor": frozenset(dir(torch.nn.Parameter(torch.empty(0))))}
"""The attributes of their own that the objects torch sets attributes on have: an OrderedDict or a Counter (a
BUILD: torch updates its __dict__), a tensor (a Parameter's include a plain tensor's)."""
_KINDS = frozenset(_OWN_NAMES)

_HEAD = 8
"""How many of a container's first items the scan keeps (a call's arguments)."""


class _Box:
    """A container (tuple, list, dict, set, or an object built from one) as far as the scan needs it."""
    __slots__ = ("items", "flat", "referred_again", "int_product", "head", "tensors", "text_bytes", "counted", "keys",
                 "pairs", "first_alike", "weight", "depth")

    def __init__(self) -> None:
        self.items, self.flat, self.referred_again, self.int_product, self.head = 0, True, False, 1, ()
        self.tensors = False  # whether a tensor is in it, at any depth
        self.text_bytes = 0  # the length of the texts in it, at any depth, each reference counted
        # its items that may hash alike (a dict's keys), as a call that hashes them meets them: themselves and the
        # first item of each (the key an OrderedDict takes from a pair); those in its head counted only when a call
        # hashes them (see iterated: a tensor's sizes, in its rebuild's arguments, never are)
        self.counted = 0  # how many of its head were
        self.keys: _Keys | None = None
        self.pairs: _Keys | None = None
        self.first_alike = False  # of a container a call made, its items in no set order: whether any of them (its
        # first, as a pair's key) may hash alike
        self.weight = 0  # its items at every depth, each reference counted
        self.depth = 1  # how deep it nests containers (itself one level)

    items_hashed = True
    """Whether its items are what a call that hashes it meets (see iterated)."""

    def add(self, item: object) -> None:
        if self.referred_again:
            raise PickleBombError("a container referred to again changes afterwards (torch.save writes a container "
                                  "whole before it refers to it again)")
        if (type(item) is _Leaf or item is _TENSOR or type(item) is float
                or (type(item) is int and -_HASH_MODULUS < item < _HASH_MODULUS)):
            self._add_plain(item)  # the items of most containers (a tensor's sizes and strides): quickly
            return
        if len(self.head) == _HEAD and self.items_hashed and _may_hash_alike(item):
            self.hash_item(item)  # past its head: counted now
        self.items += 1
        self.weight += 1 + (item.weight if isinstance(item, _Box) else 0)
        if len(self.head) < _HEAD:
            self.head += (item,)  # a tuple: none for an empty box (the scan keeps a record of each)
        if isinstance(item, _Box):
            self.flat = False
            self.nest(item.depth)
            self.int_product = min(self.int_product * item.int_product, 2**63)
            self.tensors = self.tensors or item.tensors
            self.text_bytes += item.text_bytes
        elif isinstance(item, _Text):
            self.text_bytes += item.size
        elif item is _TENSOR:
            self.tensors = True
        elif isinstance(item, int):
            self.int_product = min(self.int_product * max(abs(item), 1), 2**63)
            self.text_bytes += _digits(item)

    def _add_plain(self, item: object) -> None:
        """``add`` of an item that cannot hash alike, holds nothing and has no digits to walk: a leaf (_Leaf), a
        float, a tensor or an int below 2**61 - 1 in size."""
        self.items += 1
        self.weight += 1
        if len(self.head) < _HEAD:
            self.head += (item,)  # a tuple: none for an empty box (the scan keeps a record of each)
        if item is _TENSOR:
            self.tensors = True
        elif type(item) is int:
            self.int_product = min(self.int_product * (item if item > 1 else -item if item < -1 else 1), 2**63)

    def nest(self, depth: int) -> None:
        """Count a container ``depth`` deep inside this one."""
        self.depth = max(self.depth, depth + 1)
        if self.depth > NESTING_MAX:
            raise PickleBombError(f"it nests containers over {NESTING_MAX} deep (torch.save writes weights in a few "
                                  "levels; hashing one nested 160,000 deep crashes Python)")

    def hash_item(self, item: object) -> None:
        """Count an item that may hash alike, as itself and as a pair's key."""
        self.keys = _own(self.keys, self)
        self.keys.add(item, _compare_cost(item))
        if (first := _first(item)) is not None:
            self.pairs = _own(self.pairs, self)
            self.pairs.add(first, _compare_cost(item if first is _UNKNOWN else first))

    def iterated(self, pairs: bool) -> _Keys | None:
        """Its items that may hash alike, as a call that hashes them meets them: themselves, or (``pairs``: an
        OrderedDict of pairs) the first item of each."""
        if self.items_hashed:
            for item in self.head[self.counted:]:
                if _may_hash_alike(item):
                    self.hash_item(item)
            self.counted = len(self.head)
        return self.pairs if pairs else self.keys

    def hash_keys(self, keys: list) -> int:
        """Count ``keys`` given to this dict (SETITEM, SETITEMS) as it hashes them. Returns the comparisons inserting
        them takes (see _Keys.comparisons); refused where over HASHED_ALIKE_MAX keys may share a hash."""
        alike = [key for key in keys if _may_hash_alike(key)]
        if not alike:
            return 0
        before = self.keys.comparisons() if self.iterated(False) else 0
        for key in alike:
            self.hash_item(key)
        self.keys.check()
        return self.keys.comparisons() - before


class _Keys:
    """Keys that may hash alike (see _may_hash_alike) as a dict, set or Counter holds them, or a call that hashes a
    container's items meets them: those whose value the scan knows counted by their hash (see _key_hash), the
    others by number, any of which may share a hash with any key. Shared by the containers made of one (set(x),
    Counter(set(x))), until one of them is given more."""
    __slots__ = ("owner", "by_hash", "base", "unknown", "compared", "largest", "count", "unknown_compared",
                 "unknown_cost", "cost")

    def __init__(self, owner: _Box, source: _Keys | None = None) -> None:
        self.owner = owner
        self.by_hash: dict[int, int] = dict(source.by_hash) if source else {}  # how many keys of each hash
        self.base = source.base if source else 0  # how many of each hash there may be besides (see freeze)
        self.unknown = source.unknown if source else 0  # keys whose value the scan does not know
        self.compared = source.compared if source else 0  # those of the known: each with those before it of its hash
        self.largest = source.largest if source else 0  # the most keys of known value of one hash
        self.count = source.count if source else 0  # all keys
        # the comparisons are weighed by _compare_cost: of the unknown, each with those before it; their costs; all
        self.unknown_compared = source.unknown_compared if source else 0
        self.unknown_cost = source.unknown_cost if source else 0
        self.cost = source.cost if source else 0

    def add(self, key: object, cost: int) -> None:
        """Count one more key, each comparison with it costing ``cost`` (_compare_cost): at most what comparing it
        with any walks."""
        self.count += 1
        self.cost += cost
        h = _key_hash(key)
        if h is None:
            self.unknown_compared += self.unknown * cost
            self.unknown += 1
            self.unknown_cost += cost
            return
        n = self.by_hash.get(h, 0)
        self.by_hash[h] = n + 1  # a key given again counts too: torch.save writes each once
        self.compared += (n + self.base) * cost
        self.largest = max(self.largest, n + 1 + self.base)

    def freeze(self) -> None:
        """Forget each key's hash once their container is passed to a call, which ends it (nothing is added to it
        after; it may stay in the memo to the end), keeping what comparisons and check need. A key given later to a
        container made of it is taken to share its hash with as many as the most of one hash."""
        self.by_hash = {}
        self.base = self.largest

    def comparisons(self) -> int:
        """The comparisons hashing these keys into a container takes, at most: each key with those before it of its
        hash, or that may share it (a key of unknown value: with each other such key, and the largest known group),
        each weighed by the cost of comparing the later key (_compare_cost). A set of 256 integers of one hash
        takes 32,640."""
        return self.compared + self.unknown_compared + self.unknown_cost * self.largest

    def check(self) -> None:
        if self.largest + self.unknown > HASHED_ALIKE_MAX:
            raise PickleBombError(f"it gives a dict, set or Counter over {HASHED_ALIKE_MAX} keys of one hash, or "
                                  "whose hashes can be made equal (large integers, complex numbers, tuples; "
                                  "torch.save writes no such keys in weights): inserting them takes their count "
                                  "squared")


def _own(keys: _Keys | None, box: _Box) -> _Keys:
    """``box``'s keys as it may count more: its own copy where it shares them with the container it was made of."""
    return keys if keys is not None and keys.owner is box else _Keys(box, keys)


_UNKNOWN = object()
"""A key whose value the scan does not know (the first item of what a call made, its items in no set order)."""


def _first(item: object) -> object:
    """The first item of ``item``, what an OrderedDict given it as a pair hashes, where that may hash alike; else
    None."""
    if not isinstance(item, _Box):
        return None
    if item.head:
        return item.head[0] if _may_hash_alike(item.head[0]) else None
    return _UNKNOWN if item.first_alike else None


def _compare_cost(key: object) -> int:
    """What one comparison of ``key`` with a key of its hash may walk, at most: a key equal in value to another, or
    to its first items, but a distinct object is walked in full (256 keys of one hash, each a tree of 2**14 tuples
    over one float, took 10 s to load from 2 MB when charged 1 a comparison). One unit covers its first _HEAD
    items (a number, a short tuple of numbers: as many as the comparison itself costs); past those, each object it
    holds at any depth (its weight, as a walk of it is charged), and each _COMPARED_BYTES of its texts and large
    integers' digits."""
    if not isinstance(key, _Box):
        return 1
    return 1 + max(0, key.weight + key.text_bytes // _COMPARED_BYTES - _HEAD)


_COMPARED_BYTES = 64
"""The bytes of text (or decimal digits of an integer) a comparison unit covers: texts and integers compare by
their memory, about as many in the time a unit's object takes (a dict of 250 keys (a device, a 100-byte name, an
int) reads, each key of unknown hash, so compared with every other)."""


_UNHASHED = object()
"""A tuple's or short text's hash not computed yet (see _key_hash, _text_hash)."""


class _HashOf:
    """Stands for an item of known hash inside a tuple: a tuple's hash is made of its items' hashes alone."""
    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def __hash__(self) -> int:
        return self.value


_HASHED_ITEMS = 64
"""The most items of a tuple whose hash the scan computes (past _HEAD items: when the tuple is made, as it keeps
no more): a longer tuple is of unknown value. Each tuple is hashed once, its items by the hashes kept for them."""


def _key_hash(key: object) -> int | None:
    """The hash of a key whose value the scan knows, as the loading process will hash it (the scan runs in it: a
    text's or bytes' hash, None's on Python 3.11, keyed afresh in every process, is the same here): an int, a
    complex number of known parts, a tuple of up to _HASHED_ITEMS of those, floats (a NaN is kept as of unknown
    value: its hash is its address in the loader), None, bools, texts and bytes of
    up to _HASHED_TEXT_MAX bytes, or such tuples, a torch.Size (hashed as the tuple of its numbers). None for
    another: its value unknown."""
    if type(key) is int or type(key) is complex:
        return hash(key)
    if isinstance(key, _Tuple):
        if (hashed := getattr(key, "hashed", _UNHASHED)) is _UNHASHED:  # once for each tuple, an item of many
            key.hashed = hashed = _items_hash(key.head) if key.items == len(key.head) else None
        return hashed
    return key.hashed if isinstance(key, _Made) else None


_NUMBERS = frozenset((int, float, complex))
_PLAIN = _NUMBERS | {type(None), bool}


def _items_hash(items: list | tuple) -> int | None:
    """The hash of a tuple of ``items`` where the scan knows each one's hash, else None."""
    if _NUMBERS.issuperset(map(type, items)):  # the most frequent: numbers alone, their hash taken whole
        return hash(tuple(items))
    values = tuple(map(_LEAF_VALUES.get, items, items))  # None and bools as themselves: hashed in C, alike
    if _PLAIN.issuperset(map(type, values)):
        return hash(values)
    values = []  # numbers, None, bools and short texts as themselves; others as a _HashOf
    for item in items:
        if type(item) in _NUMBERS:
            values.append(item)
        elif type(item) is _Leaf and item.hashed is not None:
            values.append(_LEAF_VALUES[item])
        elif isinstance(item, _Text) and item.hashed is _UNHASHED:  # a short text kept whole: str's hash
            values.append(item)
        elif isinstance(item, _Text) and (hashed := _text_hash(item)) is not None:
            values.append(_HashOf(hashed))
        elif isinstance(item, _Box) and (hashed := _key_hash(item)) is not None:
            values.append(_HashOf(hashed))  # its hash, not its value: shared tuples inside are hashed once
        else:
            return None
    return hash(tuple(values))


class _Tuple(_Box):
    """A tuple the pickle wrote (TUPLE, TUPLE1-3, EMPTY_TUPLE): what torch.save writes every call's arguments as."""
    __slots__ = ("hashed",)  # its hash where the scan knows its items' values, else None (see _key_hash)


class _Made(_Box):
    """A container a call made (``set(...)``, ``torch.Size(...)``), ``by`` that function: the scan keeps none of its
    items."""
    __slots__ = ("by", "hashed")

    def __init__(self, by: str) -> None:
        super().__init__()
        self.by = by
        self.hashed: int | None = None  # a torch.Size's, that of the tuple of its numbers (see _container)


class _EmptyTuple(_Tuple):
    """The empty tuple, one object for every EMPTY_TUPLE opcode (as in Python): a million of them cost the scan no
    memory. Nothing changes it: torch refuses to append to a tuple, set its items or its state."""
    __slots__ = ()

    def add(self, item: object) -> None:
        pass

    def hash_keys(self, keys: list) -> int:
        return 0


_EMPTY_TUPLE = _EmptyTuple()


class _Dict(_Box):
    """A dict, OrderedDict or Counter: what a BUILD's state and a tensor's backward hooks may be."""
    __slots__ = ("attribute_of",)

    def __init__(self) -> None:
        super().__init__()
        self.attribute_of = _KINDS  # the kinds of object whose attributes its keys may name (_attributes)

    items_hashed = False  # its keys alone are, counted as it is given them (hash_keys)

    def hash_keys(self, keys: list) -> int:
        for key in keys:
            if self.attribute_of:
                self.attribute_of = self.attribute_of & _attribute_of(key)
        return super().hash_keys(keys)


CONTAINER_BYTES = 16
"""What each list, dict, set or tuple (but the empty one) the pickle makes is charged against the budget: torch makes
one of 48 to 216 bytes from one byte of the file (five million empty sets: 1.2 GB from 5 MB; a tuple of the tuple
before it), and the scan keeps a record of about 150 bytes of each. A quarter of that, four times the budget's share
of a byte, so that there is at most one container per 4 bytes of the file (and 65,536 more), taking at most 16 times
the file's size, where texts and elements take 4: torch.save writes a small dict in 6 to 15 bytes (100,000 of them,
600 KB, read) and about 70 bytes of the pickle for each tensor, in four tuples (its size, its stride, its storage's
id, the rebuild's arguments)."""
MADE_CONTAINER_BYTES = 2 * CONTAINER_BYTES
"""What each container a call makes (``set()``, ``OrderedDict()``: a function fetched again, the empty tuple, the call,
4 bytes) is charged: more than the budget's share of its 4 bytes, and the scan takes the longest over a call."""


class _Global(str):
    """The name (module.name, as torch's reader renames it) a GLOBAL opcode pushed."""


class _Text(str):
    """A text a BINUNICODE or SHORT_BINSTRING opcode pushed (its value when short, else empty), or the bytes encoded
    from one (empty), and its ``size``; ``hashed``, the hash loading will give it (a short one's taken from its value
    when a key needs it, see _text_hash; None where unknown), ``encoded``, that of the bytes its latin1 encoding
    makes."""
    size = 0
    hashed: int | None | object = _UNHASHED
    encoded: int | None | object = _UNHASHED


def _digits(n: int) -> int:
    """What an integer of more than 64 bits is charged when walked (its decimal digits, about); 0 for others."""
    return n.bit_length() // 3 + 1 if n.bit_length() > 64 else 0


def _text(value: str, size: int, hashed: int | None | object = _UNHASHED, encoded: int | None | object = _UNHASHED
          ) -> _Text:
    text = _Text(value)
    text.size = size
    if hashed is not _UNHASHED:
        text.hashed, text.encoded = hashed, encoded
    return text


_SHORT_TEXT = 64
"""Texts up to this long are kept (a call's arguments); longer ones are kept as their hashes, or skipped."""
_HASHED_TEXT_MAX = 2**16
"""The longest text (in bytes) the scan hashes, when it reads it, keeping its hash and not its value (a longer one is
skipped, of unknown value): a tuple key of a long name reads (see _key_hash). Hashing is charged against the budget,
a unit per _COMPARED_BYTES, as a comparison walking it is."""


def _long_text(raw: bytes, value: str) -> _Text:
    """A text of more than _SHORT_TEXT bytes (``raw``, as decoded into ``value``), kept as its hashes: its own and
    that of the bytes ``_codecs.encode(value, "latin1")`` makes (torch.save writes bytes so), None where that fails."""
    return _text("", len(raw), hash(value), hash(raw) if raw.isascii() else _latin1_hash(value))


def _latin1_hash(value: str) -> int | None:
    try:
        return hash(value.encode("latin1"))
    except UnicodeEncodeError:  # torch's call fails alike
        return None


def _text_hash(text: _Text) -> int | None:
    """The hash loading will give ``text`` (see _Text), None where unknown."""
    # a short text kept whole: Python keeps its hash once computed
    return str.__hash__(text) if text.hashed is _UNHASHED else text.hashed


def _encoded_hash(text: _Text) -> int | None:
    """The hash of the bytes ``_codecs.encode(text, "latin1")`` makes, None where unknown."""
    if text.encoded is _UNHASHED:  # a short text kept whole
        text.encoded = _latin1_hash(str(text))
    return text.encoded


class _Leaf:
    """None, a bool, a device, a layout or a NaN: nothing a call or walk reads into; ``hashed``, its hash where the scan
    knows it (None's is its address on Python 3.11, the same for the whole process: the scan runs in the one that
    loads)."""
    __slots__ = ("hashed",)

    def __init__(self, hashed: int | None) -> None:
        self.hashed = hashed


_LEAF = _Leaf(None)  # a device, a layout or a NaN (another float is kept as it is: a key's hash needs it)
_NONE, _TRUE, _FALSE = _Leaf(hash(None)), _Leaf(hash(True)), _Leaf(hash(False))
_LEAF_VALUES = {_NONE: None, _TRUE: True, _FALSE: False}  # those of known hash: a tuple of them hashes alike
_COMPLEX = object()  # a complex number of parts the scan does not know (one of known parts is kept as it is)
_TENSOR = object()  # a tensor or storage: referred to again freely, passed to nothing but rebuilds
_SIZED = ("builtins.bytearray",)  # and every torch tensor and storage class ("torch.FloatTensor", ...)
_MAKES_TENSOR = ("torch._utils._rebuild_", "torch.nn.parameter.Parameter")
_MAKES_LEAF = ("torch.device", "torch.serialization._get_layout")
_HASHES = ("builtins.set", "collections.Counter", "collections.OrderedDict")
"""Calls that hash the items of their first argument (OrderedDict: the first item of each pair, or a dict's keys)."""
_DICTS = ("collections.OrderedDict", "collections.Counter")
_HASH_MODULUS = 2**61 - 1
"""An int's hash is its remainder by this: any number of ints of one hash are written in a few bytes each."""
_ELEMENT_BYTES = {f"torch.{kind}Storage": size for size, kinds in (
    (1, ("Untyped", "Bool", "Byte", "Char", "QInt8", "QUInt8", "QUInt4x2", "QUInt2x4")),
    (2, ("Half", "BFloat16", "Short")), (4, ("Float", "Int", "QInt32")), (8, ("Double", "Long", "ComplexFloat")),
    (16, ("ComplexDouble",))) for kind in kinds} | {"torch.storage.UntypedStorage": 1}
"""The bytes of each element of the storage classes a persistent id names (torch reads elements of that size;
torch.save names a dtype with no class of its own, float8 or uint16, by torch.storage's UntypedStorage, in bytes);
another class, which torch refuses, is charged the most."""
_WITH_STATE = ("torch._tensor._rebuild_from_type_v2", "torch._utils._rebuild_parameter_with_state")
"""Tensor rebuilds whose last argument is a state set on the tensor."""
_REFUSED = ("torch._utils._rebuild_device_tensor_from_cpu_tensor", "torch._utils._rebuild_device_tensor_from_numpy")
"""Rebuilds that copy a tensor while loading (a view of one element becomes gigabytes); torch.save writes them only
for tensors on devices without storage, which saelab never reads."""


def _sized(name: str) -> bool:
    return name in _SIZED or (name.startswith("torch.") and name.endswith(("Tensor", "Storage")))


def _may_hash_alike(item: object) -> bool:
    """Whether a pickle can give many distinct keys of this kind one hash: large ints, complex numbers, and tuples
    (whose hash combines their items' by steps that can be undone). Floats can share a hash only by the few dozen."""
    return ((isinstance(item, int) and abs(item) >= _HASH_MODULUS) or type(item) is complex or item is _COMPLEX
            or (isinstance(item, _Box) and item.items > 0))


def _known_text(item: object) -> bool:
    """Whether ``item`` is a text the scan kept whole (not a long one, kept empty, nor bytes encoded from one)."""
    return isinstance(item, _Text) and 0 < item.size <= _SHORT_TEXT and len(item.encode("utf-8", "surrogatepass")) \
        == item.size


def _attributes(state: object, kind: str) -> bool:
    """Whether a BUILD's or a tensor rebuild's state is what torch.save writes for the attributes of an object of
    ``kind`` ("dict", an OrderedDict's: ``_metadata`` of a state_dict, any a user set; "tensor"): a dict (made empty,
    then given its items) whose keys are all names that are none of the object's own. torch's weights-only reader
    sets any dict there as it is, which is not enough for saelab: an OrderedDict's ``keys`` or ``values`` would hide
    its items from every reader, a tensor's ``grad``, ``data``, ``__class__`` or ``_backward_hooks`` would replace
    what its rebuild was checked for, and a tensor as the state itself is iterated row by row."""
    return type(state) is _Dict and kind in state.attribute_of


def _attribute_of(key: object) -> frozenset:
    """The kinds of object (_OWN_NAMES) an attribute named ``key`` may be set on without replacing one of its own:
    none for a key that is no identifier kept whole, or that starts with two underscores (Python's own); a
    tensor's also none starting with one (torch's hooks and caches)."""
    if not (_known_text(key) and key.isidentifier() and not key.startswith("__")):
        return frozenset()
    return frozenset(kind for kind, own in _OWN_NAMES.items()
                     if key not in own and not (kind == "tensor" and key.startswith("_")))


def _leaf(item: object) -> bool:
    """Whether ``item`` is None, a bool, a float, a device or a layout: nothing a call or walk reads into."""
    return type(item) is _Leaf or type(item) is float


def _empty(item: object) -> bool:
    return _leaf(item) or (isinstance(item, _Box) and item.items == 0)


_HOOKS_ARGUMENT = {"_rebuild_tensor_v2": 5, "_rebuild_tensor_v3": 5, "_rebuild_parameter": 2,
                   "_rebuild_parameter_with_state": 2, "_rebuild_qtensor": 6}
"""Where each tensor rebuild takes the tensor's backward hooks, which torch sets on the tensor as they are."""

_NAME_MAX = 1000
"""The longest module or name of a global: torch writes a refused one into a message it then searches with a
regular expression whose time grows with the square of its length."""


def _cost(callee: object, args: object) -> int:
    """What a call makes, as far as the budget counts it: the elements a sized constructor asks for, the texts it
    is passed (each reference: one text fetched again and again is copied or hashed each time)."""
    if isinstance(callee, _Box) or (isinstance(callee, _Text) and callee.size > _NAME_MAX):
        # torch refuses it, writing it into its message first, however large
        raise PickleBombError("it calls a container or a long text, not a named function")
    if not isinstance(callee, _Global):  # torch's refusal, quoting a short value, is the message
        return 0
    if isinstance(args, _Text):
        return args.size
    if not isinstance(args, _Box):
        return 0
    return args.text_bytes + args.weight + (args.int_product if _sized(callee) else 0)  # each item walked


_NOT_DENSE = ("torch._utils._rebuild_qtensor", "torch._utils._rebuild_nested_tensor", "torch._utils._rebuild_sparse_",
              "torch._utils._rebuild_meta_tensor_no_storage", "torch._utils._rebuild_wrapper_subclass")
"""Rebuilds of tensors that are not dense, which torch_files refuses once loaded; refused before, as their rebuild
works through the tensors it is given (a quantizer's scales made contiguous: 2 GiB from a view of one element)."""


def _check_rebuild(name: str, head: tuple) -> None:
    """Refuse the tensor rebuilds torch.save never writes: one that copies a tensor while loading, one of a tensor
    that is not dense, or one given backward hooks (torch sets them on the tensor as they are, and formats them when
    it is saved again)."""
    if name in _REFUSED:
        raise PickleBombError(f"it calls {name}, which copies a tensor while loading (saelab reads tensors with "
                              "storage of their own)")
    if name.startswith(_NOT_DENSE):
        raise PickleBombError(f"it calls {name}, a tensor that is not dense (saelab reads dense tensors alone)")
    hooks = _HOOKS_ARGUMENT.get(name.removeprefix("torch._utils."), len(head)) if name.startswith("torch.") else 99
    # an empty dict alone: torch sets them as they are (True: saving the tensor fails, a backward pass crashes)
    if hooks < len(head) and not (type(head[hooks]) is _Dict and head[hooks].items == 0):
        raise PickleBombError(f"it calls {name} with backward hooks (torch.save writes an empty OrderedDict; a "
                              "tensor's hooks are formatted, element by element, when it is saved again)")


def _check_arguments(name: str, args: object) -> None:
    """Refuse a call whose arguments are not a tuple the pickle wrote (torch.save writes every call's so): torch
    passes any container's items one by one, and the scan keeps none of a made set's or OrderedDict's."""
    if not isinstance(args, _Tuple):
        raise PickleBombError(f"it calls {name or 'something'} with arguments that are not a tuple (torch.save "
                              "writes every call's arguments as one)")


def _made(callee: object, args: object) -> object:
    """What calling ``callee`` (REDUCE, NEWOBJ) with ``args`` makes."""
    name = str(callee) if isinstance(callee, _Global) else ""
    head = args.head if isinstance(args, _Box) else ()
    _check_rebuild(name, head)
    _check_arguments(name, args)
    if name.endswith("_rebuild_from_type_v2") and len(head) > 2:  # the rebuild it runs, with its arguments
        _check_arguments(str(head[0]), head[2])
        _check_rebuild(str(head[0]), head[2].head)
    if args.tensors and not name.startswith(_MAKES_TENSOR) and name not in _WITH_STATE:
        raise PickleBombError(f"it passes a tensor or storage to {name or 'a call'}, which would read it element by "
                              "element (torch.save writes no such call)")
    if _sized(name) and args.int_product > CONSTRUCTED_SIZE_MAX:
        raise PickleBombError(f"it calls {name} for {args.int_product:,} elements at once (torch.save writes no "
                              "such call)")
    if name == "_codecs.encode":  # torch.save writes bytes as encode(text, "latin1")
        if not (len(head) == 2 == args.items and isinstance(head[0], _Text) and head[1] in ("latin1", "latin-1")):
            raise PickleBombError("it calls _codecs.encode on something other than a text in latin1 (torch.save "
                                  "writes no such call)")
        return _text("", head[0].size, _encoded_hash(head[0]), None)  # bytes as long: passed again, copied again
    if name in _WITH_STATE:
        rebuild = head[0] if name.endswith("type_v2") and head else _Global("torch._utils._rebuild_")
        whole = 0 < args.items <= _HEAD  # head[-1]: the last argument, the state
        # a rebuild with a state of its own inside: torch sets that state too (a Parameter's is never wrapped so)
        if not (whole and str(rebuild).startswith("torch._utils._rebuild_") and str(rebuild) not in _WITH_STATE
                and (_empty(head[-1]) or _attributes(head[-1], "tensor"))):
            raise PickleBombError(f"it calls {name} with a state or a function of its own (torch.save writes "
                                  "plain tensors, or their attributes named apart from a tensor's own)")
        return _TENSOR
    if name == "builtins.bytearray":  # bytes as long as it was given or asked for: referred to again, walked again
        # torch.save writes bytearray() or bytearray(bytes); another codec may take time quadratic in the text
        # (punycode) or make 40 bytes of a character (an error handler's \N{...})
        if not (args.items == 0 or (args.items == 1 and isinstance(head[0], (int, _Text)))
                or (args.items == 2 and isinstance(head[0], _Text) and isinstance(head[1], _Text)
                    and head[1] in ("latin1", "latin-1"))):
            raise PickleBombError("it calls bytearray with other arguments than bytes, a size or a text in latin1 "
                                  "(torch.save writes bytearray(bytes))")
        return _text("", args.text_bytes + (args.int_product if args.items == 1 and not args.text_bytes else 0),
                     None, None)  # unhashable
    if name.startswith(_MAKES_TENSOR) or _sized(name):
        return _TENSOR
    if name == "builtins.complex":
        return _complex(args)
    if name.startswith(_MAKES_LEAF):
        return _LEAF
    return _container(name, args)


def _complex(args: _Box) -> object:
    """What ``complex(*args)`` makes: the number itself where its parts are numbers the scan knows (its hash, which
    a pickle may choose, is then known), else _COMPLEX."""
    if args.items == len(args.head) <= 2 and all(type(x) in (int, float) for x in args.head):
        try:
            return complex(*args.head)
        except OverflowError:  # an int too large for a float: torch's call fails alike
            pass
    return _COMPLEX


def _container(name: str, args: _Box) -> _Box:
    """The container a call of ``name`` makes (OrderedDict, Counter, set, torch.Size...): one of what it was made
    from, as large."""
    made = _Dict() if name in _DICTS else _Made(name or "a call")
    if isinstance(made, _Dict) and args.weight:  # the keys it was made with are not known
        made.attribute_of = frozenset()
    made.flat, made.int_product, made.text_bytes = args.flat, args.int_product, args.text_bytes
    made.items = made.weight = args.weight + args.text_bytes  # set("text..."): an item per character
    made.depth = args.depth  # a container of its arguments' items
    first = args.head[0] if args.head else None
    if name == "torch.Size" and args.items == 1 and isinstance(first, _Tuple):
        made.hashed = _key_hash(first)  # a tuple's subclass: hashed as the tuple of its numbers
    if isinstance(first, _Box):  # its items: its first argument's (an OrderedDict's: the first of each pair)
        of_pairs = name == "collections.OrderedDict" and not isinstance(first, _Dict)
        made.keys = first.iterated(of_pairs)  # hashed again if it is passed on
        made.pairs = first.iterated(True)
        for keys in (made.keys, made.pairs):
            if keys is not None:
                keys.freeze()
        if of_pairs and made.keys is not None:  # the first items of its keys (pairs of pairs) are not kept
            made.pairs = _Keys(made)
            made.pairs.unknown = made.pairs.count = made.keys.count
            # their costs unknown, each at most its pair's; a comparison of two costs at most their mean
            made.pairs.unknown_cost = made.pairs.cost = made.keys.cost
            made.pairs.unknown_compared = made.keys.cost * max(made.keys.count - 1, 0) // 2
        # its items come in no set order: any of them may be the key a pair of it gives
        made.first_alike = made.keys is not None and made.keys.count > 0
    return made


_CONTAINERS, _CALLS, _REFERRED, _STORAGES, _WALKS, _SHARED, _COMPARISONS, _HASHED = range(8)
"""What the budget is spent on: the containers the pickle makes, what its calls make, the texts and large integers
it refers to again, the storages its ids name, the walks of containers referred to again (_SHARED: of those that
hold containers), the comparisons of keys that may hash alike, the scan's hashing of long texts."""
_PARTS = ("containers", "calls", "texts and integers referred to again", "storages", "containers referred to again",
          "containers of containers referred to again", "comparisons of keys of one hash", "long texts hashed")
_SPENT_ON = ("the containers it makes (each list, dict, set or tuple, more for one a call makes)",
             "what its calls make (texts passed, items walked, elements asked for)",
             "the texts and large integers it refers to again, each reference counted",
             "the storages its ids name (each spelling of a key; in a legacy file, as its id says)",
             "the containers it refers to again, walked in full at each reference", "",
             ("the comparisons of its keys whose hashes can be made equal (each with those before it of its hash, "
              "or that may share it)"),
             f"its texts of {_SHORT_TEXT + 1} to {_HASHED_TEXT_MAX:,} bytes, each hashed once as it is read")


def _over_budget(spent: int, budget: int, spent_on: list[int], shared: dict[int, int]) -> str:
    """A refusal for a pickle that would make ``spent`` of its ``budget``: what took most of it, and each part's
    total (``shared``: the walks of each container of containers referred to again, by its memo index)."""
    order = sorted(range(len(_PARTS)), key=spent_on.__getitem__, reverse=True)
    if order[0] == _SHARED:
        most = (f"it refers again to a container that holds containers (memo {max(shared, key=shared.__getitem__)}), "
                "walked in full at each reference (such sharing can describe an exponentially large object), which "
                "takes most of its budget")
    else:
        most = f"most of its budget goes to {_SPENT_ON[order[0]]}"
    parts = "; ".join(f"{_PARTS[i]} {spent_on[i]:,}" for i in order if spent_on[i])
    return (f"{most}: in all it would make {spent:,} bytes or elements or more, over {budget:,} for a file of its "
            f"size ({parts})")


def check_pickle_stream(f: IO[bytes], budget: int, plain: bool = False) -> int | None:
    """Scan one pickle from ``f`` (see the module docstring) whose calls, texts referred to again and storages may
    make at most ``budget`` bytes or elements in all; ``plain``: one that calls nothing of torch's (a legacy file's
    headers: torch compares its protocol version, a tensor element by element). Returns what is left of the budget
    when it ended at its STOP opcode, None where the scan stopped early, at an opcode where torch's reader fails too
    (left to torch). Raises PickleBombError for a refused pickle."""
    collecting = gc.isenabled()
    gc.disable()  # the scan's records make no cycles: the collector's passes over them took half its time
    try:
        return _scan(f, budget, plain)
    finally:
        if collecting:
            gc.enable()


def _scan(f: IO[bytes], budget: int, plain: bool) -> int | None:
    """check_pickle_stream's scan."""
    read = f.read
    spent = 0
    spent_on = [0] * len(_PARTS)  # the budget spent on each part (_CONTAINERS ...), for a refusal to name
    shared: dict[int, int] = {}  # the walks of each container of containers referred to again, by memo index
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    storages: set[str] = set()  # the keys of the storages named so far: one storage, named again, is read once
    alike_keys = 0  # storage keys that may hash alike
    referred_texts = 0  # the bytes of the texts referred to again, each reference counted
    read_globals: set[bytes] = set()  # the globals torch's reader read, each asked once (a few microseconds)

    def charge(made: int, part: int) -> None:
        nonlocal spent
        spent += made
        spent_on[part] += made
        if spent > budget:
            raise PickleBombError(_over_budget(spent, budget, spent_on, shared))

    def to_mark() -> list[object]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def fill(box: object, items) -> None:
        if isinstance(box, _Box):
            for item in items:
                box.add(item)

    def get(idx: int) -> None:
        nonlocal referred_texts
        obj = memo[idx]
        if isinstance(obj, _Text):  # walked (formatted, copied) once per reference: past REFERRED_TEXTS_FREE
            referred_texts += obj.size
            if referred_texts > REFERRED_TEXTS_FREE:
                charge(min(obj.size, referred_texts - REFERRED_TEXTS_FREE), _REFERRED)
        elif isinstance(obj, int):
            charge(_digits(obj), _REFERRED)
        elif isinstance(obj, _Box):
            # walked again in full at each reference, the containers in it too: shared levels that double at each
            # (an exponentially large object) exhaust the budget in a few, one state_dict under two names does not
            if not obj.flat:
                shared[idx] = shared.get(idx, 0) + obj.weight + obj.text_bytes
            charge(obj.weight + obj.text_bytes, _WALKS if obj.flat else _SHARED)
            obj.referred_again = True
        stack.append(obj)

    def new_box(items) -> _Tuple:
        if not items:  # as Python makes it: the one empty tuple
            return _EMPTY_TUPLE
        charge(CONTAINER_BYTES, _CONTAINERS)
        box = _Tuple()
        for item in items:
            box.add(item)
        if len(items) > _HEAD:  # its items past the head are not kept: hashed now, or of unknown value
            box.hashed = _items_hash(items) if len(items) <= _HASHED_ITEMS else None
        return box

    start = f.tell()
    try:
        while True:
            op = read(1)
            if op == b"":
                return None
            code = op[0]
            # the opcodes most frequent in what torch.save writes first: the scan's time is this chain's
            if code in (0x71, 0x72):  # BINPUT, LONG_BINPUT
                memo[read(1)[0] if code == 0x71 else struct.unpack("<I", read(4))[0]] = stack[-1]
            elif code in (0x68, 0x6A):  # BINGET, LONG_BINGET
                get(read(1)[0] if code == 0x68 else struct.unpack("<I", read(4))[0])
            elif code == 0x4B:  # BININT1
                stack.append(read(1)[0])
            elif code == 0x80:  # PROTO
                if f.tell() != start + 1:  # torch warns at each one, a few microseconds each
                    raise PickleBombError("it gives its protocol again after its first opcode (torch.save writes it "
                                          "once, first)")
                read(1)
            elif code == 0x2E:  # STOP
                return budget - spent
            elif code == 0x28:  # MARK
                if len(marks) >= MARKS_OPEN_MAX:
                    raise PickleBombError(f"it has over {MARKS_OPEN_MAX} marks open at once (torch keeps a list for "
                                          "each; torch.save opens one per level of nesting)")
                marks.append(len(stack))
            elif code == 0x63:  # GLOBAL
                module, name = f.readline(_NAME_MAX + 1), f.readline(_NAME_MAX + 1)
                if any(len(part) > _NAME_MAX and not part.endswith(b"\n") for part in (module, name)):
                    raise PickleBombError(f"it names a global of over {_NAME_MAX} characters")
                if not (module.endswith(b"\n") and name.endswith(b"\n")):  # cut short: torch's error says so
                    return None
                if module + name not in read_globals:
                    if _torch_refuses_global(module + name):  # its refusal, naming the global, is the message
                        return None
                    read_globals.add(module + name)
                module, name = module[:-1].decode("utf-8"), name[:-1].decode("utf-8")
                if (module, name) in NAME_MAPPING:
                    module, name = NAME_MAPPING[(module, name)]
                elif module in IMPORT_MAPPING:
                    module = IMPORT_MAPPING[module]
                stack.append(_Global(f"{module}.{name}"))
            elif code == 0x51:  # BINPERSID: a storage ("storage", class, key, location, elements, ...)
                pid = stack.pop()
                head = pid.head if isinstance(pid, _Box) else ()
                if len(head) < 5 or not isinstance(head[4], int):  # torch's own error names a malformed id
                    raise PickleBombError("it names a storage without a number of elements (torch.save writes one)")
                if pid.tensors:  # torch formats its key, multiplies its offset: a view, element by element
                    raise PickleBombError("it names a storage by a tensor (torch.save names one by texts and numbers)")
                if len(head) > 5 and not _leaf(head[5]):  # torch keeps each view in a dict by its own key
                    raise PickleBombError("it names a view of a storage (torch.save's legacy writer writes None there)")
                if _may_hash_alike(head[2]):  # torch keeps each storage in a dict by its key
                    alike_keys += 1
                    if alike_keys > HASHED_ALIKE_MAX:
                        raise PickleBombError(f"it names storages by over {HASHED_ALIKE_MAX} keys whose hashes can be "
                                              "made equal (torch.save keys them by short texts)")
                key = str(head[2]) if isinstance(head[2], _Text) and head[2] else None  # a long text is kept empty
                # a legacy file allocates it as its id says; torch's zip reader finds a record whatever the case of
                # its key, so each spelling reads it again
                if key is None or key not in storages:
                    charge(abs(head[4]) * _ELEMENT_BYTES.get(str(head[1]), max(_ELEMENT_BYTES.values())), _STORAGES)
                storages.add(key)
                stack.append(_TENSOR)
            elif code == 0x4E:  # NONE
                stack.append(_NONE)
            elif code in (0x88, 0x89):  # NEWTRUE, NEWFALSE
                stack.append(_TRUE if code == 0x88 else _FALSE)
            elif code == 0x4A:  # BININT
                stack.append(struct.unpack("<i", read(4))[0])
            elif code == 0x4D:  # BININT2
                stack.append(struct.unpack("<H", read(2))[0])
            elif code == 0x8A:  # LONG1
                stack.append(int.from_bytes(read(read(1)[0]), "little", signed=True))
            elif code == 0x47:  # BINFLOAT
                value = struct.unpack(">d", read(8))[0]  # as torch reads it: a key's hash needs it
                # a NaN hashes by its object's address (Python 3.10+): the loader's, not the scan's; of unknown value
                stack.append(value if value == value else _LEAF)
            elif code in (0x58, 0x55):  # BINUNICODE, SHORT_BINSTRING
                n = struct.unpack("<I", read(4))[0] if code == 0x58 else read(1)[0]
                # as torch decodes it: lone surrogates kept (two storage keys differing in one are two storages)
                if n <= _SHORT_TEXT:
                    stack.append(_text(read(n).decode("utf-8", "surrogatepass"), n))
                elif n <= _HASHED_TEXT_MAX:  # decoded here: where torch fails to decode it, so does the scan
                    raw = read(n)
                    stack.append(_long_text(raw, raw.decode("utf-8", "surrogatepass")))
                    charge(n // _COMPARED_BYTES, _HASHED)
                else:
                    stack.append(_text(_skip(f, n), n, hashed=None, encoded=None))
            elif code == 0x29:  # EMPTY_TUPLE
                stack.append(_EMPTY_TUPLE)
            elif code in (0x5D, 0x7D, 0x8F):  # EMPTY_LIST, EMPTY_DICT, EMPTY_SET
                charge(CONTAINER_BYTES, _CONTAINERS)
                stack.append(_Dict() if code == 0x7D else _Box())
            elif code == 0x74:  # TUPLE
                stack.append(new_box(to_mark()))
            elif code in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                n = code - 0x84
                items = stack[-n:]
                del stack[-n:]
                if len(items) < n:
                    return None
                stack.append(new_box(items))
            elif code == 0x61:  # APPEND
                item = stack.pop()
                fill(stack[-1], (item,))
            elif code == 0x65:  # APPENDS
                items = to_mark()
                fill(stack[-1], items)
            elif code in (0x73, 0x75):  # SETITEM, SETITEMS
                items = [stack.pop(-2), stack.pop()] if code == 0x73 else to_mark()
                fill(stack[-1], items)
                if isinstance(stack[-1], _Box):
                    charge(stack[-1].hash_keys(items[::2]), _COMPARISONS)
            elif code == 0x62:  # BUILD: the state goes into the object
                state = stack.pop()
                if not isinstance(stack[-1], _Dict) and stack[-1] is not _TENSOR:
                    # torch builds any object of a class it allows, and takes an empty state as nothing to do
                    raise PickleBombError(f"it sets a state on {_named(stack[-1])} (torch.save sets one on an "
                                          "OrderedDict alone: its attributes)")
                if not (isinstance(stack[-1], _Box) and _attributes(state, "dict")):
                    raise PickleBombError("it sets a state other than attributes of an OrderedDict or Counter named "
                                          "apart from its own (torch.save writes an OrderedDict's attributes alone, "
                                          "and plain tensors without)")
                fill(stack[-1], (state,))
            elif code in (0x52, 0x81):  # REDUCE, NEWOBJ
                args = stack.pop()
                if stack[-1] is _TENSOR:  # torch's refusal formats it, element by element
                    raise PickleBombError("it calls a tensor (torch.save writes no such call)")
                if plain and str(stack[-1]).startswith("torch."):  # others: torch's refusal names the global
                    raise PickleBombError(f"its header calls {stack[-1]} (torch.save writes plain numbers there)")
                charge(_cost(stack[-1], args), _CALLS)
                hashes = isinstance(stack[-1], _Global) and stack[-1] in _HASHES
                stack[-1] = _made(stack[-1], args)
                if isinstance(stack[-1], _Box):
                    charge(MADE_CONTAINER_BYTES, _CONTAINERS)
                    if hashes and stack[-1].keys is not None:  # the keys it hashed, each time, as a dict given them
                        stack[-1].keys.check()
                        charge(stack[-1].keys.comparisons(), _COMPARISONS)
            elif _torch_refuses(code):  # its refusal is the message
                return None
            else:
                raise PickleBombError(f"it holds opcode {code:#04x}, which this torch reads and the check does not "
                                      "(torch.save writes none)")
    except (IndexError, KeyError, struct.error, UnicodeDecodeError) as err:
        if _torch_fails_alike(err):
            return None  # malformed: torch stops at this opcode, with its own error
        raise PickleBombError(f"the check cannot follow it ({type(err).__name__} at byte {f.tell() - start}; "
                              "torch.save writes nothing it cannot follow)") from None


@functools.cache
def _torch_refuses(code: int) -> bool:
    """Whether the installed torch's weights-only reader refuses opcode ``code`` as it reads it (a later torch may
    read one the scan does not, and read on where the scan stopped)."""
    try:
        _weights_only_unpickler.Unpickler(io.BytesIO(bytes([code]))).load()
    except Exception as err:  # noqa: BLE001 - any other error: it read the opcode, then found nothing to go on with
        return str(err).startswith("Unsupported operand")  # an UnpicklingError, a RuntimeError in older torch
    return False


def _torch_refuses_global(lines: bytes) -> bool:
    """Whether the installed torch's weights-only reader fails at a GLOBAL opcode of ``lines`` (its module and name,
    each ending in a newline) as it reads it: a global off its allowlist and the safe globals the user added (as
    torch renames it), or of a module it blocks. Asked of the reader itself as the file is checked: it answers with
    the safe globals torch.load will read with, and for whatever the installed torch allows."""
    try:
        _weights_only_unpickler.Unpickler(io.BytesIO(b"c" + lines + b".")).load()
    except Exception:  # noqa: BLE001 - any error: it stopped at the GLOBAL, the one opcode before STOP
        return True
    return False


def _torch_fails_alike(err: BaseException) -> bool:
    """Whether ``err`` came from the scan's own reading of the pickle's bytes, stack, marks and memo, which torch's
    reader reads alike (failing at the same opcode), not from its model of what a call or container makes, where
    torch may read on."""
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code in _SCAN_CODE


_SCAN_CODE = frozenset([_scan.__code__, *(c for c in _scan.__code__.co_consts if isinstance(c, types.CodeType))])
"""The code of _scan and of the functions inside it (its reads of the stack, marks and memo)."""


def _named(obj: object) -> str:
    """What the scan knows of ``obj``, for a refusal."""
    if isinstance(obj, _Global):
        return f"{obj} itself"
    if isinstance(obj, _Made):
        return f"what {obj.by} made"
    if isinstance(obj, _Box):
        return "a tuple" if isinstance(obj, _Tuple) else "a list or set"
    if isinstance(obj, _Text):
        return "a text or bytes"
    if isinstance(obj, int):
        return "an integer"
    if obj is _TENSOR:
        return "a tensor or storage"
    if obj is _COMPLEX or type(obj) is complex:
        return "a complex number"
    return "None, a bool, a float, a device or a layout"


REFERRED_TEXTS_FREE = 2**26
"""The bytes of texts referred to again (each reference counted) a pickle may have before they are charged against
its budget: one long text torch.save wrote in many places (its memo refers to it again: a 4.9 KB text in 5,000
places, 24 MB) reads, 100 KB in 5,000 (500 MB to format) does not. What this allows is the same for every file."""


def _skip(f: IO[bytes], n: int) -> str:
    f.seek(n, os.SEEK_CUR)
    return ""


MADE_BYTES_PER_FILE_BYTE = 4
"""What a pickle's calls may make in all (texts passed, elements asked for), in times the file's size (and 1 MiB)."""
LEGACY_PICKLES = 5
"""A torch file from before torch 1.6: magic number, protocol, system info, the object, its storage keys."""
LEGACY_HEADERS = 3
"""Its first pickles, plain numbers and a dict of them, which torch compares and reads as they are."""


def check_torch_file(path: str | os.PathLike) -> None:
    """Scan the pickles of the torch file at ``path``: a zip archive's data.pkl as torch's own zip reader gives
    it, else the pickles a legacy file starts with. Raises PickleBombError naming what it refused; a file that
    cannot be read so, or whose pickle torch's reader fails on where the scan stopped, or a TorchScript archive
    torch refuses unread, is left to torch, whose error names the fault."""
    try:
        f = open(path, "rb")
        budget = MADE_BYTES_PER_FILE_BYTE * os.path.getsize(path) + 2**20
    except OSError:  # torch.load's own error says why
        return
    with f:
        if f.read(4) != b"PK\x03\x04":  # as torch tells a zip archive from a legacy file
            f.seek(0)
            _check_not_tar(f)
            for i in range(LEGACY_PICKLES):  # one budget for the five
                budget = check_pickle_stream(f, budget, plain=i < LEGACY_HEADERS)
                if budget is None:
                    return
            return
    _check_archive(path)
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        # a TorchScript archive, as torch.load tells one: its data.pkl builds the script's objects
        record = None if "constants.pkl" in reader.get_all_records() else reader.get_record("data.pkl")
    except Exception:  # noqa: BLE001 - unreadable as a torch archive: torch.load's own error says why
        return
    if record is None:  # a TorchScript archive: torch refuses one unread (from 2.6 on, which pyproject requires)
        return
    check_pickle_stream(io.BytesIO(record), budget)


def _check_not_tar(f: IO[bytes]) -> None:
    """Refuse a file whose first block is a tar header: torch.load opens a file that is not a zip archive as a tar
    archive first (its oldest format, which it refuses with weights_only only after), and Python's tarfile reads the
    first member's headers whole (pax records of a 100 KB file: 2.7 GB, or 15-26 s)."""
    block = f.read(tarfile.BLOCKSIZE)
    f.seek(0)
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except Exception:  # noqa: BLE001 - no tar header: tarfile.open fails at once, and torch reads the pickles
        return
    raise PickleBombError("it is a tar archive (torch's oldest format, which torch does not read with weights_only; "
                          "torch.save writes a zip archive)")


def _check_archive(path: str | os.PathLike) -> None:
    """Refuse a zip archive that torch's zip reader and Python's zipfile could read as two directories, or whose
    records are compressed or take more bytes than the file holds: torch.save stores every record once, as it is,
    and torch's reader inflates a record whole before checking its size (a 1 GiB storage from a 1 MB file). A
    TorchScript archive's code may be compressed: torch refuses that archive unread."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as archive:
            found = _directory_as_torch_finds_it(f, size)
            read = (archive.start_dir, len(archive.infolist()))
            records = archive.infolist()
    except (zipfile.BadZipFile, ValueError, NotImplementedError, struct.error) as e:
        try:
            torch._C.PyTorchFileReader(str(path))  # reads the directory (and the version record)
        except Exception:  # noqa: BLE001 - torch cannot read it either: its own error says what is wrong
            return
        raise PickleBombError(f"torch reads a zip directory that Python's zipfile refuses ({e}); torch.save "
                              "writes a plain one") from None
    except OSError:  # torch.load's own error says why
        return
    if found != read:
        raise PickleBombError("its zip directory is not where torch's reader and Python's zipfile both find it "
                              "(torch.save writes one directory, at the end)")
    total = 0
    for info in records:
        # torch's reader reads nothing of a folder (a name ending in / or the MS-DOS folder flag): a storage read
        # from one holds whatever memory the reader was given
        if info.filename.endswith("/") or info.external_attr & 0x10:
            raise PickleBombError(f"it holds a folder entry, {info.filename} (torch.save writes records alone)")
        if _zip64_fields(info.extra) > 1:
            raise PickleBombError(f"its record {info.filename} has several zip64 size fields, which torch's reader "
                                  "and Python's zipfile read differently (torch.save writes at most one)")
        if _torchscript_code(info.filename):
            continue
        if info.compress_type != zipfile.ZIP_STORED:
            raise PickleBombError(f"its record {info.filename} is compressed (torch.save stores every record as it is)")
        total += max(info.file_size, info.compress_size)
        if info.header_offset + max(info.file_size, info.compress_size) > size or total > size:
            raise PickleBombError(f"its records take {total:,} bytes or more, more than the file's {size:,} (torch.save "
                                  "stores every record once, as it is)")


def _zip64_fields(extra: bytes) -> int:
    """How many zip64 fields (id 1) a central directory entry's extra data holds: torch's reader takes the first,
    Python's zipfile applies each in turn (4 GiB read from a 403-byte file)."""
    count, at = 0, 0
    while at + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, at)
        count += kind == 1
        at += 4 + size
    return count


def _torchscript_code(name: str) -> bool:
    """Whether a record is a TorchScript archive's code: ``<archive>/code/...``, whatever its case (a storage's
    record is ``<archive>/data/<key>``, its key any text)."""
    parts = name.split("/")
    return len(parts) > 2 and parts[1].lower() == "code"


def _directory_as_torch_finds_it(f: IO[bytes], size: int) -> tuple[int, int] | None:
    """(where the central directory starts, how many records it lists) as torch's zip reader finds them: from the
    last end record with its 22 bytes in the file and, where a zip64 locator precedes it, from the zip64 end record
    at the offset the locator gives. None where that record is not right before the locator, where Python's
    zipfile reads it whatever the locator says."""
    tail_size = min(size, 2**16 + 22)
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    at = tail.rfind(b"PK\x05\x06", 0, len(tail) - 18)
    if at < 0:
        return None
    entries, _, start = struct.unpack_from("<HII", tail, at + 10)
    end = size - tail_size + at
    if end >= 20 + 56:
        f.seek(end - 20)
        locator = f.read(20)
        if locator[:4] == b"PK\x06\x07":
            zip64_end = struct.unpack_from("<Q", locator, 8)[0]
            f.seek(end - 20 - 56)
            record = f.read(56)
            if zip64_end != end - 20 - 56 or record[:4] != b"PK\x06\x06":
                return None
            entries, _, start = struct.unpack_from("<QQQ", record, 32)
    return start, entries
