"""What every verb shares: the parser class, common options, config groups and error reporting."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import re
import sys
import textwrap
import typing
from pathlib import Path
from typing import Any

from simple_parsing import ArgumentParser, DashVariant
from simple_parsing.helpers.custom_actions import BooleanOptionalAction

from saelab.cli.config_file import (CONFIG_SUFFIXES, EMPTY_VALUE_READ_BY_ITS_OPTION, check_config_section, closest_key,
                                    file_key, first_repeat, option_file_value, read_config_file,
                                    run_record_as_settings)
from saelab.errors import ConfigError, CorpusError
from saelab.models.config import MODEL_SPECS
from saelab.sae.config import SAE_SOURCES
from saelab.utils.config import given_parts
from saelab.utils.words import ESCAPED, did_you_mean

DTYPES = ("float32", "bfloat16", "float16")

VERB_SUMMARIES = {
    "quickstart": "harvest, train, evaluate and report on the offline default model",
    "harvest": "harvest activations at a hook into an on-disk cache",
    "train": "train a top-k SAE on an activation cache",
    "sweep": "train a grid of SAEs from one pass over an activation cache",
    "eval": "evaluate an SAE, or every run of a sweep folder",
    "report": "(re)write report.md, training_curves.png and density.png of a run folder; for a sweep folder the "
              "scaling study (scaling.md, scaling.json, scaling_nmse.png, scaling_delta_loss.png)",
    "steer": "generate with and without adding / clamping / ablating an SAE latent",
    "top": "the top-activating contexts of one or more latents on held-out text",
    "browse": "build an offline feature browser for SAEs (--serve serves it on 127.0.0.1)",
    "families": "feature families of SAEs of several sizes on one hook, as JSON",
    "export": "write an SAE as a SAELens or sparsify folder, for other tools to load",
}
"""Each verb's one line, in `saelab --help`'s order: that list shows it, and the verb's --help opens with it unless
the verb describes itself at more length."""


def add_verb(sub, verb: str, description: str | None = None, **kwargs: Any) -> ArgumentParser:
    """The parser of ``verb``, its summary from :data:`VERB_SUMMARIES`."""
    summary = VERB_SUMMARIES[verb]
    return sub.add_parser(verb, help=summary, description=description or f"{summary[0].upper()}{summary[1:]}.",
                          **kwargs)
UNSET_NOTE = "\n\"unset\" above: what a setting means when its option is left out.\n"


def _naming_its_group(construct: typing.Callable, group: str) -> typing.Callable:
    """``construct`` (how the parse builds a settings group) with its refusals carrying ``group``
    ("harvest"): groups share field names (harvest's and eval's lm_batch_size), so the message's bare
    name does not tell whose value was refused. The innermost group builder's name stays."""
    if getattr(construct, "names_group", False):
        return construct

    def constructing(*args: Any, **kwargs: Any) -> Any:
        try:
            return construct(*args, **kwargs)
        except ConfigError as e:
            if getattr(e, "group", None) is None:
                e.group = group
            raise

    constructing.names_group = True
    return constructing


class Parser(ArgumentParser):
    """argparse that also reads config dataclasses (field docstrings become --help, ``Literal`` types
    become choices), with dashed option names and ``--config FILE`` (JSON or YAML option defaults keyed
    by group, e.g. ``{"train": {"k": 64}}``; options on the command line win)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("add_option_string_dash_variants", DashVariant.DASH)
        kwargs.setdefault("add_config_path_arg", "config")
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)  # --rec would set a recipe's name without its settings
        super().__init__(*args, **kwargs)
        self.sections_of_other_verbs: frozenset[str] = frozenset()
        """Sections of a config file shared between verbs that this verb skips (set by build_parser)."""
        self.hidden_fields: frozenset[str] = frozenset()
        """Fields of a shared settings group that this verb refuses: left out of its --help."""
        self.group_text: dict[str, tuple[str, str]] = {}
        """Title and description of a settings group, by its config key, where this verb uses a group
        written for another verb (families reads browse's settings)."""
        self.check_words: typing.Callable[[Parser, list[str]], None] | None = None
        """Called with the verb's words before they are parsed, to refuse a form argparse would misread
        (``saelab top 5 RUN``, the latent first as in earlier versions, would read 5 as the SAE)."""
        self.config_entries: dict[str, str] = {}
        """Each setting a --config file of this parse set ("train.k"), with its entry as the user wrote
        it ("--config c.yaml: train.k")."""
        self.reads_as: frozenset[str] = frozenset()
        """Other verbs' option groups whose settings this verb's options are, unprefixed: top reads held-out text
        as eval does, so quickstart's --eval-corpus is top's --corpus (harvest's --corpus is another text)."""
        self.verbs: dict[str, Parser] = {}
        """Every verb's parser by its name, this one's included (set by build_parser): an unknown option that
        another verb takes is answered as such."""

    def set_defaults(self, config_path: str | Path | None = None, **kwargs: Any) -> None:
        """simple_parsing reads each --config file through here: the file is checked first, so that a
        mistake in it is one line naming the file and the entry, not a traceback or a silent no-op."""
        if config_path is not None:
            kwargs = {**self._config_sections(Path(config_path)), **kwargs}
        super().set_defaults(**kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv_seen = list(sys.argv[1:] if args is None else args)  # for error()
        self.config_entries = {}
        self.config_nulls: dict[str, set[str]] = {}  # group: its fields a --config file set to null
        if self.check_words is not None and not {"-h", "--help"} & set(self._argv_seen):
            self.check_words(self, self._argv_seen)
        if self.add_config_path_arg:
            self._refuse_a_repeated_config()
        for wrapper in self._wrappers:
            wrapper.dataclass_fn = _naming_its_group(wrapper.dataclass_fn, wrapper.dest)
        self._extras: list[str] = []
        try:
            parsed, rest = super().parse_known_args(args, namespace)
        except ConfigError as e:  # a settings class refused a value while the parse built it
            if any(word.startswith("-") for word in self._extras):  # a misspelling first: it may be the cause
                self.error(f"unrecognized arguments: {' '.join(self._extras)}")
            raise ConfigError(self._in_given_words(str(e), getattr(e, "group", None))) from None
        given = self._given_as()
        self._keep_config_nulls(parsed, given)
        # Read by given(); merged, as the verb's parser fills it before the top parser returns.
        parsed.given_as = {**getattr(parsed, "given_as", {}), **given}
        return parsed, rest

    def _keep_config_nulls(self, parsed: argparse.Namespace, given: dict[str, str]) -> None:
        """A --config file's null for a setting, not typed over (``given``: _given_as): None, as the bare
        option gives it. The parse takes a group's null default for "no default", which left a recipe's
        value in its place."""
        for group, fields in self.config_nulls.items():
            settings = getattr(parsed, group, None)
            nulls = {f: None for f in fields if given.get(f"{group}.{f}", "").startswith("--config ")}
            if dataclasses.is_dataclass(settings) and nulls:
                setattr(parsed, group, dataclasses.replace(settings, **nulls))

    def _refuse_a_repeated_config(self) -> None:
        """--config given twice: simple_parsing reads it before the parse, keeping the last one's files
        (`--config a.yaml --config b.yaml` dropped a.yaml's entries), so _refuse_a_repeat never sees it."""
        option = f"--{self.add_config_path_arg}"
        reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        reader.add_argument(option, dest="files", nargs="*", action="append", default=[])
        files = reader.parse_known_args(self._argv_seen)[0].files
        if len(files) > 1:
            self.error(repeat_refusal([option] * 2, files[:2], listed=True))
        # `eval --config m.yaml RUN`: --config takes RUN as a second file, and RUN would be named as a bad config
        other = next((w for w in (files[0][1:] if files else []) if not w.lower().endswith(CONFIG_SUFFIXES)), None)
        if other is not None:
            self.error(f"{option} takes every word after it as a file, and {other!r} is not a .json, .yaml or .yml "
                       f"file: put it before {option}, or end the files with --")

    def _given_as(self) -> dict[str, str]:
        """Each setting the user gave, with how: its option as typed ("-k", "--no-auxk"), else the --config
        file's entry that set it (the command line wins over the file)."""
        given = {}
        for action in self._actions:
            typed_as = self._typed_words(action)
            if typed_as:
                given[action.dest] = typed_as[-1]
            elif action.dest in self.config_entries:
                given[action.dest] = self.config_entries[action.dest]
        return given

    def _typed_words(self, action: argparse.Action) -> list[str]:
        """How ``action``'s option was typed on the command line ("-k", "--k"), each time, in order; a short
        option with its value attached ("-n5") counts, or a file's bad value would be refused over it."""
        return [o for a in self._argv_seen for o in action.option_strings if _typed_as(a, o)]

    def _in_given_words(self, message: str, group: str | None) -> str:
        """A settings class's refusal ("k must be an integer >= 1, got -4") with each setting the user gave
        named as given: the option as typed ("-k must be ..."), or the --config file's entry ("--config
        c.yaml: train.k: must be ..."), not an option never typed. The settings are those of ``group``, the
        group that refused; where it is unknown, only a name no other group of the verb has."""
        if message.startswith("--config "):
            return message
        given = self._given_as()
        if group is None:
            names = [a.dest.rsplit(".", 1)[-1] for a in self._actions if "." in a.dest]
            ours = {dest for dest in given if "." in dest and names.count(dest.rsplit(".", 1)[-1]) == 1}
        else:
            ours = {dest for dest in given if dest.rpartition(".")[0] == group}
        return in_given_words(message, {dest.rsplit(".", 1)[-1]: given[dest] for dest in ours})

    def error(self, message: str) -> typing.NoReturn:
        """One line, as for every other bad input (argparse would print the usage block first), with a
        close match for a misspelled option."""
        if message.startswith("the following arguments are required:"):
            # "--n-latent 5" without --out: the misspelling is the first thing to fix, not the missing --out
            unknown = unknown_options(self, getattr(self, "_argv_seen", []))
            message = f"unrecognized arguments: {' '.join(unknown)}" if unknown else message
        # simple_parsing's type for a Literal field reports "invalid typing.Literal['zero', 'mean'] value: 'foo'"
        message = re.sub(r"invalid typing\.Literal\[(.*)\] value: ('.*')",
                         lambda m: f"invalid choice: {m[2]} (choose from {m[1].replace(chr(39), '')})", message)
        # argparse quotes each choice ("'saelens', 'sparsify'"); saelab's own messages list them bare
        message = re.sub(r"\(choose from ([^()]*)\)$", lambda m: f"(choose from {m[1].replace(chr(39), '')})", message)
        if message.startswith("unrecognized arguments:"):
            message += self._did_you_mean(message.split(":", 1)[1].split())
        message += _closest_choice(message)
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")

    def _did_you_mean(self, given: list[str]) -> str:
        """"; did you mean --n-latents?" for the first unknown option of ``given`` with a hint; for another verb's
        option, that it is, and this verb's counterpart (:data:`OPTION_COUNTERPARTS`) or that it is not this verb's."""
        for typed in (arg.split("=", 1)[0] for arg in given if arg.startswith("-")):
            word = "--" + typed[2:].replace("_", "-") if typed.startswith("--") else typed  # as options are spelled
            if word != typed and word in self._option_string_actions:  # this verb's own, typed with "_"
                return f"; did you mean {word}?"
            owners = self._verbs_taking(word)
            hint = did_you_mean(word, self._options_of_settings(owners.values()), *self._group_prefixes(),
                                named_elsewhere=bool(owners),
                                switches=[o for o, a in self._option_string_actions.items() if a.nargs == 0])
            if not hint and owners:
                hint = f"; {word} is {self._counterpart(word, list(owners))}"
            if hint:
                return hint
        return ""

    def _verbs_taking(self, option: str) -> dict[str, str]:
        """The other verbs whose --help lists ``option``, with the setting it sets there ("train.n_latents");
        families refuses browse's page options, which it holds."""
        taking = {}
        for name, parser in self.verbs.items():
            if parser is not self:
                parser._preprocessing()  # the settings' options are added here (20-40 ms for all verbs)
                action = parser._option_string_actions.get(option)
                if action is not None and action.help is not argparse.SUPPRESS:
                    taking[name] = action.dest
        return taking

    def _options_of_settings(self, settings: typing.Iterable[str]) -> list[str]:
        """This verb's options, less those of another group's setting than ``settings`` (other verbs' settings of
        the word typed, each "group.field"): train's --n-latents (train.n_latents) is not eval's --n2g-n-latents
        (n2g.n_latents), though a group's prefix tells them apart; quickstart's --harvest-dtype is harvest's
        --dtype (harvest.dtype). Settings outside a group (steer's "seed") say nothing; none in a group: all options."""
        settings = [s for s in settings if "." in s]
        if not settings:
            return list(self._option_string_actions)
        own = {w.dest for w in getattr(self, "_wrappers", []) if not w.prefix}  # browse's "browse"
        alike = {f"{group}.{s.split('.', 1)[1]}" for s in settings if s.split(".", 1)[0] in self.reads_as
                 for group in own}  # eval.corpus is browse's browse.corpus: it reads text as eval does
        return [o for o, a in self._option_string_actions.items()
                if "." not in a.dest or a.dest in settings or a.dest in alike]

    def _counterpart(self, option: str, owners: list[str]) -> str:
        """Whose ``option`` is, with what this verb reads in its place ("steer's option: top reads --n-tokens tokens
        of text"), else that it is not this verb's: not that this verb has no such setting, which it may have under
        a name no rule finds (--help lists them)."""
        verb = next(name for name, parser in self.verbs.items() if parser is self)
        instead = OPTION_COUNTERPARTS.get(option, {}).get(verb)
        if instead:
            return f"{_whose(owners)}: {verb} {instead}"
        return f"{_whose(owners)}, not {verb}'s" if len(owners) == 1 else f"{_whose(owners)}, not of {verb}"

    def _group_prefixes(self) -> tuple[set[str], set[str]]:
        """The prefixes of this verb's option groups (quickstart's "harvest", eval's "n2g"), which an option
        typed without them may lack, and the groups it reads unprefixed (harvest's "harvest", and its
        :attr:`reads_as`), whose prefix an option typed as another verb spells it may carry."""
        wrappers = getattr(self, "_wrappers", [])
        return ({w.prefix.rstrip("-") for w in wrappers if w.prefix},
                {w.dest for w in wrappers if not w.prefix} | self.reads_as)

    def format_help(self) -> str:
        """The help, with each option group titled for people ("harvest options:"), not after its
        dataclass ("HarvestConfig ['harvest']:"), and the settings' None (which cannot be typed) said as
        "unset"."""
        for action in self._actions:  # simple_parsing's own words for --config say nothing of its format
            if "--config" in action.option_strings:
                action.help = ('a JSON or YAML file of option defaults by group, e.g. {"train": {"k": 64}}; '
                               "options typed on the command line win")
        titles = {"suite_cfg": "paper suite", "compute_equivalent": "compute-equivalent (paper suite)",
                  "ablation_sparsity": "ablation sparsity (paper suite)", "probe": "probe loss (paper suite)",
                  "n2g": "N2G (paper suite)"}
        for group in self._action_groups:
            key = re.fullmatch(r"\w+ \['(\w+)'\]", group.title or "")
            if key and key[1] in self.group_text:
                titles[key[1]], group.description = self.group_text[key[1]]
        text = re.sub(r"^\w+ \['(\w+)'\]:$", lambda m: f"{titles.get(m[1], m[1])} options:", super().format_help(),
                      flags=re.M)
        if not re.search(r"\bNone\b", text):
            return text
        return re.sub(r"\bNone\b", "unset", text) + UNSET_NOTE


    def _preprocessing(self, *args: Any, **kwargs: Any) -> None:
        # simple_parsing turns the settings' fields into options here (before a parse or a help)
        super()._preprocessing(*args, **kwargs)
        for action in self._actions:
            if action.dest.rsplit(".", 1)[-1] in self.hidden_fields:
                action.help = argparse.SUPPRESS

    def _parse_known_args(self, *args: Any, **kwargs: Any) -> Any:
        self._taken: dict[argparse.Action, list[list[str]]] = {}  # each option's values so far, as typed
        parsed, self._extras = super()._parse_known_args(*args, **kwargs)  # for a refusal while building settings
        return parsed, self._extras

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        self._refuse_a_repeat(action, arg_strings)
        # simple_parsing gives an Optional field nargs="?", the bare option meaning None, and a list field
        # nargs="*": where that is also the default, "--corpus" or "--metrics" without a value would quietly
        # change nothing (a bare --metrics ran every metric).
        if _bare_is_a_no_op(action) and not arg_strings:
            wanted = "at least one argument" if action.nargs == "*" else "one argument"
            self.error(f"argument {'/'.join(action.option_strings)}: expected {wanted}")
        self._refuse_an_empty_value(action, arg_strings)
        values = super()._get_values(action, arg_strings)
        if action.nargs in ("*", "+"):  # a list option: "--ablations zero zero" would run (and record) zero twice
            repeat = first_repeat(values)
            if repeat is not None:
                named = "/".join(action.option_strings) or action.metavar or action.dest.upper()  # as the usage shows it
                self.error(f"{named}: {repeat!r} given twice; give each value once")
        return values

    def _refuse_an_empty_value(self, action: argparse.Action, arg_strings: list[str]) -> None:
        """An empty value (an unset variable in a script): `--corpus ""` read the default corpus, `--hook ""` the
        SAE's hook, an empty OUT the current folder, each without a word. Options whose own reader words it
        (--positions) or that take empty text (--prompt: BOS alone) are left to it."""
        empty = [a for a in arg_strings if a == ""]  # " " may be a value: a padding token
        if (not empty or action.dest.rsplit(".", 1)[-1] in EMPTY_VALUE_READ_BY_ITS_OPTION
                or action.nargs in (argparse.PARSER, argparse.REMAINDER)):  # a verb's words: its own parser's
            return
        named = "/".join(action.option_strings) or action.metavar or action.dest.upper()
        self.error(f"argument {named}: expected a value, got an empty one {empty[0]!r} (an unset variable?)")

    def _refuse_a_repeat(self, action: argparse.Action, arg_strings: list[str]) -> None:
        """An option given a second time: argparse keeps the last value, so `train --k 8 --k 16` trained
        k=16 without a word. Options that gather their occurrences (--log-to) take repeats, and a switch
        takes the last of its forms, as switches do ("--no-auxk --auxk")."""
        if (not action.option_strings or isinstance(action, (*REPEATABLE_ACTIONS, BooleanOptionalAction))
                or action.nargs == 0):
            return
        taken = self._taken.setdefault(action, [])
        taken.append(list(arg_strings))
        if len(taken) == 2:
            spellings = [o for w in self._argv_seen for o in action.option_strings if _typed_as(w, o)]
            spellings = spellings[:2] if len(spellings) >= 2 else [action.option_strings[0]] * 2
            listed = action.nargs in ("*", "+")  # a fixed number of values (--export FORMAT OUT) is one use
            self.error(repeat_refusal(spellings, taken, listed, getattr(action, "several", None)))

    def exit(self, status: int = 0, message: str | None = None) -> typing.NoReturn:
        # simple_parsing refuses "--no-auxk true" through exit(0, message): a bad option must fail
        if status == 0 and message and message.startswith("Negative flags cannot be passed a value"):
            self.error(message.replace("Negative flags", "switches such as --no-X"))
        super().exit(status, message)

    def _config_sections(self, path: Path) -> dict[str, Any]:
        """The file's entries for this verb: its option groups (checked field by field) and its options."""
        groups = {w.dest: w.dataclass for w in self._wrappers}
        options = {a.dest: a for a in self._actions if a.option_strings and a.dest not in ("help", "debug")}
        kept = {}
        for key, value in run_record_as_settings(read_config_file(path), groups.get("train"), self.prog,
                                                  path).items():
            where = f"--config {path}: {key}"
            if key in groups:
                kept[key] = check_config_section(where, groups[key], value, key)
                self.config_nulls.setdefault(key, set()).update(f for f, v in kept[key].items() if v is None)
                self.config_entries.update({f"{key}.{str(field).replace('-', '_')}": f"{where}.{field}"
                                            for field in value})
            elif key in options:
                self.config_entries[key] = where
                action = options[key]
                if not hasattr(action, "may_be_unset"):  # as built: each file rewrites the default (set_defaults)
                    action.may_be_unset = action.default in (None, [], ()) and not action.required
                # A typed value replaces the file's, which is then never used (an option that gathers its
                # values, --log-to, keeps the file's beside it): the command line wins, as for a typed option.
                typed_over = self._typed_words(action) and not isinstance(action, REPEATABLE_ACTIONS)
                kept[key] = value if typed_over else option_file_value(action, value, where)
                action.required = False  # --out or --activations may come from the file
            elif key not in self.sections_of_other_verbs:
                keys = sorted(groups) + [file_key(options[o]) for o in sorted(options)]
                switches = [o for o, action in options.items() if action.nargs == 0]
                listed = f"; expected one of {', '.join(keys)}"
                raise ConfigError(f"--config {path}: {str(key).translate(ESCAPED)}: not an option group or option "
                                  f"of `{self.prog}`"
                                  f"{closest_key(key, [*groups, *options], switches, value) or listed}")
        return kept


REPEATABLE_ACTIONS = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction)
"""Actions that gather each occurrence of their option (``--log-to`` extends): a repeat adds, it loses nothing."""


def repeat_refusal(spellings: list[str], values: list[list[str]], listed: bool = False,
                   several: str | None = None) -> str:
    """The refusal of an option given twice: "--k given twice (8, 16): give it once", from how each
    occurrence was typed (``spellings``: "-k", "--k") and its values as typed. ``listed``: the option takes
    several values; ``several`` says how to give several where one value lists them ("--latent 3,4")."""
    names = "/".join(dict.fromkeys(spellings))
    shown = [" ".join(v) or "no value" for v in values]  # "--warmup-steps" bare: its optional value left out
    if listed:  # "--grid k=8,16 --grid lr=1e-3": its values would read as one list
        return f"{names} given twice ({' and '.join(shown)}): list all its values after one {spellings[0]}"
    hint = f"list several as {several}" if several else "give it once"
    return f"{names} given twice ({', '.join(shown)}): {hint}"


OPTION_COUNTERPARTS: dict[str, dict[str, str]] = {
    "--scale-tokens": {"top": "reads --n-tokens tokens of text", "browse": "reads --n-tokens tokens of text",
                       "families": "reads --n-tokens tokens of text"},
    "--n-tokens": {"steer": "reads --scale-tokens tokens of text to measure a latent's scale",
                   "train": "trains on --total-tokens activation rows",
                   "sweep": "trains on --total-tokens activation rows",
                   "eval": "reads --recon-tokens and --downstream-tokens tokens of text"},
    "--n2g-latents": {"browse": "explains --n2g-n-latents latents, drawn at random"},
    "--n-top": {"top": "shows -n/--n-contexts contexts per latent"},
    "--n-contexts": {"browse": "keeps --n-top top contexts per latent"},
}
"""Another verb's option, typed where it is unknown, with what each verb that reads the setting meant under
other options does instead ("top reads --n-tokens tokens of text" for steer's --scale-tokens; for --n-tokens,
top's text read or quickstart's training tokens): a close spelling would name an unrelated setting (top's
--sample-pool-tokens, steer's --top-tokens, train's --dead-tokens). Which verbs take an option is read from
their parsers; a verb not listed here is told the option is not its own."""


def _whose(verbs: list[str]) -> str:
    """"steer's option" for one verb, "an option of train and sweep" or "an option of a, b, c and 5 more verbs"
    (a long list would push the verb's own counterpart off the line)."""
    if len(verbs) == 1:
        return f"{verbs[0]}'s option"
    named = verbs if len(verbs) <= 4 else [*verbs[:3], f"{len(verbs) - 3} more verbs"]
    return f"an option of {', '.join(named[:-1])} and {named[-1]}"


def _closest_choice(message: str) -> str:
    """"; did you mean train?" for argparse's "invalid choice: 'trian' (choose from quickstart, ...)" (a
    misspelled verb or choice; its choices listed bare by ``error``), else ""."""
    match = re.search(r"invalid choice: '(.*)' \(choose from (.*)\)$", message)
    if not match:
        return ""
    return did_you_mean(match[1], [c.strip(" '") for c in match[2].split(",")])


def typed(args: argparse.Namespace, option: str) -> bool:
    """Whether ``option`` (e.g. "--n-latents", "-n") was given on the command line (not from --config); read
    as the parser reads its words (_typed_as: "-n5" is -n), so both agree on what was typed."""
    return any(_typed_as(a, option) for a in getattr(args, "command_line", ()))


def _is_option(word: str, option: str) -> bool:
    return word == option or word.startswith(option + "=")


def _typed_as(word: str, option: str) -> bool:
    """Whether ``word`` gives ``option``: "--k", "--k=8", and a short option's attached value, "-n5"."""
    return _is_option(word, option) or (option[1] != "-" and word.startswith(option) and word[1] != "-")


def given(args: argparse.Namespace, dest: str) -> str | None:
    """How the user set the setting ``dest`` ("train.k"): its option as typed ("--k", "-k"), or the --config
    file's entry ("--config c.yaml: train.k"); None where it is a default (a recipe's value included)."""
    return getattr(args, "given_as", {}).get(dest)


@contextlib.contextmanager
def eval_settings_as_given(args: argparse.Namespace, prefix: str):
    """An eval corpus too short for the evaluation (``saelab.evals.core.eval_corpus_too_short``) refused with
    each eval setting as the user gave it: its option as typed, or the --config file's entry (the file
    leading the line), and one left at its default by its option (``prefix``: "--eval-", or "--" in eval)."""
    try:
        yield
    except CorpusError as e:
        worded = getattr(e, "worded", None)
        if worded is None:
            raise
        files: dict[str, str] = {}  # each entry named, with its file ("" for an option)

        def name(setting: str, several: bool = False) -> str:
            file, entry = given_parts(given(args, setting) or f"{prefix}{setting.partition('.')[2].replace('_', '-')}")
            first = entry not in files
            files.setdefault(entry, file)
            return f"{entry} ({file.removesuffix(': ')})" if several and first and file else entry

        message = worded(name)
        leads = set(files.values()) - {""}
        if len(leads) > 1:  # entries of several files: each followed by its own where first named
            files.clear()
            message = worded(lambda setting: name(setting, several=True))
        raise CorpusError(leads.pop() + message if len(leads) == 1 else message) from None


# A settings field in a refusal: an assignment ("k=9000"), or a bare name beside a comparison ("k <=
# n_latents"); not inside a longer word or a path ("top-k", "runs/k=32"), nor a word of the prose ("x k latents").
_ASSIGNED_FIELD_RE = re.compile(r"(?<![\w./-])([a-z][a-z0-9_]*)=([^\s,;:)]+)")
_COMPARED_FIELD_RE = re.compile(r"(?<![\w./-])[a-z][a-z0-9_]*(?= [<>]=? )"
                                r"|(?:(?<=[<>] )|(?<=[<>]= ))[a-z][a-z0-9_]*\b(?![/.-])")


def reword_fields(message: str, assigned: typing.Callable[[str, str], str | None],
                  compared: typing.Callable[[str], str | None]) -> str:
    """A settings class's refusal with the settings it names in its own words: each assignment ("k=9000")
    as ``assigned(field, value)`` says, each name beside a comparison ("k <= n_latents") as ``compared(field)``
    says; None keeps the words."""
    message = _ASSIGNED_FIELD_RE.sub(lambda m: assigned(m[1], m[2]) or m[0], message)
    return _COMPARED_FIELD_RE.sub(lambda m: compared(m[0]) or m[0], message)


def in_given_words(message: str, how: dict[str, str],
                   otherwise: typing.Callable[[str], str | None] = lambda field: None) -> str:
    """``message`` with each setting and option it names in the words the user gave it. ``how`` maps a
    setting ("k") or a long option ("--k") to how it was given: an option as typed ("-k"), a --config file's
    entry ("--config c.yaml: train.k"; the message then opens with its file, or, where the entries named
    come from several files, each is followed by its own at its first mention) or a grid entry ("--grid
    k=9000", or a file's "--config c.yaml: grid k=9000"; named "k" beside a comparison); ``otherwise`` names
    a setting ``how`` lacks (None: as the message has it). "k must be >= 1, got 0" -> "-k must be >= 1, got
    0", "--config c.yaml: train.k: must be ...", "--grid k=0: must be >= 1"; "--k 100" -> "-k 100"."""
    setting, _, rest = message.partition(" ")
    lead = setting if rest.startswith("must ") and not setting.startswith("-") and setting in how else None
    if lead is not None and grid_entry(how[lead]) is None:
        return f"{how[lead]}{':' if how[lead].startswith('--config ') else ''} {rest}"
    files: dict[str, str] = {}  # the file of each entry named
    reworded = _in_given_words(message, lead, how, otherwise, files, several=False)
    named = {file for file in files.values() if file}
    opening = _OPENING_ENTRY_RE.match(message)  # an option typed, or a file's entry, at the front already
    opened_by = (None if opening is None or opening[1] in how  # (an option given otherwise is reworded)
                 else opening[1] if opening[1].startswith("--config ") else "")
    if len(named) > 1 or (opened_by is not None and named - {opened_by}):
        # one file at the front would blame it for the others' entries: each entry followed by its own
        return _in_given_words(message, lead, how, otherwise, {}, several=True)
    if not named:
        return reworded
    file = named.pop()  # at the front once: the message may open with that file's entry already
    return reworded if reworded.startswith(f"{file}: ") else f"{file}: {reworded}"


# A refusal that opens with the entry it is about, as given: "--l1-coefficient: ...", "--config b.yaml: ...".
_OPENING_ENTRY_RE = re.compile(r"^(--config \S+|--?[\w-]+): ")


def grid_entry(words: str | None) -> str | None:
    """The sweep grid's entry that ``words`` name, as the grid was given: typed ("--grid k=8") or a --config
    file's ("--config c.yaml: grid k=8" -> "grid k=8"); None for any other setting."""
    entry = (words or "").rpartition(": ")[2]
    return entry if entry.startswith(("--grid ", "grid ")) else None


# A grid entry in a refusal, as typed ("--grid k=8") or from a file ("grid k=8", "grid k-aux:", "grid entry
# 'k='", "grid: expected ..."): named in the grid's own words, not reworded as options ("--k 8").
GRID_ENTRY_RE = re.compile(r"(?:--|(?<![\w./-]))grid(?::| (?:[\w-]+[=:]|entry |names ))")


def _in_given_words(message: str, lead: str | None, how: dict[str, str],
                    otherwise: typing.Callable[[str], str | None], files: dict[str, str], several: bool) -> str:
    """in_given_words' rewording, recording in ``files`` the file of each entry named; ``several``: each
    entry followed by its file ("train.k 600 (--config k.yaml)") where first named. ``lead``: the setting
    of a grid entry the message opens with."""

    def named(words: str, value: str | None = None) -> str:  # a grid entry holds its value as typed
        file, _, entry = words.rpartition(": ")
        first = entry not in files
        files.setdefault(entry, file)
        shown = entry if value is None or grid_entry(entry) else f"{entry} {value}"
        return f"{shown} ({file})" if several and first and file else shown

    def compared(field: str) -> str | None:
        words = how.get(field) or otherwise(field)
        if words is not None and grid_entry(words):  # beside a comparison, the entry's name: "k <= n-latents"
            return grid_entry(words).partition(" ")[2].partition("=")[0]
        return None if words is None else named(words)

    def assigned(field: str, value: str) -> str | None:
        words = how.get(field) or otherwise(field)
        return None if words is None else named(words, value)

    if lead is not None:  # a grid entry: the value is in the entry, no ", got 0"
        rest = message.partition(" ")[2]
        message = f"{named(how[lead])}: {reword_fields(re.sub(r', got [^,;]+$', '', rest), assigned, compared)}"
    else:
        message = reword_fields(message, assigned, compared)
    for option in how:  # the verbs' own messages name long options too
        if option.startswith("--"):
            message = re.sub(rf"(?<![\w./-]){re.escape(option)}(?![\w-])", lambda m: named(how[option]), message)
    return message


def typed_starting(args: argparse.Namespace, *prefixes: str) -> list[str]:
    """The options given on the command line whose names start with one of ``prefixes`` (e.g. "--eval-")."""
    return [a.split("=", 1)[0] for a in getattr(args, "command_line", ()) if a.startswith(prefixes)]


def _bare_is_a_no_op(action: argparse.Action) -> bool:
    """An option whose value may be left out, giving None (an empty list), when that is its default anyway
    (not a switch such as --auxk / --no-auxk, whose bare forms mean true / false; not --ablations, whose
    bare form is no ablation where its default has two)."""
    if action.nargs == "*":
        return bool(action.option_strings) and action.default in (None, (), [])
    return (action.nargs == "?" and bool(action.option_strings) and action.const is None
            and action.default is None and not isinstance(action, BooleanOptionalAction))


def _with_nargs(action: argparse.Action, nargs: Any) -> argparse.Action:
    shown = copy.copy(action)
    shown.nargs = nargs
    return shown


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once, metavars from the option name (not from a parsing function's name, nor
    simple_parsing's "[[float]]" for an optional value or "Literal [Literal, ...]" for a tuple)."""

    def _metavar_formatter(self, action: argparse.Action, default_metavar: str):
        if isinstance(action.metavar, str) and "[" in action.metavar:
            action = copy.copy(action)
            action.metavar = None
        return super()._metavar_formatter(action, default_metavar)

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if _bare_is_a_no_op(action):  # a value is required (Parser._get_values)
            if action.nargs == "*":  # "--metrics METRICS [METRICS ...]"
                return super()._format_args(_with_nargs(action, "+"), default_metavar)
            return "%s" % self._metavar_formatter(action, default_metavar)(1)
        if isinstance(action, BooleanOptionalAction):  # usage "[--auxk | --no-auxk]", not "[--auxk [bool]]"
            return " ".join(f"| {o}" for o in action.option_strings[1:])
        return super()._format_args(action, default_metavar)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, BooleanOptionalAction):  # "--auxk / --no-auxk", as a user types the switch
            return " / ".join(action.option_strings)
        return super()._format_action_invocation(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # an option named in a help text ("(default: --no-harvest-prepend-bos)") stays whole
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return action.dest.rsplit(".", 1)[-1].upper()

    def _get_default_metavar_for_positional(self, action: argparse.Action) -> str:
        return action.dest.rsplit(".", 1)[-1].upper()

    def _get_help_string(self, action: argparse.Action) -> str:
        # argparse formats help with '%': a literal one in a docstring ("60 %") must be doubled.
        text = re.sub(r"%(?!\()", "%%", action.help or "")
        if isinstance(action, BooleanOptionalAction) and action.default is not None:  # not "(default: False)"
            switch = action.option_strings[0 if action.default else 1]
            return text.replace(" (default: %(default)s)", "") + f" (default: {switch})"
        default = action.default  # "is", not "in": a default of 0 (a seed) is shown, only False / None are not
        if "(default" in text or default is None or default is False or default is argparse.SUPPRESS \
                or action.nargs == 0:
            return text
        if isinstance(default, (list, tuple)):  # "zero mean", as typed, not "('zero', 'mean')"; () needs no word
            return text + f" (default: {' '.join(map(str, default))})" if default else text
        if isinstance(default, str) and default != default.strip():  # ' _': a bare space would not show
            return text + f" (default: {default!r})".replace("%", "%%")
        return text + " (default: %(default)s)"


def unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """The words of ``argv`` that ``parser`` reads as options it does not have ("--lat", "--lat=5", "-x"), as
    typed; not a negative number, nor anything after "--"."""
    found = []
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-" or " " in arg or parser._negative_number_matcher.match(arg):
            continue  # a value or a positional, as argparse reads it
        name = arg.split("=", 1)[0]
        if name in parser._option_string_actions or (arg[1] != "-" and arg[:2] in parser._option_string_actions):
            continue  # "-n5": -n and its value
        found.append(arg)
    return found


def positional_indices(parser: argparse.ArgumentParser, argv: list[str]) -> list[int]:
    """Where in ``argv`` the words are that are neither an option nor an option's value, as ``parser``
    reads them."""
    found, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            return found + list(range(i, len(argv)))
        if not arg.startswith("-") or arg == "-":
            found.append(i - 1)
            continue
        action = parser._option_string_actions.get(arg)
        if action is None or action.nargs == 0:  # "--opt=V", "-n5", a switch, an unknown option
            continue
        if isinstance(action.nargs, int):
            i += action.nargs
        elif action.nargs in ("*", "+"):
            while i < len(argv) and not argv[i].startswith("-"):
                i += 1
        elif action.nargs is None or (i < len(argv) and not argv[i].startswith("-")):  # one value, or "?"
            i += 1
    return found


def add_io_options(p: ArgumentParser, *, device: bool = True, model: bool = True, sae: bool = True,
                   overwrite: bool | str = True) -> None:
    """--device and (``model``: a verb that runs the language model) --model-dtype, --overwrite (a string:
    its help), --no-progress, --debug where a verb has them; ``sae``: whether the verb runs an SAE."""
    if device:
        what = {(True, True): "the model and the SAE run", (True, False): "the model runs",
                (False, True): "the SAE trains"}[model, sae]
        p.add_argument("--device", default=None, metavar="DEVICE",
                       help=f"where {what}: auto (CUDA when available, else cpu), cpu, cuda, cuda:N (default: auto)")
    if device and model:
        add_model_dtype(p)
    if overwrite:
        p.add_argument("--overwrite", action="store_true", help=overwrite if isinstance(overwrite, str) else
                       "replace finished results in the output folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_model_dtype(p: ArgumentParser) -> None:
    p.add_argument("--model-dtype", default="float32", choices=DTYPES,
                   help="dtype of the language model's weights and forward (bfloat16 / float16 on a GPU halve "
                        "memory and speed it up)")


def add_sae_argument(p: ArgumentParser, lead: str = "the SAE:", *, several: bool = False, also: str = "") -> None:
    """The positional SAE(s): ``lead``, the one list of what is accepted, then ``also``; and --allow-http, which
    the loader's refusal of an http URL names."""
    p.add_argument("sae", metavar="SAE", nargs="+" if several else None,
                   help=f"{lead} {SAE_SOURCES}{also}")
    p.add_argument("--allow-http", action="store_true",
                   help="also download SAEs from plain http URLs (unverified transport; https is the default)")


def add_model_option(p: ArgumentParser) -> None:
    p.add_argument("--model", type=model_spec, default=None,
                   help="language model (default: the one the SAE was trained on)")


def model_spec(text: str) -> str:
    """--model's value: not empty (an unset shell variable would otherwise mean the SAE's own model, unsaid)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a language model ({MODEL_SPECS}), got {text!r}")
    return text


def positive_int(text: str) -> int:
    """An option's integer >= 1 (argparse names the option in front of the message)."""
    return _int_from(text, 1)


def nonnegative_int(text: str) -> int:
    """An option's integer >= 0 (argparse names the option in front of the message)."""
    return _int_from(text, 0)


def _int_from(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected an integer >= {least}, got {value}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def check_range(option: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{option} must be in [{lo:g}, {hi:g}], got {value:g}")
