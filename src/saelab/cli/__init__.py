"""`saelab <verb>`: each verb is a thin shell over a public function (see the README's command table).

Errors reach the user as one line, ``saelab VERB: error: ...``, exit status 2 for bad input and 1
for I/O failures (disk full, read-only folder); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shlex
import sys

import saelab
from saelab.cli.common import GRID_ENTRY_RE, VERB_SUMMARIES, Parser, in_given_words
from saelab.errors import InterruptedBeforeAnyResult, SaelabError
from saelab.utils.config import given_parts
from saelab.utils.device import may_refuse, resolve_device

VERBS = tuple(VERB_SUMMARIES)


def _option_value(argv: list[str], option: str) -> str | None:
    """The value of ``option`` in ``argv`` (``--opt V`` or ``--opt=V``), read before the full parse."""
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def build_parser(argv: list[str] | None = None, recipe: str | None = None) -> argparse.ArgumentParser:
    """The full parser. The recipe (``recipe``, else ``--recipe`` in ``argv``) sets the training defaults."""
    from saelab.cli import evaluate, explore, jobs, share
    from saelab.train.config import RECIPES

    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = recipe or _option_value(argv, "--recipe") or "short-run"
    if recipe not in RECIPES:
        recipe = "short-run"  # the full parse then refuses the unknown name, listing the choices
    parser = Parser(prog="saelab", add_config_path_arg=False,
                    description="Train, evaluate and explore top-k sparse autoencoders.")
    parser.add_argument("--version", action="version", version=f"saelab {saelab.__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="{" + ",".join(VERBS) + "}",
                                parser_class=Parser)
    jobs.add_quickstart(sub, recipe)
    jobs.add_harvest(sub)
    jobs.add_train(sub, recipe)
    jobs.add_sweep(sub, recipe)
    evaluate.add_eval(sub)
    evaluate.add_report(sub)
    explore.add_steer(sub)
    explore.add_top(sub)
    explore.add_browse(sub)
    explore.add_families(sub)
    share.add_export(sub)
    _share_config_sections(sub.choices.values())
    for verb in sub.choices.values():
        verb.verbs = sub.choices
    parser.verb_parsers = sub.choices
    return parser


def _share_config_sections(verbs) -> None:
    """One config file may serve several verbs: each skips the sections that only other verbs read."""
    sections = {verb: {w.dest for w in verb._wrappers} | {a.dest for a in verb._actions if a.option_strings}
                for verb in verbs}
    for verb, own in sections.items():
        verb.sections_of_other_verbs = frozenset(set().union(*sections.values()) - own)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; when a --config file names another recipe than the command line, parse again with
    that recipe's defaults (a recipe is its settings, not only its name)."""
    args = _parse_with(build_parser(argv), argv)
    train = getattr(args, "train", None)
    if train is not None and train.recipe != (_option_value(argv, "--recipe") or "short-run"):
        args = _parse_with(build_parser(argv, recipe=train.recipe), argv)
    args.command_line = argv  # which options were typed, not taken from a default or --config (common.typed)
    return args


def _parse_with(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, with an unknown option reported by the verb's parser (argparse: by the top one)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.verb_parsers[args.verb].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _verb(argv: list[str]) -> str:
    return next((a for a in argv if a in VERBS), "")


def _verb_options(argv: list[str], verb: str) -> dict[str, str]:
    """The long options ``verb`` takes, each with the setting it sets ("--n-tokens": "harvest.n_tokens"); the
    settings' fields become options only when its help is built."""
    if verb not in VERBS:
        return {}
    try:
        parser = build_parser(argv).verb_parsers[verb]
        parser._preprocessing()  # simple_parsing adds the settings' options here, before a parse
    except Exception:  # noqa: BLE001 - the error being reported matters, not this rewording of it
        return {}
    return {o: action.dest for action in parser._actions for o in action.option_strings if o.startswith("--")}


def _typed_spellings(args: argparse.Namespace | None, options: dict[str, str]) -> dict[str, str]:
    """Each long option the user set by another spelling, from :func:`_verb_options`' ``options``: its short
    one ("--k": "-k"), another option that sets it ("--total-tokens": "--n-tokens" in quickstart), or a
    --config file's entry ("--context-size": "--config c.yaml: harvest.context_size"); not a switch's --no-
    form, which sets the same setting but says the opposite."""
    given_as = getattr(args, "given_as", {})
    spelled = {}
    for option, dest in options.items():
        spelling = given_as.get(dest, "")
        negative = option.startswith("--no-") and f"--{option[5:]}" in options
        short = spelling[:1] == "-" and spelling[1:2] != "-"
        if (short or options.get(spelling) not in (None, dest) or given_parts(spelling)[0]) and not negative:
            spelled[option] = spelling
    return spelled


# A setting named in an error the Python API raises: "lr must", "k=100", "k <= n_latents", "(total_tokens)".
_SETTING_RE = re.compile(r"(?<![\w/.-])([a-z][a-z0-9_]*)(?=(?: must\b| ?[<>]=? | ?[<>]=?$))|(?<=\()([a-z][a-z0-9_]*)(?=\))")
_SETTING_AFTER_RE = re.compile(r"(?:(?<=[<>] )|(?<=[<>]= ))([a-z][a-z0-9_]*)\b(?![/.-])")
# A setting named by its path in the settings, "train.k", "meta.harvest.n_tokens" (not "cfg.json"), or in
# a list of changes: "model_dtype "float32" -> "bfloat16"".
_SETTING_PATH_RE = re.compile(r"(?<![\w/.-])(?:[a-z_]\w*(?:\.[a-z_]\w*)+(?![\w/-]|\.\w)|[a-z_]\w*(?= \S+ -> ))")


def in_option_words(message: str, options: dict[str, str], typed_as: dict[str, str] | None = None) -> str:
    """``message`` with the API's words for a setting replaced by the verb's options (``options``: each with
    the setting it sets): "pass overwrite=True (--overwrite)" -> "pass --overwrite", "lr must be > 0" ->
    "--lr must be > 0", "k=100" -> "--k 100", "train.k 16 -> 32" -> "--k 16 -> 32"; then each long option
    the user typed otherwise as typed (``typed_as``, "--k": "-k"): "--k 100" -> "-k 100"."""
    return in_given_words(_in_long_option_words(message, options, typed_as or {}), typed_as or {})


def _in_long_option_words(message: str, options: dict[str, str], typed_as: dict[str, str]) -> str:
    if "--config " not in message:  # a config file's entry is named in the file's own words, "train.recipe"
        message = _SETTING_PATH_RE.sub(lambda m: _option_of_path(m[0], options), message)
    message = re.sub(r"\b\w+=True \((--[\w-]+)\)", r"\1", message)
    message = re.sub(r"\b\w+=(\S+) \((--[\w-]+)\)", r"\2 \1", message)

    if "--grid " in message or GRID_ENTRY_RE.search(message):  # a grid entry in its own words, "k=16,32"
        return message

    def option(match: re.Match) -> str:
        word = next(group for group in match.groups() if group)
        name = "--" + word.replace("_", "-")
        prefixed = [o for o in options if o.endswith(name[1:])]  # "--eval-recon-tokens" for recon_tokens
        return name if name in options else prefixed[0] if len(prefixed) == 1 else word

    def assignment(match: re.Match) -> str:  # "k=100" -> "--k 100", "format='saelens'" -> "--format saelens"
        name = option(match)
        return match.group(0) if name == match.group(1) else f"{name} {match.group(3)}"

    # not inside a path or a list of assignments: "runs/k=32", "k=32,lr=1e-3/"
    message = re.sub(r"(?<![\w/.,=-])([a-z][a-z0-9_]*)=(['\"]?)([\w.-]++(?::\w+)?)\2(?![/,=])", assignment,
                     message)  # ":N": "device='cuda:1'"
    message = _SETTING_RE.sub(option, message)
    message = _SETTING_AFTER_RE.sub(option, message)
    return re.sub(r"--([\w-]+) (True|False)(, not (True|False))?\b", lambda m: _as_switch(m, options, typed_as),
                  message)


def _as_switch(match: re.Match, options: dict[str, str], typed_as: dict[str, str]) -> str:
    """A switch's value as it is typed: "--prepend-bos True, not False" -> "--prepend-bos, not --no-prepend-bos";
    as a --config file's entry (``typed_as``) gives it, "--prepend-bos true, not false", which the file's
    entry then names ("harvest.prepend_bos true, not false"), not the half of the switch never typed."""
    name = match[1]
    if f"--no-{name}" not in options:
        return match[0]
    if given_parts(typed_as.get(f"--{name}", ""))[0]:
        return f"--{name} {match[2].lower()}" + (f", not {match[4].lower()}" if match[3] else "")
    typed = {"True": f"--{name}", "False": f"--no-{name}"}
    return typed[match[2]] + (f", not {typed[match[4]]}" if match[3] else "")


def _option_of_path(path: str, options: dict[str, str]) -> str:
    """The option setting ``path`` or a tail of two parts or more ("meta.harvest.n_tokens": harvest.n_tokens;
    not "manifest.json": json), else ``path``."""
    by_setting: dict[str, str] = {}
    for option, setting in options.items():
        by_setting.setdefault(setting, option)  # "--auxk", not "--no-auxk"
    parts = path.split(".")
    tails = (".".join(parts[i:]) for i in range(max(len(parts) - 1, 1)))
    return next((by_setting[tail] for tail in tails if tail in by_setting), path)


def _fail(verb: str, message: str, code: int) -> int:
    print(f"saelab{' ' + verb if verb else ''}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def _hide_library_progress_bars() -> None:
    """--no-progress also hides the bars the hub draws (downloads), with one switch: transformers takes the hub's
    setting when it is imported, and each model load hides its bars itself (load_model's ``progress``).
    transformers is not imported here (~1 s), as a verb's own checks may still refuse the call."""
    from huggingface_hub.utils import disable_progress_bars  # ~40 ms, no torch

    disable_progress_bars()


def _first_process() -> bool:
    """Rank 0 under torchrun (the result prints once, not once per process); a lone process otherwise."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def main(argv: list[str] | None = None) -> int:
    status = 1  # an exception that escapes (--debug) is a failure too
    try:
        status = _run_verb(list(sys.argv[1:] if argv is None else argv))
    finally:
        ddp = sys.modules.get("saelab.train.distributed")  # not imported: no process group was started
        if status != 0 and ddp is not None:  # leave at once, not after 60 s waiting for processes that wait for this
            ddp.leave_on_failure()
    return status


def _run_verb(argv: list[str]) -> int:
    verb = _verb(argv)
    debug = "--debug" in argv
    args = None  # a parse that fails has no typed spellings to name (it names them itself)
    try:
        args = parse_args(argv)
        if not getattr(args, "progress", True):
            _hide_library_progress_bars()
        # a device this machine lacks is refused before any work starts (one never refused imports no torch here)
        if hasattr(args, "device") and may_refuse(args.device):
            resolve_device(args.device, _device_as_typed(args))
        result = args.handler(args)
        if result is not None and _first_process():
            print(json.dumps(result, indent=2, default=str))
        if sys.stdout is not None:  # None: started with stdout closed
            sys.stdout.flush()  # here, not at exit: a reader gone is then the BrokenPipeError below
    except BrokenPipeError as e:
        if _stdout_reader_gone():  # `saelab ... | head`: not a failure of the work, --debug or not
            return _reader_gone()
        return _failed_on_the_system(verb, e, debug)
    except SaelabError as e:
        if debug:
            raise
        options = _verb_options(argv, verb)
        return _fail(verb, in_option_words(str(e), options, _typed_spellings(args, options)), 2)
    except OSError as e:  # disk full, read-only folder, a file that vanished: not the input's fault
        return _failed_on_the_system(verb, e, debug)
    except KeyboardInterrupt as e:
        print(f"\nsaelab {verb}: interrupted; {_after_interruption(verb, args, e)}", file=sys.stderr)
        return 130
    return 0


def _failed_on_the_system(verb: str, e: OSError, debug: bool) -> int:
    if debug:
        raise e
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    return _fail(verb, f"{where}{e.strerror or e}", 1)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader has closed it (poll reports an error on a pipe's end, a
    hang-up on a socket's); False where that cannot be told (no poll, no file behind stdout)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR | select.POLLHUP)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return False


def _reader_gone() -> int:
    """End quietly, with the status of a tool that SIGPIPE stops (128 + 13); stdout goes to /dev/null so that
    its flush at exit raises nothing more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return 141


def _device_as_typed(args: argparse.Namespace) -> str | None:
    """--device as the user typed it, for resolve_device's refusal; None (not typed): $SAELAB_DEVICE names it."""
    return None if args.device is None else f"--device {shlex.quote(args.device)}"


RESUMING_VERBS = ("quickstart", "harvest", "train", "sweep")
"""Verbs whose interrupted call the same command continues (checkpoints, the cache's written shards)."""


def _after_interruption(verb: str, args: argparse.Namespace, interruption: KeyboardInterrupt) -> str:
    """What the same command does next. An interrupted --overwrite of a run put the earlier run back and kept
    nothing of the new one (utils.atomic.replacing_entries); eval keeps each metric file or run it finished;
    the other verbs write their output only at the end; a harvest before its first rows kept nothing when its
    input had no state to keep."""
    if verb in ("train", "sweep", "quickstart") and getattr(args, "overwrite", False):
        return "the run being replaced has its earlier results back; the same command starts the replacement over"
    if isinstance(interruption, InterruptedBeforeAnyResult):
        return "nothing of this call was kept; the same command starts over"
    if verb in RESUMING_VERBS:
        return "run the same command again to resume"
    if verb == "eval":
        return "results finished before the interruption are kept; the same command does the rest"
    return "nothing of this call was saved; the same command starts over"


__all__ = ["VERBS", "build_parser", "main", "parse_args"]
