"""Bad input gets a clear error that names the input and what was expected, and never destroys earlier results.

Every case asserts the exception type (from ``saelab.errors`` or the subpackage's documented error), that the
message names the offending input, and where earlier results exist, that their bytes are unchanged.
Models are real (a randomly initialised 2-layer GPT-2 with GPT-2's tokenizer), text is real Wikipedia.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from saelab.cli import main
from saelab.data import ActivationCache, ActivationCacheError, write_activation_cache
from saelab.errors import (
    CheckpointError,
    ConfigError,
    CorpusError,
    HookNameError,
    NonFiniteError,
    RunExistsError,
    SaelabError,
    ShapeMismatchError,
)
from saelab.evals.downstream import downstream_metrics
from saelab.models import LanguageModel
from saelab.pipeline import EvalConfig, HarvestConfig, evaluate, harvest
from saelab.run_folder import check_output_folder
from saelab.sae import SAEConfig, TopKSAE, load_sae, save_sae
from saelab.train import TrainConfig, Trainer, train_sae
from saelab.train.checkpoint import CHECKPOINT, load_checkpoint, read_status, save_checkpoint
from saelab.utils.folder_lock import LOCK
from saelab.utils.memory_limit import memory_limit

HOOK = "blocks.1.hook_resid_post"
D = 64  # tiny_gpt2's d_model
BAD_HOOKS = ["blocks.99.hook_resid_post", "blocks.1.hook_foo"]


# ---- helpers and shared inputs --------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): earlier results, to compare after a failure."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    """Leftovers of saelab.utils.atomic (``.NAME.XXXX.tmp``), which must be removed on failure."""
    return [str(p) for p in folder.rglob(".*.tmp")]


def wiki_docs(data_dir: Path, n: int) -> list[str]:
    with lzma.open(data_dir / "wiki-en" / "wiki_eval.jsonl.xz", "rt", encoding="utf-8") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``saelab ARGV`` in-process: (exit code, stdout, saelab's own stderr lines without progress bars)."""
    capsys.readouterr()  # drop anything printed before
    code = main([*argv])
    out, err = capsys.readouterr()
    # transformers draws a "Loading weights" bar on stderr even with --no-progress; keep saelab's lines.
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith(("saelab ", "saelab:"))]
    return code, out, "\n".join(ours)


def make_sae(d_in: int = D, n: int = 128, k: int = 8, seed: int = 0, **cfg) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(SAEConfig(d_in, n, k, hook_name=HOOK, model_name="tiny-gpt2", context_size=32, **cfg))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory) -> Path:
    """The first three articles of the real Wikipedia eval split (~8k GPT-2 tokens), as JSON Lines."""
    path = tmp_path_factory.mktemp("corpus") / "wiki3.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in wiki_docs(data_dir, 3)), encoding="utf-8")
    return path


def harvest_cfg(corpus, hook=HOOK, n_tokens=1024) -> HarvestConfig:
    return HarvestConfig(model="tiny-gpt2", hook=hook, corpus=str(corpus), n_tokens=n_tokens, context_size=32,
                         lm_batch_size=16, buffer_tokens=8192)


@pytest.fixture(scope="module")
def tiny_cache(tiny_gpt2, corpus, tmp_path_factory) -> Path:
    """A complete activation cache of 1,024 real rows of tiny_gpt2 at HOOK."""
    folder = tmp_path_factory.mktemp("cache") / "acts"
    harvest(harvest_cfg(corpus), folder, lm=tiny_gpt2, progress=False)
    return folder


# ---- unknown hook names ---------------------------------------------------------------------------------


def test_unknown_hook_in_harvest(tiny_gpt2, corpus, tmp_path):
    # A layer the model lacks: refused once the model is known, before anything is written.
    with pytest.raises(HookNameError, match=re.escape(repr(BAD_HOOKS[0]))) as err:
        harvest(harvest_cfg(corpus, hook=BAD_HOOKS[0]), tmp_path / "acts", lm=tiny_gpt2, progress=False)
    assert "valid hooks look like blocks.{L}.hook_" in str(err.value)
    assert "L in 0..1" in str(err.value)  # what was expected, for this 2-layer model
    assert not (tmp_path / "acts").exists()
    # A hook kind no model has: refused by the config itself, before any model is named.
    with pytest.raises(ConfigError, match=re.escape(f"hook {BAD_HOOKS[1]!r}: expected blocks.{{L}}.hook_{{")):
        harvest_cfg(corpus, hook=BAD_HOOKS[1])


@pytest.mark.parametrize("bad", BAD_HOOKS)
def test_unknown_hook_in_activations(tiny_gpt2, bad):
    tokens = torch.tensor([tiny_gpt2.tokenize(["The cat sat on the mat."])[0]])

    def hook_count() -> int:  # transformers may keep hooks of its own from earlier calls
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in tiny_gpt2.model.modules())

    before = hook_count()
    with pytest.raises(HookNameError, match=re.escape(repr(bad))) as err:
        tiny_gpt2.activations(tokens, bad)
    why = "layer 99 out of range 0..1" if "99" in bad else "no hook kind 'foo'"
    assert why in str(err.value) and "tiny-gpt2" in str(err.value)
    assert hook_count() == before  # none of ours left behind


def test_unknown_hook_in_cli_harvest(tiny_dir, corpus, tmp_path, capsys):
    bad = BAD_HOOKS[0]
    code, out, err = run_cli(capsys, "harvest", "--model", str(tiny_dir), "--hook", bad, "--corpus", str(corpus),
                             "--out", str(tmp_path / "acts"), "--no-progress")
    assert code == 2 and out == ""
    assert err.startswith("saelab harvest: error: unknown hook 'blocks.99.hook_resid_post'")
    assert not (tmp_path / "acts").exists()


def test_hook_past_the_last_layer_is_refused_from_the_config_before_the_load(tiny_gpt2, corpus, tmp_path, capsys):
    folder = tmp_path / "config-only"  # the model's config and no weights: any load of it fails
    tiny_gpt2.model.config.save_pretrained(folder)
    argv = ["--model", str(folder), "--corpus", str(corpus), "--out", str(tmp_path / "acts"), "--no-progress"]
    code, out, err = run_cli(capsys, "harvest", "--hook", "blocks.2.hook_resid_post", *argv)
    assert code == 2 and err.strip() == (f"saelab harvest: error: unknown hook 'blocks.2.hook_resid_post' for model "
                                         f"{folder}: layer 2 out of range 0..1")
    code, out, err = run_cli(capsys, "harvest", "--hook", "blocks.1.hook_resid_post", *argv)
    assert code == 2 and "cannot load model directory" in err  # the last layer passes; the load is what fails
    assert not (tmp_path / "acts").exists()


# ---- d_in of an SAE vs. the width of its hook -----------------------------------------------------------


def test_evaluate_sae_of_wrong_width(tiny_gpt2, corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"nmse": 0.1}\n')  # an earlier evaluation
    before = snapshot(out)
    sae = make_sae(d_in=48)
    with pytest.raises(ShapeMismatchError) as err:
        evaluate(sae, lm=tiny_gpt2, cfg=EvalConfig(corpus=str(corpus), recon_tokens=256, downstream_tokens=128),
                 out_dir=out, progress=False)
    msg = str(err.value)
    assert f"activations at {HOOK} of tiny-gpt2 have width {D}" in msg and "expects d_in=48" in msg
    assert snapshot(out) == before


def test_downstream_metrics_sae_of_wrong_width(tiny_gpt2):
    tokens = torch.tensor([[tiny_gpt2.bos_token_id] + tiny_gpt2.tokenize(["The cat sat on the mat."])[0]])
    with pytest.raises(ShapeMismatchError, match=rf"hook {re.escape(HOOK)} have width {D} but the SAE expects "
                                                 r"d_in=100"):
        downstream_metrics(tiny_gpt2, make_sae(d_in=100), tokens, progress=False)


def test_sae_forward_on_wrong_width_input():
    sae = make_sae(d_in=D)
    for call in (sae.forward, sae.encode, sae.forward_with_latents):
        with pytest.raises(ShapeMismatchError, match=rf"width 65 but the SAE expects d_in={D} \(trained on "
                                                     rf"{re.escape(HOOK)}\)"):
            call(torch.randn(4, 65))


# ---- foreign, truncated, corrupt and malicious checkpoints -----------------------------------------------


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def openai_state_dict(d=D, n=128, k=8) -> dict:
    """A well-formed OpenAI sparse_autoencoder v5 state dict (the .pt format load_sae reads)."""
    g = torch.Generator().manual_seed(0)
    return {"encoder.weight": torch.randn(n, d, generator=g), "decoder.weight": torch.randn(d, n, generator=g),
            "pre_bias": torch.randn(d, generator=g), "latent_bias": torch.randn(n, generator=g),
            "stats_last_nonzero": torch.zeros(n, dtype=torch.long), "activation": "TopK",
            "activation_state_dict": {"k": k, "postact_fn": "ReLU"}}


def make_bad_checkpoint(kind: str, tmp: Path, tiny_gpt2) -> tuple[Path, str, Path | None]:
    """(what to load, text the error must contain, marker file that must not appear)."""
    marker = None
    if kind == "foreign_pt":  # a language model's weights, not an SAE
        path = tmp / "gpt2.pt"
        sd = tiny_gpt2.model.state_dict()
        torch.save({k: sd[k] for k in ("transformer.wte.weight", "transformer.ln_f.weight")}, path)
        expect = "not an OpenAI sparse_autoencoder checkpoint: missing encoder.weight"
    elif kind == "foreign_folder":  # a model folder (config.json, model.safetensors), not an SAE folder
        path = tmp / "model"
        tiny_gpt2.model.config.save_pretrained(path)
        expect = "folder has no cfg.json"
    elif kind == "truncated_pt":  # cut in half, under 64 KiB: torch's zip reader names no fault, only [Errno 22]
        path = tmp / "ae.pt"
        torch.save(openai_state_dict(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expect = ("could not be read as a plain tensor checkpoint (truncated or damaged archive "
                  f"({path.stat().st_size:,} bytes)); expected an OpenAI sparse_autoencoder .pt checkpoint")
    elif kind == "cut_legacy_pt":  # the pickle format before torch 1.6, cut short: torch says only EOFError
        path = tmp / "ae.pt"
        torch.save(openai_state_dict(), path, _use_new_zipfile_serialization=False)
        path.write_bytes(path.read_bytes()[:50])
        expect = ("could not be read as a plain tensor checkpoint (truncated or damaged file (50 bytes)); expected an "
                  "OpenAI sparse_autoencoder .pt checkpoint")  # a damaged torch file: the format it was read as
    elif kind == "empty_pt":  # torch says only EOFError
        path = tmp / "ae.pt"
        path.write_bytes(b"")
        expect = "could not be read as a plain tensor checkpoint (empty file (0 bytes)); expected an OpenAI"
    elif kind == "cut_short_pt":  # cut where torch's zip reader names the damage: its reason, not its advice
        path = tmp / "ae.pt"
        torch.save(openai_state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
        expect = "could not be read as a plain tensor checkpoint (truncated or damaged archive: failed finding central"
    elif kind == "truncated_folder":
        path = tmp / "sae"
        save_sae(make_sae(), path)
        weights = path / "sae_weights.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        expect = "sae_weights.safetensors: not a readable safetensors file"
    elif kind == "corrupt_pt":  # a zip's signature, then noise
        path = tmp / "noise.pt"
        path.write_bytes(b"PK\x03\x04" + torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                                         dtype=torch.uint8).numpy().tobytes())
        expect = "could not be read as a plain tensor checkpoint"
    elif kind == "text_pt":  # not a checkpoint at all: named as such, not by the unpickler's KeyError
        path = tmp / "notes.txt"
        path.write_text("hello\n")
        expect = ("not a torch checkpoint (neither a zip archive nor a pickle); expected an SAE: a run folder "
                  "(saelab train), a SAELens folder")  # what a path may name, not only the format it was read as
    elif kind == "corrupt_folder":
        path = tmp / "sae"
        save_sae(make_sae(), path)
        (path / "cfg.json").write_text('{"architecture": "topk", "d_in": ')
        expect = "cfg.json: not valid JSON"
    elif kind == "pickle_runs_code":
        path, marker = tmp / "evil.pt", tmp / "pwned"
        sd = openai_state_dict()
        sd["activation_state_dict"] = _Payload(marker)
        torch.save(sd, path)
        expect = "pickles that reference code are refused"
    else:
        raise AssertionError(kind)
    return path, expect, marker


CHECKPOINT_KINDS = ["foreign_pt", "foreign_folder", "truncated_pt", "cut_short_pt", "cut_legacy_pt", "empty_pt",
                    "truncated_folder", "corrupt_pt", "text_pt", "corrupt_folder",
                    "pickle_runs_code"]


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_bad_checkpoint_load_sae(kind, tmp_path, tiny_gpt2):
    path, expect, marker = make_bad_checkpoint(kind, tmp_path, tiny_gpt2)
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_sae(path)
    msg = str(err.value)
    assert str(path) in msg and expect in msg
    if marker is not None:
        assert not marker.exists()  # the payload never ran
    assert snapshot(tmp_path) == before  # reading never modifies what it reads


@pytest.mark.parametrize("kind", CHECKPOINT_KINDS)
def test_bad_checkpoint_cli_eval(kind, tmp_path, tiny_gpt2, tiny_dir, corpus, capsys):
    path, expect, marker = make_bad_checkpoint(kind, tmp_path, tiny_gpt2)
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "eval", str(path), "--model", str(tiny_dir), "--corpus", str(corpus),
                             "--no-progress")
    assert code == 2 and out == ""
    assert err.startswith("saelab eval: error: ") and str(path) in err and expect in err
    if marker is not None:
        assert not marker.exists()
    assert snapshot(tmp_path) == before


class _NotAllowed:
    """Unpickling this makes a pathlib path: no code runs, but weights_only refuses any class it does not know."""

    def __reduce__(self):
        return (Path, ("x",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_pickle"])
@pytest.mark.parametrize("payload", ["blocked_module", "builtin", "class"])
def test_refused_pickle_is_never_told_to_load_unsafely(payload, legacy, tmp_path):
    """torch refuses a global outside its allowlist with a paragraph whose first line past its title is "(1) In
    PyTorch 2.6 ... Re-running torch.load with weights_only set to False will likely succeed": that line was
    passed on as the reason, advising the one thing an untrusted file must not get. Only a blocked module
    (os.system) came in the one-paragraph form the filter knew. Every loader now names the global refused."""
    marker = tmp_path / "pwned"
    value, name = {"blocked_module": (_Payload(marker), "GLOBAL 'posix.system' whose module 'posix' is blocked"),
                   "builtin": (_Builtin(), "GLOBAL 'print' was not an allowed global"),
                   "class": (_NotAllowed(), "GLOBAL 'pathlib.Path' was not an allowed global")}[payload]
    sd = {**openai_state_dict(), "activation_state_dict": value}
    path = tmp_path / "ae.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"sae": value}, run / CHECKPOINT, _use_new_zipfile_serialization=not legacy)
    messages = []
    for load in (lambda: load_sae(path), lambda: load_checkpoint(run)):
        with pytest.raises(CheckpointError) as err:
            load()
        messages.append(str(err.value))
    for msg in messages:
        assert name in msg and "\n" not in msg, msg
        for advice in ("False", "trusted source", "safe_globals", "(1)", "(2)"):
            assert advice not in msg, msg
    assert "(read with weights_only=True: pickles that reference code are refused, never run)" in messages[0]
    assert not marker.exists()


class _Builtin:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.mark.parametrize("extra", [None, {1, 2}], ids=["tensors", "with_a_set"])
def test_legacy_pickle_cut_anywhere_says_truncated(extra, tmp_path):
    """A pre-1.6 torch file (a pickle) cut short raised IndexError ('index out of range'), struct.error ('unpack
    requires a buffer of 2 bytes'), RuntimeError ('unexpected EOF, expected 8 more bytes'), a bare EOFError or,
    cut within a class name, a refusal of the name's first part ('GLOBAL collections.Orde'), by where it was cut;
    a zip cut to its first 1-3 bytes was 'not a torch checkpoint'. Each is now a file of its size, 'truncated
    or damaged' (a pickle holds the lengths it reads: one damaged byte runs it past its end as a cut does),
    'truncated' for the zip, without the clause on refused pickles (nothing was refused). A set is written as the
    global '__builtin__.set', which torch renames 'set': cut within it, it was a refusal. The same file damaged
    in the middle, whole, is never called 'truncated' (a byte turned into a GLOBAL opcode makes the rest of the
    file a class name; one that lengthens a string runs the reader past the end: a bare EOFError)."""
    path = tmp_path / "ae.pt"
    state = openai_state_dict(n=4, d=3) | ({} if extra is None else {"extra": extra})
    torch.save(state, path, _use_new_zipfile_serialization=False)
    legacy = path.read_bytes()
    torch.save(openai_state_dict(n=4, d=3), path)
    cuts = [legacy[:n] for n in range(1, len(legacy))] + [path.read_bytes()[:n] for n in (1, 2, 3)]
    reasons = set()
    for data in cuts:
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as err:
            load_sae(path)
        reasons.add(str(err.value).replace(f"({len(data):,} byte{'s' * (len(data) != 1)})", "(N bytes)"))
    assert reasons == {f"{path}: could not be read as a plain tensor checkpoint ({how} (N bytes)); expected an "
                       "OpenAI sparse_autoencoder .pt checkpoint" for how in ("truncated file",
                                                                            "truncated or damaged file")}, reasons
    torch.save({"b": torch.zeros(4)}, tmp_path / "small.pt", _use_new_zipfile_serialization=False)
    for whole in (legacy, (tmp_path / "small.pt").read_bytes()):
        for at, byte in itertools.product(range(2, len(whole)), (0x55, 0x63)):  # one byte changed, the file whole
            path.write_bytes(whole[:at] + bytes([whole[at] ^ byte if byte == 0x55 else byte]) + whole[at + 1:])
            try:
                load_sae(path)
            except CheckpointError as err:
                assert "truncated file" not in str(err) and "\n" not in str(err), (at, str(err))


def test_torch_refusals_in_other_wordings_carry_no_advice(tmp_path):
    """torch words its advice to retry with weights_only=False after other reasons too: a DTensor's module not
    imported, a TorchScript archive (and the legacy .tar format). Each loader keeps the reason and drops the
    advice. The DTensor's file is read by a fresh `saelab top`: once a test has imported transformers, which
    imports torch.distributed.tensor, torch reads the file further and fails otherwise."""
    dtensor = tmp_path / "dtensor.pt"
    dtensor.write_bytes(b"\x80\x02ctorch.distributed.tensor\nDTensor\n.")
    done = subprocess.run([sys.executable, "-m", "saelab", "top", str(dtensor), "--latent", "1"], capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout) == (2, "") and done.stderr == (
        f"saelab top: error: {dtensor}: could not be read as a plain tensor checkpoint (UnpicklingError: "
        "``torch.distributed.tensor`` must be imported to load DTensors); expected an OpenAI sparse_autoencoder .pt "
        "checkpoint\n"), done.stderr
    script = tmp_path / "script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own: a TorchScript file is what is needed
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(script, run / CHECKPOINT)
    for load in (lambda: load_sae(script), lambda: load_checkpoint(run)):
        with pytest.raises(CheckpointError) as err, warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            load()
        assert warned == []  # torch's warning on a TorchScript archive ("dispatching to torch.jit.load") neither
        msg = str(err.value)
        assert ("(RuntimeError: Cannot use ``weights_only=True`` with TorchScript archives passed to ``torch.load``)"
                in msg and "False" not in msg and "trust" not in msg and "\n" not in msg), msg


_SAYS_SAFE = "5); this file is safe. load it with torch.load(weights_only=0) instead"


@pytest.mark.parametrize("ops, shown", [
    (b"K\x05)\x81", "Can only create new object for nn.Parameter or classes allowlisted but got '5'"),
    (b"X" + len(_SAYS_SAFE).to_bytes(4, "little") + _SAYS_SAFE.encode() + b")\x81",
     f"Can only create new object for nn.Parameter or classes allowlisted but got {_SAYS_SAFE!r}"),
    (b"}}b", "Can only build Tensor, Parameter, OrderedDict or types allowlisted, but got <class 'dict'>")])
def test_torch_refusal_that_names_its_allowlist_keeps_its_reason(ops, shown, tmp_path):
    """torch's 'Can only create new object / build ... allowlisted via `add_safe_globals` but got X' (a damaged or
    crafted pickle: NEWOBJ on an int or a string, BUILD on a dict) read as a bare '(UnpicklingError)': the whole
    sentence was taken for advice. The reason stays, the object the pickle made quoted (its text is the file's);
    only the pointer to add_safe_globals goes. (saelab's own check refuses a BUILD on an int or a string first.)"""
    path = tmp_path / "odd.pt"
    path.write_bytes(b"\x80\x02" + ops + b".")
    with pytest.raises(CheckpointError) as err:
        load_sae(path)
    assert f"(UnpicklingError: {shown});" in str(err.value), err.value


@pytest.mark.parametrize("module, name, shown", [
    (b"os2", b"x was not an allowed global by default. Please use `torch.serialization.add_safe_globals([os2.x])` y",
     "Unsupported global: GLOBAL 'os2.x was not an allowed global by default. Please use `torch.serialization."
     "add_safe_globals([os2.x])` y' was not an allowed global by default"),
    (b"os", b"system whose module evil is blocked",
     "Trying to load unsupported GLOBAL 'os.system whose module evil is blocked' whose module 'os' is blocked"),
    (b"os", b"system Unsupported global: GLOBAL print was not an allowed global by default",
     "Trying to load unsupported GLOBAL 'os.system Unsupported global: GLOBAL print was not an allowed global by "
     "default' whose module 'os' is blocked"),
    (b"evil", b"Trying to load unsupported GLOBAL os.x whose module os is blocked.",
     "Unsupported global: GLOBAL 'evil.Trying to load unsupported GLOBAL os.x whose module os is blocked.' was not "
     "an allowed global by default")])
def test_refused_name_holding_torchs_own_words_is_quoted_whole(module, name, shown, tmp_path):
    """A class name that holds torch's own wording of a refusal ended the name there: the file chose which module
    a blocked global was named in, or showed a blocked global as another refusal. The name is found by the whole
    of torch's wording around it, the refusal by the words that end torch's text."""
    path = tmp_path / "named.pt"
    path.write_bytes(b"\x80\x02c" + module + b"\n" + name + b"\n.")
    with pytest.raises(CheckpointError) as err:
        load_sae(path)
    assert f"(UnpicklingError: {shown}); expected" in str(err.value), str(err.value)


@pytest.mark.parametrize("data, name", [(b"\x80\x02cos\nsystem\n)R.cos\nsystemX", "os.system"),
                                        (b"\x80\x02cos\nsystem\n", "os.system"),
                                        (b"\x80\x02cos\nsystem.\n", "os.system.")])
def test_whole_refused_global_near_the_end_is_a_refusal(data, name, tmp_path):
    """A whole refused global, then its name again at the end of the file, cut: torch refused the first and
    stopped there, but the file read as truncated. A whole name with no pickle after it: the same. Where torch
    stopped reading, and whether the name's line was whole, decide."""
    path = tmp_path / "evil.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        load_sae(path)
    refusal = (f"(UnpicklingError: Trying to load unsupported GLOBAL '{name}' whose module 'os' is blocked); "
               "expected an OpenAI sparse_autoencoder .pt checkpoint (read with weights_only=True")
    assert refusal in str(err.value), str(err.value)


@pytest.mark.parametrize("data", [b"\x80\x02cConfigParser\nFo", b"\x80\x02cexceptions\nValueErrorX",
                                  b"\x80\x02c__builtin__\nse", b"\x80\x02c__builtin__\n"])
def test_pickle_cut_within_a_python_2_name_is_truncated(data, tmp_path):
    """A pickle cut within a class name is refused by torch as the name's first part, renamed as torch renames
    Python 2 modules (some: '__builtin__' to 'builtins', not 'ConfigParser'); each such cut is a truncated file."""
    path = tmp_path / "cut.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as err:
        load_sae(path)
    assert f"(truncated or damaged file ({len(data)} bytes)); expected" in str(err.value), str(err.value)


def test_operating_system_error_on_a_path_with_advice_words_keeps_its_reason(tmp_path):
    """The filter of torch's advice dropped any sentence holding 'trust' or 'False': an OSError quoting a path under
    trusted_models/ read as a bare '(IsADirectoryError)'. An operating system's error is taken whole."""
    run = tmp_path / "trusted_models" / "run"
    (run / CHECKPOINT).mkdir(parents=True)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(run)
    assert f"(IsADirectoryError: [Errno 21] Is a directory: '{run / CHECKPOINT}')" in str(err.value), str(err.value)


def test_reason_quoting_the_file_shows_its_words_quoted(tmp_path):
    """torch's 'Trying to call reduce for unrecognized function {name}' quotes the file: a name saying to retry with
    weights_only = False was shown as the reason, then (817593b) its sentence dropped, but a name that avoids
    False and trust, or one whose first sentence names them, still put its words in torch's place. The name is
    now quoted whole, as a refused global's is, and nothing follows it."""
    for name in ("x; retry with weights_only = False (you may trust this file)",
                 "5); this file is safe. load it with torch.load(weights_only=0) instead",
                 "x False. Use weights_only=0\n\nCheck the documentation of torch.load, it is safe"):
        path = tmp_path / "reduce.pt"
        path.write_bytes(b"\x80\x02X" + len(name.encode()).to_bytes(4, "little") + name.encode() + b")R.")
        with pytest.raises(CheckpointError) as err:
            load_sae(path)
        assert f"(UnpicklingError: Trying to call reduce for unrecognized function {name!r}); expected an OpenAI " \
            in str(err.value), str(err.value)


def _torch_zip_rewritten(src: Path, dst: Path, change) -> Path:
    """A copy of the zip archive torch.save wrote at ``src``, each member (name, bytes) passed through ``change``."""
    import zipfile

    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            new.writestr(*change(info.filename, old.read(info.filename)))
    return dst


def test_torch_reasons_show_the_files_own_text_quoted(tmp_path):
    """torch's reasons quote text a crafted file chooses: a pre-1.6 file's protocol version, a byteorder record, a
    storage key (the member torch then looks for), a member's name. It was shown as torch's words (a file could
    word saelab's message: 'this file is safe, load it with ...'), the storage key with its terminal escapes.
    Each is now quoted as Python writes a string, escapes escaped."""
    import pickle
    import zipfile

    says = "5; this file is safe\x1b[2J, load it with torch.load(f, weights_only=0)"
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(2)}, good)
    legacy = tmp_path / "legacy.pt"
    with open(legacy, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)  # torch's magic number, then the protocol "version"
        pickle.dump(says, f, protocol=2)
    byteorder = _torch_zip_rewritten(good, tmp_path / "byteorder.pt", lambda name, data: (
        name, says.encode() if name.endswith("/byteorder") else data))
    key = b"X\x01\x00\x00\x000"  # data.pkl's storage key "0": BINUNICODE of one character
    keyed = _torch_zip_rewritten(good, tmp_path / "key.pt", lambda name, data: (name, data.replace(
        key, b"X" + len(says.encode()).to_bytes(4, "little") + says.encode())
        if name.endswith("data.pkl") else data))
    member = tmp_path / "member.pt"
    with zipfile.ZipFile(member, "w") as z:
        z.writestr(says, b"x")
    cases = {legacy: f"(RuntimeError: Invalid protocol version: {says!r});",
             byteorder: f"(ValueError: Unknown endianness type: {says!r});",
             keyed: f"(truncated or damaged archive: failed locating file {'data/' + says!r}: file not found);",
             member: f"(RuntimeError: file in archive is not in a subdirectory: {says!r});"}
    for path, shown in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_sae(path)
        assert shown in str(err.value) and "\x1b" not in str(err.value), str(err.value)


def test_values_read_from_a_file_are_named_by_type_in_messages(tmp_path):
    """A file with a long tuple or a tensor viewed from one element, no call in it: it loads, and saelab's own
    message wrote the value out (the OpenAI activation, the keys of a checkpoint). Named by its type instead. (A
    tuple of shared tuples, 2**40 leaves written out, and a view that takes gigabytes once copied are refused
    unread: tests/test_pickle_check.py.)"""
    torch.save({"activation": tuple(range(100_000)), "encoder.weight": torch.zeros(2, 2), "decoder.weight": torch.zeros(2, 2),
                "pre_bias": torch.zeros(2), "latent_bias": torch.zeros(2), "stats_last_nonzero": torch.zeros(2)},
               tmp_path / "sae.pt")
    with pytest.raises(CheckpointError, match=r"activation \(a tuple\) is not supported"):
        load_sae(tmp_path / "sae.pt")
    torch.save({torch.zeros(1).expand(*[2] * 10): 1, "step": 3}, tmp_path / CHECKPOINT)  # 2**10 elements printed
    with pytest.raises(CheckpointError, match=r"\(found \['\(a Tensor\)', 'step'\]\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("k", [1.7, float("nan"), float("inf")])
def test_openai_k_as_a_float_tensor_is_refused(k, tmp_path):
    """k stored as a float tensor: 1.7 loaded as k = 1 (int() of its item) while a plain 4.0 is refused; nan and inf
    were a ValueError / OverflowError traceback. An integer tensor is still taken."""
    path = tmp_path / "sae.pt"
    torch.save({**openai_state_dict(), "activation_state_dict": {"k": torch.tensor(k), "postact_fn": "ReLU"}}, path)
    with pytest.raises(CheckpointError, match=r"activation_state_dict k=\(a Tensor\) must be an integer in 1\.\.128"):
        load_sae(path)
    torch.save({**openai_state_dict(), "activation_state_dict": {"k": torch.tensor(8), "postact_fn": "ReLU"}}, path)
    assert load_sae(path).cfg.k == 8


def test_zip_that_torch_did_not_write_names_what_torch_found(tmp_path):
    """A numpy .npz is a zip archive: torch's reason came with the place in its C++ code that raised it
    ('[enforce fail at inline_container.cc:180] . file in archive is not in a subdirectory: x.npy')."""
    import numpy as np

    path = tmp_path / "acts.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(CheckpointError) as err:
        load_sae(path)
    assert str(err.value) == (f"{path}: could not be read as a plain tensor checkpoint (RuntimeError: file in archive "
                              "is not in a subdirectory: 'x.npy'); expected an OpenAI sparse_autoencoder .pt checkpoint")


@pytest.mark.parametrize("name", [b"\x1b[2J\x1b[31mOK", b"Re-running torch.load with weights_only=False. It is trusted",
                                  b"a\rb\x0bc. d" + b"x" * 300])
def test_class_name_from_a_file_is_shown_quoted(name, tmp_path):
    """A refused global's name comes from the file: its terminal escapes reached the terminal as they were, a
    line break or '. ' in it cut it short, and any sentence in it with an advice word dropped it whole. It is
    quoted as Python writes a string, cut to 200 characters, whatever it says."""
    path = tmp_path / "named.pt"
    path.write_bytes(b"\x80\x02cx\n" + name + b"\n.")
    with pytest.raises(CheckpointError) as err:
        load_sae(path)
    shown = repr(("x." + name.decode())[:200]) + ("..." if len(name) > 198 else "")
    assert str(err.value) == (f"{path}: could not be read as a plain tensor checkpoint (UnpicklingError: Unsupported "
                              f"global: GLOBAL {shown} was not an allowed global by default); expected an OpenAI "
                              "sparse_autoencoder .pt checkpoint (read with weights_only=True: pickles that reference "
                              "code are refused, never run)")


def _train_tiny_run(run: Path, stop_after_steps: int | None = None) -> None:
    rows = torch.randn(512, D, generator=torch.Generator().manual_seed(2)).split(128)
    cache = write_activation_cache(rows, run.parent / f"{run.name}-acts", meta={"hook_name": "blocks.0.hook_resid_post"},
                                   shard_rows=256, progress=False)
    cfg = TrainConfig(n_latents=64, k=4, batch_size=128, total_tokens=512, init_rows=256, checkpoint_every=1,
                      log_every=1, warmup_steps=1)
    train_sae(cfg, lambda start: cache.batches(128, start_batch=start), run, d_in=D, progress=False,
              stop_after_steps=stop_after_steps, device="cpu")


def _safetensors_whose_first_byte_is(value: int, path: Path) -> Path:
    """A real safetensors file whose header length's lowest byte, its first, is ``value``."""
    from safetensors.torch import save_file

    for pad in range(256):
        save_file({"w": torch.zeros(2)}, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == value:
            return path
    raise AssertionError(f"no padding gives a first byte {value:#x}")


def test_safetensors_file_given_as_sae_is_named_as_one(tmp_path, capsys, monkeypatch):
    """A lone .safetensors file given as the SAE was 'not a torch checkpoint', or, where its header's length ends
    in byte 0x80 (a pickle's first byte), read as a pickle: 'Unsupported operand 0', cut short too. Under any name
    it is now a safetensors file. A file of another kind inside a folder that holds an SAE (cfg.json beside its
    weights) names that folder, absolute, also through a link; a damaged torch file there, and a file beside a
    cfg.json alone, do not."""
    lone = tmp_path / "lone"
    lone.mkdir()
    pickle_like = _safetensors_whose_first_byte_is(0x80, lone / "weights.safetensors")
    plain = _safetensors_whose_first_byte_is(0x50, lone / "other.safetensors")
    renamed = lone / "weights.pt"
    shutil.copy(pickle_like, renamed)
    cut = lone / "cut.safetensors"
    cut.write_bytes(pickle_like.read_bytes()[:60])
    header_end = 8 + int.from_bytes(pickle_like.read_bytes()[:8], "little")
    kinds = {path: "a safetensors file" for path in (pickle_like, plain, renamed)}
    kinds[cut] = f"a safetensors file cut short (60 bytes, its header alone {header_end:,})"
    for path, kind in kinds.items():
        expect = f"{path}: {kind}, not a torch checkpoint; expected an SAE: a run folder (saelab train)"
        code, out, err = run_cli(capsys, "top", str(path), "--latent", "1")
        assert code == 2 and err.startswith(f"saelab top: error: {expect}") and "its folder" not in err, err
        with pytest.raises(CheckpointError) as raised:
            load_sae(path)
        assert str(raised.value).startswith(expect), raised.value
    folder = tmp_path / "sae"
    save_sae(make_sae(), folder)
    shutil.copy(pickle_like, folder / "sparsity_copy.safetensors")
    (folder / "notes.txt").write_text("hello\n")
    torch.save({"w": torch.zeros(2)}, folder / "other.pt")
    (tmp_path / "link.txt").symlink_to(folder / "notes.txt")
    hint = f"; its folder {folder} holds an SAE: pass the folder"
    for path in (folder / "sparsity_copy.safetensors", folder / "notes.txt", folder / "other.pt",
                 tmp_path / "link.txt", folder / ".." / "sae" / "notes.txt"):
        with pytest.raises(CheckpointError) as raised:
            load_sae(path)
        assert str(raised.value).endswith(hint), raised.value
    monkeypatch.chdir(folder)
    with pytest.raises(CheckpointError) as raised:
        load_sae("notes.txt")
    assert str(raised.value).endswith(hint) and isinstance(raised.value.__cause__, CheckpointError), raised.value
    (folder / "damaged.pt").write_bytes((folder / "other.pt").read_bytes()[:300])  # the user's own files: one cut,
    torch.save(openai_state_dict(k=999), folder / "openai_k.pt")  # an OpenAI SAE with a setting out of range
    for name, reason in (("damaged.pt", "could not be read"), ("openai_k.pt", "k=999 must be an integer")):
        with pytest.raises(CheckpointError) as raised:
            load_sae(name)
        assert reason in str(raised.value) and "its folder" not in str(raised.value), raised.value
    assert load_sae("cfg.json").cfg.n_latents == 128  # a file that stands for its folder still loads
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "cfg.json").write_text('{"foo": 1}')
    (tmp_path / "cfg_only" / "notes.txt").write_text("hello\n")
    with pytest.raises(CheckpointError) as raised:  # no SAE's weights there: nothing to point at
        load_sae(tmp_path / "cfg_only" / "notes.txt")
    assert "its folder" not in str(raised.value), raised.value


def test_training_checkpoint_given_as_sae_names_its_run(tmp_path, capsys):
    """A run's checkpoint.pt given as the SAE read as an OpenAI checkpoint missing its keys: it names its run
    folder (through a link to it, or as a run's own checkpoint.pt that links elsewhere), from the CLI and from
    Python (load_sae gave the plain refusal); a copy outside a run gets the plain refusal."""
    unfinished, finished, linked = tmp_path / "unfinished", tmp_path / "finished", tmp_path / "linked"
    _train_tiny_run(unfinished, stop_after_steps=1)
    _train_tiny_run(finished)
    _train_tiny_run(linked, stop_after_steps=1)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(finished / CHECKPOINT, tmp_path / "elsewhere" / CHECKPOINT)
    (tmp_path / "link.pt").symlink_to(finished / CHECKPOINT)
    shutil.move(linked / CHECKPOINT, tmp_path / "elsewhere" / "kept.pt")  # a checkpoint kept on another disk
    (linked / CHECKPOINT).symlink_to(tmp_path / "elsewhere" / "kept.pt")
    run_hint = "the training checkpoint of run folder {}, not an SAE: pass the run folder"
    cases = {unfinished / CHECKPOINT: run_hint.format(unfinished) + " once its training has finished",
             finished / CHECKPOINT: run_hint.format(finished),
             tmp_path / "link.pt": run_hint.format(finished),
             linked / CHECKPOINT: run_hint.format(linked) + " once its training has finished",
             tmp_path / "elsewhere" / CHECKPOINT: "not an OpenAI sparse_autoencoder checkpoint: missing encoder.weight"}
    for path, expect in cases.items():
        code, out, err = run_cli(capsys, "top", str(path), "--latent", "1")
        assert code == 2 and err.startswith(f"saelab top: error: {path}: {expect}"), err
        assert "elsewhere" in str(path) or err.strip() == f"saelab top: error: {path}: {expect}"
        with pytest.raises(CheckpointError) as raised:
            load_sae(path)
        assert str(raised.value).startswith(f"{path}: {expect}"), raised.value
    assert load_sae(finished).cfg.n_latents == 64  # the run folder it names loads, from Python too
    with pytest.raises(CheckpointError) as raised:  # a run's other file names the run folder too
        load_sae(finished / "train_config.json")
    assert str(raised.value).endswith(f"; its folder {finished} holds an SAE: pass the folder"), raised.value
    # from inside the run, as "checkpoint.pt": the run folder by its absolute path, not "."
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(finished)
        with pytest.raises(CheckpointError) as raised:
            load_sae(CHECKPOINT)
    assert str(raised.value).startswith(f"{CHECKPOINT}: {run_hint.format(finished)}"), raised.value
    # as "../checkpoint.pt" from a folder inside the run: the folder without ".."
    (finished / "sub").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(finished / "sub")
        with pytest.raises(CheckpointError) as raised:
            load_sae(Path("..") / CHECKPOINT)
    assert f"run folder {finished}, not an SAE" in str(raised.value), raised.value
    # "link/../checkpoint.pt" inside the run, with link to another folder: the file opened is that folder's parent's
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir()
    (finished / "link").symlink_to(elsewhere)
    torch.save({"model": {}}, tmp_path / "elsewhere" / CHECKPOINT)
    with pytest.raises(CheckpointError) as raised:
        load_sae(finished / "link" / ".." / CHECKPOINT)
    assert "not an OpenAI sparse_autoencoder checkpoint" in str(raised.value), raised.value
    # another tool's checkpoint.pt beside its own train_config.json: the plain refusal, not a run to pass
    tool = tmp_path / "tool"
    tool.mkdir()
    torch.save({"model": {"w": torch.zeros(2)}, "optimizer": {}}, tool / CHECKPOINT)
    (tool / "train_config.json").write_text('{"lr": 0.0001, "n_latents": 64}')
    with pytest.raises(CheckpointError, match="not an OpenAI sparse_autoencoder checkpoint: missing encoder.weight"):
        load_sae(tool / CHECKPOINT)
    (tool / "train_config.json").unlink()
    os.mkfifo(tool / "train_config.json")  # read, it would wait for a writer for good
    with pytest.raises(CheckpointError, match="not an OpenAI sparse_autoencoder checkpoint: missing encoder.weight"):
        load_sae(tool / CHECKPOINT)
    # an SAE saved as checkpoint.pt beside another tool's train_config.json is no run's checkpoint: it loads
    other = tmp_path / "other"
    other.mkdir()
    torch.save(openai_state_dict(), other / CHECKPOINT)
    (other / "train_config.json").write_text('{"lr": 0.0001}')
    code, out, err = run_cli(capsys, "export", str(other / CHECKPOINT), str(tmp_path / "out"), "--format", "saelens",
                             "--hook", "blocks.1.hook_resid_post")
    assert code == 0, err


def test_cli_eval_of_run_folder_with_corrupt_sae_keeps_earlier_results(tmp_path, tiny_dir, corpus, capsys):
    run = tmp_path / "run"
    save_sae(make_sae(), run / "sae")
    (run / "metrics.json").write_text('{"nmse": 0.25}\n')
    (run / "report.md").write_text("# earlier report\n")
    weights = run / "sae" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    before = snapshot(run)
    code, _, err = run_cli(capsys, "eval", str(run), "--model", str(tiny_dir), "--corpus", str(corpus),
                           "--no-progress")
    assert code == 2 and str(weights) in err and "not a readable safetensors file" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_model_folder_with_corrupt_weights_is_one_line_naming_the_file(damage, tiny_dir, corpus, tmp_path, capsys):
    from saelab.models import ModelLoadError, load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-100] if damage == "truncated" else b"\x00garbage" * 64)
    expect = f"{weights} is not a readable safetensors file"
    with pytest.raises(ModelLoadError, match=re.escape(expect)) as err:
        load_model(str(folder))
    assert "\n" not in str(err.value) and "expected the model's weights" in str(err.value)
    code, out, err = run_cli(capsys, "harvest", "--model", str(folder), "--hook", HOOK, "--corpus", str(corpus),
                             "--out", str(tmp_path / "acts"), "--no-progress")
    assert code == 2 and out == "" and err.startswith("saelab harvest: error: ") and expect in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "acts").exists()


@pytest.mark.parametrize("damage", ["truncated", "cut_small", "empty", "garbage", "zip_noise", "pickle_runs_code",
                                    "pickle_refused_builtin", "pickle_format_with_a_zip_end"])
def test_model_folder_with_corrupt_pytorch_weights_is_one_line_naming_the_file(damage, tiny_gpt2, tiny_dir, corpus,
                                                                               tmp_path, capsys):
    """A damaged pytorch_model.bin was torch's traceback naming no file (an UnpicklingError, a RuntimeError, or
    "[Errno 22] Invalid argument"), whose text advised retrying with weights_only=False: that runs whatever
    code the pickle holds. It is one line naming the file, without that advice, and nothing is ever run."""
    from saelab.models import ModelLoadError, load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    weights, marker = folder / "pytorch_model.bin", tmp_path / "pwned"
    torch.save(tiny_gpt2.model.state_dict(), weights)
    load_model(str(folder))  # intact, it loads
    good = weights.read_bytes()
    if damage == "pickle_format_with_a_zip_end":  # zipfile.is_zipfile: True, so transformers asks torch for mmap
        torch.save(tiny_gpt2.model.state_dict(), weights, _use_new_zipfile_serialization=False)
        weights.write_bytes(weights.read_bytes() + b"PK\x05\x06" + bytes(18))
    elif damage.startswith("pickle"):
        extra = _Payload(marker) if damage == "pickle_runs_code" else _Builtin()
        torch.save({**tiny_gpt2.model.state_dict(), "extra": extra}, weights)
    else:
        noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        weights.write_bytes({"truncated": good[: len(good) // 2], "cut_small": good[:30000], "empty": b"",
                             "garbage": b"\x00garbage" * 64, "zip_noise": b"PK\x03\x04" + noise.numpy().tobytes()
                             }[damage])
    # cut short, torch's zip reader names what it missed, then a paragraph of advice on corrupt checkpoints; cut
    # under 64 KiB it names nothing ("[Errno 22] Invalid argument"), and an empty file is torch's bare EOFError
    expect = f"cannot load model directory {folder}: {weights} is not a readable torch file of plain tensors (" + {
        "truncated": "truncated or damaged archive: failed finding central directory)",
        "cut_small": "truncated or damaged archive (30,000 bytes))", "empty": "empty file (0 bytes))"}.get(damage, "")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    msg = str(err.value)
    assert msg.startswith(expect) and msg.endswith("); expected the model's weights, as save_pretrained writes them")
    assert "\n" not in msg and "weights_only" not in msg and "miniz" not in msg and not marker.exists(), msg
    code, out, err = run_cli(capsys, "harvest", "--model", str(folder), "--hook", HOOK, "--corpus", str(corpus),
                             "--out", str(tmp_path / "acts"), "--no-progress")
    assert (code, out, err) == (2, "", f"saelab harvest: error: {msg}")
    assert not (tmp_path / "acts").exists() and not marker.exists()


def misfit_weights(kind: str, tiny_gpt2) -> dict[str, torch.Tensor]:
    """Weights under a well-formed safetensors header that do not fit tiny_gpt2's config (its tied lm_head is
    left out, as save_pretrained leaves it out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    state = tiny_gpt2.model.state_dict()
    if kind == "shapes":  # the same names, from a GPT-2 half as wide
        torch.manual_seed(0)
        state = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=128)).state_dict()
    elif kind == "partial":  # layer 1 left out: transformers made it up at random, saying so only in its log
        state = {k: v for k, v in state.items() if ".h.1." not in k}
    else:  # another model's weights
        state = {"encoder.weight": torch.zeros(8, 8), "encoder.bias": torch.zeros(8)}
    return {k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}


MISFITS = {
    "shapes": "of another shape: transformer.h.0.attn.c_attn.bias (96 in the file, 192 expected), "
              "transformer.h.0.attn.c_attn.weight (32x96 in the file, 64x192 expected), "
              "transformer.h.0.attn.c_proj.bias (32 in the file, 64 expected) and 25 more",
    "partial": "missing: transformer.h.1.attn.c_attn.bias, transformer.h.1.attn.c_attn.weight, "
               "transformer.h.1.attn.c_proj.bias and 9 more",
    "unrelated": "missing: lm_head.weight, transformer.h.0.attn.c_attn.bias, transformer.h.0.attn.c_attn.weight "
                 "and 26 more; not in the model: encoder.bias, encoder.weight",
}


@pytest.mark.parametrize("kind", MISFITS)
def test_model_folder_whose_weights_do_not_fit_its_config_is_one_line_naming_them(kind, tiny_gpt2, tiny_dir, corpus,
                                                                                  tmp_path, capsys):
    """Weights of the wrong shapes were a RuntimeError traceback; missing or unrelated ones loaded silently, made
    up at random, so that every number computed from the model was a random model's."""
    from safetensors.torch import save_file

    from saelab.models import ModelLoadError, load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    save_file(misfit_weights(kind, tiny_gpt2), str(folder / "model.safetensors"), metadata={"format": "pt"})
    expect = (f"cannot load model directory {folder}: its weights do not fit the GPT2LMHeadModel its config "
              f"describes ({MISFITS[kind]}); expected that model's weights, as save_pretrained writes them")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    assert str(err.value) == expect
    code, out, err = run_cli(capsys, "harvest", "--model", str(folder), "--hook", HOOK, "--corpus", str(corpus),
                             "--out", str(tmp_path / "acts"), "--no-progress")
    assert (code, out, err) == (2, "", f"saelab harvest: error: {expect}")
    assert not (tmp_path / "acts").exists()


def test_sharded_model_folder_with_corrupt_weights_is_one_line_naming_the_shard(tiny_gpt2, tmp_path):
    """A model saved in shards, one of which is damaged: the shard its index lists is the file named."""
    from saelab.models import ModelLoadError, load_model

    folder = tmp_path / "model"
    tiny_gpt2.model.save_pretrained(folder, max_shard_size="4MB")
    tiny_gpt2.tokenizer.save_pretrained(folder)
    shards = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    shard = folder / shards[-1]
    shard.write_bytes(b"\x00garbage" * 64)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    msg = str(err.value)
    assert msg.startswith(f"cannot load model directory {folder}: {shard} is not a readable safetensors file (") and (
        msg.endswith("); expected the model's weights, as save_pretrained writes them") and "\n" not in msg), msg



def test_model_folder_whose_config_names_its_weights_file_blames_that_file(tiny_gpt2, tiny_dir, tmp_path):
    """config.json's transformers_weights names the file transformers reads in place of model.safetensors: that
    file damaged was one line naming no file, and a damaged model.safetensors beside it (never read) was blamed in
    place of why the named file does not load."""
    from safetensors.torch import save_file

    from saelab.models import ModelLoadError, load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    default, named = folder / "model.safetensors", folder / "weights.safetensors"
    good = default.read_bytes()
    named.write_bytes(good)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": named.name}))
    default.write_bytes(b"\x00garbage" * 64)
    load_model(str(folder))  # transformers reads the named file alone, so the load goes on
    named.write_bytes(good[:-100])
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    assert str(err.value).startswith(f"cannot load model directory {folder}: {named} is not a readable safetensors "
                                     "file ("), err.value
    save_file(misfit_weights("partial", tiny_gpt2), str(named), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    assert str(err.value) == (f"cannot load model directory {folder}: its weights do not fit the GPT2LMHeadModel its "
                              f"config describes ({MISFITS['partial']}); expected that model's weights, as "
                              "save_pretrained writes them")


@pytest.mark.parametrize("case", ["symlink", "index_in_subfolder", "name_transformers_refuses"])
def test_named_weights_file_is_probed_where_transformers_reads_it(case, tiny_dir, tmp_path):
    """transformers_weights as transformers takes it: a symlink to a file outside the folder (every file of a hub
    cache's snapshot) is read, an index's shards are read from the model folder wherever the index lies, and a
    name other than *.safetensors, *.safetensors.index.json or adapter_model.bin is refused unread, so the
    refusal, not that file, is what the message names."""
    from saelab.models import ModelLoadError, load_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    good = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").unlink()
    if case == "symlink":
        blob = tmp_path / "blobs" / "abc"
        blob.parent.mkdir()
        blob.write_bytes(good[:-100])
        (folder / "weights.safetensors").symlink_to(blob)
        named, blamed = "weights.safetensors", folder / "weights.safetensors"
    elif case == "index_in_subfolder":
        (folder / "w-00001.safetensors").write_bytes(good[:-100])
        keys = json.loads(good[8:8 + int.from_bytes(good[:8], "little")])
        (folder / "sub").mkdir()
        (folder / "sub" / "w.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {key: "w-00001.safetensors" for key in keys if key != "__metadata__"}}))
        named, blamed = "sub/w.safetensors.index.json", folder / "w-00001.safetensors"
    else:
        (folder / "weights.bin").write_bytes(b"\x00garbage" * 64)
        named, blamed = "weights.bin", None
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": named}))
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    message = str(err.value)
    if blamed is not None:
        assert message.startswith(f"cannot load model directory {folder}: {blamed} is not a readable safetensors "
                                  "file ("), message
    else:
        assert message.startswith(f"cannot load model directory {folder}: The transformers file in the config seems "
                                  "to be incorrect"), message


_LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1048576\n"


def test_stray_unreadable_file_does_not_hide_why_a_model_folder_fails_to_load(tiny_gpt2, tiny_dir, gpt2_tokenizer,
                                                                              tmp_path):
    """A failed load probed every *.safetensors in the folder, so a file transformers never reads (a git-lfs
    pointer left as adapter_model.safetensors) was named as the fault in place of the real one."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from saelab.models import ModelLoadError, load_model

    misfit = tmp_path / "misfit"  # layer 1's weights left out
    shutil.copytree(tiny_dir, misfit)
    save_file(misfit_weights("partial", tiny_gpt2), str(misfit / "model.safetensors"), metadata={"format": "pt"})
    (misfit / "adapter_model.safetensors").write_text(_LFS_POINTER)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(misfit))
    assert str(err.value) == (f"cannot load model directory {misfit}: its weights do not fit the GPT2LMHeadModel its "
                              f"config describes ({MISFITS['partial']}); expected that model's weights, as "
                              "save_pretrained writes them")

    heads = tmp_path / "heads"  # a whole Llama whose config then asks for 5 heads of its 32 dimensions
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(heads)
    gpt2_tokenizer.save_pretrained(heads)
    config = json.loads((heads / "config.json").read_text())
    (heads / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    (heads / "adapter_model.safetensors").write_text(_LFS_POINTER)
    with pytest.raises(Exception) as err:
        load_model(str(heads))
    assert "hidden size (32) is not a multiple of the number of attention heads (5)" in str(err.value), err.value
    assert "adapter_model" not in str(err.value)


def test_model_folder_whose_config_does_not_validate_is_one_line(gpt2_tokenizer, corpus, tmp_path, capsys):
    """A config that transformers' own checks refuse (5 heads of 32 dimensions) ended in a traceback whose first line,
    "Class validation error for validator 'validate_architecture':", named neither the folder nor the fault."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from saelab.models import ModelLoadError, load_model

    folder = tmp_path / "heads"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    gpt2_tokenizer.save_pretrained(folder)
    load_model(str(folder))  # as saved, it loads
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 5}))
    expect = (f"cannot load model directory {folder}: its config.json does not validate (The hidden size (32) is not a "
              "multiple of the number of attention heads (5).)")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(folder))
    assert str(err.value) == expect
    code, out, err = run_cli(capsys, "harvest", "--model", str(folder), "--hook", "blocks.0.hook_resid_post",
                             "--corpus", str(corpus), "--out", str(tmp_path / "acts"), "--no-progress")
    assert (code, out, err) == (2, "", f"saelab harvest: error: {expect}")
    assert not (tmp_path / "acts").exists()


def tiny_llama_gguf(path: Path, leave_out: str | None = None) -> Path:
    """A 2-layer Llama (d_model 32) of random float32 tensors and a 28-token BPE vocabulary (a to z, one merge, one
    BOS/EOS token), written as a GGUF file with llama.cpp's names; the tensors named ``leave_out``... are left out."""
    import gguf
    import numpy as np

    d, ff, heads, kv_heads, tokens = 32, 64, 4, 2, [*"abcdefghijklmnopqrstuvwxyz", "ab", "<s>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(writer.add_context_length, 64), (writer.add_embedding_length, d), (writer.add_block_count, 2),
                       (writer.add_feed_forward_length, ff), (writer.add_head_count, heads),
                       (writer.add_head_count_kv, kv_heads), (writer.add_rope_dimension_count, d // heads),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_tokenizer_model, "gpt2"),
                       (writer.add_token_list, tokens), (writer.add_token_merges, ["a b"]),
                       (writer.add_token_types, [1] * len(tokens)), (writer.add_bos_token_id, len(tokens) - 1),
                       (writer.add_eos_token_id, len(tokens) - 1)]:
        add(value)
    kv = kv_heads * d // heads
    shapes = {"token_embd": (len(tokens), d), "output_norm": (d,)}
    for i in range(2):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in [
            ("attn_norm", (d,)), ("ffn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (kv, d)), ("attn_v", (kv, d)),
            ("attn_output", (d, d)), ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))]})
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        if leave_out is None or not name.startswith(leave_out):
            writer.add_tensor(f"{name}.weight", rng.standard_normal(shape).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_whose_weights_do_not_fit_its_metadata_is_one_line_naming_them(tmp_path, corpus, capsys, monkeypatch):
    """A .gguf file lacking layer 1's tensors is refused naming them, and what it should hold is worded for a GGUF
    file (save_pretrained writes none); nothing is cached."""
    from saelab.models import ModelLoadError, load_model

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    load_model(str(tiny_llama_gguf(tmp_path / "whole.gguf")), cache=False)  # whole, it loads
    partial = tiny_llama_gguf(tmp_path / "partial.gguf", leave_out="blk.1.")
    expect = (f"cannot load {partial}: its weights do not fit the LlamaForCausalLM its config describes (missing: "
              "model.layers.1.input_layernorm.weight, model.layers.1.mlp.down_proj.weight, "
              "model.layers.1.mlp.gate_proj.weight and 6 more); expected that model's weights, as llama.cpp's "
              "convert_hf_to_gguf.py writes them")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(partial), cache=False)
    assert str(err.value) == expect
    code, out, err = run_cli(capsys, "harvest", "--model", str(partial), "--hook", "blocks.1.hook_resid_post", "--corpus",
                             str(corpus), "--out", str(tmp_path / "acts"), "--no-progress")
    assert (code, out, err) == (2, "", f"saelab harvest: error: {expect}")
    assert not (tmp_path / "acts").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("damage", ["no_magic", "bad_version", "truncated"])
def test_damaged_gguf_is_one_line_naming_it(damage, tmp_path, corpus, capsys, monkeypatch):
    """A .gguf that does not parse (no GGUF magic, a version no reader knows, cut short) was transformers'
    traceback; it is one line naming the file, and nothing is cached."""
    from saelab.models import ModelLoadError, load_model

    monkeypatch.setenv("SAELAB_CACHE_DIR", str(tmp_path / "cache"))
    whole = tiny_llama_gguf(tmp_path / "whole.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes({"no_magic": b"\x00garbage" * 64, "bad_version": whole[:4] + b"\xff\xff\x00\x00" + whole[8:],
                     "truncated": whole[:len(whole) // 2]}[damage])
    with pytest.raises(ModelLoadError) as err:
        load_model(str(bad))
    msg = str(err.value)
    assert msg.startswith(f"cannot load {bad} as a GGUF model file: ") and "\n" not in msg, msg
    code, out, err = run_cli(capsys, "harvest", "--model", str(bad), "--hook", "blocks.1.hook_resid_post", "--corpus",
                             str(corpus), "--out", str(tmp_path / "acts"), "--no-progress")
    assert (code, out, err) == (2, "", f"saelab harvest: error: {msg}")
    assert not (tmp_path / "acts").exists() and not any((tmp_path / "cache").rglob("config.json"))


# ---- a corrupt checkpoint.pt when resuming a training run ------------------------------------------------


def _synthetic_source(rows=1024, d=D, batch=128):
    g = torch.Generator().manual_seed(0)
    data = torch.randn(rows, 96, generator=g).relu() @ torch.randn(96, d, generator=g) + 1.0

    def batches_from(start):
        for i in range(start * batch, rows - batch + 1, batch):
            yield data[i:i + batch]
    return batches_from


def _train_cfg(**kw) -> TrainConfig:
    base = dict(n_latents=128, k=8, batch_size=128, total_tokens=1024, init_rows=256, checkpoint_every=2,
                log_every=1, lr=1e-2, warmup_steps=2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("damage", ["truncated", "cut_small", "empty", "garbage", "foreign", "pickle_runs_code",
                                    "other_run", "optimizer_layout"])
def test_corrupt_checkpoint_when_resuming(damage, tmp_path):
    run = tmp_path / "run"
    train_sae(_train_cfg(), _synthetic_source(), run, d_in=D, progress=False, stop_after_steps=3)
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    ckpt_path = run / CHECKPOINT
    marker = tmp_path / "pwned"
    if damage == "truncated":
        ckpt_path.write_bytes(ckpt_path.read_bytes()[: ckpt_path.stat().st_size // 2])
        expect = "unreadable, truncated or corrupt (truncated or damaged archive: failed finding central directory)"
    elif damage == "cut_small":  # under 64 KiB, torch's zip reader names no fault: [Errno 22] Invalid argument
        ckpt_path.write_bytes(ckpt_path.read_bytes()[:30000])
        expect = "unreadable, truncated or corrupt (truncated or damaged archive (30,000 bytes)); expected"
    elif damage == "empty":  # torch says only EOFError
        ckpt_path.write_bytes(b"")
        expect = "unreadable, truncated or corrupt (empty file (0 bytes)); expected"
    elif damage == "garbage":
        ckpt_path.write_bytes(b"\x00not a checkpoint\xff" * 100)
        expect = "unreadable, truncated or corrupt"
    elif damage == "foreign":  # a valid torch file, but an SAE release rather than a training state
        torch.save(openai_state_dict(), ckpt_path)
        expect = "missing step, sae, optimizer, tokens_since_fired, normalizer, ema"
    elif damage == "pickle_runs_code":
        state = torch.load(ckpt_path, weights_only=True)
        state["normalizer"] = _Payload(marker)
        torch.save(state, ckpt_path)
        expect = "unreadable, truncated or corrupt"
    elif damage == "optimizer_layout":  # Adam moments in another layout (W_enc's as [d, n], not [n, d])
        state = torch.load(ckpt_path, weights_only=True)
        for moments in state["optimizer"]["state"].values():
            for key, t in moments.items():
                if t.dim() == 2 and t.shape[1] == D:
                    moments[key] = t.t().contiguous()
        torch.save(state, ckpt_path)
        expect = "does not hold a training state of this run"
    else:  # the checkpoint of another run (other n_latents) copied over this one's
        train_sae(_train_cfg(n_latents=64), _synthetic_source(), tmp_path / "other", d_in=D, progress=False,
                  stop_after_steps=2)
        ckpt_path.write_bytes((tmp_path / "other" / CHECKPOINT).read_bytes())
        expect = "does not hold a training state of this run"
    before = snapshot(run)
    with pytest.raises(CheckpointError) as err:
        train_sae(_train_cfg(), _synthetic_source(), run, d_in=D, progress=False)
    msg = str(err.value)
    assert f"cannot resume from {ckpt_path}" in msg and expect in msg and "--overwrite" in msg
    assert "weights_only` set to `False`" not in msg  # torch's advice to unpickle anything is not repeated
    assert "miniz" not in msg and "\n" not in msg
    assert snapshot(run) == before  # the checkpoint (and everything else) is left as it was
    assert not marker.exists()


# ---- empty and missing corpora ---------------------------------------------------------------------------


def _bad_corpus(kind: str, tmp: Path) -> tuple[Path, str]:
    if kind == "missing":
        return tmp / "no-such-corpus.jsonl", "does not exist"
    path = {"empty": tmp / "empty.txt", "blank_jsonl": tmp / "blank.jsonl", "too_short": tmp / "short.txt"}[kind]
    path.write_text({"empty": "", "blank_jsonl": '{"text": "  "}\n\n{"text": ""}\n',
                     "too_short": "Just a few words."}[kind])
    expect = "too few for one context" if kind == "too_short" else "contains no non-empty text"
    return path, expect


CORPUS_KINDS = ["missing", "empty", "blank_jsonl", "too_short"]


def test_cli_corpus_shorter_than_a_context_is_refused_before_the_model_loads(tiny_dir, corpus, tmp_path, capsys,
                                                                             monkeypatch):
    """A corpus too short for one context was refused once the model had loaded (harvest), or after the harvest
    and the training (quickstart's eval corpus: `gave only 0 contexts of 32 tokens; 33 requested`), naming no
    option. Now before the load: the corpus's tokens, what one context takes, and the option that shrinks it."""
    import saelab.pipeline

    short, _ = _bad_corpus("too_short", tmp_path)  # "Just a few words.": 5 GPT-2 tokens
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out, err = run_cli(capsys, "harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(short),
                             "--n-tokens", "1024", "--context-size", "32", "--out", str(tmp_path / "acts"),
                             "--no-progress")
    assert code == 2 and err == (f"saelab harvest: error: corpus {str(short)!r} holds 5 tokens, too few for one "
                                 "context of 32 (BOS and 31 tokens of text); expected a corpus of at least 31 tokens, "
                                 "or --context-size <= 6")
    run = ["quickstart", "--out", str(tmp_path / "q"), "--harvest-model", str(tiny_dir), "--harvest-hook", HOOK,
           "--harvest-context-size", "32", "--n-tokens", "1024", "--n-latents", "64", "--k", "4", "--batch-size",
           "128", "--init-rows", "256", "--no-progress"]
    for extra, option in ((["--harvest-corpus", str(short)], "--harvest-context-size"),
                          (["--harvest-corpus", str(corpus), "--eval-corpus", str(short)], "--eval-context-size")):
        code, out, err = run_cli(capsys, *run, *extra)
        assert code == 2 and err == (f"saelab quickstart: error: corpus {str(short)!r} holds 5 tokens, too few for "
                                     "one context of 32 (BOS and 31 tokens of text); expected a corpus of at least "
                                     f"31 tokens, or {option} <= 6")
        assert not (tmp_path / "q" / "activations").exists()


SHORT_EVAL_TEXT = "The cat sat on the mat. " * 50  # 351 GPT-2 tokens: 11 contexts of 32, 341 tokens an SAE reads


def _too_short(corpus: str, reads: str, text: str, lower: str) -> str:
    """The refusal of an eval corpus of SHORT_EVAL_TEXT too short for the evaluation's ``reads``."""
    return (f"{corpus} holds 351 tokens, too few for the evaluation ({reads} in contexts of 32: {text} tokens of "
            f"text); expected a corpus of at least {text} tokens, or {lower} <= 341")


def test_cli_quickstart_refuses_an_eval_corpus_too_short_for_the_evaluation_before_the_harvest(
        tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    """An eval corpus that fills a context but holds fewer tokens than the evaluation reads was refused after
    the harvest and the training (`gave only 11 contexts of 32 tokens; 1058 requested`), naming no option.
    Now before the model loads: the corpus as given, its tokens, the evaluation's and the options that lower them."""
    import saelab.pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text(SHORT_EVAL_TEXT, encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"eval": {"corpus": "c.txt", "downstream_tokens": 100_000}}))
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    run = ["quickstart", "--out", "q", "--harvest-model", str(tiny_dir), "--harvest-hook", HOOK, "--harvest-corpus",
           str(corpus), "--harvest-context-size", "32", "--n-tokens", "1024", "--n-latents", "64", "--k", "4",
           "--batch-size", "128", "--init-rows", "256", "--no-progress"]
    both = "--eval-recon-tokens and --eval-downstream-tokens"
    for extra, message in (
            (["--eval-corpus", "c.txt"], _too_short("--eval-corpus 'c.txt'", "--eval-recon-tokens 32,768 and "
                                                    "--eval-downstream-tokens 16,384", "32,798", both)),
            # only the setting past the corpus is named; one from --config as the file's entry
            (["--config", "c.json", "--eval-recon-tokens", "300"],
             "--config c.json: " + _too_short("eval.corpus 'c.txt'", "eval.downstream_tokens 100,000", "100,006",
                                              "eval.downstream_tokens"))):
        code, out, err = run_cli(capsys, *run, *extra)
        assert code == 2 and err == f"saelab quickstart: error: {message}"
        assert not (tmp_path / "q").exists()


@pytest.fixture(scope="module")
def tiny_dir_cache(tiny_gpt2, tiny_dir, corpus, tmp_path_factory) -> Path:
    """A complete activation cache of 1,024 rows recording tiny_dir, whose tokenizer is on disk, as its model."""
    folder = tmp_path_factory.mktemp("cache") / "acts"
    harvest(dataclasses.replace(harvest_cfg(corpus), model=str(tiny_dir)), folder, lm=tiny_gpt2, progress=False)
    return folder


def test_cli_sweep_and_eval_refuse_an_eval_corpus_too_short_for_the_evaluation_before_the_load(
        tiny_dir_cache, tmp_path, capsys, monkeypatch):
    """`sweep --eval` trained every run, then loaded the model and failed on a short --eval-corpus; `eval` of a
    sweep, a run or an SAE loaded the model first. Now each is refused before (the sweep before its training)."""
    import saelab.pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.txt").write_text(SHORT_EVAL_TEXT, encoding="utf-8")
    sweep = ["sweep", "--activations", str(tiny_dir_cache), "--out", "sw", "--grid", "k=4,8", "--n-latents", "64",
             "--batch-size", "128", "--init-rows", "256", "--no-progress"]
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, out, err = run_cli(capsys, *sweep, "--eval", "--eval-corpus", "c.txt", "--eval-recon-tokens", "341")
    assert code == 2 and err.splitlines()[-1] == "saelab sweep: error: " + _too_short(
        "--eval-corpus 'c.txt'", "--eval-downstream-tokens 16,384", "16,399", "--eval-downstream-tokens")
    assert not (tmp_path / "sw").exists()
    assert run_cli(capsys, *sweep)[0] == 0  # trained without --eval: no model runs
    before = snapshot(tmp_path / "sw")
    short = _too_short("--corpus 'c.txt'", "--recon-tokens 32,768 and --downstream-tokens 16,384", "32,798",
                       "--recon-tokens and --downstream-tokens")
    for target in (["sw"], ["sw/k4"], ["sw/k4/sae", "--out", "ev"]):
        code, out, err = run_cli(capsys, "eval", *target, "--corpus", "c.txt", "--no-progress")
        assert code == 2 and err == f"saelab eval: error: {short}", target
    # entries of two --config files: each followed by its file where first named
    (tmp_path / "a.json").write_text(json.dumps({"eval": {"corpus": "c.txt"}}))
    (tmp_path / "b.json").write_text(json.dumps({"eval": {"downstream_tokens": 100_000}}))
    code, out, err = run_cli(capsys, "eval", "sw/k4/sae", "--out", "ev", "--recon-tokens", "100", "--config", "a.json",
                             "b.json")
    assert code == 2 and err == "saelab eval: error: " + _too_short(
        "eval.corpus (--config a.json) 'c.txt'", "eval.downstream_tokens (--config b.json) 100,000", "100,006",
        "eval.downstream_tokens")
    assert snapshot(tmp_path / "sw") == before and not (tmp_path / "ev").exists()


def test_an_eval_corpus_too_short_is_refused_in_the_same_words_after_a_load(tiny_gpt2, tmp_path):
    """Where the tokenizer comes only with the model (here, a model already loaded), the evaluation's own read
    refuses the corpus as the check before a load does, by the settings' names (`gave only 11 contexts of 32
    tokens; 1058 requested` before)."""
    (tmp_path / "c.txt").write_text(SHORT_EVAL_TEXT, encoding="utf-8")
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=64, k=4, hook_name=HOOK, context_size=32))
    with pytest.raises(CorpusError) as err:
        evaluate(sae, lm=tiny_gpt2, cfg=EvalConfig(corpus=str(tmp_path / "c.txt")), progress=False)
    assert str(err.value) == _too_short(f"eval.corpus {str(tmp_path / 'c.txt')!r}", "eval.recon_tokens 32,768 and "
                                        "eval.downstream_tokens 16,384", "32,798",
                                        "eval.recon_tokens and eval.downstream_tokens")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", CORPUS_KINDS)
def test_bad_corpus_in_harvest_keeps_earlier_cache(kind, overwrite, tiny_gpt2, tiny_cache, tmp_path):
    bad, expect = _bad_corpus(kind, tmp_path)
    error = CorpusError
    if not overwrite and kind != "missing":  # the cache, of another corpus, is refused first (before the model loads)
        error, expect = ActivationCacheError, "it was written with meta.harvest.corpus"
    before = snapshot(tiny_cache)
    with pytest.raises(error) as err:  # even overwrite=True keeps the old cache: nothing to replace it with
        harvest(harvest_cfg(bad), tiny_cache, lm=tiny_gpt2, overwrite=overwrite, progress=False)
    assert str(bad) in str(err.value) and expect in str(err.value)
    assert snapshot(tiny_cache) == before
    assert ActivationCache(tiny_cache).n_rows == 1024


@pytest.mark.parametrize("kind", CORPUS_KINDS)
def test_bad_corpus_in_cli_harvest(kind, tiny_dir, tmp_path, capsys):
    bad, expect = _bad_corpus(kind, tmp_path)
    code, out, err = run_cli(capsys, "harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(bad),
                             "--out", str(tmp_path / "acts"), "--context-size", "32", "--no-progress")
    assert code == 2 and out == ""
    assert err.startswith("saelab harvest: error: ") and str(bad) in err and expect in err
    assert not (tmp_path / "acts" / "manifest.json").exists()


def test_cli_harvest_into_a_cache_of_other_settings_names_the_option(tiny_dir, corpus, tmp_path, capsys):
    def harvest(n_tokens: str) -> tuple[int, str, str]:
        return run_cli(capsys, "harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(corpus), "--out",
                       str(tmp_path / "acts"), "--context-size", "32", "--n-tokens", n_tokens,
                       "--buffer-tokens", "8192", "--no-progress", "--device", "cpu")

    assert harvest("1024")[0] == 0
    before = snapshot(tmp_path / "acts")
    code, _, err = harvest("2048")
    assert code == 2 and err.endswith("it was written with --n-tokens 1024, not 2048; pass --overwrite to replace it")
    assert snapshot(tmp_path / "acts") == before


def test_quickstart_names_its_cache_of_other_settings(tiny_gpt2, tiny_cache, corpus, tmp_path):
    import shutil

    from saelab.pipeline import ACTIVATIONS_DIR, _quickstart_harvest

    shutil.copytree(tiny_cache, tmp_path / "run" / ACTIVATIONS_DIR)
    with pytest.raises(ActivationCacheError, match="holds activations harvested with other settings"):
        _quickstart_harvest(harvest_cfg(corpus, n_tokens=2048), tmp_path / "run", tiny_gpt2, False, False)


def test_quickstart_names_an_empty_harvest_of_other_settings_once(tiny_gpt2, tiny_cache, corpus, tmp_path):
    """A harvest cut off before its first row, of other settings: said once what the folder holds, with the
    setting that differs (the cache's own words, "it holds no rows yet, from a harvest started with", repeated it)."""
    import shutil

    from saelab.pipeline import ACTIVATIONS_DIR, _quickstart_harvest

    folder = tmp_path / "run" / ACTIVATIONS_DIR
    shutil.copytree(tiny_cache, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for shard in manifest["shards"]:
        (folder / shard["file"]).unlink()
    (folder / "manifest.json").write_text(json.dumps({**manifest, "n_rows": 0, "shards": [], "complete": False}))
    with pytest.raises(ActivationCacheError) as refused:
        _quickstart_harvest(harvest_cfg(corpus, n_tokens=2048), tmp_path / "run", tiny_gpt2, False, False)
    assert str(refused.value) == (f"{folder} holds an empty harvest started with other settings "
                                  "(meta.harvest.n_tokens 1024, not 2048); pass --overwrite-activations --overwrite to "
                                  "harvest and train again, or pick another --out")


def test_quickstart_refuses_its_cache_of_other_settings_before_the_model_loads(tiny_cache, corpus, tmp_path,
                                                                               monkeypatch):
    import shutil

    import saelab.pipeline
    from saelab.pipeline import ACTIVATIONS_DIR, QuickstartConfig, quickstart

    shutil.copytree(tiny_cache, tmp_path / "run" / ACTIVATIONS_DIR)
    before = snapshot(tmp_path / "run" / ACTIVATIONS_DIR)
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = QuickstartConfig(harvest=harvest_cfg(corpus, n_tokens=2048),
                           train=TrainConfig(n_latents=64, k=4, total_tokens=1024, batch_size=256),
                           eval=EvalConfig(corpus=str(corpus)))
    with pytest.raises(ActivationCacheError, match=r"holds activations harvested with other settings \(it was written "
                                                   r"with meta.harvest.n_tokens 1024, not 2048\); pass "
                                                   "--overwrite-activations --overwrite"):
        quickstart(cfg, tmp_path / "run", progress=False)
    assert snapshot(tmp_path / "run" / ACTIVATIONS_DIR) == before


def test_quickstart_tells_its_cache_of_a_relative_corpus_by_its_text(tiny_gpt2, data_dir, tmp_path, monkeypatch):
    """quickstart's checks before the model loads compare its cache as harvest does: corpus.jsonl from another
    folder (other text) is refused by its text, a/'s file by another path is the cache's (a real difference named)."""
    import saelab.pipeline
    from saelab.pipeline import ACTIVATIONS_DIR, QuickstartConfig, quickstart

    a, b = _two_corpora_of_one_name(data_dir, tmp_path)
    acts = tmp_path / "run" / ACTIVATIONS_DIR
    monkeypatch.chdir(a)
    harvest(harvest_cfg("corpus.jsonl"), acts, lm=tiny_gpt2, progress=False)
    before = snapshot(acts)
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))

    def cfg(corpus: str, n_tokens: int = 1024) -> QuickstartConfig:
        return QuickstartConfig(harvest=harvest_cfg(corpus, n_tokens=n_tokens),
                                train=TrainConfig(n_latents=64, k=4, total_tokens=n_tokens, batch_size=256),
                                eval=EvalConfig(corpus=str(a / "corpus.jsonl")))

    monkeypatch.chdir(b)
    with pytest.raises(ActivationCacheError) as refused:
        quickstart(cfg("corpus.jsonl"), tmp_path / "run", progress=False)
    assert str(refused.value) == (
        f"{acts} holds activations harvested with other settings (it was written with the corpus 'corpus.jsonl', "
        f"which held other text then ({_shown_text(a / 'corpus.jsonl')}; now {_shown_text(b / 'corpus.jsonl')})); "
        "pass --overwrite-activations --overwrite to harvest and train again, or pick another --out")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ActivationCacheError, match=r"\(it was written with meta.harvest.n_tokens 1024, not 2048\)"):
        quickstart(cfg("a/corpus.jsonl", n_tokens=2048), tmp_path / "run", progress=False)
    assert snapshot(acts) == before


def test_quickstart_with_another_n_tokens_names_the_cache_and_both_options_at_once(tiny_dir, corpus, tmp_path,
                                                                                   capsys):
    """A finished quickstart run again with another --n-tokens was refused for its run with "pass --overwrite
    ... (the activation cache is kept)", then with --overwrite for its cache: the first refusal names the
    cache and both options, and the option typed (not --total-tokens or --harvest-n-tokens, which it sets)."""
    q = tmp_path / "q"
    run = ["quickstart", "--out", str(q), "--harvest-model", str(tiny_dir), "--harvest-hook", HOOK,
           "--harvest-corpus", str(corpus), "--harvest-context-size", "32", "--harvest-buffer-tokens", "8192",
           "--n-latents", "64", "--k", "4", "--batch-size", "128", "--init-rows", "256", "--eval-corpus", str(corpus),
           "--eval-recon-tokens", "256", "--eval-downstream-tokens", "128", "--device", "cpu", "--no-progress"]
    assert run_cli(capsys, *run, "--n-tokens", "1024")[0] == 0
    before = snapshot(q)
    code, _, err = run_cli(capsys, *["8" if word == "4" else word for word in run], "--n-tokens", "1024")
    assert code == 2 and err.endswith("(--k 4 -> 8); pick another --out, or pass --overwrite to train again (the "
                                      "activation cache is kept)"), err  # this folder holds one
    code, _, err = run_cli(capsys, *run, "--n-tokens", "2048")
    assert code == 2 and err == (f"saelab quickstart: error: {q / 'activations'} holds activations harvested with "
                                 "other settings (it was written with --n-tokens 1024, not 2048); pass "
                                 "--overwrite-activations --overwrite to harvest and train again, or pick another --out")
    assert snapshot(q) == before
    code, _, err = run_cli(capsys, *run, "--n-tokens", "2048", "--overwrite-activations", "--overwrite")
    assert code == 0, err
    assert json.loads((q / "train_config.json").read_text())["train"]["total_tokens"] == 2048
    # a finished cache as an earlier saelab wrote it (no sample_pool_tokens_drawn): trained on, as harvest reuses it
    q2 = tmp_path / "q2"
    shutil.copytree(q / "activations", q2 / "activations")
    manifest = json.loads((q2 / "activations" / "manifest.json").read_text())
    del manifest["meta"]["sample_pool_tokens_drawn"]
    (q2 / "activations" / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, *[str(q2) if word == str(q) else word for word in run], "--n-tokens", "2048")
    assert code == 0 and "already holds this harvest, 2,048 activations" in err, err


def test_quickstart_n_tokens_from_a_config_file_is_named_by_its_entry(tiny_dir, corpus, tmp_path, capsys):
    """A --config file's n_tokens was named by the options it sets (--harvest-n-tokens, --total-tokens) or as
    --n-tokens, never typed: each refusal of the token count names the file's entry; typed, --n-tokens."""
    q, cfg = tmp_path / "q", tmp_path / "q.yaml"
    run = ["quickstart", "--out", str(q), "--harvest-model", str(tiny_dir), "--harvest-hook", HOOK,
           "--harvest-corpus", str(corpus), "--harvest-context-size", "32", "--harvest-buffer-tokens", "8192",
           "--n-latents", "64", "--k", "4", "--init-rows", "256", "--eval-corpus", str(corpus),
           "--eval-recon-tokens", "256", "--eval-downstream-tokens", "128", "--device", "cpu", "--no-progress",
           "--config", str(cfg)]
    cfg.write_text("n_tokens: 1024\ntrain:\n  batch_size: 128\n")
    assert run_cli(capsys, *run)[0] == 0
    before = snapshot(q)
    lead = f"saelab quickstart: error: --config {cfg}: "
    cfg.write_text("n_tokens: 2048\ntrain:\n  batch_size: 128\n")
    for extra, message in (
            ([], f"{q / 'activations'} holds activations harvested with other settings (it was written with n_tokens "
                 "1024, not 2048); pass --overwrite-activations --overwrite to harvest and train again, or pick "
                 "another --out"),
            (["--overwrite-activations"], f"run folder {q} holds a finished run trained with other settings (n_tokens "
                                          "1024 -> 2048); pick another --out, or pass --overwrite to train again"),
            (["--total-tokens", "1024"], "n_tokens 2048 and --total-tokens 1024 both set the tokens to harvest and "
                                         "train on; give n_tokens only")):
        assert run_cli(capsys, *run, *extra) == (2, "", lead + message)
    # the file's own total_tokens beside its n_tokens: refused, not silently replaced by n_tokens
    cfg.write_text("n_tokens: 2048\ntrain:\n  batch_size: 128\n  total_tokens: 4096\n")
    assert run_cli(capsys, *run) == (2, "", lead + "n_tokens 2048 and train.total_tokens 4096 both set the tokens to "
                                     "harvest and train on; give n_tokens only")
    cfg.write_text("n_tokens: 100\ntrain:\n  batch_size: 128\n")  # both entries of the file, named once
    assert run_cli(capsys, *run)[2] == f"{lead}n_tokens 100 is less than one batch (train.batch_size 128)"
    assert snapshot(q) == before
    # More tokens than the corpus holds: the harvest takes all it has, then training is refused.
    cfg.write_text("n_tokens: 200000\ntrain:\n  batch_size: 128\n")
    short = [str(tmp_path / "short") if word == str(q) else word for word in run]
    typed = "saelab quickstart: error: "
    for given, opening, name in (([], lead, "n_tokens"), (["--n-tokens", "200000"], typed, "--n-tokens")):
        code, _, err = run_cli(capsys, *short, *given)
        rows = re.search(r"gave ([\d,]+) activations", err)[1]
        assert code == 2 and err.splitlines()[-1] == (
            f"{opening}activation cache {tmp_path / 'short' / 'activations'} holds {rows} rows but training needs "
            f"200,000 ({name}); harvest more or train on fewer tokens ({name} {rows.replace(',', '')} at most)")


# ---- NaN and inf --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_sae_fed_non_finite_rows(bad_value):
    sae = make_sae()
    x = torch.randn(2, 5, D)
    x[1, 3, 7] = bad_value
    for call in (sae.forward, sae.encode, sae.forward_with_latents):
        with pytest.raises(NonFiniteError, match=rf"activations given to the SAE \(trained on {re.escape(HOOK)}\) "
                                                 r"contain NaN or inf in 1 of 10 rows"):
            call(x)


@pytest.mark.parametrize("where,expect", [(50, "initialisation batch"), (700, "activation batch 5")])
def test_trainer_fed_non_finite_rows(tmp_path, where, expect):
    source = _synthetic_source()
    data = torch.cat(list(source(0)))
    data[where, 3] = float("nan")

    def batches_from(start):
        yield from data[start * 128:].split(128)

    with pytest.raises(NonFiniteError, match=f"{expect} contains NaN or inf activations"):
        train_sae(_train_cfg(), batches_from, tmp_path / "run", d_in=D, progress=False)
    assert not (tmp_path / "run" / "sae").exists()


@pytest.fixture(scope="module")
def nan_gpt2(tiny_gpt2) -> LanguageModel:
    """tiny_gpt2 with ONE weight set to NaN (a real model, broken on purpose): every activation after it is NaN."""
    model = copy.deepcopy(tiny_gpt2.model)
    with torch.no_grad():
        model.transformer.h[0].ln_1.weight[5] = float("nan")
    return LanguageModel(model, tiny_gpt2.tokenizer, "tiny-gpt2-nan")


def test_harvest_from_model_producing_nan(nan_gpt2, corpus, tmp_path):
    with pytest.raises(NonFiniteError) as err:
        harvest(harvest_cfg(corpus), tmp_path / "acts", lm=nan_gpt2, progress=False)
    assert f"NaN or inf in activations at hook {HOOK!r}, harvest batch 0" in str(err.value)
    with pytest.raises(ActivationCacheError):  # no cache that looks usable was left behind
        ActivationCache(tmp_path / "acts")


def test_evaluate_on_model_producing_nan_keeps_earlier_metrics(nan_gpt2, corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text('{"nmse": 0.1}\n')
    before = snapshot(out)
    with pytest.raises(NonFiniteError) as err:
        evaluate(make_sae(), lm=nan_gpt2, cfg=EvalConfig(corpus=str(corpus), recon_tokens=256, downstream_tokens=128),
                 out_dir=out, progress=False)
    assert f"activations at {HOOK} of model tiny-gpt2-nan" in str(err.value) and str(corpus) in str(err.value)
    assert snapshot(out) == before


# ---- a full disk while writing -----------------------------------------------------------------------------

FSIZE_LIMIT = 16_384  # bytes: above every cfg.json/manifest, below every weights file, checkpoint and shard

_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    import torch
    from saelab.data import write_activation_cache
    from saelab.sae import SAEConfig, TopKSAE, save_sae
    from saelab.train import TrainConfig, Trainer
    from saelab.train.checkpoint import save_checkpoint

    base, limit = Path(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    torch.manual_seed(1)

    def sae_b():
        return TopKSAE(SAEConfig(64, 512, 8, hook_name="blocks.1.hook_resid_post", model_name="other"))

    def rows():
        g = torch.Generator().manual_seed(7)
        for _ in range(4):
            yield torch.randn(128, 64, generator=g)

    cases = {
        "save_sae": lambda: save_sae(sae_b(), base / "sae"),
        "checkpoint": lambda: save_checkpoint(base / "run", Trainer(
            TrainConfig(n_latents=512, k=8, batch_size=128, total_tokens=1024), sae_b(), 2.0).state_dict()),
        "cache_shard": lambda: write_activation_cache(rows(), base / "acts", meta={"hook_name": "h"},
                                                      shard_rows=256, resume=True, skip_written=False,
                                                      progress=False),
    }
    result = {}
    for name, write in cases.items():
        try:
            write()
            result[name] = {"type": None}
        except BaseException as e:
            result[name] = {"type": type(e).__name__, "oserror": isinstance(e, OSError),
                            "errno": getattr(e, "errno", None), "message": str(e)}
    print(json.dumps(result))
""")


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """Earlier results written here, then overwritten by a child process whose files cannot grow past
    FSIZE_LIMIT bytes; returns (folder, snapshots taken before, the child's report per case)."""
    base = tmp_path_factory.mktemp("full_disk")
    save_sae(make_sae(n=256, seed=3), base / "sae")  # (a) a valid SAE folder (another SAE than the child's)
    trainer = Trainer(_train_cfg(n_latents=256), make_sae(n=256, seed=4), 1.5)
    trainer.step = 3
    save_checkpoint(base / "run", trainer.state_dict())  # (b) a valid checkpoint

    def interrupted_rows():  # (c) an activation cache, interrupted after its first 256-row shard
        g = torch.Generator().manual_seed(5)
        for _ in range(3):
            yield torch.randn(128, D, generator=g)
        raise _Stop

    with pytest.raises(_Stop):
        write_activation_cache(interrupted_rows(), base / "acts", meta={"hook_name": "h"}, shard_rows=256,
                               progress=False)
    before = {name: snapshot(base / name) for name in ("sae", "run", "acts")}
    assert before["acts"].keys() == {"manifest.json", "shard_00000.npy"}
    assert min(len(before["sae"]["sae_weights.safetensors"]), len(before["run"][CHECKPOINT]),
               len(before["acts"]["shard_00000.npy"])) > FSIZE_LIMIT > len(before["sae"]["cfg.json"])
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(FSIZE_LIMIT)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    return base, before, json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_failed_with_efbig(report: dict, target: Path) -> None:
    assert report["type"] is not None, "the write should have failed"
    assert report["oserror"], report  # a plain OSError, not a serializer's RuntimeError
    assert report["errno"] == 27, report  # EFBIG, "File too large"
    assert str(target) in report["message"], report  # names the file it could not write


def test_full_disk_save_sae_keeps_earlier_sae(full_disk):
    base, before, report = full_disk
    _assert_failed_with_efbig(report["save_sae"], base / "sae" / "sae_weights.safetensors")
    assert snapshot(base / "sae") == before["sae"]
    assert temp_files(base / "sae") == []
    again = load_sae(base / "sae")
    expected = make_sae(n=256, seed=3)
    for name, p in expected.named_parameters():
        assert torch.equal(getattr(again, name), p), name


def test_full_disk_checkpoint_keeps_earlier_checkpoint(full_disk):
    base, before, report = full_disk
    _assert_failed_with_efbig(report["checkpoint"], base / "run" / CHECKPOINT)
    assert snapshot(base / "run") == before["run"]
    assert temp_files(base / "run") == []
    state = load_checkpoint(base / "run")
    assert state["step"] == 3 and state["normalizer"] == 1.5
    assert torch.equal(state["sae"]["W_dec"], make_sae(n=256, seed=4).W_dec)


def test_full_disk_cache_shard_keeps_earlier_shards(full_disk):
    base, before, report = full_disk
    _assert_failed_with_efbig(report["cache_shard"], base / "acts" / "shard_00001.npy")
    assert snapshot(base / "acts") == {**before["acts"], LOCK: b""}  # and the writer's emptied lock file
    assert temp_files(base / "acts") == []
    partial = ActivationCache(base / "acts", allow_incomplete=True)
    assert (partial.n_rows, partial.complete) == (256, False)
    # With room again, the interrupted cache is resumed and completed from where it stood.
    g = torch.Generator().manual_seed(5)
    all_rows = torch.cat([torch.randn(128, D, generator=g) for _ in range(4)])
    cache = write_activation_cache(all_rows.split(128), base / "acts", meta={"hook_name": "h"}, shard_rows=256,
                                   resume=True, progress=False)
    assert cache.n_rows == 512
    assert torch.equal(cache.read(0, 512), all_rows.half().float())


# ---- refusing to overwrite a finished run ------------------------------------------------------------------


def test_cli_train_keeps_a_finished_run(tiny_cache, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--activations", str(tiny_cache), "--out", str(run), "--n-latents", "64", "--batch-size", "128",
            "--total-tokens", "512", "--init-rows", "256", "--no-progress"]
    args = [*base, "--k", "4"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and json.loads(out)["n_latents"] == 64
    before = snapshot(run)
    # The same options again: the finished run is kept and is the answer, untouched.
    code, again, err = run_cli(capsys, *args)
    assert code == 0 and again == out and "already holds this finished run (--overwrite trains it again)" in err
    assert snapshot(run) == before
    code, out, err = run_cli(capsys, *base, "--k", "8")  # other options: refused
    assert code == 2 and out == ""
    assert err.startswith(f"saelab train: error: run folder {run} holds a finished run trained with other settings")
    assert "--overwrite" in err
    assert snapshot(run) == before
    assert issubclass(RunExistsError, SaelabError)


def test_quickstart_into_a_finished_relu_run_names_no_top_k_setting(tiny_cache, tiny_dir, corpus, tmp_path, capsys):
    """A ReLU run records the top-k settings it never used (k, AuxK's, Multi-TopK's); a quickstart of a top-k SAE
    into its folder was refused naming "-k 32 -> 4" (and --k-aux, --multi-topk, --multi-topk-factor) beside the
    architecture, a k the ReLU run never had. A setting that acts on nothing in one of the runs is no difference
    between them: the change that makes it act on nothing is named."""
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(run), "--architecture",
                             "relu", "--n-latents", "64", "--batch-size", "128", "--total-tokens", "512",
                             "--init-rows", "256", "--no-progress")
    assert code == 0 and json.loads(out)["k"] is None, err
    assert json.loads((run / "train_config.json").read_text())["train"]["k"] == 32  # recorded, unused
    before = snapshot(run)
    code, out, err = run_cli(capsys, "quickstart", "--out", str(run), "--harvest-model", str(tiny_dir), "--harvest-hook",
                             HOOK, "--harvest-corpus", str(corpus), "--harvest-context-size", "32", "--n-tokens", "512",
                             "--n-latents", "64", "--batch-size", "128", "--init-rows", "256", "-k", "4", "--k-aux",
                             "16", "--multi-topk", "--multi-topk-factor", "2", "--no-progress")
    assert (code, out) == (2, "") and err == (
        f'saelab quickstart: error: run folder {run} holds a finished run trained with other settings (--architecture '
        '"relu" -> "topk"); pick another --out, or pass --overwrite to train again'), err
    assert snapshot(run) == before


def test_cli_train_on_a_small_cache_trains_on_all_its_rows_unless_total_tokens_is_given(tiny_cache, tmp_path, capsys):
    """`saelab train --activations CACHE` on a cache of 1,024 rows was refused: the short-run recipe's
    --total-tokens 1,048,576 did not fit, though the user never typed it. Left at its default it now trains on
    all the cache's rows, says so, and records it; a --total-tokens typed larger than the cache is refused."""
    small = ["--n-latents", "64", "--k", "4", "--init-rows", "256", "--no-progress"]
    code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(tmp_path / "run"),
                             "--batch-size", "128", *small)
    assert code == 0, err
    assert err.splitlines()[0] == (f"saelab: activation cache {tiny_cache} holds 1,024 rows, fewer than the recipe's "
                                   "1,048,576 training tokens; training on all of them (--total-tokens 1024)")
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]
    assert (recorded["total_tokens"], read_status(tmp_path / "run")["state"]) == (1024, "finished")
    # 1,024 rows in batches of 384: two whole batches train, and that is what is said and recorded.
    code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(tmp_path / "part"),
                             "--batch-size", "384", *small)
    assert code == 0, err
    assert err.splitlines()[0] == (f"saelab: activation cache {tiny_cache} holds 1,024 rows, fewer than the recipe's "
                                   "1,048,576 training tokens; training on 768 of them, in whole batches of 384 "
                                   "(--total-tokens 768)")
    assert "not a multiple" not in err
    assert json.loads((tmp_path / "part" / "train_config.json").read_text())["train"]["total_tokens"] == 768
    code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(tmp_path / "typed"),
                             "--batch-size", "128", "--total-tokens", "2048", *small)
    assert code == 2 and "holds 1,024 rows but training needs 2,048" in err and "--total-tokens 1024 at most" in err
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  total_tokens: 2048\n")
    code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(tmp_path / "file"),
                             "--batch-size", "128", "--config", str(config), *small)
    assert code == 2 and err == (f"saelab train: error: --config {config}: activation cache {str(tiny_cache)!r} holds "
                                 "1,024 rows but training needs 2,048 (train.total_tokens); harvest more or train on "
                                 "fewer tokens (train.total_tokens 1024 at most)")
    code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(tmp_path / "batch"),
                             "--batch-size", "2048", *small)
    assert code == 2 and err == (f"saelab train: error: activation cache {str(tiny_cache)!r} holds 1,024 rows, fewer "
                                 "than one batch (--batch-size 2048); harvest more, or give a smaller --batch-size")


def test_cli_train_warmup_steps_are_checked_against_the_steps_the_run_trains(tiny_cache, tmp_path, capsys):
    """On a cache of 1,024 rows in batches of 128 the run trains 8 steps. --warmup-steps 10000 was refused as
    past the run's 8,192 steps (the recipe's --total-tokens, before it was lowered to the cache), --warmup-steps
    100 as past its 8 steps: both are now measured against the 8 steps, in one message, before training."""
    small = ["--batch-size", "128", "--n-latents", "64", "--k", "4", "--init-rows", "256", "--no-progress"]
    for warmup in ("10000", "100", "9"):
        code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(tmp_path / "run"),
                                 "--warmup-steps", warmup, *small)
        assert code == 2 and err.splitlines()[-1] == (
            f"saelab train: error: --warmup-steps {warmup} exceeds the run's 8 steps (total tokens / batch size); "
            "the learning rate would never reach its peak"), err
        assert not (tmp_path / "run").exists()
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  warmup_steps: 100\n")
    code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(tmp_path / "run"),
                             "--config", str(config), *small)
    assert code == 2 and err.splitlines()[-1] == (
        f"saelab train: error: --config {config}: train.warmup_steps 100 exceeds the run's 8 steps (total tokens / "
        "batch size); the learning rate would never reach its peak"), err
    code, out, err = run_cli(capsys, "train", "--activations", str(tiny_cache), "--out", str(tmp_path / "run"),
                             "--warmup-steps", "8", *small)
    assert code == 0, err


def test_cli_sweep_on_a_small_cache_trains_on_all_its_rows_as_train_does(tiny_cache, tmp_path, capsys):
    """sweep on a cache smaller than the recipe's --total-tokens was refused for an option never typed, where
    train trains on all the rows: both now fit the budget to the cache, through one function."""
    code, out, err = run_cli(capsys, "sweep", "--activations", str(tiny_cache), "--out", str(tmp_path / "sweep"),
                             "--grid", "k=4,8", "--n-latents", "64", "--batch-size", "128", "--init-rows", "256",
                             "--no-progress")
    assert code == 0, err
    assert err.splitlines()[0] == (f"saelab: activation cache {tiny_cache} holds 1,024 rows, fewer than the recipe's "
                                   "1,048,576 training tokens; training on all of them (--total-tokens 1024)")
    for run in ("k4", "k8"):
        recorded = json.loads((tmp_path / "sweep" / run / "train_config.json").read_text())["train"]
        assert (recorded["total_tokens"], read_status(tmp_path / "sweep" / run)["state"]) == (1024, "finished")


def test_cli_sweep_refuses_a_grid_total_tokens_past_the_cache_naming_the_entry(tiny_cache, tmp_path, capsys):
    """A --grid total_tokens value larger than the cache was refused naming --total-tokens, an option never
    typed (a --config file's grid as --grid); a --config file's total_tokens that the grid replaces at every
    point was refused though unused."""
    small = ["--n-latents", "64", "--k", "4", "--batch-size", "128", "--init-rows", "256", "--no-progress"]
    for entry in ("total_tokens=512,2048", "total-tokens=2048"):
        code, out, err = run_cli(capsys, "sweep", "--activations", str(tiny_cache), "--out", str(tmp_path / "sw"),
                                 "--grid", entry, *small)
        name = entry.partition("=")[0]
        assert code == 2 and err == (f"saelab sweep: error: --grid {name}=2048: activation cache {str(tiny_cache)!r} "
                                     "holds 1,024 rows but training needs 2,048; harvest more or train on fewer "
                                     f"tokens ({name}=1024 at most)")
        assert not (tmp_path / "sw").exists()
    grid = tmp_path / "grid.yaml"  # a file's grid: named by its entry, as the file's other settings
    grid.write_text('grid: ["total-tokens=512,2048"]\n')
    code, out, err = run_cli(capsys, "sweep", "--activations", str(tiny_cache), "--out", str(tmp_path / "sw"),
                             "--config", str(grid), *small)
    assert code == 2 and err == (f"saelab sweep: error: --config {grid}: grid total-tokens=2048: activation cache "
                                 f"{str(tiny_cache)!r} holds 1,024 rows but training needs 2,048; harvest more or "
                                 "train on fewer tokens (total-tokens=1024 at most)")
    assert not (tmp_path / "sw").exists()
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  total_tokens: 2048\n")
    code, out, err = run_cli(capsys, "sweep", "--activations", str(tiny_cache), "--out", str(tmp_path / "sw"),
                             "--config", str(config), "--grid", "total_tokens=512,1024", *small)
    assert code == 0, err
    assert sorted(json.loads(out)) == ["tok1024", "tok512"]


def test_cli_batch_size_is_named_as_given_and_refused_in_a_sweep_grid(tiny_cache, tmp_path, capsys):
    """A cache smaller than one batch named --batch-size however the batch size was given; a --grid batch_size
    trained every run on the recipe's batches while recording its own ("ran out after 1 batches"), or was
    refused after the cache was read as "runs trained together must share batch_size"."""
    cache = str(tiny_cache)
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  batch_size: 2048\n")
    code, _, err = run_cli(capsys, "train", "--activations", cache, "--out", str(tmp_path / "r"), "--config",
                           str(config), "--n-latents", "64", "--k", "4", "--no-progress")
    assert code == 2 and err == (f"saelab train: error: activation cache {cache!r} holds 1,024 rows, fewer than one "
                                 f"batch (--config {config}: train.batch_size 2048); harvest more, or give a smaller "
                                 "train.batch_size")
    for entry in ("batch_size=128", "batch-size=128,256"):
        code, _, err = run_cli(capsys, "sweep", "--activations", cache, "--out", str(tmp_path / "sw"), "--grid",
                               "k=4,8", entry, "--n-latents", "64", "--no-progress")
        assert code == 2 and err == (f"saelab sweep: error: --grid {entry}: a sweep's runs train together on the same "
                                     "batches, so they share one batch size; set it with --batch-size")
    assert not (tmp_path / "sw").exists() and not (tmp_path / "r").exists()
    from saelab.pipeline import sweep_from_cache
    from saelab.train import TrainConfig

    with pytest.raises(ConfigError, match="share one batch size: set batch_size in the base config"):
        sweep_from_cache(cache, tmp_path / "sw", TrainConfig(n_latents=64, k=4), {"k": [4], "batch_size": [128]})


def test_cli_harvest_into_a_finished_cache_decides_before_the_model_loads(tiny_dir, corpus, tmp_path, capsys,
                                                                          monkeypatch):
    import saelab.pipeline

    acts = tmp_path / "acts"
    args = ["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(corpus), "--n-tokens", "1024",
            "--context-size", "32", "--buffer-tokens", "8192", "--out", str(acts), "--no-progress"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and json.loads(out)["rows"] == 1024
    before = snapshot(acts)
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code, again, err = run_cli(capsys, *args)  # the same settings: the cache is the answer, and says so
    assert code == 0 and again == out
    assert err == f"saelab: {acts} already holds this harvest, 1,024 activations (--overwrite harvests again)"
    code, out, err = run_cli(capsys, *args, "--seed", "3")  # other settings: refused
    assert code == 2 and out == ""
    assert err == (f"saelab harvest: error: cannot reuse activation cache '{acts}': it was written with --seed 0, "
                   "not 3; pass --overwrite to replace it")
    # a switch a --config file set is named as the file's entry with its values, not as --no-prepend-bos
    (tmp_path / "c.json").write_text('{"harvest": {"prepend_bos": false}}')
    code, out, err = run_cli(capsys, *args, "--config", str(tmp_path / "c.json"))
    assert code == 2 and err == (f"saelab harvest: error: --config {tmp_path / 'c.json'}: cannot reuse activation "
                                 f"cache '{acts}': it was written with harvest.prepend_bos true, not false; pass "
                                 "--overwrite to replace it")
    code, out, err = run_cli(capsys, *args, "--no-prepend-bos")
    assert code == 2 and "it was written with --prepend-bos, not --no-prepend-bos; pass --overwrite" in err
    assert snapshot(acts) == before


def _two_corpora_of_one_name(data_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """Folders a/ and b/, each with a corpus.jsonl of the same size but other text (the articles reordered)."""
    docs = wiki_docs(data_dir, 3)
    for name, order in (("a", docs), ("b", docs[::-1])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in order),
                                                      encoding="utf-8")
    return tmp_path / "a", tmp_path / "b"


def _shown_text(path: Path) -> str:
    import hashlib

    data = path.read_bytes()
    return f"{len(data):,} bytes, sha256 {hashlib.sha256(data).hexdigest()[:12]}..."


def test_cli_harvest_tells_a_relative_corpus_by_its_text(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """A cache harvested with --corpus corpus.jsonl in a/, then the same call from b/, whose corpus.jsonl holds other
    text: the cache of a/'s text was reused as this harvest. The same file named from a/'s parent was refused as
    another --corpus, which hid the real difference (--seed)."""
    import saelab.pipeline

    a, b = _two_corpora_of_one_name(data_dir, tmp_path)
    acts = a / "acts"
    args = ["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--n-tokens", "1024", "--context-size", "32",
            "--buffer-tokens", "8192", "--out", str(acts), "--no-progress"]
    monkeypatch.chdir(a)
    code, out, _ = run_cli(capsys, *args, "--corpus", "corpus.jsonl")
    assert code == 0 and json.loads(out)["rows"] == 1024
    before = snapshot(acts)
    monkeypatch.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.chdir(b)
    code, again, err = run_cli(capsys, *args, "--corpus", "corpus.jsonl")
    assert code == 2 and again == ""
    assert err == (f"saelab harvest: error: cannot reuse activation cache '{acts}': it was written with the corpus "
                   f"'corpus.jsonl', which held other text then ({_shown_text(a / 'corpus.jsonl')}; now "
                   f"{_shown_text(b / 'corpus.jsonl')}); pass --overwrite to harvest it again")
    monkeypatch.chdir(tmp_path)  # a/'s file by another path: the cache's text, reused
    code, again, err = run_cli(capsys, *args, "--corpus", "a/corpus.jsonl")
    assert code == 0 and again == out
    assert err == f"saelab: {acts} already holds this harvest, 1,024 activations (--overwrite harvests again)"
    code, again, err = run_cli(capsys, *args, "--corpus", "a/corpus.jsonl", "--seed", "3")  # the real difference
    assert code == 2 and err == (f"saelab harvest: error: cannot reuse activation cache '{acts}': it was written "
                                 "with --seed 0, not 3; pass --overwrite to replace it")
    assert snapshot(acts) == before


def test_cli_harvest_resumes_a_relative_corpus_by_its_text(tiny_dir, data_dir, tmp_path, capsys, monkeypatch):
    """An unfinished harvest of corpus.jsonl in a/: resumed from b/ (other text by that name) it took b/'s text
    for the rest; from a/'s parent, with a/'s file by another path, it was refused as another --corpus."""
    import saelab.pipeline

    a, b = _two_corpora_of_one_name(data_dir, tmp_path)
    args = ["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--n-tokens", "1024", "--context-size", "32",
            "--buffer-tokens", "8192", "--no-progress"]
    monkeypatch.chdir(a)
    code, out, _ = run_cli(capsys, *args, "--corpus", "corpus.jsonl", "--out", str(a / "acts"))
    assert code == 0
    finished = ActivationCache(a / "acts")

    def cut_off():  # the same harvest, interrupted after its first rows
        yield from finished.read()[:320].split(64)
        raise KeyboardInterrupt

    part = a / "part"
    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(cut_off(), part, meta=finished.meta, dtype=finished.dtype, progress=False)
    before = snapshot(part)
    with monkeypatch.context() as patched:
        patched.setattr(saelab.pipeline, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
        monkeypatch.chdir(b)
        code, again, err = run_cli(capsys, *args, "--corpus", "corpus.jsonl", "--out", str(part))
        assert code == 2 and err == (
            f"saelab harvest: error: cannot resume activation cache '{part}': it was written with the corpus "
            f"'corpus.jsonl', which held other text then ({_shown_text(a / 'corpus.jsonl')}; now "
            f"{_shown_text(b / 'corpus.jsonl')}); pass --overwrite to harvest it again")
        monkeypatch.chdir(tmp_path)
        code, again, err = run_cli(capsys, *args, "--corpus", "a/corpus.jsonl", "--out", str(part), "--seed", "3")
        assert code == 2 and err == (f"saelab harvest: error: cannot resume activation cache '{part}': it was "
                                     "written with --seed 0, not 3; pass --overwrite to replace it")
        assert snapshot(part) == before
    code, again, _ = run_cli(capsys, *args, "--corpus", "a/corpus.jsonl", "--out", str(part))  # a/'s text: resumed
    assert code == 0 and json.loads(again)["rows"] == 1024
    assert torch.equal(ActivationCache(part).read(), finished.read())
    assert ActivationCache(part).meta["dataset"] == "corpus.jsonl"  # as the harvest that started it recorded it


def test_cli_harvest_reusing_a_finished_cache_names_the_unfinished_overwrite_beside_it(tiny_dir, corpus, tmp_path,
                                                                                        capsys):
    """harvest --overwrite --seed 3 cut off (Ctrl-C), then the first harvest again: the finished cache is reused,
    and the overwrite kept in its hidden stage folder was not mentioned; one note names it and both ways out."""
    acts = tmp_path / "acts"
    args = ["harvest", "--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(corpus), "--n-tokens", "1024",
            "--context-size", "32", "--buffer-tokens", "8192", "--out", str(acts), "--no-progress"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    cache = ActivationCache(acts)
    rows, seed3 = cache.read(), {**cache.meta, "harvest": {**cache.meta["harvest"], "seed": 3}}

    def cut_off():  # the overwrite's input, interrupted after its first rows
        yield from rows[:320].split(64)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(cut_off(), acts, meta=seed3, dtype=cache.dtype, shard_rows=128, overwrite=True,
                               progress=False)
    stage = acts / ".overwrite"
    staged = {p.name: p.read_bytes() for p in stage.iterdir()}
    code, again, err = run_cli(capsys, *args)
    assert code == 0 and again == out
    assert err.splitlines() == [
        f"saelab: {acts} already holds this harvest, 1,024 activations (--overwrite harvests again)",
        f"saelab: note: activation cache {acts} (its overwrite) is unfinished; run the --overwrite call that started "
        f"it again to resume it, or delete {stage} to discard it"]
    assert {p.name: p.read_bytes() for p in stage.iterdir()} == staged  # kept for its own call


def test_cli_train_on_an_interrupted_harvest_names_the_harvest_that_finishes_it(tmp_path, capsys):
    """train and sweep on a cache whose harvest was cut off: its rows were counted without those saved toward the
    next shard (0 after a harvest that said it kept 4,096), and the advice was a Python call."""
    acts = tmp_path / "hr"
    rows = torch.randn(384, D, generator=torch.Generator().manual_seed(0))

    def cut_off():  # one shard of 256 rows listed, 128 saved toward the next
        yield from rows.split(128)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(cut_off(), acts, meta={"hook_name": HOOK}, shard_rows=256, progress=False)
    assert "keeps the 384 rows written so far" in capsys.readouterr().err
    for verb, extra in (("train", []), ("sweep", ["--grid", "k=4,8"])):
        code, out, err = run_cli(capsys, verb, "--activations", str(acts), "--out", str(tmp_path / verb), *extra,
                                 "--no-progress")
        assert code == 2 and out == ""
        assert err == (f"saelab {verb}: error: activation cache '{acts}' is incomplete (384 rows written); run the "
                       f"same `saelab harvest --out {acts} ...` command again to finish it")
        assert not (tmp_path / verb).exists()


# ---- a run's --out that holds other results ------------------------------------------------------------


@pytest.fixture(scope="module")
def other_results(tiny_gpt2, tiny_cache, corpus, tmp_path_factory) -> Path:
    """What saelab's other verbs write, for real and small: a sweep, a browser site, exports (SAELens, sparsify,
    Neuronpedia), an evaluation and a paper-suite evaluation; and a folder of the user's own files."""
    from saelab.evals.suite import PaperSuiteConfig
    from saelab.explore.browser import BrowseConfig, build_browser
    from saelab.explore.browser.export import export_neuronpedia_run
    from saelab.pipeline import paper_suite, sweep_from_cache

    root = tmp_path_factory.mktemp("other-results")
    sweep_from_cache(tiny_cache, root / "sweep", TrainConfig(n_latents=64, k=4, batch_size=128, total_tokens=512,
                                                             init_rows=256), {"n_latents": [64, 128]}, progress=False)
    run = root / "sweep" / "n64"
    eval_cfg = EvalConfig(corpus=str(corpus), recon_tokens=256, downstream_tokens=256)
    evaluate(run, lm=tiny_gpt2, cfg=eval_cfg, out_dir=root / "eval", progress=False)
    paper_suite(run, out_dir=root / "suite", lm=tiny_gpt2, eval_cfg=eval_cfg, cfg=PaperSuiteConfig(metrics=("core",)),
                progress=False)
    browse = BrowseConfig(n_tokens=31 * 16, corpus=str(corpus), n_top=2, n_samples=2, lm_batch_size=8)
    build_browser([run], root / "site", browse, lm=tiny_gpt2, progress=False)
    export_neuronpedia_run([run], root / "neuronpedia", browse, lm=tiny_gpt2, progress=False)
    save_sae(load_sae(run), root / "saelens")
    save_sae(load_sae(run), root / "sparsify", format="sparsify")
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("mine")
    (root / "notes" / "metrics.json").write_text('{"accuracy": 0.9}')  # another tool's, no evaluation of saelab
    return root


_NOT_FOR_A_RUN = "pick another folder (a new one, or one holding only other files such as a log, is taken)"
_RUN_REFUSALS = {
    "sweep": f"is a sweep folder (a folder of runs): a run there would hide its runs; {_NOT_FOR_A_RUN}",
    "site": f"is a feature browser site (site.json): a run there would mix with its files; {_NOT_FOR_A_RUN}",
    "neuronpedia": f"is a Neuronpedia export (run_settings.json): a run there would mix with its files; "
                   f"{_NOT_FOR_A_RUN}",
    "eval": f"is an evaluation's folder (latent_frequencies.safetensors): a run there would mix with its files; "
            f"{_NOT_FOR_A_RUN}",
    "suite": f"is a paper-suite evaluation's folder (evals/): a run there would mix with its files; {_NOT_FOR_A_RUN}",
    "saelens": "is an SAE folder (cfg.json); expected a new folder or a run folder",
    "sparsify": "is an SAE folder (cfg.json); expected a new folder or a run folder",
    "notes": f"holds metrics.json, which a run writes, but no run (train_config.json): a run there would mix with "
             f"or replace it; move it out or {_NOT_FOR_A_RUN}"}


@pytest.mark.parametrize("folder", list(_RUN_REFUSALS))
def test_an_activation_cache_is_not_harvested_into_other_results(folder, other_results, tmp_path, capsys):
    """`harvest --out` took a sweep folder (its manifest.json then beside the runs: the sweep could no longer be
    resumed or extended), a site, an export, an evaluation or the user's files. Refused as a run is, in one line,
    before the model loads (there is none here), nothing written."""
    out = other_results / folder
    before = snapshot(out), sorted(p.relative_to(out) for p in out.rglob("*"))
    refusal = _RUN_REFUSALS[folder].replace("a run there", "a cache there").replace("or a run folder",
                                                                                    "or an activation cache")
    code, stdout, err = run_cli(capsys, "harvest", "--model", str(tmp_path / "no-model"), "--hook",
                                "blocks.0.hook_resid_post", "--out", str(out), "--no-progress")
    assert (code, stdout, err) == (2, "", f"saelab harvest: error: --out {out} {refusal}")
    assert (snapshot(out), sorted(p.relative_to(out) for p in out.rglob("*"))) == before


def test_an_activation_cache_is_not_harvested_into_a_run_being_replaced(tmp_path, capsys):
    """A run whose overwrite was cut off holds only the run it set aside (.set-aside/train_config.json): harvest
    took it as a folder of other files and wrote its cache among the run's."""
    from saelab.utils.atomic import SET_ASIDE

    run = tmp_path / "run"
    (run / SET_ASIDE).mkdir(parents=True)
    (run / SET_ASIDE / "train_config.json").write_text("{}")
    code, stdout, err = run_cli(capsys, "harvest", "--model", str(tmp_path / "no-model"), "--hook",
                                "blocks.0.hook_resid_post", "--out", str(run), "--no-progress")
    assert (code, stdout, err) == (2, "", f"saelab harvest: error: --out {run} holds a run (train_config.json, or the "
                                          f"one an overwrite set aside): a cache there would mix with its files; "
                                          f"{_NOT_FOR_A_RUN}")
    assert sorted(p.name for p in run.rglob("*")) == [SET_ASIDE, "train_config.json"]


@pytest.mark.parametrize("verb", ["train", "quickstart"])
@pytest.mark.parametrize("folder", list(_RUN_REFUSALS))
def test_a_run_is_not_written_into_other_results(verb, folder, other_results, tiny_cache, tmp_path, capsys):
    """`train --out` and `quickstart --out` took a sweep folder (it then held sae/ and train_config.json beside
    its runs and read as one run), a site, an export, an evaluation or the user's files, and wrote a run into
    it. Refused in one line, before the model loads (there is none here), and nothing is written."""
    out = other_results / folder
    before = snapshot(out), sorted(p.relative_to(out) for p in out.rglob("*"))
    args = {"train": ["--activations", str(tiny_cache), "--n-latents", "64", "--k", "4", "--batch-size", "128",
                      "--total-tokens", "512", "--init-rows", "256"],
            "quickstart": ["--harvest-model", str(tmp_path / "no-model")]}
    code, stdout, err = run_cli(capsys, verb, *args[verb], "--out", str(out), "--no-progress")
    assert (code, stdout, err) == (2, "", f"saelab {verb}: error: --out {out} {_RUN_REFUSALS[folder]}")
    assert (snapshot(out), sorted(p.relative_to(out) for p in out.rglob("*"))) == before


@pytest.mark.slow  # ~15 s on 2 cores; .ci/run runs the slow tests
def test_a_run_folder_in_its_first_moments_is_still_a_run_s_out(tiny_gpt2, tiny_cache, corpus, data_dir, tmp_path,
                                                                monkeypatch, capsys):
    """What the refusal of other results must still take: quickstart interrupted in its harvest (RUN holds only
    activations/) then run again; `train --activations RUN/activations --out RUN`, as quickstart trains; a
    finished run trained again with --overwrite; a new and an empty folder; a folder of the user's files (the
    log a shell redirects there, the --config file; for a moment, 156008a, refused); one holding only the lock of
    a training killed before its config; an overwrite's state where only the set-aside run has a config."""
    from saelab.pipeline import QuickstartConfig, quickstart

    run = tmp_path / "run"
    # 16 contexts of 31 rows a forward: the 8,192-row buffer writes its first 4,096 rows at the 17th
    harvesting = harvest_cfg(data_dir / "wiki-en" / "wiki_train.jsonl.xz", n_tokens=16384)
    cfg = QuickstartConfig(harvest=harvesting, train=TrainConfig(n_latents=64, k=4, total_tokens=1024, batch_size=128,
                                                                 init_rows=256),
                           eval=EvalConfig(corpus=str(corpus), recon_tokens=256, downstream_tokens=256))
    forward, calls = LanguageModel.activations, []

    def interrupted_past_the_first_rows(lm, tokens_BT, hook):
        calls.append(tokens_BT.shape[0])
        if len(calls) == 18:
            raise KeyboardInterrupt
        return forward(lm, tokens_BT, hook)

    monkeypatch.setattr(LanguageModel, "activations", interrupted_past_the_first_rows)
    with pytest.raises(KeyboardInterrupt):
        quickstart(cfg, run, lm=tiny_gpt2, progress=False)
    assert [p.name for p in run.iterdir() if not p.name.startswith(".")] == ["activations"]
    assert json.loads((run / "activations" / "manifest.json").read_text())["partial_rows"] == 4096
    capsys.readouterr()
    assert quickstart(cfg, run, lm=tiny_gpt2, progress=False)["sae_sha256"]
    assert f"resuming activation cache {run / 'activations'} after the 4,096 rows" in capsys.readouterr().err
    monkeypatch.undo()
    first = ["train", "--n-latents", "64", "--k", "4", "--batch-size", "128", "--total-tokens", "512", "--init-rows",
             "256", "--no-progress"]
    fresh = tmp_path / "fresh"
    harvest(harvest_cfg(corpus), fresh / "activations", lm=tiny_gpt2, progress=False)
    (tmp_path / "empty").mkdir()
    (tmp_path / "logged").mkdir()
    (tmp_path / "logged" / "train.log").write_text("saelab train ...\n")  # `> RUN/train.log` makes it first
    (tmp_path / "logged" / "config.yaml").write_text("k: 4\n")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / LOCK).write_text("")  # a training killed before it wrote its config
    for out, activations in ((fresh, fresh / "activations"), (tmp_path / "empty", tiny_cache),
                             (tmp_path / "new", tiny_cache), (tmp_path / "logged", tiny_cache),
                             (tmp_path / "locked", tiny_cache)):
        code, _, err = run_cli(capsys, *first, "--activations", str(activations), "--out", str(out))
        assert code == 0 and read_status(out)["state"] == "finished", err
    code, _, err = run_cli(capsys, *first, "--activations", str(tiny_cache), "--out", str(run), "--overwrite")
    assert code == 0 and read_status(run)["state"] == "finished", err
    assert not (run / ".set-aside").exists()  # the earlier run, set aside, went once the new one finished
    aside = tmp_path / "aside"  # an overwrite cut off while it put the earlier run back: only that one's config
    (aside / ".set-aside").mkdir(parents=True)
    shutil.copy(run / "train_config.json", aside / ".set-aside" / "train_config.json")
    for name in ("checkpoint.pt", "status.json", "metrics.jsonl"):
        shutil.copy(run / name, aside / name)
    assert check_output_folder(aside, "--out", "run") == aside


# ---- pickles disguised as other formats; a full disk seen from the command line -------------------------


def test_pickle_disguised_as_safetensors_or_npy_runs_nothing(tmp_path):
    """A pickle named like a safetensors file, and an object .npy shard: refused, and the payload never runs."""
    import pickle

    import numpy as np

    marker = tmp_path / "pwned"
    folder = tmp_path / "sae"
    save_sae(make_sae(), folder)
    (folder / "sae_weights.safetensors").write_bytes(pickle.dumps({"W_enc": _Payload(marker)}))
    with pytest.raises(SaelabError, match="sae_weights.safetensors"):
        load_sae(folder)

    acts = tmp_path / "acts"
    write_activation_cache([torch.randn(256, D)], acts, meta={"hook_name": "h"}, progress=False)
    shard = acts / "shard_00000.npy"
    payload = np.empty((256, D), dtype=object)
    payload[0, 0] = _Payload(marker)
    np.save(shard, payload, allow_pickle=True)
    with pytest.raises(ActivationCacheError, match="shard_00000.npy"):
        ActivationCache(acts).read(0, 256)
    assert not marker.exists(), "unpickling ran the payload"


def test_cli_train_on_a_full_disk_prints_one_line(tiny_cache, tmp_path):
    """saelab train in a process whose files cannot grow past FSIZE_LIMIT bytes: one line, exit status 1."""
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))

    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "saelab", "train", "--activations", str(tiny_cache), "--out", str(run),
         "--n-latents", "512", "--k", "8", "--batch-size", "128", "--total-tokens", "512", "--init-rows", "256",
         "--checkpoint-every", "2", "--no-progress"],
        capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("saelab train: error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in proc.stderr and str(run) in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert temp_files(run) == []


def test_harvest_larger_than_the_free_disk_space_is_refused_before_it_starts(tiny_dir, corpus, tiny_cache, tmp_path,
                                                                           capsys):
    # 2^50 rows of 64 float16 values: 128 PiB, more than any disk holds.
    argv = ["--model", str(tiny_dir), "--hook", HOOK, "--corpus", str(corpus), "--n-tokens", str(2**50),
            "--context-size", "32", "--no-progress"]
    code, out, err = run_cli(capsys, "harvest", *argv, "--out", str(tmp_path / "acts"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert re.search(r"error: activation cache .*acts: 1,125,899,906,842,624 rows of 64 float16 values need "
                     r"134,217,728\.0 GiB, and .* has [\d,.]+ GiB free; free some space", err)
    assert not (tmp_path / "acts").exists()
    # An overwrite writes beside the old cache: refused the same way, the old cache untouched.
    before = snapshot(tiny_cache)
    code, out, err = run_cli(capsys, "harvest", *argv, "--out", str(tiny_cache), "--overwrite")
    assert code == 2 and "GiB free" in err and snapshot(tiny_cache) == before


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_interrupted_quickstart_overwrite_keeps_the_earlier_results(stage, tiny_gpt2, corpus, tmp_path, monkeypatch,
                                                                     capsys):
    """Ctrl-C during the training or the evaluation of `quickstart --overwrite`: the earlier run's
    metrics.json, report.md and SAE are still there, byte for byte."""
    import saelab.pipeline
    import saelab.train.trainer
    from saelab.pipeline import QuickstartConfig, quickstart

    run = tmp_path / "run"
    cfg = QuickstartConfig(harvest=harvest_cfg(corpus), train=TrainConfig(n_latents=64, k=4, total_tokens=1024,
                                                                            batch_size=128, checkpoint_every=2),
                           eval=EvalConfig(corpus=str(corpus), recon_tokens=256, downstream_tokens=256))
    quickstart(cfg, run, lm=tiny_gpt2, progress=False)
    before = {p: data for p, data in snapshot(run).items() if not p.startswith("activations")}
    assert {"metrics.json", "report.md", "sae/cfg.json"} <= set(before)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if stage == "train":
        monkeypatch.setattr(saelab.train.trainer.TrainingRun, "train_step", interrupted)
    else:
        monkeypatch.setattr(saelab.pipeline, "evaluate_core", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quickstart(cfg, run, lm=tiny_gpt2, overwrite=True, progress=False)
    assert {p: data for p, data in snapshot(run).items() if not p.startswith("activations")} == before
    assert "the earlier results are back in place" in capsys.readouterr().err


def test_quickstart_and_sweep_refuse_a_warmup_longer_than_the_run_before_any_work(tmp_path, capsys, monkeypatch):
    """quickstart harvests every training token and a sweep point's steps only fall when fitted to its cache, so
    both know now whether a warmup outlasts the run: refused before the model loads or the cache is read."""
    monkeypatch.chdir(tmp_path)
    assert main(["quickstart", "--n-tokens", "4096", "--batch-size", "1024", "--warmup-steps", "10", "--out", "q"]) == 2
    assert capsys.readouterr().err.strip() == ("saelab quickstart: error: --warmup-steps 10 exceeds the run's 4 steps "
                                               "(total tokens / batch size); the learning rate would never reach its peak")
    assert main(["sweep", "--activations", "no-cache", "--out", "sw", "--grid", "total_tokens=1024", "--batch-size",
                 "128", "--warmup-steps", "100"]) == 2
    # the grid point whose tokens set the steps is named, as typed (the other points may be long enough)
    assert "--warmup-steps 100 exceeds the 8 steps of --grid total_tokens=1024 (total tokens" in capsys.readouterr().err
    assert main(["sweep", "--activations", "no-cache", "--out", "sw", "--grid", "n-latents=64,128", "--total-tokens",
                 "1024", "--batch-size", "128", "--warmup-steps", "100"]) == 2
    assert "--warmup-steps 100 exceeds the run's 8 steps" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    # from Python too: the grid entry that set the point's tokens, not only the run's steps
    from saelab.pipeline import sweep_from_cache

    with pytest.raises(ConfigError) as refused:
        sweep_from_cache(tmp_path / "no-cache", tmp_path / "sw", TrainConfig(n_latents=64, k=4, batch_size=128,
                                                                             warmup_steps=100),
                         {"total_tokens": [65536, 1024]})
    assert str(refused.value) == ("warmup_steps=100 exceeds the 8 steps of the grid's total_tokens=1024 (total tokens "
                                  "/ batch size); the learning rate would never reach its peak")


# ---- sizes past what they can mean (browse, top) -------------------------------------------------------------

_WITHIN = "the 65 contexts read (--n-tokens 2,000 in contexts of 32 tokens, 31 scored in each)"  # of the corpus fixture
SIZE_REFUSALS = [
    (["browse", "sae", "--out", "site", "--n-bins", "1073741824"],
     "--n-bins must be <= 512 (a page draws the histogram 520 pixels wide, and the pass keeps every latent's bins in "
     "memory), got 1073741824"),
    (["browse", "sae", "--out", "site", "--n-neighbours", "9000"],
     "--n-neighbours 9,000: the SAE has 128 latents; expected at most 127, its other latents"),
    (["browse", "sae", "sae64", "--out", "site", "--n-neighbours", "64"],
     "--n-neighbours 64: the SAE sae64 has 64 latents; expected at most 63, its other latents"),
    # the default's own value, given: the user's number, refused as any other (the default 8 is cut to 7)
    (["browse", "sae8", "--out", "site", "--n-neighbours", "8"],
     "--n-neighbours 8: the SAE has 8 latents; expected at most 7, its other latents"),
    (["browse", "sae8", "--out", "site", "--config", "nb.json"],
     "--config nb.json: browse.n_neighbours 8: the SAE has 8 latents; expected at most 7, its other latents"),
    (["browse", "sae", "--out", "site", "--seed", str(2**64), "--n2g-n-latents", "1"],
     f"--seed must be in -2^31..2^31 - 1 (the samples' hash reads 31 bits of it: another seed would repeat one of these), "
     f"got {2**64}"),
    (["top", "sae", "--latent", "1", "-n", "100000000"],
     f"-n 100,000,000: expected at most {_WITHIN}: a latent lists each context once"),
    (["top", "sae", "--latent", "1", "--config", "c.json"],
     f"--config c.json: n_contexts 500: expected at most {_WITHIN}: a latent lists each context once"),
]


@pytest.mark.parametrize("weights", [True, False], ids=["model", "model-without-weights"])
@pytest.mark.parametrize("argv,message", SIZE_REFUSALS, ids=[" ".join(argv[2:]) for argv, _ in SIZE_REFUSALS])
def test_sizes_past_what_they_mean_are_refused_in_one_line_before_the_model_loads(argv, message, weights, tiny_dir,
                                                                                  corpus, tmp_path, capsys,
                                                                                  monkeypatch):
    """browse --n-top 300000, --n-samples 10000000, --n-bins 2^30 and top -n 100000000 failed in the allocator, with
    its traceback, after the model load and the text's read; --n-neighbours past an SAE's other latents was cut to
    them without a word (9,000 on 8,192 latents: 11.8 GB, 6 minutes; 8, the default's value, given on an SAE of 8
    latents, still was), and a --seed past 2^63 failed the N2G draw after the whole pass. Each is one line naming
    the option, its value and its bound, and nothing is written. Without weights, a refusal after the load would
    read "cannot load"."""
    monkeypatch.chdir(tmp_path)
    model = tiny_dir
    if not weights:
        model = tmp_path / "model"
        shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for name, n in (("sae", 128), ("sae64", 64), ("sae8", 8)):
        sae = make_sae(n=n, k=min(8, n // 2))
        sae.cfg.model_name = str(model)
        save_sae(sae, tmp_path / name)
    (tmp_path / "c.json").write_text('{"n_contexts": 500}')
    (tmp_path / "nb.json").write_text('{"browse": {"n_neighbours": 8}}')
    inputs = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run_cli(capsys, *argv, "--corpus", str(corpus), "--n-tokens", "2000", "--no-progress")
    assert (code, out, err) == (2, "", f"saelab {argv[0]}: error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == inputs


def test_browse_refuses_contexts_past_this_machines_memory_before_the_model_loads(tiny_dir, corpus, tmp_path, capsys,
                                                                                  monkeypatch):
    """--n-top within the contexts read can still ask for more memory than the machine has (each latent keeps an
    activation row per top context): refused in one line, with the most it can take, before anything is read."""
    monkeypatch.chdir(tmp_path)
    sae = make_sae()
    sae.cfg.model_name = str(tiny_dir)
    save_sae(sae, tmp_path / "sae")
    memory = memory_limit().size
    n_top = memory // (128 * 32 * 4) + 1  # the float32 rows of 128 latents' top contexts alone fill it
    code, out, err = run_cli(capsys, "browse", "sae", "--out", "site", "--corpus", str(corpus), "--n-tokens",
                             str(n_top * 31), "--n-top", str(n_top), "--no-progress")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"saelab browse: error: --n-top {n_top:,} and --n-samples 12: the pass keeps each latent's "
                          "top and sampled contexts' activations, "), err
    most = re.search(r"of memory; expected --n-top \+ --n-samples <= ([\d,]+)$", err)
    assert most and 0 < int(most[1].replace(",", "")) < n_top, err  # the most it can take, fewer than asked
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_browse_compares_with_a_containers_memory_limit(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    """A container's process is killed past its cgroup's memory limit, while the machine's memory still reads as the
    host's, which the check compared with alone. Here the cgroup's files (real files, read where a container mounts
    them) allow 1 GiB: rows past it are refused, the limit named as the container's."""
    import saelab.utils.memory_limit

    if memory_limit(tmp_path / "no-cgroup").size <= 2**30:
        pytest.skip("this machine has no more than 1 GiB of memory: the limit would not be the smaller")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "memory.max").write_text(f"{2**30}\n")
    monkeypatch.setattr(saelab.utils.memory_limit, "CGROUP_ROOT", tmp_path / "cgroup")
    sae = make_sae()
    sae.cfg.model_name = str(tiny_dir)
    save_sae(sae, tmp_path / "sae")
    per_context = 128 * (4 * 32 + 24)  # 128 latents' float32 rows of 32 tokens, with context, position and score
    n_top = 2**30 // per_context
    code, out, err = run_cli(capsys, "browse", "sae", "--out", "site", "--corpus", str(corpus), "--n-tokens",
                             str(n_top * 31), "--n-top", str(n_top), "--no-progress")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.endswith(f"past this container's 1.0 GiB of memory; expected --n-top + --n-samples <= {n_top:,}"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cgroup", "sae"]


def test_browse_refuses_nearest_latents_past_this_machines_memory_before_the_model_loads(tiny_dir, corpus, tmp_path,
                                                                                        capsys, monkeypatch):
    """--n-neighbours within an SAE's other latents still lists n_latents x n_neighbours entries (8,191 on 8,192
    latents: 11.8 GB, 6 minutes), which the memory check did not count: an SAE whose every latent lists all the
    others past the memory is refused in one line, with the most it can take, before the model loads (its folder
    has no weights: a load would fail otherwise)."""
    from saelab.explore.browser.make import NEIGHBOUR_BYTES

    monkeypatch.chdir(tmp_path)
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    n = math.isqrt(memory_limit().size // NEIGHBOUR_BYTES) + 2  # n x (n - 1) neighbours fill it
    sae = make_sae(n=n)
    sae.cfg.model_name = str(model)
    save_sae(sae, tmp_path / "sae")
    code, out, err = run_cli(capsys, "browse", "sae", "--out", "site", "--corpus", str(corpus), "--n-tokens", "2000",
                             "--n-neighbours", str(n - 1), "--no-progress")
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"saelab browse: error: --n-neighbours {n - 1:,}: the pages list each latent's nearest "
                          f"latents, "), err
    most = re.search(r"of memory; expected --n-neighbours <= ([\d,]+)$", err)
    assert most and 0 < int(most[1].replace(",", "")) < n - 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "sae"]


def test_browse_cuts_the_default_nearest_latents_to_a_small_saes_other_latents(tiny_dir, corpus, tmp_path, capsys,
                                                                               monkeypatch):
    """The default --n-neighbours 8 on an SAE of 8 latents (unlike 8 given, refused above) lists its 7 others."""
    monkeypatch.chdir(tmp_path)
    sae = make_sae(n=8, k=4)
    sae.cfg.model_name = str(tiny_dir)
    save_sae(sae, tmp_path / "sae")
    code, _, err = run_cli(capsys, "browse", "sae", "--out", "site", "--corpus", str(corpus), "--n-tokens", "500",
                           "--no-progress")
    assert code == 0, err
    page = (tmp_path / "site" / "data" / "sae" / "l" / "0000.js").read_text(encoding="utf-8")
    records = json.loads(re.fullmatch(r'SAELAB\.put\("[^"]+",(.*)\);\n', page, re.S)[1])
    assert [sorted(j for j, _ in r["near"]) for r in records] == [[j for j in range(8) if j != i] for i in range(8)]


def test_browse_top_and_samples_past_the_contexts_read_list_them_all(tiny_dir, corpus, tmp_path, capsys, monkeypatch):
    """browse --n-top 300000 and --n-samples 10000000 failed in the allocator after the load (a slot per latent and
    context asked for, most never filled). A latent lists each context once: the pages are those of --n-top and
    --n-samples equal to the 65 contexts read, and a site built with such settings stays reusable (not refused)."""
    monkeypatch.chdir(tmp_path)
    sae = make_sae()
    sae.cfg.model_name = str(tiny_dir)
    save_sae(sae, tmp_path / "sae")
    common = ("--corpus", str(corpus), "--n-tokens", "2000", "--no-progress")
    for out, n_top, n_samples in (("huge", "300000", "10000000"), ("all", "65", "65")):
        code, _, err = run_cli(capsys, "browse", "sae", "--out", out, "--n-top", n_top, "--n-samples", n_samples,
                               *common)
        assert code == 0, err
    pages = sorted(p.relative_to(tmp_path / "all") for p in (tmp_path / "all" / "data" / "sae").rglob("*.js"))
    assert pages and all((tmp_path / "huge" / p).read_bytes() == (tmp_path / "all" / p).read_bytes() for p in pages)
    code, out, err = run_cli(capsys, "browse", "sae", "--out", "huge", "--n-top", "300000", "--n-samples", "10000000",
                             *common)
    assert code == 0 and json.loads(out)["reused"] is True, err


def test_a_file_of_other_tensors_says_how_many_its_listing_leaves_out(tmp_path):
    """A training checkpoint or an OpenAI SAE file missing its keys lists the keys it holds, at most a few: the
    listing says how many it leaves out, where 11 keys read as the 8 (or 6) shown."""
    from saelab.sae.openai_format import read_openai_v5_state
    from saelab.train.checkpoint import CHECKPOINT, load_checkpoint

    other = {f"k{i:02d}": torch.zeros(1) for i in range(11)}
    torch.save(other, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match=r"missing step, .* \(found \['k00', .*'k07'\] and 3 more\)"):
        load_checkpoint(tmp_path)
    torch.save(other, tmp_path / "ae.pt")
    with pytest.raises(SaelabError, match=r"missing encoder.weight, .* \(found \['k00', .*'k05'\] and 5 more\)"):
        read_openai_v5_state(tmp_path / "ae.pt")
