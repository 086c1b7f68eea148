"""`saelab steer | browse | families`: shells over saelab.explore."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

from saelab.cli.common import (add_io_options, add_model_option, add_sae_argument, add_verb, finite_float, given,
                               nonnegative_int, positional_indices, positive_int, typed, unknown_options)
from saelab.errors import ConfigError, CorpusError
from saelab.explore.config import STEER_MODES, BrowseConfig
from saelab.explore.positions import comma_items, index_list, parse_positions
from saelab.run_folder import BROWSER_DIR, check_output_folder, is_run, is_sweep, open_sae
from saelab.sae.config import check_latents_once
from saelab.utils.config import given_parts
from saelab.utils.hub import local_path
from saelab.utils.words import plural


def _int_list(text: str) -> list[int]:
    try:
        values = index_list(text)  # the reader --positions shares
        check_latents_once(values, text)  # "5,5", refused as steer and top refuse [5, 5] in Python
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return values


def _positions_text(text: str) -> str:
    """--positions as typed, once it reads as positions: a --config file's 5 or [3, 7, 9] is then given as
    "5" or "3,7,9", as --latent's is. Kept as text: its refusals after the parse (_check_generation) show it so."""
    try:
        parse_positions(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _float_list(text: str) -> list[float]:
    try:
        items = comma_items(text, "numbers")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return [finite_float(t) for t in items]


def add_steer(sub) -> None:
    p = add_verb(sub, "steer")
    p.reads_as = frozenset({"eval"})  # --scale's text drawn as eval draws its own: --eval-sample-pool-tokens is its own
    add_sae_argument(p, "the SAE to steer through:")
    latent = p.add_argument("--latent", type=_int_list, required=True,
                            help="latent index; several, comma-separated ('12,40'), are steered together")
    latent.several = "--latent 3,4"  # how a repeat's refusal says to give several (Parser)
    p.add_argument("--mode", choices=STEER_MODES, default="add",
                   help="add: raise the latent by --value (its decoder direction added to the activation at the "
                        "hook, times each token's std for an SAE that normalizes its input); clamp: set the latent "
                        "to --value through the SAE (error term kept); ablate: clamp to 0")
    p.add_argument("--value", type=_float_list, default=None,
                   help="the value, in the latent's own units (those of its activations, as top shows them): "
                        "what add raises it by, what clamp sets it to; one number, or one per latent "
                        "comma-separated. Add and clamp need --value or --scale")
    p.add_argument("--scale", type=_float_list, default=None,
                   help="the value as a multiple of the latent's largest activation on held-out text (e.g. 2 "
                        "adds twice its max, in the latent's own units; measured on --scale-tokens tokens of the "
                        "eval split, drawn from its first --sample-pool-tokens)")
    p.add_argument("--scale-tokens", type=positive_int, default=65_536,
                   help="tokens read to find each latent's max activation for --scale")
    add_sample_pool_option(p)  # of --scale's text, as top's of its own
    p.add_argument("--prompt", default="I think that", help="text to continue (BOS is prepended)")
    p.add_argument("--positions", type=_positions_text, default="all",
                   help="absolute token positions to edit, 0 = BOS: 'all', '5', '3,7,9', '1:' (generated tokens "
                        "included), '2:10' or '1::2' (every second, as a Python slice). 'all' leaves out position 0 "
                        "when the SAE was trained without it, as its splice does; '0:' edits it too")
    p.add_argument("--max-new-tokens", type=positive_int, default=40, help="tokens to generate")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=finite_float, default=0.8, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=finite_float, default=0.95, help="nucleus sampling threshold, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (the same for both generations)")
    p.add_argument("--samples", type=positive_int, default=1,
                   help="pairs of generations, with seeds --seed, --seed + 1, ...")
    add_model_option(p)
    p.add_argument("--hook", default=None, help="override the SAE's hook name")
    p.add_argument("--top-tokens", type=int, default=10,
                   help="also print the tokens the latent's decoder direction promotes most (0: skip)")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of text")
    add_io_options(p, overwrite=False)
    p.set_defaults(handler=run_steer)


FLOAT32_MAX = 3.4028234663852886e38
"""The largest float32: a steering value past it becomes inf in the activations, and the text NaN."""


def _check_steer(args: argparse.Namespace):
    if args.value is not None and args.scale is not None:
        raise ConfigError("give --value or --scale, not both")
    # each as given, typed or a --config file's entry (the refusal then names the entry)
    if given(args, "scale_tokens") and args.scale is None:
        raise ConfigError("--scale-tokens is the text read to measure --scale; add --scale, or leave it out")
    if given(args, "sample_pool_tokens") and args.scale is None:
        lead, entry = given_parts(given(args, "sample_pool_tokens"))
        raise ConfigError(f"{lead}{entry} is the pool --scale's text is drawn from; add --scale, or leave it out")
    sampling = [o for o in ("--temperature", "--top-p", "--seed") if given(args, o[2:].replace("-", "_"))]
    if args.greedy and sampling:
        raise ConfigError(f"--greedy picks the likeliest token: it takes no {sampling[0]}")
    if args.greedy and args.samples > 1:
        raise ConfigError(f"--greedy gives the same text in every sample: --samples {args.samples} would repeat it")
    amount = args.value if args.value is not None else args.scale
    option = "--value" if args.value is not None else "--scale"
    # steered as float32: inf, then NaN. A layernorm SAE's std(x) factor is known only as the model runs, and is
    # checked there (Steering._check_in_range); this is the refusal that needs no model.
    if amount is not None and any(abs(v) > FLOAT32_MAX for v in amount):
        raise ConfigError(f"{option} {','.join(f'{v:g}' for v in amount)}: expected numbers within float32's range "
                          f"(|x| <= {FLOAT32_MAX:.4g}), which the activations are steered in")
    if args.mode == "ablate" and amount is not None:
        raise ConfigError("--mode ablate sets the latent to 0: it takes no --value or --scale")
    if args.mode != "ablate" and amount is None:
        raise ConfigError(f"--mode {args.mode} needs --value (or --scale)")
    if not -2**63 <= args.seed <= 2**63 - args.samples:  # torch's seed range, for every sample's seed
        raise ConfigError(f"--seed {args.seed}: expected an integer in -2^63..2^63 - {args.samples}")
    n = len(args.latent)
    if amount is not None and len(amount) not in (1, n):
        raise ConfigError(f"{option} has {len(amount)} numbers for {n} {plural(n, 'latent')}; expected 1 number"
                          + (f", or one per latent ({n})" if n > 1 else ""))
    if not args.greedy and args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_tokens < 0:
        raise ConfigError(f"--top-tokens must be >= 0, got {args.top_tokens}")
    return parse_positions(args.positions)  # read by its type (_positions_text): only the positions are new


def _checked_sae(args: argparse.Namespace, hook: str | None = None):
    """The SAE named by ``args.sae`` (its latents ``args.latent`` and its hook checked) and its model's spec;
    the checks against the model's config (``check_before_load``) are the caller's, run once."""
    from saelab.run_folder import check_sae_hook, model_for

    sae, _ = open_sae(args.sae, allow_http=args.allow_http)
    args.trained_at = sae.cfg.hook_name  # what _note_another_hook_or_model compares --hook with
    if hook:
        sae.cfg.hook_name = hook
    bad = [i for i in args.latent if i >= sae.n_latents]
    if bad:
        raise ConfigError(f"--latent {','.join(map(str, bad))} {'is' if len(bad) == 1 else 'are'} out of range: "
                          f"{args.sae} has latents 0..{sae.n_latents - 1}")
    check_sae_hook(sae, args.sae)
    spec = args.model or model_for(sae, args.sae)  # once: an SAE that records no model is warned about once
    return sae, spec


def _loaded(args: argparse.Namespace, sae, spec: str, tokenizer=None):
    """The SAE beside its model, loaded with ``tokenizer`` when the checks read it already (not read again)."""
    from saelab.models import load_model

    lm = load_model(spec, device=args.device, dtype=args.model_dtype, tokenizer=tokenizer,
                    progress=args.progress)
    return sae.to(lm.device), lm  # steering splices the SAE into the model's forward: same device


def _note_another_hook_or_model(args: argparse.Namespace, sae) -> None:
    """Say that --hook reads the SAE at another hook than it was trained at, or --model on another model than it
    records: a near miss (blocks.8 for blocks.9) gives plausible-looking output. Called once every check has passed;
    an SAE that records no hook has none to compare with (--hook is required for it), nor one that records no model."""
    from saelab.explore.browser.build import another_hook_words, another_model_words

    if args.trained_at and sae.cfg.hook_name != args.trained_at:  # browse and families: note_another_hook
        print(f"saelab {args.verb}: note: {another_hook_words(sae.cfg.hook_name, args.sae, args.trained_at)}",
              file=sys.stderr)
    words = another_model_words(args.model, args.sae, sae)  # browse and families: note_another_model
    if words:
        print(f"saelab {args.verb}: note: {words}", file=sys.stderr)


def _check_generation(args: argparse.Namespace, positions, tokenizer, model) -> None:
    """Refuse --positions that no step of the generation can reach, and a prompt and --max-new-tokens longer together
    than the model's context (``model``: its spec, whose config may be on disk before the load, or the loaded model):
    generating past it fails, or runs for ever, only after the load. A None tokenizer (not on disk before the load)
    leaves the checks to the call after the load."""
    from saelab.explore.positions import first_past
    from saelab.explore.steering import prompt_length
    from saelab.models import LanguageModel, check_context_fits

    if tokenizer is None:
        return
    n_prompt = prompt_length(tokenizer, args.prompt)
    last = n_prompt + args.max_new_tokens - 2  # the last new token is sampled, never read back
    past = first_past(positions, last)
    if past is not None:
        raise ConfigError(f"--positions {args.positions}: position {past} is never reached; the largest reachable is "
                          f"{last} (a prompt of {n_prompt} {plural(n_prompt, 'token')} with BOS, then --max-new-tokens "
                          f"{args.max_new_tokens}, the last of which the model never reads)")
    named = (f"--max-new-tokens {args.max_new_tokens} after the prompt ({n_prompt} {plural(n_prompt, 'token')} with "
             "BOS; the model reads {n} of them, all but the last new one)")
    if isinstance(model, LanguageModel):
        model.check_context_size(last + 1, named)
    else:
        check_context_fits(model, last + 1, named)


def _check_or_cut_top_tokens(args: argparse.Namespace, vocab_size: int | None) -> None:
    """Refuse a --top-tokens past the model's vocabulary: the list would be all of it, on one line; the default
    is cut to a smaller vocabulary's size. A None ``vocab_size`` (no config on disk before the load) leaves the
    check to the call after the load."""
    if vocab_size is None or args.top_tokens <= vocab_size:
        return
    if given(args, "top_tokens") is None:
        args.top_tokens = vocab_size
    else:
        lead, entry = given_parts(given(args, "top_tokens"))
        raise ConfigError(f"{lead}{entry} {args.top_tokens}: expected at most the model's vocabulary size, "
                          f"{vocab_size:,} tokens")


def _steer_sae_and_model(args: argparse.Namespace, positions):
    """The SAE named by ``args.sae``, checked (``_checked_sae``), and its language model, with --positions checked
    against the prompt before the load when the model's tokenizer can be had without it (a hub model's fetched
    alone), and --top-tokens against the vocabulary its config gives, else right after it (before any
    generation). --scale's eval text is read as top reads its corpus (``load_model_beside``: a --scale-tokens
    past the eval split refused before the load where it can be) and returned too, its contexts drawn from
    --sample-pool-tokens (``DrawnContexts``); None without --scale."""
    from saelab.models import check_before_load, tokenizer_before_load
    from saelab.models.loading import configured_vocab_size

    sae, spec = _checked_sae(args, args.hook)

    def before_load(tokenizer) -> None:  # after check_before_load, which fetches a hub model's config alone
        _check_generation(args, positions, tokenizer, spec)
        _check_or_cut_top_tokens(args, configured_vocab_size(spec))

    if args.scale is not None:
        lm, drawn = _scale_text_and_model(args, sae, spec, before_load)
    else:
        check_before_load(spec, sae.cfg.hook_name, sae=sae)
        tokenizer = tokenizer_before_load(spec)
        before_load(tokenizer)
        sae, lm = _loaded(args, sae, spec, tokenizer)
        drawn = None
    _check_generation(args, positions, lm.tokenizer, lm)
    _check_or_cut_top_tokens(args, lm.vocab_size)  # the rows of its unembedding, which the list ranks
    return sae, lm, drawn


def _scale_text_and_model(args: argparse.Namespace, sae, spec: str, before_load):
    """The model (the SAE moved beside it) and --scale's eval text in the SAE's context, which no option of steer
    changes; ``before_load`` checks the options with the tokenizer read before the load."""
    from saelab.explore.browser.build import SAESource
    from saelab.explore.browser.make import load_model_beside

    source = SAESource(args.sae, args.sae, sae)
    with _within_the_corpus("--scale-tokens", args.scale_tokens, None):
        return load_model_beside(spec, _scale_text(args), [source], [source], sae.cfg.hook_name, args.device,
                                 args.model_dtype, context_setting=None, check_tokenizer=before_load,
                                 progress=args.progress)


def _scale_text(args: argparse.Namespace) -> BrowseConfig:
    """What --scale's text is: --scale-tokens of the eval split, drawn as top draws its own."""
    return BrowseConfig(n_tokens=args.scale_tokens, sample_pool_tokens=args.sample_pool_tokens)


@contextlib.contextmanager
def _within_the_corpus(option: str, value: int, corpus: str | None, n_saes: int = 1):
    """More tokens asked for than the corpus holds (``read_tokens``' CorpusError with ``max_tokens``): said as
    the option that asked (as typed) and the most it can be (for ``n_saes`` > 1, the most each can score)."""
    try:
        yield
    except CorpusError as e:
        if not getattr(e, "max_tokens", 0):  # an empty or unreadable corpus: its own words
            raise
        text = "the eval split" if corpus is None else f"the corpus {corpus}"
        reader = "each SAE" if n_saes > 1 else "the SAE"
        lead, entry = given_parts(option)  # a --config file's entry: "--config c.json: browse.n_tokens"
        raise ConfigError(f"{lead}{entry} {value:,}: {text} holds {e.max_tokens:,} {plural(e.max_tokens, 'token')} "
                          f"{reader} reads; expected {entry} {e.max_tokens} at most") from None


def _n_tokens_option(args: argparse.Namespace) -> str:
    """browse's --n-tokens as the user gave it: the option as typed, or the --config file's entry."""
    return given(args, "browse.n_tokens") or "--n-tokens"


def _steer_value(args: argparse.Namespace, sae, lm, drawn) -> tuple[list[float] | float, list[dict[str, Any]]]:
    """--value as given, or --scale times each latent's max activation on held-out text (``drawn``, read
    beside the load), with what each value was scaled from (none for --value): the text's tokens and how its
    contexts were drawn too."""
    from saelab.explore import top_activations
    from saelab.explore.browser.build import contexts_drawn

    if args.scale is None:
        return (args.value if args.value is not None else 0.0), []
    tops = top_activations(sae, lm, drawn, args.latent, 1, progress=args.progress)  # the max, with its count
    maxima, scored = [t.max_activation for t in tops], tops[0].n_tokens  # whole contexts: a few past the option
    scales = args.scale * len(args.latent) if len(args.scale) == 1 else args.scale
    values = [f * m for f, m in zip(scales, maxima)]
    past = [(i, f, m) for i, f, m in zip(args.latent, scales, maxima) if abs(f * m) > FLOAT32_MAX]
    if past:
        i, f, m = past[0]
        raise ConfigError(f"--scale {f:g} times latent {i}'s max activation {m:.4g} is past float32's range "
                          f"(|x| <= {FLOAT32_MAX:.4g}), which the activations are steered in; pass a smaller --scale")
    silent = [i for i, m in zip(args.latent, maxima) if m <= 0]
    if silent:  # --scale of a latent that never fired steers by 0: say so instead of showing no effect
        print(f"saelab steer: warning: latent(s) {silent} never fired on {scored:,} eval tokens, so --scale "
              "gives them a value of 0; pass --value, or more --scale-tokens", file=sys.stderr)
    words = contexts_drawn(_scale_text(args), drawn.tokens.numel())
    return values, [{"latent": i, "max_activation": m, "eval_tokens": scored, "contexts_drawn": words, "scale": f,
                     "value": v} for i, m, f, v in zip(args.latent, maxima, scales, values)]


def _quoted(token: str) -> str:
    """A token in quotes, escaped as top shows it: repr() doubled the backslash of a byte ('\\x9f'); a quote in it
    escaped, or "'='" and "'" "='" would read alike."""
    from saelab.utils.words import ESCAPED

    return "'" + token.translate({**ESCAPED, ord("'"): "\\'"}) + "'"


def run_steer(args: argparse.Namespace) -> dict[str, Any] | None:
    positions = _check_steer(args)
    from saelab.explore.attribution import latent_logit_effects  # torch, once the options are checked
    from saelab.explore.steering import generate_with_and_without, steer

    sae, lm, drawn = _steer_sae_and_model(args, positions)
    value, scaled = _steer_value(args, sae, lm, drawn)
    s = steer(lm, sae, args.latent, args.mode, value, positions)
    model = lm.known_as  # the hub id of the offline default, as reports name it
    text = [f"model {model}, SAE {args.sae} ({sae.n_latents} {plural(sae.n_latents, 'latent')} at {s.hook})"]
    text += [f"latent {r['latent']}: max activation {r['max_activation']:.4g} on {r['eval_tokens']:,} eval tokens, "
             f"value {r['value']:.4g}; contexts {r['contexts_drawn']}" for r in scaled]
    promoted = {}
    for i in s.latents.tolist() if args.top_tokens > 0 else []:
        promoted[i] = [t for t, _, _ in latent_logit_effects(lm, sae, i, top=args.top_tokens)["promoted"]]
        text.append(f"latent {i} promotes: {' '.join(_quoted(t) for t in promoted[i])}")
    results = []
    for j in range(args.samples):
        gen = generate_with_and_without(lm, args.prompt, s, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                                        temperature=args.temperature, top_p=args.top_p, seed=args.seed + j)
        text += ["", f"=== sample {j + 1} (seed {args.seed + j}) ===" if args.samples > 1 else None, gen.format()]
        results.append({"seed": None if args.greedy else args.seed + j,  # greedy decoding draws nothing
                        "clean": gen.clean, "steered": gen.steered})
    _note_another_hook_or_model(args, sae)  # once the steered forward has passed its range check
    if not s.positions_edited:  # reachable positions the generation never got to: it stopped at EOS first
        print(f"saelab steer: warning: --positions {args.positions} lie past the {s.tokens_seen} "
              f"{plural(s.tokens_seen, 'position')} the model read (the generation ended early, at the end-of-text "
              "token): nothing was steered", file=sys.stderr)
    result = {"prompt": args.prompt, "steering": s.describe(), "promoted_tokens": promoted, "generations": results,
              **({"scale": scaled} if scaled else {})}
    if args.json:
        return result
    print("\n".join(line for line in text if line is not None))
    return None


def add_browse(sub) -> None:
    p = add_verb(sub, "browse")
    p.reads_as = frozenset({"eval"})  # its text read as eval reads its own: --eval-corpus is its --corpus
    add_sae_argument(p, "one or more SAEs, each", several=True,
                     also="; several SAEs on one hook also get their feature families")
    p.add_argument("--out", default=None, metavar="DIR", help="site folder (default: RUN/browser for a run folder)")
    p.add_argument("--serve", action="store_true",
                   help="serve the site on 127.0.0.1 after building it (a site of the same settings whose inputs "
                        "cannot be compared, without a local key, is served as it is)")
    p.add_argument("--port", type=int, default=8000, help="port for --serve, 1..65535 (0: any free port)")
    p.add_argument("--export", nargs=2, metavar=("FORMAT", "OUT"), default=None,
                   help="instead of the site, write the latents' pages for another viewer: 'neuronpedia OUT' "
                        "writes SAEDashboard's Neuronpedia batch files (batch-N.json) into the folder OUT")
    p.add_argument("--model-id", default=None, metavar="ID",
                   help="with --export neuronpedia: the model's Neuronpedia id, 2 to 32 of a-z 0-9 - . from a letter "
                        "to a letter or digit, without '--' or '..' (e.g. gpt2-small; default: the model's name, made "
                        "to follow this rule)")
    p.add_argument("--sae-set", default=None, metavar="NAME",
                   help="with --export neuronpedia, one SAE: its Neuronpedia SAE set, 1 to 64 of a-z 0-9 - _ . "
                        "from a letter or digit to one, without '__' (e.g. res-jb; its pages are MODEL/LAYER-NAME; "
                        "default: from the SAE's name)")
    p.add_arguments(BrowseConfig, dest="browse")
    add_io_options(p)
    p.set_defaults(handler=run_browse)


def _default_out(sources: list[str]) -> Path:
    if is_run(sources[0]):
        return Path(sources[0]) / BROWSER_DIR
    if is_sweep(sources[0]):
        open_sae(sources[0], several=True)  # names the sweep's runs: they are what to browse
    if "://" in sources[0]:
        raise ConfigError(f"{sources[0]} is not a run folder; pass --out for the site folder")
    local = local_path(sources[0])
    if local is None:
        raise ConfigError(f"{sources[0]!r}: no such file or folder; expected a run folder or an SAE")
    open_sae(sources[0])  # what is no SAE at all (an activation cache, say) is named as such first
    run = local.parent
    its_run = f", or browse its run folder {run}" if is_run(run) else ""
    raise ConfigError(f"{sources[0]} is not a run folder; pass --out for the site folder{its_run}")


def _check_port(port: int) -> None:
    """Fail before a long build when the port is out of range or cannot be bound."""
    from saelab.explore.browser.serve import HOST, ServeError

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise ServeError(f"port {port} on {HOST} is in use; pass another --port (or 0 for any free port)") from e


def run_browse(args: argparse.Namespace) -> dict[str, Any]:
    if args.export:
        return _export(args)
    for dest in ("model_id", "sae_set"):
        if getattr(args, dest) is not None:
            raise ConfigError(f"{given(args, dest)} names the Neuronpedia export's pages; add --export neuronpedia OUT, "
                              "or leave it out")
    if args.serve:
        _check_port(args.port)  # before a long build, not after it
    elif given(args, "port"):  # typed, or a --config file's entry (then named so)
        raise ConfigError("--port is the port of --serve; add --serve, or leave it out")
    if len(args.sae) < 2 and typed(args, "--family-min-score"):
        raise ConfigError("--family-min-score scores the feature families between SAEs of different sizes; browse "
                          "two or more, or leave it out")
    if typed(args, "--n2g-padding-token") and not args.browse.n2g_n_latents:
        raise ConfigError("--n2g-padding-token pads the N2G explanations that --n2g-n-latents builds; add "
                          "--n2g-n-latents N, or leave it out")
    out = check_output_folder(args.out, "--out") if args.out else _default_out(args.sae)
    from saelab.explore.browser import build_browser, serve_site  # torch, once the options are checked

    with _within_the_corpus(_n_tokens_option(args), args.browse.n_tokens, args.browse.corpus, len(args.sae)):
        result = build_browser(args.sae, out, args.browse, device=args.device, model_dtype=args.model_dtype,
                               overwrite=args.overwrite, progress=args.progress, allow_http=args.allow_http,
                               given_as=lambda setting: given(args, setting),  # an 8 typed is not the default 8
                               keep_uncompared=args.serve)  # to serve: kept as it is, with a warning
    summary = {"site": result["site"], "reused": result["reused"], "n_tokens": result["n_tokens"],
               "saes": result["saes"], "seconds": result["seconds"]}
    if result["reused"] and not result.get("uncompared"):  # the same command again, as families and export say
        print(f"{out} already holds this feature browser site (--overwrite builds it again)", file=sys.stderr)
    if not args.serve:
        return summary
    print(json.dumps(summary, indent=2))  # before serving, once: Ctrl-C ends the command
    serve_site(out, args.port)
    return None


def _export(args: argparse.Namespace) -> dict[str, Any]:
    fmt, out = args.export
    if fmt != "neuronpedia":
        raise ConfigError(f"--export {fmt!r}: the formats are: neuronpedia")
    if args.serve:
        raise ConfigError("--export writes files for another viewer; --serve serves the site: pass one of them")
    if args.out:
        raise ConfigError(f"--out is the site's folder; --export writes into its own OUT, {out!r}: leave --out out")
    if typed(args, "--port"):
        raise ConfigError("--port is the port of --serve; the Neuronpedia export does not use it")
    unused = _typed_fields(args, SITE_ONLY)
    if unused:
        raise ConfigError(f"{unused[0]} shapes the browser's pages (browse without --export); the Neuronpedia "
                          "export does not use it")
    from saelab.explore.browser.export import check_neuronpedia_ids, export_neuronpedia_run, refuse_explanations

    refuse_explanations(args.browse, lambda setting: given(args, setting))  # a --config entry named as the file has it
    check_neuronpedia_ids(args.model_id, args.sae_set, (given(args, "model_id"), given(args, "sae_set")))
    if args.sae_set is not None and len(args.sae) > 1:  # each SAE's pages would take the same address
        raise ConfigError(f"{given(args, 'sae_set')} {args.sae_set}: names one SAE's set, and {len(args.sae)} SAEs "
                          "were given; export each SAE with its own --sae-set, or leave it out (each SAE's set is "
                          "then its name)")
    check_output_folder(out, "--export OUT")
    # the export loads the model itself, after its own checks of the targets, hook and corpus
    with _within_the_corpus(_n_tokens_option(args), args.browse.n_tokens, args.browse.corpus, len(args.sae)):
        result = export_neuronpedia_run(args.sae, out, args.browse, device=args.device, model_dtype=args.model_dtype,
                                        progress=args.progress, overwrite=args.overwrite, model_id=args.model_id,
                                        sae_set=args.sae_set, allow_http=args.allow_http)
    if all(r["reused"] for r in (result if isinstance(result, list) else [result])):  # the same command again
        print(f"{out} already holds this Neuronpedia export (--overwrite writes it again)", file=sys.stderr)
    return {"export": "neuronpedia", "out": out, "saes": result}


def add_sample_pool_option(p) -> None:
    """--sample-pool-tokens of top, and of steer's --scale text: the text read as the browser reads its own."""
    p.add_argument("--sample-pool-tokens", type=nonnegative_int, default=BrowseConfig.sample_pool_tokens,
                   help="the contexts are drawn at random (seed 0) from the corpus's first this many tokens, as "
                        "`saelab eval` draws its contexts; 0: the first contexts, in order (default: 4,194,304, all "
                        "of the eval split)")


def add_top(sub) -> None:
    p = add_verb(sub, "top", description="The top-activating contexts of one or more latents on held-out text. Each "
                                         "context is numbered by its place in the corpus (ctx N in the text, "
                                         "\"context\" in --json): N counts the contexts packed from the corpus's "
                                         "start, from 0, whether they were drawn at random or read in order.")
    p.reads_as = frozenset({"eval"})  # its text read as eval reads its own: --eval-corpus is its --corpus
    add_sae_argument(p, "the SAE whose latents to show:")
    latent = p.add_argument("--latent", type=_int_list, required=True,
                            help="latent index; several, comma-separated ('12,40'), are shown one after the other")
    latent.several = "--latent 3,4"  # how a repeat's refusal says to give several (Parser)
    p.add_argument("-n", "--n-contexts", type=positive_int, default=10,
                   help="contexts per latent, at most the contexts read (default: 10)")
    p.add_argument("--n-tokens", type=positive_int, default=262_144,
                   help="tokens of text read, rounded up to whole contexts (default: 262,144)")
    p.add_argument("--corpus", default=None, help="text to read (default: the offline Wikipedia eval split)")
    add_sample_pool_option(p)
    add_model_option(p)
    p.add_argument("--hook", default=None, help="the hook the SAE reads (default: the one it records)")
    p.add_argument("--json", action="store_true", help="print one JSON object (for scripts) instead of text")
    add_io_options(p, overwrite=False)
    p.check_words = _check_top_order
    p.set_defaults(handler=run_top)


def _looks_like_latents(word: str) -> bool:
    return any(c.isdigit() for c in word) and all(c.isdigit() or c in ", " for c in word)


def _check_top_order(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Refuse `top 5 RUN` (the latent first, as `top` took it before it took the SAE first like steer) and
    `top RUN 5`, showing the command in the current form, before argparse reports a missing --latent."""
    if "--" in argv or "--latent" in argv or any(a.startswith("--latent=") for a in argv):
        return
    if unknown_options(parser, argv):  # its value would read as a positional: argparse names it, with a close match
        return
    at = positional_indices(parser, argv)
    if len(at) != 2 or not any(_looks_like_latents(argv[i]) for i in at):
        return
    latent, sae = at if _looks_like_latents(argv[at[0]]) else at[::-1]
    fixed = argv[:at[0]] + [argv[sae], "--latent", argv[latent]] + argv[at[0] + 1:at[1]] + argv[at[1] + 1:]
    parser.error(f"the SAE comes first and the latents follow --latent: {shlex.join(['saelab', 'top', *fixed])}")


def run_top(args: argparse.Namespace) -> dict[str, Any] | None:
    from saelab.data import resolve_corpus
    from saelab.explore import top_activations
    from saelab.explore.browser.build import SAESource, contexts_drawn
    from saelab.explore.browser.make import load_model_beside
    from saelab.explore.top import check_k

    resolve_corpus(args.corpus, "eval")  # a missing corpus is named before the model loads
    sae, spec = _checked_sae(args, args.hook)
    if given(args, "n_contexts"):  # a default past a short text is kept: it lists fewer
        check_k(args.n_contexts, sae, args.n_tokens,
                (given(args, "n_contexts"), given(args, "n_tokens") or "--n-tokens"))
    source = SAESource(args.sae, args.sae, sae)
    with _within_the_corpus("--n-tokens", args.n_tokens, args.corpus):
        # the library's own checks and read before the load, on the device asked for; None: top reads the SAE's
        # context, which no option changes (a context the model cannot take is refused in the SAE's words)
        cfg = BrowseConfig(n_tokens=args.n_tokens, corpus=args.corpus, sample_pool_tokens=args.sample_pool_tokens)
        lm, drawn = load_model_beside(spec, cfg, [source], [source], sae.cfg.hook_name, args.device,
                                      args.model_dtype, context_setting=None, progress=args.progress)
        _note_another_hook_or_model(args, sae)
        # a -n given past the contexts read was refused above; the default lists them all
        results = top_activations(sae, lm, drawn, list(args.latent), args.n_contexts, progress=args.progress)
    for r in results:  # read here, given to top_activations drawn: said as the corpus was read
        r.contexts_drawn = contexts_drawn(cfg, drawn.tokens.numel())
    if args.json:
        return {"sae": args.sae, "latents": [r.to_dict() for r in results]}
    print("\n\n".join(r.to_text() for r in results))
    return None


def add_families(sub) -> None:
    p = add_verb(sub, "families")
    p.reads_as = frozenset({"eval"})  # its text read as eval reads its own: --eval-corpus is its --corpus
    add_sae_argument(p, "two or more SAEs of different sizes on one hook, each", several=True)
    p.add_argument("--out", required=True, metavar="FILE", help="families JSON file to write")
    p.add_arguments(BrowseConfig, dest="browse")
    p.hidden_fields = frozenset(PAGE_ONLY)
    p.group_text = {"browse": ("families", "What the feature families are computed from, and how strict a parent "
                                           "must be (in a --config file: its \"browse\" group).")}
    add_io_options(p, overwrite="replace an existing --out file")
    p.set_defaults(handler=run_families)


# BrowseConfig fields that shape the browser's pages only: feature families read none of them.
PAGE_ONLY = ("n_top", "n_samples", "n_bands", "n_bins", "window_before", "window_after", "n_logits", "n_neighbours",
             "n2g_file", "n2g_n_latents", "n2g_padding_token", "seed")


# BrowseConfig fields that shape the site's pages only: the Neuronpedia export reads none of them (its N2G
# settings are refused by the export itself, naming why).
SITE_ONLY = ("window_before", "window_after", "n_neighbours", "family_min_score")


def _typed_fields(args: argparse.Namespace, fields) -> list[str]:
    """The options of ``fields`` (BrowseConfig names) given on the command line, as typed; not a --config
    file's entries: one file serves every verb, so it may set what this verb does not read."""
    ways = [given(args, f"browse.{field}") for field in fields]
    return [way for way in ways if way is not None and not way.startswith("--config ")]


def run_families(args: argparse.Namespace) -> dict[str, Any]:
    unused = _typed_fields(args, PAGE_ONLY)
    if unused:
        raise ConfigError(f"{unused[0]} shapes the browser's pages (saelab browse); families does not use it")
    from saelab.explore.browser import build_families  # torch, once the options are checked

    with _within_the_corpus(_n_tokens_option(args), args.browse.n_tokens, args.browse.corpus, len(args.sae)):
        tree = build_families(args.sae, args.out, args.browse, device=args.device, model_dtype=args.model_dtype,
                              overwrite=args.overwrite, progress=args.progress, allow_http=args.allow_http)
    if tree["reused"]:  # the same command again
        print(f"{args.out} already holds these feature families (--overwrite builds them again)", file=sys.stderr)
    top = tree["families"][:5]
    return {"families": args.out, "reused": tree["reused"], "n_tokens": tree["n_tokens"], "saes": tree["saes"],
            "matched": {f"{l['child_sae']}->{l['parent_sae']}": l["n_children_matched"] for l in tree["links"]},
            "largest": [{"sae": f["sae"], "latent": f["latent"], "n_descendants": f["n_descendants"]} for f in top]}
