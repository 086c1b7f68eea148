"""A --config file: read (JSON or YAML), and each value checked as the command line checks it, a refusal
naming the file's entry. The parser (cli/common.py) reads its files through here."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from simple_parsing.utils import FALSE_STRINGS, TRUE_STRINGS

from saelab.errors import ConfigError
from saelab.train.config import unused_settings
from saelab.utils.words import ESCAPED, did_you_mean


RECORD_READERS = ("saelab train", "saelab sweep")
"""The verbs that read a run's train_config.json as --config: they train on the --activations given."""


def run_record_as_settings(entries: dict[str, Any], train_settings: type | None, prog: str,
                            path: Path) -> dict[str, Any]:
    """A run's ``train_config.json`` (its ``train`` settings beside the SAE's shape and its data) read as a
    --config file of `saelab train` or `saelab sweep`: the entries that give its training settings again
    (``TrainConfig.entries_giving``), less those that act on nothing under its own settings (a k_aux with
    AuxK off: a sweep's grid may have turned AuxK off); its SAE shape and data are the record's, not
    options. Any other file as it is."""
    sae = entries.get("sae")
    if not (isinstance(entries.get("train"), dict) and isinstance(sae, dict) and "d_in" in sae):
        return entries
    if prog not in RECORD_READERS or not hasattr(train_settings, "entries_giving"):
        raise ConfigError(f"--config {path}: a run's record of its settings; `saelab train` and `saelab sweep` "
                          f"read it, training on the --activations given, while `{prog}` would leave its model, "
                          "hook and data aside; expected option groups such as {\"train\": {\"k\": 64}}")
    giving = train_settings.entries_giving(entries["train"])
    unused = unused_settings(entries["train"])  # none for an unknown recipe or setting: refused as the file's entry
    return {"train": {field: value for field, value in giving.items() if field not in unused}}


EMPTY_VALUE_READ_BY_ITS_OPTION = ("prompt", "positions", "model")
"""Options that read an empty value themselves: steer's --prompt "" (BOS alone); --positions and --model refuse it
in their own words."""


def refuse_an_empty_text(where: str, name: str, value: Any) -> None:
    """A file's "" (or one in a list) for an option that reads no empty value: an unset variable the file was
    made from, which would read as the option left out (the default corpus, the current folder)."""
    empty = value == "" or (isinstance(value, list) and "" in value)
    if empty and name.rsplit(".", 1)[-1] not in EMPTY_VALUE_READ_BY_ITS_OPTION:
        raise ConfigError(f"{where}: expected a value, got an empty one '' (an unset variable?)")


def option_file_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A --config file's value of a plain option (not a group's), checked as the command line checks it,
    a refusal naming the file's entry ``where``: argparse checks neither the choices nor the type of a
    default, so a misspelled choice ran silently (suite: papers) and a number crashed where text was read."""
    if action.nargs == 0:  # a switch: "overwrite: maybe" or 1 would be true
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {shown_value(value)}")
        return value
    refuse_an_empty_text(where, action.dest, value)
    if action.type is not None and action.nargs is None:
        return _as_typed(action, value, where)
    if hasattr(action, "check_file_value"):  # an option with words of its own for a malformed value (--grid)
        action.check_file_value(value, where)
        return value
    item = _item_type(action)
    if item is None:  # an item type of its own: left to the command, as before
        return value
    listed = action.nargs in ("*", "+")
    if listed and value is not None and not isinstance(value, list):
        return [_lone_item(where, item, value)]  # one value, as `--log-to wandb` gives it
    if isinstance(action.nargs, int) and value is not None and not (isinstance(value, list)
                                                                    and len(value) == action.nargs):
        named = f" ({' '.join(action.metavar)})" if isinstance(action.metavar, tuple) else ""  # --export FORMAT OUT
        raise ConfigError(f"{where}: expected {action.nargs} values{named}, got {shown_value(value)}")
    hint = item if action.nargs in (None, "?") else tuple[item, ...]
    # null leaves the option unset: taken where the option as built may be left so
    hint = typing.Optional[hint] if action.may_be_unset else hint
    return checked_value(where, hint, value, repeats_refused=listed)  # FORMAT OUT may repeat, as typed


def _lone_item(where: str, item: Any, value: Any) -> Any:
    """A list option's lone file value, checked as an item of its list: text that reads as a number
    (`series_steps: '1000'`) is refused as it is inside a list, as nothing after the parse converts it (it
    reached the eval as text); the refusal shows the value as the file wrote it."""
    value = checked_value(where, item, value)
    if not _fits_in_list(item, value):
        raise ConfigError(f"{where}: expected {type_words(tuple[item, ...])}, got {shown_value(value)}")
    return value


def _item_type(action: argparse.Action) -> Any:
    """The type of each value of an option without a type of its own (``Literal`` for its choices, else
    text), or of the items of a list option typed int (--series-steps), as a settings field's hint for the
    checks of a group's fields; None for an option whose type reads its own items."""
    if action.choices is not None:
        return typing.Literal[tuple(action.choices)]
    return action.type or str if action.type in (None, int, float) else None


def _as_typed(action: argparse.Action, value: Any, where: str) -> Any:
    """A file's value of a one-value option as the command line would give it ("latent: 0" as "0", "[0, 1]"
    as "0,1", 1e6 as "1000000"), read here with the option's own type and checks, a refusal naming the
    file's entry ``where``: argparse reads only text defaults, so a number or list went to the command as
    it was ("latent: 0" crashed it as no list), and its refusal of text named an option never typed. Null
    leaves the option unset where it may be (--model), not the text "None"."""
    if value is None and action.may_be_unset:
        return None
    long_form = max(action.option_strings, key=len)  # --n-contexts, not -n: a file's entry is named long
    wanted = type_words(action.type) if action.type in (int, float) else f"a value {long_form} takes"
    if value is None or value == []:  # neither is a value typed: str() gave 'None', [] would be joined to ""
        raise ConfigError(f"{where}: expected {wanted}, got {shown_value(value)}")
    try:
        text = _typed_text(value)
        action.type(text)
    except argparse.ArgumentTypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {wanted}, got {shown_value(value)}") from None
    return text


def _typed_text(value: Any) -> str:
    """A file's value as the command line would type it: 3 as "3", [3.0, 7] as "3,7" (a whole float, JSON's
    1e6 or YAML's 4096.0, as its integer); ValueError for what cannot be typed (true is no number or list,
    "--latent True" is not typed)."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, (bool, dict, list)) for v in items):
        raise ValueError
    return value if isinstance(value, str) else ",".join(str(_whole(v)) for v in items)


def file_key(action: argparse.Action) -> str:
    """An option's key in a config file, with the value a switch named otherwise takes: "progress (false:
    --no-progress)", as the key alone reads like an option --progress that does not exist."""
    if f"--{action.dest.replace('_', '-')}" in action.option_strings or action.nargs != 0:
        return action.dest
    return f"{action.dest} ({str(bool(action.const)).lower()}: {action.option_strings[0]})"


CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


class _ConfigLoader(yaml.SafeLoader):
    """YAML as safe_load reads it, but for digits joined by colons: YAML 1.1 reads ``positions: 2:10`` as
    the base-60 integer 130, which --positions would then take as position 130; kept as text, as YAML 1.2
    reads it."""


_BASE_60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-9_]*)+(?:\.[0-9_]*)?$")  # 2:10, 1:5:2, 1:30.5
_ConfigLoader.yaml_implicit_resolvers = {  # the first resolver that matches a plain value tags it
    first: ([("tag:yaml.org,2002:str", _BASE_60)] if first in "+-0123456789" else []) + resolvers
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def read_config_file(path: Path) -> dict[str, Any]:
    """A --config file (JSON, or YAML by its suffix) as a mapping; ConfigError for anything else."""
    if path.is_dir():
        raise ConfigError(f"--config {path}: is a folder; expected a .json, .yaml or .yml file")
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise ConfigError(f"--config {path}: expected a .json, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_ConfigLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})") from None
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option groups such as {{\"train\": {{\"k\": 64}}}}, "
                          f"got a {type(data).__name__}")
    return data


def check_config_section(where: str, cls: type, value: Any, group: str = "") -> dict[str, Any]:
    """A config file's section for the dataclass ``cls``: known field names (dashes allowed), choices for
    the fields that have them, and every value of the type its field takes (the parse that follows would
    name a bad one by its option, "argument -k/--k", which the user never typed, or not at all). ``group``: the
    section's name, which a key spelled as quickstart's option (harvest_dtype) may carry."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping of its options, got {shown_value(value)}")
    hints = typing.get_type_hints(cls)
    # Fields the caller fills at run time (cmd=False: the hook, exclude_first) have no option to set.
    names = [f.name for f in dataclasses.fields(cls) if f.metadata.get("cmd", True)]
    section = {}
    for key, v in value.items():
        name = str(key).replace("-", "_")
        if name not in names:  # a close match alone, as on the command line; else every option
            switches = [n for n in names if hints[n] is bool]
            raise ConfigError(f"{where}.{str(key).translate(ESCAPED)}: not one of its options"
                              f"{closest_key(key, names, switches, v, (group,)) or ' (' + ', '.join(names) + ')'}")
        refuse_an_empty_text(f"{where}.{key}", name, v)
        v = checked_value(f"{where}.{key}", hints[name], v)
        if dataclasses.is_dataclass(hints[name]):  # a group inside a group: the paper suite's probe settings
            v = check_config_section(f"{where}.{key}", hints[name], v, name)
        section[name] = v
    return section


def checked_value(where: str, hint: Any, value: Any, repeats_refused: bool = True) -> Any:
    """A config file's ``value`` for a setting of type ``hint``, refused as the file's entry ``where``
    unless the command line would take it: one of its choices, of its type, a list without repeats (where
    ``repeats_refused``: not a fixed number of values, --export FORMAT OUT); a whole number written as a
    float (JSON's 1e6, YAML's 4096.0) is the integer, alone or in a list."""
    choices = literal_choices(hint)
    if choices and value not in choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, choices))}, got {shown_value(value)}")
    value = _whole_numbers_as_integers(hint, value)
    wrong_type = _type_expected(hint, value)
    if wrong_type:
        # a number, a switch's word or a date where text is read: YAML and JSON read it so unless quoted
        fix = "; quote it to give it as text" if wrong_type == "text" and _is_scalar(value) else ""
        raise ConfigError(f"{where}: expected {wrong_type}, got {shown_value(value)}{fix}")
    repeat = first_repeat(value) if isinstance(value, list) and repeats_refused else None
    if repeat is not None:  # as on the command line (Parser._get_values)
        raise ConfigError(f"{where}: {shown_value(repeat)} given twice; give each value once")
    return value


def _whole_numbers_as_integers(hint: Any, value: Any) -> Any:
    """``value`` with each whole number written as a float (1e3, 1000.0) the integer, where ``hint`` reads
    an integer or a list of integers; any other value as it is."""
    kind = _kind(hint)
    item = typing.get_args(kind)[0] if typing.get_origin(kind) in (tuple, list) else None
    if kind is int:
        return _whole(value)
    return [_whole(v) for v in value] if item is int and isinstance(value, list) else value


def _whole(value: Any) -> Any:
    # Past 2**53 a float is not the integer written (JSON's 1e23 would become 99999999999999991611392).
    whole = isinstance(value, float) and value.is_integer() and abs(value) <= 2**53
    return int(value) if whole else value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, datetime.date))  # bool is an int


def shown_value(value: Any) -> str:
    """A config file's value in a refusal, as the file wrote it where its repr would not: null, true and
    false, not Python's None, True and False (None read as a value); a YAML date as written."""
    if isinstance(value, datetime.date):  # YAML's 2024-01-01, not datetime.date(2024, 1, 1)
        return f"{value.isoformat()} (a date)"
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, list):
        return f"[{', '.join(map(shown_value, value))}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{shown_value(k)}: {shown_value(v)}' for k, v in value.items())}}}"
    return repr(value)


def closest_key(key: Any, names: list[str], switches: typing.Collection[str] = (), value: Any = None,
                drop: typing.Collection[str] = ()) -> str:
    """"; did you mean n_latents?" for a misspelled config file key, spelled as the key is (n-latents for a
    key with dashes), else "". A switch's --no- form as a key (no_auxk, of ``switches``) with ``value`` true
    or false: "; did you mean auxk: false?" (or true), as "did you mean auxk?" could turn on what the key
    meant to turn off. ``drop``: group prefixes the key may carry (:func:`did_you_mean`)."""
    dashed = "-" in str(key)
    name = str(key).replace("-", "_")
    if name.startswith("no_") and name[3:] in switches:
        switch = name[3:].replace("_", "-") if dashed else name[3:]
        return f"; did you mean {switch}{f': {str(not value).lower()}' if isinstance(value, bool) else ''}?"
    return did_you_mean(str(key), [n.replace("_", "-") if dashed else n for n in names], drop=drop)


def _type_expected(hint: Any, value: Any) -> str | None:
    """What a field of type ``hint`` takes ("an integer", "true or false", "a list of integers") when
    ``value`` does not fit it (None fits an Optional field), else None. Text is read as the command line
    reads it: YAML takes 1e-3 for text, and "--auxk yes" is a switch's value."""
    kind = _kind(hint)
    if kind is None:  # a union of several types: the parse reads it
        return None
    if value is None:
        return None if type(None) in _members(hint) else type_words(kind)
    return None if _fits(kind, value) else type_words(kind)


def _members(hint: Any) -> set[Any]:
    return set(typing.get_args(hint)) if typing.get_origin(hint) in (typing.Union, types.UnionType) else {hint}


def _kind(hint: Any) -> Any:
    """The one type ``hint`` takes, less None (int for Optional[int]); None for a union of several types."""
    kinds = _members(hint) - {type(None)}
    return kinds.pop() if len(kinds) == 1 else None


_SWITCH_WORDS = (*TRUE_STRINGS, *FALSE_STRINGS)  # the words simple_parsing reads as a switch's value


def _fits(kind: Any, value: Any) -> bool:
    """Whether a config file's ``value`` (not None) is one the command line would read for type ``kind``."""
    if typing.get_origin(kind) in (tuple, list):
        return isinstance(value, list) and all(_fits_in_list(typing.get_args(kind)[0], v) for v in value)
    if typing.get_origin(kind) is typing.Literal:
        return value in typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        return isinstance(value, dict)
    if isinstance(value, str):
        return _reads_as(kind, value)
    if kind is bool:
        return value in (0, 1) and not isinstance(value, float)  # true, false, or 1 and 0 as "--auxk 1" reads
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    return kind is not str  # a number or a list is not text; other types are left to the parse


def _fits_in_list(item: Any, value: Any) -> bool:
    # A list's items are not read from text as a lone value is: "4" in [3, "4"] would reach n2g as text.
    text_taken = item is str or typing.get_origin(item) is typing.Literal
    return _fits(item, value) and (text_taken or not isinstance(value, str))


def _reads_as(kind: Any, text: str) -> bool:
    """Whether ``text`` reads as ``kind`` the way the command line reads it (a number, a switch's value)."""
    if kind is bool:
        return text.strip().lower() in _SWITCH_WORDS
    if kind in (int, float):
        try:
            kind(text)
        except ValueError:
            return False
    return True


def type_words(kind: Any) -> str:
    """The words for what type ``kind`` takes: "an integer", "a list of zero or mean"."""
    if typing.get_origin(kind) in (tuple, list):
        item = typing.get_args(kind)[0]
        if typing.get_origin(item) is typing.Literal:
            return f"a list of {' or '.join(map(str, typing.get_args(item)))}"
        return {int: "a list of integers", float: "a list of numbers"}.get(item, "a list of text values")
    if typing.get_origin(kind) is typing.Literal:
        return f"one of {', '.join(map(str, typing.get_args(kind)))}"
    if dataclasses.is_dataclass(kind):
        return "a mapping of its options"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(kind, f"a {kind}")


def first_repeat(values: typing.Iterable[Any]) -> Any | None:
    """The first value of a list option given more than once, or None."""
    seen = []
    for value in values:
        if value in seen:
            return value
        seen.append(value)
    return None


def literal_choices(hint: Any) -> tuple:
    """The allowed values of a Literal[...] (or Optional[Literal[...]]) type hint; () for other types."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    literals = [c for m in members if typing.get_origin(m) is typing.Literal for c in typing.get_args(m)]
    return (*literals, None) if literals and type(None) in members else tuple(literals)
