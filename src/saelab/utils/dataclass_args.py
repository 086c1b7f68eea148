"""Turn config dataclasses into argparse options; each field's docstring becomes its --help text."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The string literal that follows each annotated field in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def scalar_type(tp: Any) -> tuple[type, bool]:
    """(scalar type, optional?) for int, float, str, bool and their `X | None` forms."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # annotations are strings under `from __future__ import annotations`
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    if origin is tuple:
        return tuple, False
    return tp, False


def _parse_optional(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, prefix: str = "",
                       skip: tuple[str, ...] = (), title: str | None = None) -> None:
    group = parser.add_argument_group(title or cls.__name__)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, optional = scalar_type(f.type)
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{docs.get(f.name, '')} (default: {default})"
        dest = prefix + f.name
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif kind is tuple:
            group.add_argument(flag, dest=dest, nargs="*", default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=_parse_optional(kind) if optional else kind,
                               default=argparse.SUPPRESS,
                               metavar=kind.__name__.upper(), help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace, *, prefix: str = "", **overrides: Any):
    """Build ``cls`` from the options that were given (others keep the dataclass defaults)."""
    values = {}
    for f in dataclasses.fields(cls):
        if prefix + f.name in vars(args):  # given on the command line (absent otherwise)
            value = getattr(args, prefix + f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    values.update(overrides)
    return cls(**values)
