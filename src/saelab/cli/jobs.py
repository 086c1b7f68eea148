"""`saelab quickstart | harvest | train | sweep`: shells over saelab.pipeline's jobs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saelab.cli.common import (add_io_options, add_verb, eval_settings_as_given, given, in_given_words, typed,
                               typed_starting)
from saelab.cli.config_file import literal_choices, type_words
from saelab.errors import ConfigError
from saelab.evals.config import EvalConfig
from saelab.pipeline_config import HarvestConfig, QuickstartConfig
from saelab.run_folder import SaeHashes, check_output_folder
from saelab.train.config import APPLIES_ONLY_WITH, LOG_TARGETS, TrainConfig, check_warmup
from saelab.utils.config import given_parts
from saelab.utils.words import did_you_mean, plural

if TYPE_CHECKING:  # the jobs (torch) are imported in the handlers that run them: --help starts without them
    from saelab.data import ActivationCache

QUICKSTART_DIR = "runs/quickstart"


def add_train_config(p, recipe: str) -> None:
    """TrainConfig's options, their defaults taken from ``recipe`` (--recipe, read before parsing)."""
    p.add_arguments(TrainConfig, dest="train", default=TrainConfig.from_recipe(recipe))
    p.add_argument("--log-to", nargs="+", action="extend", choices=LOG_TARGETS, default=[],
                   metavar="{tensorboard,wandb}",
                   help="also log training metrics to TensorBoard (RUN/tensorboard/) and/or Weights & Biases "
                        "(WANDB_MODE=offline works offline); default: metrics.jsonl only")


def refuse_options_that_do_not_apply(args: argparse.Namespace, grid: dict[str, list] | None = None,
                                     grid_names: dict[str, str] | None = None) -> None:
    """Refuse a training option the user gave (typed, in a --config file, or a grid entry, named as
    ``grid_names`` says it was written) where it has no effect (APPLIES_ONLY_WITH), and a --k-aux above the
    latent count (more dead latents than there are). Before any slow work: the cache is not read yet."""
    grid, grid_names = grid or {}, grid_names or {}
    base = dataclasses.asdict(args.train)
    points = [{**base, **dict(zip(grid, values))} for values in itertools.product(*grid.values())]

    def how(field: str) -> str | None:
        return f"{grid_as(args)} {grid_names.get(field, field)}" if field in grid else given(args, f"train.{field}")

    def used(field: str) -> bool:  # a switch given off asks for nothing
        return how(field) is not None and (not isinstance(base[field], bool) or any(p[field] for p in points))

    for fields, applies, why in APPLIES_ONLY_WITH:
        if not any(applies(p) for p in points):  # a grid may vary the setting: some of its points use them
            for field in filter(used, fields):
                advice = {o: advised_as(args, how(field), o) for o in re.findall(r"(?<![\w-])--[a-z][\w-]*", why)}
                raise ConfigError(in_given_words(f"{how(field)}: {why}", {o: w for o, w in advice.items() if w}))
    # The default k_aux (256, the paper's 512) exceeds a small --n-latents: AuxK then takes every dead latent.
    if how("k_aux") is None:
        return
    for p in points:
        if p["k_aux"] > p["n_latents"]:  # each named as given, a file's entries after their file
            n_latents = how("n_latents") or advised_as(args, how("k_aux"), "--n-latents") or "--n-latents"
            how_given = {"--k-aux": how("k_aux"), "--n-latents": n_latents}
            latents = f"{p['n_latents']} {plural(p['n_latents'], 'latent')}"
            raise ConfigError(in_given_words(f"--k-aux: {p['k_aux']} exceeds the SAE's {latents} "
                                             f"(--n-latents); AuxK trains at most every dead latent: expected at "
                                             f"most {p['n_latents']}", how_given))


def advised_as(args: argparse.Namespace, lead: str, option: str) -> str | None:
    """How a refusal of the entry ``lead`` (as given) names a training option its advice gives ("--k"): the
    --config file's entry where a file set it; where nothing did, as ``lead``'s file writes it ("train.k") when
    ``lead`` came from one. None keeps the option, which the verb's errors spell as typed ("-k"; a switch typed
    off is still advised by its name)."""
    dest = f"train.{option[2:].replace('-', '_')}"
    words = given(args, dest)
    if words is None:
        return dest if given_parts(lead)[0] else None
    return words if given_parts(words)[0] else None


def grid_as(args: argparse.Namespace) -> str:
    """How the sweep's grid was given, to name its entries: "--grid" typed, or the --config file's entry
    ("--config c.yaml: grid"), as the file's other settings are named."""
    return given(args, "grid") or "--grid"


def add_quickstart(sub, recipe: str) -> None:
    p = add_verb(sub, "quickstart",
                 description="Harvest activations, train a top-k SAE, evaluate it on held-out text and write "
                             "OUT/report.md; every stage resumes when run again.")
    p.add_argument("--out", default=QUICKSTART_DIR, metavar="DIR", help=f"run folder (default: {QUICKSTART_DIR})")
    total = TrainConfig.from_recipe(recipe).total_tokens  # what --n-tokens left out trains on
    p.add_argument("--n-tokens", type=int, default=None, metavar="N",
                   help="training tokens, harvested and trained on (a small budget for a first try); "
                        f"sets --total-tokens and --harvest-n-tokens together (default: {total}, from --total-tokens)")
    p.add_argument("--overwrite-activations", action="store_true",
                   help="also harvest the activations again (--overwrite keeps the activation cache)")
    p.add_arguments(HarvestConfig, dest="harvest", prefix="harvest-")
    add_train_config(p, recipe)
    p.add_arguments(EvalConfig, dest="eval", prefix="eval-")
    p.add_argument("--json", action="store_true",
                   help="print the whole metrics.json (for scripts) instead of a short summary")
    add_io_options(p)
    p.set_defaults(handler=run_quickstart)


def run_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    train = args.train
    refuse_options_that_do_not_apply(args)
    if args.n_tokens is not None:
        train = _with_n_tokens(args, train)
    check_warmup(train, given(args, "train.warmup_steps"))  # quickstart harvests every training token: exact now
    if typed(args, "--harvest-n-tokens") and args.harvest.n_tokens < train.total_tokens:
        raise ConfigError(f"--harvest-n-tokens {args.harvest.n_tokens} is fewer than the {train.total_tokens:,} "
                          f"training tokens (--total-tokens), which quickstart harvests at least; --n-tokens "
                          f"{args.harvest.n_tokens} sets both")
    harvest_cfg = dataclasses.replace(args.harvest, n_tokens=args.n_tokens) if args.n_tokens else args.harvest
    cfg = QuickstartConfig(harvest=harvest_cfg, train=train, eval=args.eval)  # harvests max(n_tokens, total_tokens)
    from saelab.pipeline import quickstart  # torch, once the options are checked

    with eval_settings_as_given(args, "--eval-"):
        metrics = quickstart(cfg, args.out, device=args.device, model_dtype=args.model_dtype,
                             overwrite=args.overwrite, overwrite_activations=args.overwrite_activations,
                             progress=args.progress, log_to=args.log_to)
    if args.json:
        print(f"saelab quickstart: report: {Path(args.out) / 'report.md'}", file=sys.stderr)  # stdout: the JSON alone
        return metrics
    from saelab.report.markdown import run_summary

    print(run_summary(Path(args.out), metrics))
    return None


def _with_n_tokens(args: argparse.Namespace, train: TrainConfig) -> TrainConfig:
    """``train`` with quickstart's --n-tokens (typed, or a --config file's n_tokens) as its training tokens;
    the later refusals of either size it sets name it as given, not --total-tokens or --harvest-n-tokens."""
    how = {"--n-tokens": given(args, "n_tokens") or "--n-tokens",
           "--batch-size": given(args, "train.batch_size") or "--batch-size"}
    # --n-tokens sets both sizes: one also given on its own would be silently replaced (a file's is a default
    # that a typed --n-tokens overrides, but beside a file's n_tokens, both are the file's word)
    in_file = bool(given_parts(how["--n-tokens"])[0])
    for option, dest, value in (("--total-tokens", "train.total_tokens", train.total_tokens),
                                ("--harvest-n-tokens", "harvest.n_tokens", args.harvest.n_tokens)):
        if typed(args, option) or (in_file and given_parts(given(args, dest) or "")[0]):
            how[option] = given(args, dest) or option
            raise ConfigError(in_given_words(f"--n-tokens {args.n_tokens} and {option} {value} both set the tokens "
                                             "to harvest and train on; give --n-tokens only", how))
    if args.n_tokens < train.batch_size:
        raise ConfigError(in_given_words(f"--n-tokens {args.n_tokens} is less than one batch (--batch-size "
                                         f"{train.batch_size})", how))
    args.given_as.update(dict.fromkeys(("train.total_tokens", "harvest.n_tokens"), how["--n-tokens"]))
    return dataclasses.replace(train, total_tokens=args.n_tokens)


def add_harvest(sub) -> None:
    p = add_verb(sub, "harvest")
    p.add_argument("--out", required=True, metavar="DIR", help="cache folder")
    p.add_arguments(HarvestConfig, dest="harvest")
    add_io_options(p, sae=False)
    p.set_defaults(handler=run_harvest)


def run_harvest(args: argparse.Namespace) -> dict[str, Any]:
    from saelab.pipeline import harvest

    cache = harvest(args.harvest, args.out, device=args.device, model_dtype=args.model_dtype,
                    overwrite=args.overwrite, progress=args.progress)
    return {"cache": str(cache.folder), "rows": cache.n_rows, "d": cache.d}


def add_train(sub, recipe: str) -> None:
    p = add_verb(sub, "train",
                 description="Train one top-k SAE; an unfinished run in --out resumes. --recipe paper starts "
                             "from the paper's recipe (docs/training.md), options given override it.")
    p.add_argument("--activations", required=True, metavar="DIR", help="activation cache folder (saelab harvest)")
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (an unfinished run there is resumed)")
    add_train_config(p, recipe)
    add_io_options(p, model=False)  # training reads cached activations: no language model runs
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    refuse_options_that_do_not_apply(args)
    if given(args, "train.total_tokens"):  # the run's steps are known before the cache is read: it is never lowered
        check_warmup(args.train, given(args, "train.warmup_steps"))
    from saelab.data import ActivationCache  # torch, once the options are checked
    from saelab.pipeline import train_from_cache
    from saelab.train.distributed import init_from_env

    init_from_env()  # data-parallel when started by torchrun
    check_output_folder(args.out, "--out", "run")  # a wrong --out is named before the cache is read
    with _finished_by_harvest(args.activations):
        cache = ActivationCache(args.activations)
        train = _fit_to_cache(args, cache)
        check_warmup(train, given(args, "train.warmup_steps"))  # against the steps the run trains
        sae = train_from_cache(cache, args.out, train, device=args.device, overwrite=args.overwrite,
                               progress=args.progress, log_to=args.log_to)
    from saelab.sae.relu import sparsity_of

    return {"sae": str(Path(args.out) / "sae"), "n_latents": sae.n_latents, **sparsity_of(sae)}


def _fit_to_cache(args: argparse.Namespace, cache: ActivationCache, grid: dict[str, list] | None = None) -> TrainConfig:
    """The training settings, with a --total-tokens left at the recipe's default lowered to the rows of a cache
    that holds fewer (said in one line; train_config.json records it). One the user gave, or a sweep's grid
    sets, is kept, and refused here when the cache cannot hold it."""
    from saelab.train import distributed as ddp

    train = args.train
    if "total_tokens" in (grid or {}):  # every point sets it: the largest is the one to fit
        _refuse_a_budget_past_the_cache(args, cache, max(grid["total_tokens"]), grid)
        return train
    if given(args, "train.total_tokens") is not None:
        _refuse_a_budget_past_the_cache(args, cache, train.total_tokens)
        return train
    if cache.n_rows >= train.total_tokens:
        return train
    if cache.n_rows < train.batch_size:
        how = given(args, "train.batch_size") or "--batch-size"  # as given: typed, or a --config file's entry
        raise ConfigError(f"activation cache {args.activations!r} holds {cache.n_rows:,} {plural(cache.n_rows, 'row')},"
                          f" fewer than one batch ({how} {train.batch_size}); harvest more, or give a smaller "
                          f"{given_parts(how)[1]}")
    rows = cache.n_rows // train.batch_size * train.batch_size  # whole batches only: the rest is never trained on
    how = "all of them" if rows == cache.n_rows else f"{rows:,} of them, in whole batches of {train.batch_size:,}"
    if ddp.rank() == 0:
        print(f"saelab: activation cache {args.activations} holds {cache.n_rows:,} {plural(cache.n_rows, 'row')}, "
              f"fewer than the recipe's {train.total_tokens:,} training tokens; training on {how} (--total-tokens "
              f"{rows})", file=sys.stderr)
    return dataclasses.replace(train, total_tokens=rows)


def _refuse_a_budget_past_the_cache(args: argparse.Namespace, cache: ActivationCache, tokens: int,
                                    grid: dict[str, list] | None = None) -> None:
    """Refuse training ``tokens`` on a cache of fewer rows, naming the setting as given: its option as typed,
    a --config file's entry as the file's, a grid entry as written with its value ("--grid total_tokens=2048",
    "--config c.yaml: grid total_tokens=2048")."""
    if cache.n_rows >= tokens:
        return
    if grid is not None:
        name, values = typed_grid_words(args.grid)["total_tokens"]
        lead, entry = f"{grid_as(args)} {name}={values[grid['total_tokens'].index(tokens)]}: ", ""
        fewer = f"{name}={cache.n_rows}"
    else:
        lead, entry = given_parts(given(args, "train.total_tokens"))
        fewer = f"{entry} {cache.n_rows}"
    raise ConfigError(f"{lead}activation cache {args.activations!r} holds {cache.n_rows:,} "
                      f"rows but training needs {tokens:,}{f' ({entry})' if entry else ''}; harvest more or train "
                      f"on fewer tokens ({fewer} at most)")


@contextlib.contextmanager
def _finished_by_harvest(activations: str):
    """An unfinished --activations cache is finished by the harvest that was cut off, run again; the library's
    advice names a Python call."""
    from saelab.data import IncompleteCacheError

    try:
        yield
    except IncompleteCacheError as e:
        raise IncompleteCacheError(f"activation cache {activations!r} is incomplete ({e.rows:,} "
                                   f"{plural(e.rows, 'row')} written); run the same `saelab harvest --out "
                                   f"{shlex.quote(activations)} ...` command again to finish it", e.rows) from None


def add_sweep(sub, recipe: str) -> None:
    p = add_verb(sub, "sweep")
    p.add_argument("--activations", required=True, metavar="DIR", help="activation cache folder (saelab harvest)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the runs (one subfolder per grid point); the same command again resumes "
                        "unfinished runs and keeps finished ones")
    grid = p.add_argument("--grid", nargs="+", required=True, metavar="OPTION=V1,V2",
                          help="training options to vary, named without their leading dashes, e.g. "
                               "n-latents=1024,4096 k=16,32 lr=1e-3,3e-3")
    grid.check_file_value = _refuse_a_grid_not_listed  # a --config file's grid: refused in its own words
    p.add_argument("--eval", dest="evaluate", action="store_true", help="then evaluate every run (core metrics) and write the "
                                                       "scaling report (saelab report OUT)")
    add_train_config(p, recipe)
    p.add_arguments(EvalConfig, dest="eval", prefix="eval-")  # "eval" as in quickstart and eval
    add_io_options(p)
    p.set_defaults(handler=run_sweep)


def parse_grid(items: list[str], named: str = "--grid") -> dict[str, list]:
    """['n_latents=1024,4096', 'lr=1e-3'] -> {'n_latents': [1024, 4096], 'lr': [0.001]}, typed and each
    grid point validated as a TrainConfig. Refusals name an entry as written (n-latents or n_latents), after
    ``named``, how the grid was given: "--grid", or a --config file's entry "--config c.yaml: grid"."""
    _refuse_a_grid_not_listed(items, named)
    hints = typing.get_type_hints(TrainConfig)
    fields = [h for h in hints if h != "recipe"]
    grid: dict[str, list] = {}
    for item, name, field in _grid_entries(items):
        values = item.partition("=")[2]
        if field in fields and not values.strip(", "):
            raise ConfigError(f"{named} entry {item!r} gives no values; expected {name}=V1,V2")
        if field not in fields:
            spelled = [_spelled_as(f, name) for f in fields]
            raise ConfigError(f"{named} entry {item!r}: expected FIELD=V1,V2 with FIELD a training option such as "
                              f"{', '.join(_spelled_as(f, name) for f in ('n_latents', 'k', 'lr'))}"
                              f"{did_you_mean(_spelled_as(field, name), spelled)}")
        if field in grid:
            raise ConfigError(f"{named} names {name} twice; give its values once: {name}=V1,V2")
        if field == "batch_size":  # the runs read one stream of batches (train_many)
            raise ConfigError(f"{named} {item}: a sweep's runs train together on the same batches, so they share "
                              "one batch size; set it with --batch-size")
        grid[field] = [_grid_value(name, hints[field], v.strip(), named) for v in values.split(",")]
        if len(set(map(repr, grid[field]))) < len(grid[field]):  # k=8,8: one run, not the two it looks like
            raise ConfigError(f"{named} {item}: a value is listed twice; give each value once")
    return grid


def _refuse_a_grid_not_listed(items: Any, named: str) -> None:
    """A --config file's grid that is not a list of OPTION=V1,V2 strings: a string would be read letter by
    letter ("k=8,16" as entries k, =, 8, ...), a YAML mapping by its keys alone."""
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(item, str) for item in items):
        raise ConfigError(f'{named}: expected a list of OPTION=V1,V2 entries, quoted in YAML, e.g. ["k=16,32", '
                          f'"n-latents=1024"], got {items!r}')


def _grid_entries(items: list[str]) -> list[tuple[str, str, str]]:
    """(entry, its name as typed, the field it sets) of each --grid entry: 'n-latents=8' sets n_latents."""
    names = [item.partition("=")[0].strip() for item in items]
    return [(item, name, name.replace("-", "_")) for item, name in zip(items, names)]


def _spelled_as(field: str, typed_name: str) -> str:
    """``field`` as the user spells grid names: n_latents after an underscore, else n-latents (as --help)."""
    return field if "_" in typed_name else field.replace("_", "-")


def typed_grid_words(items: list[str]) -> dict[str, tuple[str, list[str]]]:
    """field -> (its name, its values) as typed in --grid: a refusal echoes 'n-latents=0' and 'lr=-1', not
    the parsed 'n_latents=0' and 'lr=-1.0'."""
    return {field: (name, [v.strip() for v in item.partition("=")[2].split(",")])
            for item, name, field in _grid_entries(items)}


def _grid_value(name: str, hint: Any, text: str, named: str) -> Any:
    choices = literal_choices(hint)
    if choices:
        if text not in choices:
            raise ConfigError(f"{named} {name}={text}: expected one of {', '.join(map(str, choices))}")
        return text
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = kinds[0]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{named} {name}={text}: expected true or false")
        return text.lower() in ("true", "1", "yes")
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ConfigError(f"{named} {name}={text}: expected {type_words(kind)}") from None  # as a --config file


def check_grid_points(base: TrainConfig, grid: dict[str, list], items: list[str],
                      given_as: dict[str, str] | None = None, named: str = "--grid") -> None:
    """Every grid point validated before anything trains; a refusal names the grid entries the user wrote
    after ``named`` ("--grid n-latents=0: ...", "--grid k=9000 exceeds --n-latents 8192", "--config c.yaml:
    grid k=9000 ..."), not options never given, and each other setting as ``given_as`` says it was given
    ({"train.k": "--config c.yaml: train.k"})."""
    words = typed_grid_words(items)
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        try:  # a warmup too: a point's steps only fall when fitted to the cache, so a refusal now is one then
            # named as the point's total_tokens where the grid sets them (reworded below as the entry typed)
            check_warmup(dataclasses.replace(base, **point),
                         run=f"total_tokens={point['total_tokens']}" if "total_tokens" in point else None)
        except ConfigError as e:
            typed_point = {field: f"{named} {words[field][0]}={words[field][1][grid[field].index(value)]}"
                           for field, value in point.items()}
            raise ConfigError(_as_grid_entries(str(e), typed_point, given_as or {})) from None


def _as_grid_entries(message: str, typed_point: dict[str, str], given_as: dict[str, str]) -> str:
    """A TrainConfig refusal in the words of the sweep: a field the grid sets as its entry ("--grid k=9000"),
    one a --config file set as the file's entry ("--config c.yaml: train.k 700 exceeds ..."), any other as
    its option ("--n-latents 8192"). A rule about one grid field opens with its entry:
    "n_latents must be >= 1, got 0" -> "--grid n-latents=0: must be >= 1"."""
    fields = set(typing.get_type_hints(TrainConfig))

    def otherwise(field: str) -> str | None:  # a setting the grid leaves: as it was given, else its option
        return given_as.get(f"train.{field}", f"--{field.replace('_', '-')}") if field in fields else None

    return in_given_words(message, typed_point, otherwise)


def refuse_options_the_grid_sets(args: argparse.Namespace, grid: dict[str, list]) -> None:
    """A training option given on the command line and also swept would be silently replaced (one
    from --config is a default that the grid overrides, as the command line overrides the file)."""
    lead, entry = given_parts(grid_as(args))  # a file's grid: its file first, as its other entries
    for name in grid:
        option = given(args, f"train.{name}")  # as typed: "-k" too
        if option is not None and not option.startswith("--config "):
            raise ConfigError(f"{lead}{option} {getattr(args.train, name)} and {entry} {name}=... both set {name}; "
                              "give it once (in the grid)")


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    grid = parse_grid(args.grid, grid_as(args))
    grid_names = {field: name for field, (name, _) in typed_grid_words(args.grid).items()}
    refuse_options_that_do_not_apply(args, grid, grid_names)
    unused = typed_starting(args, "--eval-", "--model-dtype") if not args.evaluate else []  # the model runs in --eval
    if unused:
        raise ConfigError(f"{unused[0]} sets the evaluation that --eval runs; add --eval, or leave it out")
    refuse_options_the_grid_sets(args, grid)
    check_grid_points(args.train, grid, args.grid, getattr(args, "given_as", {}), grid_as(args))
    check_output_folder(args.out, "--out", "sweep")  # a wrong --out is named before the cache is read
    from saelab.data import ActivationCache  # torch, once the options are checked
    from saelab.pipeline import check_evaluation_before_training, evaluate_sweep, sweep_from_cache
    from saelab.report import write_scaling_report
    from saelab.train import distributed as ddp
    from saelab.train.distributed import init_from_env

    with _finished_by_harvest(args.activations), eval_settings_as_given(args, "--eval-"):
        init_from_env()
        cache = ActivationCache(args.activations)
        base = _fit_to_cache(args, cache, grid)
        contexts_read = None
        if args.evaluate:  # not after the whole sweep trained; the contexts it reads are the evaluation's
            contexts_read = check_evaluation_before_training(args.activations, args.eval)
        # names only: the SAEs stay out of the evaluation's device memory (it reads each from its run)
        names = list(sweep_from_cache(cache, args.out, base, grid, device=args.device,
                                      overwrite=args.overwrite, progress=args.progress, log_to=args.log_to))
    if args.evaluate and ddp.rank() == 0:  # under torchrun one process evaluates; the others are done
        hashes = SaeHashes()  # the evaluation's hashes of the SAEs serve the scaling study: each read once
        with eval_settings_as_given(args, "--eval-"):
            evaluate_sweep(args.out, args.eval, device=args.device, model_dtype=args.model_dtype,
                           overwrite=args.overwrite, progress=args.progress, sae_hashes=hashes,
                           contexts_read=contexts_read)
        write_scaling_report(args.out, sae_hashes=hashes)
    return {name: str(Path(args.out) / name / "sae") for name in names}
