"""Steering, clamping and ablating latents in scoring and in generation (tiny GPT-2, small random SAE)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_browser_site import POOL

from saelab.explore import generate_with_and_without, latent_edit, run_with_cache_with_saes, steer
from saelab.cli import main
from saelab.errors import ConfigError
from saelab.explore.steering import generate_ids, prompt_tokens
from saelab.sae import SAEConfig, TopKSAE, save_sae

HOOK = "blocks.0.hook_resid_post"
POST = HOOK + ".hook_sae_acts_post"


@pytest.fixture(scope="module")
def sae(tiny_gpt2):
    torch.manual_seed(3)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=128, k=8, hook_name=HOOK, model_name="tiny"))
    with torch.no_grad():
        acts = tiny_gpt2.activations(torch.randint(0, 50000, (4, 16)), HOOK)
        sae.b_dec.copy_(acts[:, 1:].reshape(-1, 64).mean(0))
    return sae


@pytest.fixture(scope="module")
def tokens(tiny_gpt2):
    return prompt_tokens(tiny_gpt2, "The cat sat on the mat while the dog slept.")


def test_add_at_positions_is_causal_and_equals_manual_edit(tiny_gpt2, sae, tokens):
    lat, val, pos = 7, 4.0, [4, 6]
    clean = tiny_gpt2.logits(tokens)
    got = tiny_gpt2.logits(tokens, edits=steer(tiny_gpt2, sae, lat, "add", val, positions=pos).edits)

    def manual(x):
        x = x.clone()
        x[:, pos] += val * sae.W_dec[lat]
        return x

    torch.testing.assert_close(got, tiny_gpt2.logits(tokens, edits={HOOK: manual}), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:, :4], clean[:, :4])  # earlier positions untouched, bit for bit
    assert (got[:, 4] - clean[:, 4]).abs().max() > 1e-3
    ce = tiny_gpt2.cross_entropy(tokens, edits=steer(tiny_gpt2, sae, lat, "add", val, positions=pos).edits)
    assert torch.equal(ce[:, :4], tiny_gpt2.cross_entropy(tokens)[:, :4])


def test_clamp_and_ablate_equal_spliced_latent_edits(tiny_gpt2, sae, tokens):
    x = tiny_gpt2.activations(tokens, HOOK)
    z = sae.encode(x)
    active = [int(i) for i in torch.nonzero(z[0, 1:].sum(0)).flatten()]
    lat = active[0]
    for mode, val in (("clamp", 5.0), ("ablate", 0.0)):
        s = steer(tiny_gpt2, sae, lat, mode, val, positions=slice(1, None))
        got = tiny_gpt2.logits(tokens, edits=s.edits)
        with torch.no_grad():
            want, cache = run_with_cache_with_saes(
                tiny_gpt2, tokens, [sae], use_error_term=True,
                hooks={POST: latent_edit(tiny_gpt2, lat, "clamp", val, slice(1, None))},
            )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.all(cache[POST][0, 1:, lat] == val)  # the latent is at the set value
        # and the steered activation is exactly the spliced model's output
        torch.testing.assert_close(s(x), cache[HOOK + ".hook_sae_output"], atol=1e-5, rtol=1e-5)
    # ablating a latent changes nothing where it did not fire
    silent = int(torch.nonzero(z[0].sum(0) == 0).flatten()[0])
    torch.testing.assert_close(
        tiny_gpt2.logits(tokens, edits=steer(tiny_gpt2, sae, silent, "ablate").edits), tiny_gpt2.logits(tokens)
    )


def _check_generation_matches_scoring(lm, prompt, edits, n_new):
    """Greedy generation with a KV cache must pick, at every step, the argmax of a full forward."""
    ids = prompt_tokens(lm, prompt)
    full = generate_ids(lm, ids, edits, max_new_tokens=n_new, greedy=True)
    assert full.shape[1] == ids.shape[1] + n_new
    logits = lm.logits(full, edits=edits)
    P = ids.shape[1]
    assert torch.equal(logits[0, P - 1:-1].argmax(-1), full[0, P:])
    return full


def test_generation_positions_are_absolute(tiny_gpt2, sae):
    lm = tiny_gpt2
    prompt = " Hello world, this is"
    P = prompt_tokens(lm, prompt).shape[1]
    clean = _check_generation_matches_scoring(lm, prompt, {}, 6)
    for positions in (None, slice(P + 2, None), [P + 1]):
        s = steer(lm, sae, 7, "add", 60.0, positions=positions)
        full = _check_generation_matches_scoring(lm, prompt, s.edits, 6)
        if positions is not None:  # tokens chosen before the first edited position are the clean ones
            first = positions.start if isinstance(positions, slice) else positions[0]
            assert torch.equal(full[0, : first + 1], clean[0, : first + 1])
    # clamp through the SAE (encoder run at every step) is consistent too
    _check_generation_matches_scoring(lm, prompt, steer(lm, sae, 7, "clamp", 30.0).edits, 6)


def test_generate_with_and_without_is_seeded(tiny_gpt2, sae):
    s = steer(tiny_gpt2, sae, 7, "add", 200.0)
    a = generate_with_and_without(tiny_gpt2, "Once upon a time", s, max_new_tokens=4, seed=5, top_p=1.0, temperature=0.05)
    b = generate_with_and_without(tiny_gpt2, "Once upon a time", s, max_new_tokens=4, seed=5, top_p=1.0, temperature=0.05)
    assert a == b
    assert a.clean != a.steered
    assert "add 200" in a.format() and "--- without steering ---" in a.format()


def test_steer_in_python_refuses_what_the_command_line_refuses(tiny_gpt2, sae):
    """steer(lm, sae, 1, "add") returned "add 0", an edit that changes nothing; a value for ablate was taken and
    ignored; a text for a value was torch's TypeError. Each is one ValueError naming it; ablate's 0 is taken."""
    for args, said in ((("add",), "mode 'add' needs a value: one number, or one per latent"),
                       (("clamp",), "mode 'clamp' needs a value: one number, or one per latent"),
                       (("ablate", 5.0), "mode 'ablate' sets the latent to 0: it takes no value, got 5.0"),
                       (("add", "3"), "value: expected a number, or one per latent, got '3'"),
                       (("add", [1.0, "x"]), "value: expected a number, or one per latent, got [1.0, 'x']")):
        with pytest.raises(ValueError) as err:
            steer(tiny_gpt2, sae, 1, *args)
        assert str(err.value) == said
    for zero in (0.0, 0, torch.tensor(0.0), [0.0]):
        assert steer(tiny_gpt2, sae, 1, "ablate").describe() == steer(tiny_gpt2, sae, 1, "ablate", zero).describe()


def test_sampling_settings_are_refused_as_the_command_line_refuses_them(tiny_gpt2, sae):
    """top_p=2 was taken; max_new_tokens=0 and temperature=0 reached transformers' own errors."""
    s = steer(tiny_gpt2, sae, 7, "add", 2.0)
    for kw, said in (({"top_p": 2.0}, "top_p must be in (0, 1], got 2.0"),
                     ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer, got 0"),
                     ({"temperature": 0.0}, "temperature must be > 0, got 0.0 (greedy=True picks the likeliest token)")):
        with pytest.raises(ValueError) as err:
            generate_with_and_without(tiny_gpt2, "Once", s, **kw)
        assert str(err.value) == said
    assert generate_with_and_without(tiny_gpt2, "Once", s, max_new_tokens=1, greedy=True, temperature=0.0).clean


def test_generations_are_shown_with_their_control_characters_escaped(tiny_gpt2, sae):
    """A prompt's ESC sequence and carriage return reached the terminal raw in both generations (its `prompt:` line
    was escaped), as would a model's; they are escaped as top escapes them, newlines and tabs kept."""
    s = steer(tiny_gpt2, sae, 7, "add", 200.0)
    prompt = "hi\x1b[31mRED\rX\tY\nZ"
    shown = generate_with_and_without(tiny_gpt2, prompt, s, max_new_tokens=2, greedy=True).format()
    assert "\x1b" not in shown and "\r" not in shown
    assert shown.count("hi\\x1b[31mRED\\rX\tY\nZ") == 2


def test_steer_shows_promoted_tokens_as_top_does(tiny_gpt2, tiny_dir, tmp_path, capsys):
    r"""A token holding part of a character printed as repr() of its bytes, '\\x9f' (the backslash doubled),
    where top and the site show '\x9f'; a newline stays escaped."""
    from saelab.evals.probe_tasks import token_strings

    tok = tiny_gpt2.tokenizer
    tops = [i for i in tok(" 🎉")["input_ids"] if "\ufffd" in tok.decode([i])][:1] + tok("\n")["input_ids"]
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=4, k=1, hook_name=HOOK, model_name="tiny"))
    with torch.no_grad():  # latent 1 writes the sum of their unembeddings: they are its top tokens
        sae.W_dec[1] = tiny_gpt2.model.lm_head.weight[tops].sum(0) / tiny_gpt2.model.transformer.ln_f.weight
        quote = tok("'s")["input_ids"]  # latent 2: a token holding a quote
        sae.W_dec[2] = tiny_gpt2.model.lm_head.weight[quote].sum(0) / tiny_gpt2.model.transformer.ln_f.weight
    save_sae(sae, tmp_path / "sae")
    assert main(["steer", str(tmp_path / "sae"), "--latent", "1", "--value", "1", "--model", str(tiny_dir),
                 "--prompt", "Hi", "--max-new-tokens", "1", "--greedy", "--device", "cpu",
                 "--top-tokens", "4"]) == 0
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("latent 1 promotes: "))
    shown = [s.replace("\n", "\\n") for s in token_strings(tok, tops, readable_bytes=True)]
    assert any("\\x" in s for s in shown) and all(f"'{s}'" in line for s in shown), line
    assert "\\\\" not in line
    assert main(["steer", str(tmp_path / "sae"), "--latent", "2", "--value", "1", "--model", str(tiny_dir),
                 "--prompt", "Hi", "--max-new-tokens", "1", "--greedy", "--device", "cpu", "--top-tokens", "1"]) == 0
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("latent 2 promotes: "))
    assert line == "latent 2 promotes: '\\'s'"  # its quote escaped: "'=('" and "'=(" "'" read alike


def test_steer_rejects_bad_input(tiny_gpt2, sae):
    with pytest.raises(ValueError, match="mode"):
        steer(tiny_gpt2, sae, 1, "boost", 1.0)
    with pytest.raises(IndexError):
        steer(tiny_gpt2, sae, 128, "add", 1.0)
    with pytest.raises(ValueError, match="negative"):
        steer(tiny_gpt2, sae, 1, "add", 1.0, positions=[-1])
    with pytest.raises(ValueError, match="got 3 values for 2 latents$"):
        steer(tiny_gpt2, sae, [1, 2], "add", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="got 2 values for 1 latent$"):  # read "1 latents"
        steer(tiny_gpt2, sae, [1], "add", [1.0, 2.0])
    for latent, value in ((1, float("nan")), ([1, 2], [1.0, float("inf")])):  # every steered activation NaN
        with pytest.raises(ValueError, match="value must be a finite number"):
            steer(tiny_gpt2, sae, latent, "add", value)
    with pytest.raises(IndexError, match="latent -1 out of range"):  # it steered the last latent
        steer(tiny_gpt2, sae, -1, "add", 1.0)
    for latent in ([2.9], [True]):  # read as latent 2, latent 1
        with pytest.raises(TypeError, match=f"latent {latent[0]!r}: expected an integer index"):
            steer(tiny_gpt2, sae, latent, "add", 1.0)


def test_steer_command(tiny_gpt2, sae, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny_gpt2.model.save_pretrained(model_dir)
    tiny_gpt2.tokenizer.save_pretrained(model_dir)
    save_sae(sae, tmp_path / "sae")
    argv = ["steer", str(tmp_path / "sae"), "--latent", "7", "--value", "200", "--model", str(model_dir),
            "--prompt", "Once upon a time", "--max-new-tokens", "5", "--greedy", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out  # plain text for people
    assert "--- without steering ---" in out and "--- with steering (latent 7" in out
    assert "\n\n\n" not in out  # one blank line before the sample, no header of one sample
    assert "latent 7 promotes:" in out
    assert main([*argv, "--json"]) == 0  # one JSON object for scripts
    result = json.loads(capsys.readouterr().out)
    g = result["generations"][0]
    assert g["clean"] in out and g["steered"] in out and g["clean"] != g["steered"]
    assert g["seed"] is None  # greedy: no seed drew it
    assert result["promoted_tokens"]["7"]
    # Positions past the prompt (5 tokens with BOS) and the 4 generated tokens the model reads back are
    # refused before anything runs, not shown as "no effect"; the last reachable one steers.
    for far in ("9", "3,9", "9:", "500"):
        assert main([*argv, "--positions", far, "--json"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.strip() == (
            f"saelab steer: error: --positions {far}: position {far.split(',')[-1].rstrip(':')} is never reached; "
            "the largest reachable is 8 (a prompt of 5 tokens with BOS, then --max-new-tokens 5, the last of which "
            "the model never reads)")
    for near in ("8", "3", "2:500"):
        assert main([*argv, "--positions", near, "--json"]) == 0
        assert "nothing was steered" not in capsys.readouterr().err


def _steer_latent_7_args(tiny_gpt2, sae, tmp_path) -> list[str]:
    """The model and the SAE saved under ``tmp_path`` (``tmp_path / "sae"``), and steer's options for latent 7 on
    them, short and greedy."""
    model_dir = tmp_path / "model"
    tiny_gpt2.model.save_pretrained(model_dir)
    tiny_gpt2.tokenizer.save_pretrained(model_dir)
    save_sae(sae, tmp_path / "sae")
    return ["--latent", "7", "--model", str(model_dir), "--prompt", "Once upon a time", "--max-new-tokens", "3",
            "--greedy", "--device", "cpu", "--no-progress", "--top-tokens", "0"]


def test_a_value_whose_squares_overflow_the_next_norm_is_refused_in_one_line(tiny_gpt2, sae, tmp_path, capsys):
    """A value within float32's range but whose square is not (1e20: activations of 1e20 square to 1e40) passed
    every check, and the model's next normalisation, squaring in float32, overflowed: empty or NaN text, exit 0."""
    common = _steer_latent_7_args(tiny_gpt2, sae, tmp_path)
    capsys.readouterr()
    for mode, value in (("add", "1e+20"), ("clamp", "1e+30")):
        assert main(["steer", str(tmp_path / "sae"), "--mode", mode, "--value", value, *common]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"saelab steer: error: the change made by steering (latent 7 at {HOOK}: {mode} "
                              f"{value}, positions 1:) gives activations whose squares sum to "), err
        assert "at a token, which overflows the model's normalisations (sum of squares <= 2.658e+36: the text " \
               "would come out empty or NaN); steer with a smaller value" in err, err
    # a large value whose squares fit still steers
    assert main(["steer", str(tmp_path / "sae"), "--value", "1e9", *common]) == 0


def test_a_spread_out_value_whose_squares_overflow_only_summed_is_refused(tiny_gpt2, sae, tokens, tmp_path, capsys):
    """An add along a spread-out decoder direction keeps every activation below sqrt(float32's max) while the sum
    of a token's squares, which the model's next normalisation takes, passes float32's max: the check of the
    largest activation alone let 5.4e19 through, and the text came out degenerate ("!!!!!!") with exit 0."""
    d = sae.W_dec[7].detach()
    value, root = 5.4e19, torch.finfo(torch.float32).max ** 0.5
    assert value * float(d.abs().max()) < root < value * float(d.norm())  # each square fits, their sum does not
    with pytest.raises(ConfigError) as e:
        tiny_gpt2.logits(tokens, edits=steer(tiny_gpt2, sae, 7, "add", value).edits)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"the change made by steering (latent 7 at {HOOK}: add 5.4e+19, positions 1:) "
                                   "gives activations whose squares sum to "), e.value
    assert "at a token, which overflows the model's normalisations (sum of squares <= 2.658e+36: the text would " \
           "come out empty or NaN); steer with a smaller value" in str(e.value), e.value
    # safely below the bound the steered model still reads a direction: finite logits that differ by token
    logits = tiny_gpt2.logits(tokens, edits=steer(tiny_gpt2, sae, 7, "add", 1e18).edits)
    assert bool(torch.isfinite(logits).all()) and float(logits[0, -1].std()) > 0

    common = _steer_latent_7_args(tiny_gpt2, sae, tmp_path)
    capsys.readouterr()
    assert main(["steer", str(tmp_path / "sae"), "--value", "5.4e19", *common]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"saelab steer: error: the change made by steering (latent 7 at {HOOK}: add 5.4e+19, "), err
    assert main(["steer", str(tmp_path / "sae"), "--value", "1e18", *common]) == 0


def test_steer_refuses_top_tokens_past_the_vocabulary_after_the_load(tiny_gpt2, sae, tmp_path, capsys, monkeypatch):
    """A model whose config names no vocabulary size (as a .gguf file's, read only by the load) is checked right
    after the load, before any generation: `--top-tokens 999999` printed the whole vocabulary on one line."""
    from saelab.explore import steering

    model_dir = tmp_path / "model"
    tiny_gpt2.model.save_pretrained(model_dir)
    tiny_gpt2.tokenizer.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    del config["vocab_size"]  # GPT-2's default, 50,257, is the tiny model's: it loads as before
    (model_dir / "config.json").write_text(json.dumps(config))
    save_sae(sae, tmp_path / "sae")

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before refusing --top-tokens")

    monkeypatch.setattr(steering, "generate_with_and_without", no_generation)
    argv = ["steer", str(tmp_path / "sae"), "--latent", "7", "--value", "2", "--model", str(model_dir), "--prompt",
            "Hi", "--max-new-tokens", "2", "--greedy", "--device", "cpu", "--top-tokens", "999999"]
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip().splitlines()[-1] == (  # after the load's progress bar
        "saelab steer: error: --top-tokens 999999: expected at most the model's vocabulary size, 50,257 tokens")


def _eos_only(lm):
    """A copy of ``lm`` whose final layer norm outputs one fixed vector that the end-of-text token's
    embedding matches best: greedy generation ends at once, after one new token."""
    model = copy.deepcopy(lm.model)
    eos = lm.tokenizer.eos_token_id
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.linspace(-1, 1, 64))
        model.transformer.wte.weight[eos] = 100 * model.transformer.ln_f.bias
    return model


def test_steer_warns_when_the_generation_ends_before_the_positions(tiny_gpt2, sae, tmp_path, capsys):
    model_dir = tmp_path / "model"
    _eos_only(tiny_gpt2).save_pretrained(model_dir)
    tiny_gpt2.tokenizer.save_pretrained(model_dir)
    save_sae(sae, tmp_path / "sae")
    argv = ["steer", str(tmp_path / "sae"), "--latent", "7", "--value", "200", "--model", str(model_dir),
            "--prompt", "Once upon a time", "--max-new-tokens", "5", "--greedy", "--device", "cpu",
            "--top-tokens", "0", "--json"]
    assert main([*argv, "--positions", "7"]) == 0  # reachable, but EOS comes first
    captured = capsys.readouterr()
    g = json.loads(captured.out)["generations"][0]
    assert g["clean"] == g["steered"] == ""  # the end-of-text token only, not shown
    assert captured.err.strip().splitlines()[-1] == ("saelab steer: warning: --positions 7 lie past the 5 positions the model read "
                                    "(the generation ended early, at the end-of-text token): nothing was steered")


@pytest.mark.slow  # ~35 s on 2 cores: top and steer --scale each load the model and read their text
def test_top_and_steer_scale_from_the_command_line(tiny_gpt2, sae, data_dir, tmp_path, capsys):
    from saelab.explore import latent_max_activation, top_activations

    model_dir = tmp_path / "model"
    tiny_gpt2.model.save_pretrained(model_dir)
    tiny_gpt2.tokenizer.save_pretrained(model_dir)
    save_sae(sae, tmp_path / "sae")
    corpus = str(data_dir / "wiki-en" / "wiki_eval.jsonl.xz")
    common = ["--model", str(model_dir), "--device", "cpu", "--no-progress"]
    pool = ["--sample-pool-tokens", str(POOL)]
    assert main(["top", str(tmp_path / "sae"), "--latent", "7,9", "-n", "3", "--n-tokens", "1024", "--corpus", corpus,
                 "--json", *pool, *common]) == 0
    got = json.loads(capsys.readouterr().out)["latents"]
    want = top_activations(sae, tiny_gpt2, corpus, [7, 9], 3, n_tokens=1024, sample_pool_tokens=POOL)
    assert got == [json.loads(json.dumps(w.to_dict())) for w in want]
    assert main(["top", str(tmp_path / "sae"), "--latent", "7", "--n-tokens", "1024", "--corpus", corpus, *pool,
                 *common]) == 0
    typed = capsys.readouterr().out
    assert typed.startswith("latent 7: max ")
    # a --config file's latent as the JSON number or list it naturally is, read as typed (it crashed as no list)
    for latent, printed in ((7, typed), ([7, 9], None)):
        (tmp_path / "c.json").write_text(json.dumps({"latent": latent, "n_tokens": 1024, "sample_pool_tokens": POOL}))
        assert main(["top", str(tmp_path / "sae"), "--config", str(tmp_path / "c.json"), "--corpus", corpus,
                     *common]) == 0
        out = capsys.readouterr().out
        assert out == printed if printed else out.startswith("latent 7: max ") and "latent 9: max " in out
    for latent, why in (([7, -1], "expected an integer >= 0 or comma-separated integers >= 0, got '7,-1'"),
                        (True, "expected a value --latent takes, got true")):  # refused in the file's words
        (tmp_path / "c.json").write_text(json.dumps({"latent": latent, "n_tokens": 1e3}))
        assert main(["top", str(tmp_path / "sae"), "--config", str(tmp_path / "c.json"), *common]) == 2
        assert capsys.readouterr().err.strip() == f"saelab top: error: --config {tmp_path / 'c.json'}: latent: {why}"
    # --scale 2: twice the latent's max activation on the eval split.
    assert main(["steer", str(tmp_path / "sae"), "--latent", "7", "--scale", "2", "--scale-tokens", "1024",
                 "--max-new-tokens", "3", "--greedy", "--top-tokens", "0", "--json", *common]) == 0
    captured = capsys.readouterr()
    assert "Loading weights" not in captured.err  # --no-progress hides the bar of the load beside the scale text
    printed = json.loads(captured.out)
    steering = printed["steering"]
    peak = latent_max_activation(sae, tiny_gpt2, None, 7, n_tokens=1024)
    assert peak > 0 and steering.startswith(f"latent 7 at {HOOK}: add {2 * peak:g}")
    # what the text shows of the scale (the max activation, the tokens it was read on and how) is in the JSON too
    measured = top_activations(sae, tiny_gpt2, None, 7, 1, n_tokens=1024)
    assert printed["scale"] == [{"latent": 7, "max_activation": pytest.approx(peak), "eval_tokens": measured.n_tokens,
                                 "contexts_drawn": measured.contexts_drawn, "scale": 2.0,
                                 "value": pytest.approx(2 * peak)}]
    # A latent that never fires: --scale would steer by 0, and says so.
    silent = copy.deepcopy(sae)
    with torch.no_grad():
        silent.b_enc[9] = -1e6
    save_sae(silent, tmp_path / "silent")
    assert main(["steer", str(tmp_path / "silent"), "--latent", "9", "--scale", "2", "--scale-tokens", "1024",
                 "--max-new-tokens", "2", "--greedy", "--top-tokens", "0", "--json", *common]) == 0
    scored = top_activations(silent, tiny_gpt2, None, 9, 1, n_tokens=1024).n_tokens  # whole contexts: past 1,024
    assert scored > 1024
    assert f"latent(s) [9] never fired on {scored:,} eval tokens, so --scale gives them a value of 0" in \
        capsys.readouterr().err
    # a --scale that takes a value past float32's range is refused (a traceback after the scale pass)
    loud = copy.deepcopy(sae)
    with torch.no_grad():
        loud.b_enc[7] += 100.0  # its max activation past 1: 3.4e38 times it overflows
    save_sae(loud, tmp_path / "loud")
    assert main(["steer", str(tmp_path / "loud"), "--latent", "7", "--scale", "3.4e38", "--scale-tokens", "1024",
                 "--max-new-tokens", "2", "--greedy", *common]) == 2
    assert "--scale 3.4e+38 times latent 7's max activation" in capsys.readouterr().err


def test_default_positions_leave_bos_as_the_splice_does(tiny_series, tiny_series_run):
    """A trained SAE without position 0 (cfg.exclude_first): ablating a latent active at BOS with the default
    positions is the splice (error term kept) with the latent ablated, which leaves BOS unedited; an explicit
    range from 0 still edits BOS."""
    from saelab.models import load_model
    from saelab.run_folder import open_sae

    lm = load_model(str(tiny_series / "checkpoint-120"), device="cpu")
    sae, _ = open_sae(tiny_series_run)
    assert sae.cfg.exclude_first
    tokens = prompt_tokens(lm, "The cat sat on the mat while the dog slept.")
    with torch.no_grad():
        z = sae.encode(lm.activations(tokens, sae.cfg.hook_name))
        lat = int(z[0, 0].argmax())
        assert z[0, 0, lat] > 0  # active at BOS
        s = steer(lm, sae, lat, "ablate")
        want = run_with_cache_with_saes(lm, tokens, [sae], use_error_term=True,
                                        hooks={sae.cfg.hook_name + ".hook_sae_acts_post": latent_edit(lm, lat, "ablate")})[0]
        torch.testing.assert_close(lm.logits(tokens, edits=s.edits), want, atol=1e-5, rtol=1e-5)
        assert "positions 1:" in s.describe()
        at_bos = lm.logits(tokens, edits=steer(lm, sae, lat, "ablate", positions=slice(0, None)).edits)
        assert (at_bos[0, 0] - lm.logits(tokens)[0, 0]).abs().max() > 1e-3


def test_a_steering_built_by_hand_leaves_position_0_as_steer_does(tiny_gpt2, sae, tokens):
    """The rule that the default positions skip position 0 for an SAE trained without it lived in steer():
    a Steering built from the Python API with positions=None edited BOS, which the SAE never saw."""
    from saelab.explore import Steering

    no_bos = copy.deepcopy(sae)
    no_bos.cfg.exclude_first = True
    with_bos = copy.deepcopy(sae)
    with_bos.cfg.exclude_first = False
    by_hand = Steering(tiny_gpt2, no_bos, [7], "add", torch.tensor([4.0]), None, HOOK)
    assert by_hand.positions == slice(1, None) and "positions 1:" in by_hand.describe()
    clean = tiny_gpt2.logits(tokens)
    got = tiny_gpt2.logits(tokens, edits=by_hand.edits)
    assert torch.equal(got[:, 0], clean[:, 0]) and (got[:, 1] - clean[:, 1]).abs().max() > 1e-3
    assert torch.equal(got, tiny_gpt2.logits(tokens, edits=steer(tiny_gpt2, no_bos, 7, "add", 4.0).edits))
    # an SAE that reads position 0 is steered there too; given positions are checked as steer checks them
    every = Steering(tiny_gpt2, with_bos, [7], "add", torch.tensor([4.0]), None, HOOK)
    assert every.positions is None and not torch.equal(tiny_gpt2.logits(tokens, edits=every.edits)[:, 0], clean[:, 0])
    with pytest.raises(ValueError, match="non-negative"):
        Steering(tiny_gpt2, sae, [7], "add", torch.tensor([4.0]), slice(-1, None), HOOK)


def test_steer_scale_tokens_past_the_eval_split_names_the_option_and_its_maximum(tiny_dir, sae, tmp_path, capsys,
                                                                                  monkeypatch):
    """Refused before the model loads, as top's and browse's --n-tokens are: the split is measured with the
    tokenizer on disk (it was read after the load)."""
    import re

    import saelab.models

    save_sae(sae, tmp_path / "sae")
    monkeypatch.setattr(saelab.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["steer", str(tmp_path / "sae"), "--latent", "7", "--scale", "2", "--scale-tokens", "100000000",
            "--model", str(tiny_dir), "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    m = re.fullmatch(r"saelab steer: error: --scale-tokens 100,000,000: the eval split holds ([\d,]+) tokens the SAE "
                     r"reads; expected --scale-tokens (\d+) at most", err)
    assert m and int(m.group(1).replace(",", "")) == int(m.group(2)), err
    assert int(m.group(2)) % (sae.cfg.context_size - 1) == 0  # whole contexts less their BOS


def test_steer_names_the_offline_default_by_its_hub_id(smollm2, tmp_path, capsys):
    """steer's first line read "model default", where metrics.json and report.md name the hub id."""
    from saelab.models import DEFAULT_MODEL_HUB_ID

    hook = "blocks.1.hook_resid_post"
    save_sae(TopKSAE(SAEConfig(d_in=smollm2.hook_width(hook), n_latents=16, k=2, hook_name=hook)), tmp_path / "sae")
    assert main(["steer", str(tmp_path / "sae"), "--latent", "1", "--value", "1", "--model", "default",
                 "--prompt", "Hi", "--max-new-tokens", "1", "--greedy", "--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"model {DEFAULT_MODEL_HUB_ID}, SAE "), first


@pytest.fixture(scope="module")
def paper_recipe_run(tiny_series, data_dir, tmp_path_factory):
    """(model, SAE) of a paper-recipe run: input LayerNorm inside the SAE, as OpenAI's v5 files, trained on the
    series model's blocks.1 residual stream over Wikipedia text."""
    from saelab.models import load_model
    from saelab.pipeline import HarvestConfig, harvest, train_from_cache
    from saelab.train import TrainConfig

    base = tmp_path_factory.mktemp("paper-run")
    model = str(tiny_series / "checkpoint-120")
    cache = harvest(HarvestConfig(model=model, hook="blocks.1.hook_resid_post", context_size=32, n_tokens=8192,
                                  corpus=str(data_dir / "wiki-en" / "wiki_train.jsonl.xz"), buffer_tokens=8192),
                    base / "acts", progress=False)
    cfg = TrainConfig.from_recipe("paper", n_latents=128, k=4, k_aux=64, batch_size=256, total_tokens=8192,
                                  init_rows=1024, ema_decay=0)
    sae = train_from_cache(cache, base / "run", cfg, progress=False)
    assert sae.cfg.input_norm == "layernorm"
    return load_model(model, device="cpu"), sae


def test_add_raises_the_latent_by_its_value_in_a_layernorm_sae(paper_recipe_run):
    """Add mode added value * d_i in raw activation units, which a LayerNorm SAE reads divided by the token's
    std(x): latent 828 of a paper-recipe SAE on GPT-2 rose by 0.38 for a --scale 2 add of 4.35 (std 6.5). The
    value is in the latent's own units: the steered activation is the splice (error term kept) with the latent
    raised by the value, and the SAE reading it back finds the latent's pre-activation raised by about that."""
    lm, sae = paper_recipe_run
    hook = sae.cfg.hook_name
    tokens = prompt_tokens(lm, "The river flows through the old town and past the church.")
    with torch.no_grad():
        x = lm.activations(tokens, hook)
        std = sae.normalize_input(x)[1][1]
        assert not 0.5 < float(std[0, 1:].mean()) < 2  # far from 1: the units differ
        pos = 5
        lat = int(sae.encode(x)[0, pos].argmax())  # a latent that fires there
        value = 1.0
        s = steer(lm, sae, lat, "add", value, positions=[pos])
        steered = s(x)
        assert torch.equal(steered[:, :pos], x[:, :pos]) and torch.equal(steered[:, pos + 1:], x[:, pos + 1:])
        # About the value, not exactly: the SAE's LayerNorm reads the steered token with a larger std (the
        # latent's direction added to a token that has it already), here 0.86 for 1; the old add gave 0.39.
        pre = [sae.pre_acts(sae.normalize_input(a[0, pos])[0])[lat] for a in (x, steered)]
        assert float(pre[1] - pre[0]) == pytest.approx(value, rel=0.2)
        z = [sae.encode(a[0, pos])[lat] for a in (x, steered)]
        assert float(z[1] - z[0]) == pytest.approx(value, rel=0.2)  # it fires: the same after TopK
        # exactly what the splice gives with the latent raised (decoded times std(x), as clamp)
        edit = {hook + ".hook_sae_acts_post": latent_edit(lm, lat, "add", value, [pos])}
        _, cache = run_with_cache_with_saes(lm, tokens, [sae], use_error_term=True, names=[hook + ".hook_sae_output"],
                                            hooks=edit)
        torch.testing.assert_close(steered, cache[hook + ".hook_sae_output"], atol=1e-5, rtol=1e-5)


def test_a_layernorm_sae_value_past_float32_once_times_std_is_refused_in_one_line(paper_recipe_run, tmp_path,
                                                                                   capsys):
    """steer checked --value against float32's range, but a layernorm SAE adds the value times each token's
    std(x) (here ~6.5): a value inside the range gave inf activations and NaN text, silently."""
    lm, sae = paper_recipe_run
    tokens = prompt_tokens(lm, "The river flows through the old town and past the church.")
    with torch.no_grad():
        x = lm.activations(tokens, sae.cfg.hook_name)
        std = float(sae.normalize_input(x)[1][1][0, 1:].max())
    top, largest_N = torch.finfo(torch.float32).max, sae.W_dec.detach().abs().max(1).values
    lat = int(largest_N.argmax())  # the latent whose unit direction has the largest entry
    value, largest = 0.9 * top, float(largest_N[lat])
    assert value * largest < top < value * largest * std  # within float32, but for std(x)
    model_dir, sae_dir = tmp_path / "model", tmp_path / "sae"
    lm.model.save_pretrained(model_dir)
    lm.tokenizer.save_pretrained(model_dir)
    save_sae(sae, sae_dir)
    capsys.readouterr()
    argv = ["steer", str(sae_dir), "--latent", str(lat), "--value", f"{value:.6g}", "--model", str(model_dir),
            "--prompt", "The river flows", "--max-new-tokens", "2", "--greedy", "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"saelab steer: error: the change made by steering (latent {lat} at {sae.cfg.hook_name}: "
                          f"add {value:.6g}, positions 1:) is past torch.float32's range"), err
    assert "past torch.float32's range (|x| <= 3.403e+38) (a layernorm SAE adds each value times the token's " \
           "std(x), here up to " in err and err.strip().endswith("; steer with a smaller value"), err


def test_steer_scale_reads_its_text_from_the_pool_given_as_top_does(tiny_gpt2, tiny_dir, sae, tmp_path, capsys):
    """--scale measured each latent's max on --scale-tokens tokens drawn from the eval split's first 4,194,304, and
    steer had no --sample-pool-tokens to read them in order (0) or from another pool, as top can. It takes top's
    option (the same help, default and type; its refusals: tests/test_cli.py), and says in its text and JSON how the
    contexts were drawn."""
    from saelab.cli import build_parser
    from saelab.explore import latent_max_activation

    save_sae(sae, tmp_path / "sae")
    argv = ["steer", str(tmp_path / "sae"), "--latent", "7", "--scale", "2", "--scale-tokens", "1024",
            "--max-new-tokens", "2", "--greedy", "--top-tokens", "0", "--model", str(tiny_dir), "--device", "cpu",
            "--no-progress"]
    for pool, words in ((0, "read from the corpus's start, in order"),
                        (POOL, f"drawn at random (seed 0) from the corpus's first {POOL:,} tokens")):
        assert main([*argv, "--sample-pool-tokens", str(pool), "--json"]) == 0
        [record] = json.loads(capsys.readouterr().out)["scale"]
        peak = latent_max_activation(sae, tiny_gpt2, None, 7, n_tokens=1024, sample_pool_tokens=pool)
        assert record["max_activation"] == pytest.approx(peak) and record["contexts_drawn"] == words
        assert main([*argv, "--sample-pool-tokens", str(pool)]) == 0
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("latent 7: max activation"))
        assert line.endswith(f"; contexts {words}"), line
    assert peak != pytest.approx(latent_max_activation(sae, tiny_gpt2, None, 7, n_tokens=1024, sample_pool_tokens=0))

    def option(verb: str):
        parser = build_parser([verb])
        sub = next(a for a in parser._actions if a.choices and verb in a.choices).choices[verb]
        return next(a for a in sub._actions if "--sample-pool-tokens" in a.option_strings)

    steer_pool, top_pool = option("steer"), option("top")
    assert (steer_pool.help, steer_pool.default, steer_pool.type) == (top_pool.help, top_pool.default, top_pool.type)
