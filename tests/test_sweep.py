"""Sweeps: several SAEs from one pass over the data equal the same SAEs trained one by one."""

from dataclasses import replace

import pytest
import torch

from saelab.cli.jobs import parse_grid
from saelab.pipeline import sweep_configs
from saelab.train import TrainConfig, train_many, train_sae


def _data(rows=2048, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(96, d, generator=g)
    codes = torch.rand(rows, 96, generator=g) * (torch.rand(rows, 96, generator=g) < 0.05)
    return codes @ basis + 3.0


def _source(data, batch, reads):
    def batches_from(start):
        reads.append(start)
        for i in range(start * batch, data.shape[0] - batch + 1, batch):
            yield data[i:i + batch]
    return batches_from


def test_sweep_equals_separate_runs_and_reads_data_once(tmp_path):
    data = _data()
    base = TrainConfig(n_latents=64, k=4, batch_size=128, total_tokens=2048, init_rows=512, lr=1e-2,
                       dead_tokens=512, k_aux=8, checkpoint_every=100)
    configs = sweep_configs(base, {"n_latents": [64, 96], "k": [4, 8]})
    assert list(configs) == ["n64_k4", "n64_k8", "n96_k4", "n96_k8"]
    reads = []
    swept = train_many(list(configs.values()), _source(data, 128, reads), [tmp_path / n for n in configs],
                       d_in=24, progress=False)
    assert reads == [0, 0]  # the init sample, then one training pass for all four SAEs
    for (name, cfg), sae in zip(configs.items(), swept):
        alone = train_sae(cfg, _source(data, 128, []), tmp_path / "alone" / name, d_in=24, progress=False)
        for a, b in zip(sae.parameters(), alone.parameters()):
            assert torch.equal(a, b), name


def test_parse_grid_types_and_errors():
    grid = parse_grid(["n_latents=1024,4096", "lr=1e-3", "auxk=false,true"])
    assert grid == {"n_latents": [1024, 4096], "lr": [0.001], "auxk": [False, True]}
    import pytest

    from saelab.errors import SaelabError

    with pytest.raises(SaelabError, match="--grid entry 'width=3'"):
        parse_grid(["width=3"])


def test_sweep_from_cache_keeps_finished_runs_and_trains_the_rest(tmp_path):
    """The same sweep command again resumes: finished runs are kept as they are, new ones train."""
    from saelab.data.cache import write_activation_cache
    from saelab.errors import RunExistsError
    from saelab.pipeline import sweep_from_cache

    cache = write_activation_cache(_data().split(128), tmp_path / "acts", meta={"hook_name": "h"}, shard_rows=1024,
                                   progress=False)
    base = TrainConfig(n_latents=64, k=4, batch_size=128, total_tokens=1024, init_rows=512, lr=1e-2,
                       dead_tokens=512, k_aux=8, checkpoint_every=100)
    first = sweep_from_cache(cache, tmp_path / "sweep", base, {"k": [4]}, progress=False)
    weights = (tmp_path / "sweep" / "k4" / "sae" / "sae_weights.safetensors").read_bytes()
    # Logging and checkpointing more often is the same experiment: the finished k4 is kept.
    again = sweep_from_cache(cache, tmp_path / "sweep", replace(base, log_every=1, checkpoint_every=2),
                             {"k": [4, 8]}, progress=False)
    assert list(again) == ["k4", "k8"]
    assert (tmp_path / "sweep" / "k4" / "sae" / "sae_weights.safetensors").read_bytes() == weights
    assert torch.equal(again["k4"].W_dec, first["k4"].W_dec)
    assert (tmp_path / "sweep" / "k8" / "sae" / "sae_weights.safetensors").exists()
    with pytest.raises(RunExistsError, match="finished run"):  # another config in a finished run's folder
        sweep_from_cache(cache, tmp_path / "sweep", replace(base, lr=2e-2), {"k": [4]}, progress=False)


def _asked(monkeypatch, name: str) -> list:
    """The arguments of each call of saelab.pipeline's function ``name`` (called through)."""
    import saelab.pipeline

    calls, original = [], getattr(saelab.pipeline, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(saelab.pipeline, name, counted)
    return calls


def test_sweep_names_values_apart_that_six_digits_would_merge():
    """`--grid lr=0.001,0.0010000001` named both runs lr0.001 (6 significant digits): the second point replaced
    the first, and one run was trained. A value is now written in all the digits it needs where 6 would not say
    it; the usual values keep their short names (numpy's too), and a point given twice is one run."""
    import numpy as np

    assert list(sweep_configs(TrainConfig(), {"lr": [0.001, 0.0010000001]})) == ["lr0.001", "lr0.0010000001"]
    assert list(sweep_configs(TrainConfig(), {"lr": [3e-4, 1e-5], "k": [8]})) == ["k8_lr0.0003", "k8_lr1e-05"]
    assert list(sweep_configs(TrainConfig(), {"k": [4, 4]})) == ["k4"]  # a point given twice is one run
    # a numpy grid: folder names without numpy's type name
    assert list(sweep_configs(TrainConfig(), {"lr": list(np.logspace(-4, -3, 3))})) == [
        "lr0.0001", "lr0.00031622776601683794", "lr0.001"]
    assert parse_grid(["lr=0.001,0.0010000001"]) == {"lr": [0.001, 0.0010000001]}  # the CLI keeps both


def test_sweep_names_runs_in_one_order_and_keeps_a_finished_run_of_the_same_config(tmp_path, capsys, monkeypatch):
    """A grid point equal to a finished run (k=32 where the base k is 32; a name written in the typed
    order) is that run: not trained again under a second name, which would count one SAE twice. Whether
    a run folder holds a point's finished run is asked once, and a kept run's SAE loaded once."""
    from saelab.data.cache import write_activation_cache
    from saelab.pipeline import sweep_from_cache

    assert list(sweep_configs(TrainConfig(), {"k": [8], "n_latents": [256]})) == ["n256_k8"]
    cache = write_activation_cache(_data().split(128), tmp_path / "acts", meta={"hook_name": "h"}, shard_rows=1024,
                                   progress=False)
    base = TrainConfig(n_latents=64, k=4, batch_size=128, total_tokens=1024, init_rows=512, lr=1e-2,
                       dead_tokens=512, k_aux=8, checkpoint_every=100)
    sweep = tmp_path / "sweep"
    sweep_from_cache(cache, sweep, base, {"n_latents": [64, 96]}, progress=False)
    (sweep / "n96").rename(sweep / "typed_first")  # a name the grid would not give it now
    weights = (sweep / "n64" / "sae" / "sae_weights.safetensors").read_bytes()
    capsys.readouterr()
    asked, loads = _asked(monkeypatch, "finished_training"), _asked(monkeypatch, "load_sae")
    again = sweep_from_cache(cache, sweep, base, {"k": [4, 8], "n_latents": [64, 96]}, progress=False)
    assert list(again) == ["n64", "n64_k8", "typed_first", "n96_k8"]
    questions = [(run.name, cfg.k, cfg.n_latents) for run, cfg, _ in asked]
    assert len(questions) == len(set(questions)) and ("n64", 4, 64) in questions
    assert sorted(run.parent.name for (run,) in loads) == ["n64", "typed_first"]
    assert not (sweep / "n64_k4").exists() and not (sweep / "n96_k4").exists()
    assert (sweep / "n64" / "sae" / "sae_weights.safetensors").read_bytes() == weights
    err = capsys.readouterr().err
    assert f"sweep point n64_k4 is the finished run {sweep / 'n64'} (same training config): kept it" in err
    assert f"sweep point n96_k4 is the finished run {sweep / 'typed_first'}" in err
    # Trained again when asked, in the folder of the run it is, not beside it as a second copy.
    sweep_from_cache(cache, sweep, base, {"n_latents": [64]}, overwrite=True, progress=False)
    assert "sweep point n64_k4" not in capsys.readouterr().err  # its own name: n64
    again = sweep_from_cache(cache, sweep, base, {"k": [4], "n_latents": [96]}, overwrite=True, progress=False)
    assert list(again) == ["typed_first"] and not (sweep / "n96_k4").exists()
    assert "(same training config): trains it again there (--overwrite)" in capsys.readouterr().err


def test_a_cut_off_run_named_in_the_typed_order_goes_on_in_its_folder(tmp_path, capsys, monkeypatch):
    """An earlier saelab named a grid point in the order it was typed (k8_n96). A sweep of it cut off left
    k8_n96 unfinished; the same sweep now names the point n96_k8 and must go on in k8_n96, not train a
    second copy beside it and leave the cut-off run unfinished for good."""
    import functools

    import saelab.train
    from saelab.data.cache import write_activation_cache
    from saelab.pipeline import sweep_from_cache

    cache = write_activation_cache(_data().split(128), tmp_path / "acts", meta={"hook_name": "h"}, shard_rows=1024,
                                   progress=False)
    base = TrainConfig(n_latents=64, k=4, batch_size=128, total_tokens=1024, init_rows=512, lr=1e-2,
                       dead_tokens=512, k_aux=8, checkpoint_every=2)
    grid = {"k": [8], "n_latents": [96]}
    whole = saelab.train.train_many
    monkeypatch.setattr(saelab.train, "train_many", functools.partial(whole, stop_after_steps=3))  # cut off
    sweep = tmp_path / "sweep"
    sweep_from_cache(cache, sweep, base, grid, progress=False)
    monkeypatch.setattr(saelab.train, "train_many", whole)
    (sweep / "n96_k8").rename(sweep / "k8_n96")  # the name the earlier saelab gave it
    assert not (sweep / "k8_n96" / "sae").exists()
    capsys.readouterr()
    again = sweep_from_cache(cache, sweep, base, grid, progress=False)
    assert list(again) == ["k8_n96"] and sorted(p.name for p in sweep.iterdir()) == ["k8_n96"]
    assert (f"sweep point n96_k8 is the unfinished run {sweep / 'k8_n96'} (same training config): goes on training "
            "it there") in capsys.readouterr().err
    one_go = sweep_from_cache(cache, tmp_path / "one_go", base, grid, progress=False)
    assert torch.equal(again["k8_n96"].W_dec, one_go["n96_k8"].W_dec)  # resumed, as if never cut off
