"""Run folders have one writer: a lock that refuses a second one (naming its pid), stale temporary files
removed at start, status.json at every checkpoint, train_config.json only once the run has started."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from saelab.data import ActivationCache, write_activation_cache
from saelab.errors import CheckpointError, ConfigError, CorpusError, NonFiniteError, RunExistsError
from saelab.train import TrainConfig, train_many, train_sae
from saelab.utils.folder_lock import LOCK, RunFolderBusyError, RunLock

D = 16
REPO = Path(__file__).resolve().parents[1]


def _data(rows: int = 2048) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, 48, generator=g).relu() @ torch.randn(48, D, generator=g) + 1.0


def _interrupt_at(batch: int):
    """An on_batch hook for _source: Ctrl-C when batch ``batch`` is read."""
    def hook(call, b):
        if b == batch:
            raise KeyboardInterrupt
    return hook


def _source(data: torch.Tensor, batch: int = 128, calls: list | None = None, on_batch=None):
    def batches_from(start):
        call = len(calls) if calls is not None else 0
        if calls is not None:
            calls.append(start)
        for b in range(start, data.shape[0] // batch):
            if on_batch is not None:
                on_batch(call, b)
            yield data[b * batch:(b + 1) * batch]
    return batches_from


def _cfg(**kw) -> TrainConfig:
    base = dict(n_latents=64, k=4, batch_size=128, total_tokens=2048, init_rows=256, checkpoint_every=2,
                log_every=1, lr=1e-2, warmup_steps=2)
    return TrainConfig(**{**base, **kw})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# The first writer: trains 16 steps on the CPU, and before batch 4 (checkpoint at step 2 written) holds
# the run folder until the file `go` appears, after saying so with the file `holding`.
_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from saelab.train import TrainConfig, train_sae

    run, holding, go = map(Path, sys.argv[1:4])
    g = torch.Generator().manual_seed(0)
    data = torch.randn(2048, 48, generator=g).relu() @ torch.randn(48, 16, generator=g) + 1.0

    def batches_from(start):
        for b in range(start, 16):
            if b == 4 and not holding.exists():
                holding.write_text("")
                deadline = time.monotonic() + 180
                while not go.exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
            yield data[b * 128:(b + 1) * 128]

    cfg = TrainConfig(n_latents=64, k=4, batch_size=128, total_tokens=2048, init_rows=256, checkpoint_every=2,
                      log_every=1, lr=1e-2, warmup_steps=2)
    train_sae(cfg, batches_from, run, d_in=16, progress=False, device="cpu")
""")


def _start_holding(script: str, run: Path, holding: Path, go: Path, env: dict | None = None) -> subprocess.Popen:
    """Run ``script`` in another process and return once it holds ``run`` (it writes ``holding``; it lets go
    when ``go`` appears)."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(run), str(holding), str(go)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not holding.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            go.write_text("")
            pytest.fail(f"the other process never held {run}: {proc.communicate(timeout=60)}")
        time.sleep(0.02)
    return proc


def test_second_writer_is_refused_naming_the_holder_pid(tmp_path):
    cache = tmp_path / "acts"
    write_activation_cache(iter(_data().split(512)), cache, meta={"hook_name": "blocks.0.hook_resid_post"},
                           dtype="float32", progress=False)
    run, holding, go = tmp_path / "run", tmp_path / "holding", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = _start_holding(_HOLDER, run, holding, go, env)
    try:
        live_tmp = run / ".checkpoint.pt.abc123.tmp"  # as if the holder were writing its checkpoint now
        live_tmp.write_bytes(b"being written")
        before = snapshot(run)

        # A second `saelab train` process into the same folder: one line naming the holder, nothing touched.
        second = subprocess.run([sys.executable, "-m", "saelab", "train", "--activations", str(cache), "--out", str(run),
                                 "--batch-size", "128", "--total-tokens", "2048", "--n-latents", "64",
                                 "--device", "cpu", "--no-progress"],
                                env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        err = second.stderr.strip()
        assert second.returncode != 0 and second.stdout == ""
        assert err.startswith("saelab train: error: ") and f"pid {holder.pid}" in err, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        # The same refusal from the Python API, in this process.
        with pytest.raises(RunFolderBusyError, match=f"being written by another process \\(pid {holder.pid}\\)"):
            train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
        assert snapshot(run) == before  # the live writer's temporary file included
    finally:
        go.write_text("")
        out, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # one writer: every step logged once
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert (run / LOCK).read_text() == ""  # released: no pid left behind


def test_lock_refuses_this_process_too_and_is_released(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run).acquire()
    try:
        with pytest.raises(RunFolderBusyError, match=f"pid {os.getpid()}"):
            train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
        assert sorted(p.name for p in run.iterdir()) == [LOCK]  # refused before anything was written
    finally:
        lock.release()
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")  # free again
    with pytest.raises(ConfigError, match="given to several runs"):
        train_many([_cfg(), _cfg(k=8)], _source(_data()), [tmp_path / "x", tmp_path / "x"], d_in=D, progress=False)


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu", stop_after_steps=3)
    (run / "sae").mkdir()
    stale = [run / ".checkpoint.pt.k1l2m3n4.tmp", run / ".metrics.jsonl.zz9.tmp", run / ".status.json.q.tmp",
             run / "sae" / ".sae_weights.safetensors.abc.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)  # what a killed run leaves (atomic writes' temporary files)
    others = [run / "notes.tmp", run / "sae" / "keep.txt"]  # not saelab's temporary files
    for path in others:
        path.write_text("mine")
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    assert [p for p in stale if p.exists()] == []
    assert all(p.read_text() == "mine" for p in others)


def test_status_records_each_checkpoint(tmp_path):
    run = tmp_path / "run"
    seen: list[tuple[int, int, int]] = []  # (call, batch about to be read, status step then)

    def look(call, b):
        if (run / "status.json").exists():
            status = json.loads((run / "status.json").read_text())
            assert status["state"] == "training" and status["total_steps"] == 16
            seen.append((call, b, status["step"]))

    calls: list[int] = []
    train_sae(_cfg(checkpoint_every=4), _source(_data(), calls=calls, on_batch=look), run, d_in=D, progress=False,
              device="cpu")
    assert calls == [0, 0]  # the initialisation sample, then the training pass
    training = [(b, step) for call, b, step in seen if call == 1]
    assert len(training) == 16
    for b, step in training:  # before batch b, b steps are done; the last checkpoint was at 4 * (b // 4)
        assert step == 4 * (b // 4), (b, step)


def test_failed_start_leaves_no_config_behind(tmp_path):
    run = tmp_path / "run"
    bad = _data().clone()
    bad[100, 3] = float("nan")  # inside the initialisation sample
    with pytest.raises(NonFiniteError):
        train_sae(_cfg(k=8), _source(bad), run, d_in=D, progress=False, device="cpu")
    assert not run.exists()  # the folder it had made is gone again
    run.mkdir()  # a folder the user made stays, empty but for the (released) lock file
    with pytest.raises(NonFiniteError):
        train_sae(_cfg(k=8), _source(bad), run, d_in=D, progress=False, device="cpu")
    assert sorted(p.name for p in run.iterdir()) == [LOCK] and (run / LOCK).read_text() == ""
    # The corrected rerun, with other options too, is a new run, not "a different config".
    train_sae(_cfg(k=4), _source(_data()), run, d_in=D, progress=False, device="cpu")
    assert json.loads((run / "train_config.json").read_text())["train"]["k"] == 4


def test_run_that_failed_before_its_first_checkpoint_gives_way_to_the_corrected_one(tmp_path):
    run = tmp_path / "run"
    bad = _data().clone()
    bad[-1, 3] = float("nan")  # in the last batch: the run starts, logs, and fails before any checkpoint
    with pytest.raises(NonFiniteError):
        train_sae(_cfg(k=8, checkpoint_every=1000), _source(bad), run, d_in=D, progress=False, device="cpu")
    status = json.loads((run / "status.json").read_text())
    assert not (run / "checkpoint.pt").exists()
    assert (status["state"], status["step"]) == ("failed", 0)  # nothing saved to resume from
    assert status["error"] == "activation batch 15 contains NaN or inf activations"
    train_sae(_cfg(k=4), _source(_data()), run, d_in=D, progress=False, device="cpu")  # other options: a new run
    assert json.loads((run / "train_config.json").read_text())["train"]["k"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the failed run's lines are gone


def test_failed_overwrite_keeps_the_finished_run(tmp_path):
    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    before = snapshot(run)
    bad = _data().clone()
    bad[5, 0] = float("inf")
    with pytest.raises(NonFiniteError):
        train_sae(_cfg(k=8), _source(bad), run, d_in=D, progress=False, device="cpu", overwrite=True)
    assert snapshot(run) == before  # nothing removed before the new run had started


@pytest.mark.parametrize("stop", [KeyboardInterrupt, NonFiniteError])
def test_an_overwrite_stopped_mid_training_puts_the_finished_run_back(tmp_path, stop, capsys):
    """Ctrl-C (or an error) after the new run has started and checkpointed: the finished run, with its
    SAE, evaluation, report and browser, is back in place byte for byte."""
    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    for name in ("report.md", "metrics.json", "browser/index.html"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("of the old SAE")
    before = snapshot(run)

    def stop_at_batch_5(call, b):
        if b == 5:
            raise stop("activation batch 5 contains NaN or inf activations") if stop is NonFiniteError else stop()

    with pytest.raises(stop):
        train_sae(_cfg(k=8), _source(_data(), on_batch=stop_at_batch_5), run, d_in=D, progress=False,
                  device="cpu", overwrite=True)
    assert snapshot(run) == before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == [LOCK]
    assert f"{run}: the replacement did not finish; the earlier results are back in place" in capsys.readouterr().err


def test_an_overwrite_killed_mid_training_is_put_back_by_the_next_overwrite(tmp_path):
    """A SIGKILL leaves the finished run set aside beside the new one's files; the next overwrite puts
    it back before setting it aside again, and an interruption of that one leaves the finished run."""
    from saelab.utils.atomic import SET_ASIDE

    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    before = snapshot(run)
    _kill_mid_overwrite(run)

    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(k=8), _source(_data(), on_batch=_interrupt_at(5)), run, d_in=D, progress=False,
                  device="cpu", overwrite=True)
    assert snapshot(run) == before and not (run / SET_ASIDE).exists()


def test_an_overwrite_clears_the_sae_it_replaces(tmp_path):
    """An overwritten run that is then paused must not show the old SAE, its report, curves or browser
    beside the new config: they wait in the set-aside folder."""
    from saelab.utils.atomic import SET_ASIDE

    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    for name in ("report.md", "training_curves.png", "browser/index.html", "metrics.json"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("of the old SAE")
    train_sae(_cfg(k=8), _source(_data()), run, d_in=D, progress=False, device="cpu", overwrite=True,
              stop_after_steps=2)
    assert sorted(p.name for p in run.iterdir()) == [LOCK, SET_ASIDE, "checkpoint.pt", "metrics.jsonl", "status.json",
                                                     "train_config.json"]


def _set_aside_run(run: Path) -> dict[str, bytes]:
    """The earlier run's files waiting in RUN/.set-aside, named as they were in RUN."""
    from saelab.utils.atomic import SET_ASIDE

    return {name: data for name, data in snapshot(run / SET_ASIDE).items() if not name.startswith(".")}


def _earlier_run(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A finished run with an evaluation, report and browser of its own; its files."""
    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    for name in ("report.md", "metrics.json", "browser/index.html"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("of the old SAE")
    return run, snapshot(run)


def test_a_paused_overwrite_keeps_the_earlier_run_until_a_resume_finishes_it(tmp_path, capsys):
    """stop_after_steps pauses an overwrite on purpose: the earlier run stays set aside (not removed as if
    the replacement were done), a resume cut short by Ctrl-C keeps it so, and the resume that finishes the
    new run removes it."""
    from saelab.sae import load_sae
    from saelab.utils.atomic import SET_ASIDE

    run, before = _earlier_run(tmp_path)
    train_sae(_cfg(k=8), _source(_data()), run, d_in=D, progress=False, device="cpu", overwrite=True,
              stop_after_steps=4)
    assert json.loads((run / "status.json").read_text())["state"] == "interrupted"
    assert _set_aside_run(run) == {k: v for k, v in before.items() if k != LOCK}
    assert f"{run}: the replacement is paused; the earlier results wait in {SET_ASIDE}/ until a resume finishes " \
           "it" in capsys.readouterr().err
    # Paused, the folder is an unfinished run: its set-aside is not a sweep member to evaluate or report on.
    from saelab.cli import main

    assert main(["eval", str(run)]) == 2
    assert "a run folder whose training has not finished (no sae/ yet)" in capsys.readouterr().err
    main(["report", str(run)])
    assert not list(run.glob("scaling*")) and _set_aside_run(run) == {k: v for k, v in before.items() if k != LOCK}
    (run / "report.md").unlink()  # the paused new run's own report; what follows is about the earlier run's

    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(k=8), _source(_data(), on_batch=_interrupt_at(6)), run, d_in=D, progress=False,
                  device="cpu")
    assert _set_aside_run(run) == {k: v for k, v in before.items() if k != LOCK}
    assert json.loads((run / "status.json").read_text())["step"] == 6  # the new run, resumable from there

    train_sae(_cfg(k=8), _source(_data()), run, d_in=D, progress=False, device="cpu")
    assert not (run / SET_ASIDE).exists() and not (run / "report.md").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "finished" and load_sae(run / "sae").cfg.k == 8


def test_a_paused_overwrite_is_resumed_not_put_back_and_a_new_overwrite_starts_over(tmp_path):
    """A writer that opens a paused replacement resumes the new run (it is not a cut-off one to put back);
    a later overwrite starts over from the earlier run, which an interruption of it then puts back."""
    from saelab.train import TrainingRun
    from saelab.utils.atomic import SET_ASIDE

    run, before = _earlier_run(tmp_path)
    train_sae(_cfg(k=8), _source(_data()), run, d_in=D, progress=False, device="cpu", overwrite=True,
              stop_after_steps=4)
    with TrainingRun(_cfg(k=8), run, d_in=D, meta=None, init_sample=lambda: _data()[:256], device="cpu") as direct:
        assert direct.step == 4 and _set_aside_run(run) == {k: v for k, v in before.items() if k != LOCK}

    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(k=16), _source(_data(), on_batch=_interrupt_at(2)), run, d_in=D, progress=False,
                  device="cpu", overwrite=True)
    assert snapshot(run) == before and not (run / SET_ASIDE).exists()


def test_a_paused_sweep_overwrite_removes_only_the_earlier_runs_it_finished_replacing(tmp_path):
    from saelab.utils.atomic import SET_ASIDE

    short, long = tmp_path / "short", tmp_path / "long"
    cfgs = [_cfg(total_tokens=1024), _cfg()]
    train_many(cfgs, _source(_data()), [short, long], d_in=D, progress=False, device="cpu")
    before = snapshot(long)
    train_many([_cfg(total_tokens=1024, k=8), _cfg(k=8)], _source(_data()), [short, long], d_in=D,
               progress=False, device="cpu", overwrite=True, stop_after_steps=10)
    assert json.loads((short / "status.json").read_text())["state"] == "finished" and not (short / SET_ASIDE).exists()
    assert json.loads((long / "status.json").read_text())["state"] == "interrupted"
    assert _set_aside_run(long) == {k: v for k, v in before.items() if k != LOCK}


def test_a_direct_training_run_overwrite_leaves_nothing_of_the_old_sae(tmp_path):
    """TrainingRun(overwrite=True) without train_sae's set-aside (the Python API, the benchmarks): the old
    SAE, evaluation, report and browser go when the new run starts, never left beside its config."""
    from saelab.train import TrainingRun

    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    for name in ("report.md", "browser/index.html", "metrics.json", "evals/core.json"):
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text("of the old SAE")
    with TrainingRun(_cfg(k=8), run, d_in=D, meta=None, init_sample=lambda: _data()[:256], overwrite=True,
                     device="cpu"):
        assert sorted(p.name for p in run.iterdir()) == [LOCK, "metrics.jsonl", "status.json", "train_config.json"]
        assert json.loads((run / "train_config.json").read_text())["train"]["k"] == 8


def test_an_unfinished_run_is_named_as_such(tmp_path):
    from saelab.errors import CheckpointError
    from saelab.run_folder import TRAIN_CONFIG, open_sae

    (tmp_path / TRAIN_CONFIG).write_text("{}")
    with pytest.raises(CheckpointError, match="a run folder whose training has not finished"):
        open_sae(tmp_path)


def test_a_sweep_cut_off_before_any_run_finished_is_named_as_such(tmp_path, capsys):
    """A sweep interrupted before its SAEs were written was "neither a run folder nor a sweep folder" to
    report, and "folder has no cfg.json" to eval, browse and top: each names its unfinished runs."""
    from saelab.cli import main

    sweep = tmp_path / "sweep"
    train_many([_cfg(n_latents=32), _cfg()], _source(_data()), [sweep / "n32", sweep / "n64"], d_in=D,
               progress=False, device="cpu", stop_after_steps=3)
    expected = (f"{sweep} holds no finished run: its runs n32, n64 have not finished training (no sae/ yet); run the "
                "same `saelab sweep` or `saelab train` command again to finish them")
    for argv in (["eval", str(sweep), "--device", "cpu"], ["report", str(sweep)], ["top", str(sweep), "--latent", "1"],
                 ["browse", str(sweep)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.endswith(expected) and len(err.splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in sweep.iterdir()) == ["n32", "n64"]
    from saelab.errors import CheckpointError
    from saelab.pipeline import evaluate_sweep

    from saelab.report import write_scaling_report

    for call in (evaluate_sweep, write_scaling_report):  # from Python too, not "no run folders"
        with pytest.raises(CheckpointError, match=re.escape(expected)):
            call(sweep, progress=False) if call is evaluate_sweep else call(sweep)
    # one of them in training now: named so, and the advice is to wait, not to start it again
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print(flush=True); "
                               "time.sleep(60)", str(sweep / "n32" / LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # the lock is held
        assert main(["report", str(sweep)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"runs n32 (being trained by pid {holder.pid}), n64 have not finished training (no sae/ "
                            "yet); wait for n32 to finish training, then run the same `saelab sweep` or `saelab "
                            "train` command again to finish n64"), err
    finally:
        holder.kill()
        holder.wait()


def _cache_damaged_at_batch_10(folder: Path):
    """A cache of _data() with a NaN written into the shard behind training batch 10 (as damage on disk:
    the writer refuses NaN), so that a run on it stops after its checkpoint at step 10."""
    import numpy as np

    cache = write_activation_cache(iter([_data()]), folder, meta={"hook_name": "h"}, dtype="float32",
                                   shard_rows=512, progress=False)
    row = cache.batches(128, shuffle=True, seed=_cfg().seed, start_batch=10).__next__()[0]
    where = int((_data() == row).all(1).nonzero())  # the first row of batch 10 in the file
    shard = np.load(folder / f"shard_{where // 512:05d}.npy", mmap_mode="r+")
    shard[where % 512, 2] = np.nan
    shard.flush()
    del shard
    return cache


def test_a_resume_on_its_cache_harvested_again_says_what_to_do(tmp_path):
    """A cache harvested again into its folder (other rows) refused the resume of a run on it with "resume it
    with the same options", which cannot help: the rows are gone. It says so and names the ways out:
    --overwrite trains again on the new rows; the old rows harvested back into the cache resume the run."""
    import shutil

    from saelab.pipeline import train_from_cache

    acts, run = tmp_path / "acts", tmp_path / "run"
    _cache_damaged_at_batch_10(acts)
    with pytest.raises(NonFiniteError):  # stops at batch 10: an unfinished run with a checkpoint
        train_from_cache(acts, run, _cfg(), progress=False, device="cpu")
    write_activation_cache(iter([_data() * 2]), acts, meta={"hook_name": "h"}, dtype="float32", shard_rows=512,
                           overwrite=True, progress=False)
    before = snapshot(run)
    with pytest.raises(RunExistsError) as refused:
        train_from_cache(acts, run, _cfg(), progress=False, device="cpu")
    assert str(refused.value) == (
        f"run folder {run} holds an unfinished run with a different config (differs in --activations {acts} "
        "(harvested again since)); the rows it was training on were replaced by that harvest, so it cannot resume "
        "on them: pass overwrite=True (--overwrite) to train it again from the start on the rows there now, or "
        "pick another folder; to resume it, harvest its rows into the cache again (the harvest it was trained on, "
        "with --overwrite) and the other rows into another folder")
    assert snapshot(run) == before
    shutil.rmtree(acts)
    _cache_damaged_at_batch_10(acts)  # its rows again: the run resumes, at batch 10, where the damage still is
    with pytest.raises(NonFiniteError, match="read from activation cache"):
        train_from_cache(acts, run, _cfg(), progress=False, device="cpu")
    assert json.loads((run / "status.json").read_text())["step"] == 10


def test_the_same_rows_harvested_again_are_the_same_cache(tmp_path):
    """A cache's fingerprint hashed its manifest whole, the writing's seconds included: the same rows harvested
    again (the resume's advice above) took another time and read as other rows whenever the time differed."""
    import hashlib

    from saelab.pipeline import _cache_record
    from saelab.train.checkpoint import data_changes

    acts = tmp_path / "acts"
    first = _cache_record(_cache_damaged_at_batch_10(acts))
    manifest = json.loads((acts / "manifest.json").read_text())
    (acts / "manifest.json").write_text(json.dumps({**manifest, "seconds": manifest["seconds"] + 7.5}))
    again = _cache_record(ActivationCache(acts))
    assert again["fingerprint"] == first["fingerprint"] and data_changes({"data": first}, {"data": again}) == []
    # a run recorded while the fingerprint held the seconds: its cache, unchanged, is still its cache
    recorded_then = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode("utf-8"))
    for shard in manifest["shards"]:
        recorded_then.update((acts / shard["file"]).read_bytes()[:1 << 16])
    (acts / "manifest.json").write_text(json.dumps(manifest))
    now = _cache_record(ActivationCache(acts))
    assert data_changes({"data": {"fingerprint": recorded_then.hexdigest()}}, {"data": now}) == []
    (acts / "manifest.json").write_text(json.dumps({**manifest, "meta": {"hook_name": "other"}}))
    assert _cache_record(ActivationCache(acts))["fingerprint"] != first["fingerprint"]  # other settings: not


def test_nan_in_a_cache_is_named_and_the_run_marked_failed(tmp_path):
    """A cache damaged on disk (the writer refuses NaN) stops training with an error naming the cache;
    status.json says failed at the last checkpoint, not training."""
    from saelab.pipeline import train_from_cache

    cache = _cache_damaged_at_batch_10(tmp_path / "acts")
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=f"contains NaN or inf activations, read from activation cache "
                                             f"{tmp_path / 'acts'}; harvest it again"):
        train_from_cache(cache.folder, run, _cfg(), progress=False, device="cpu")
    status = json.loads((run / "status.json").read_text())
    assert (status["state"], status["step"]) == ("failed", 10)  # the checkpoint before batch 10
    assert status["step"] == torch.load(run / "checkpoint.pt", weights_only=True)["step"]


def test_a_call_that_stops_early_finishes_the_runs_it_completed(tmp_path):
    """train_many over runs of 10 and 16 steps, NaN in batch 13: the 10-step run is finished and saved,
    the other marked failed at its last checkpoint; a source that runs out is recorded as failed too."""
    bad = _data().clone()
    bad[13 * 128 + 5, 0] = float("nan")
    short, long = tmp_path / "short", tmp_path / "long"
    with pytest.raises(NonFiniteError, match="activation batch 13"):
        train_many([_cfg(total_tokens=1280), _cfg()], _source(bad), [short, long], d_in=D, progress=False,
                   device="cpu")
    assert json.loads((short / "status.json").read_text())["state"] == "finished" and (short / "sae").is_dir()
    status = json.loads((long / "status.json").read_text())
    assert (status["state"], status["step"]) == ("failed", 12) and not (long / "sae").exists()

    few = tmp_path / "few"
    with pytest.raises(CorpusError, match="ran out after 10 batches"):
        train_sae(_cfg(), _source(_data(1280)), few, d_in=D, progress=False, device="cpu")
    status = json.loads((few / "status.json").read_text())
    assert (status["state"], status["step"]) == ("failed", 10) and "ran out after 10 batches" in status["error"]


def test_an_interrupted_overwrite_says_the_same_command_starts_it_over(tmp_path, monkeypatch, capsys):
    """The CLI's Ctrl-C line: after an overwrite the earlier run is back and nothing of the new one is
    kept, so "run the same command again to resume" would promise what the next call does not do."""
    import saelab.train.trainer
    from saelab.cli import main

    write_activation_cache(_data().split(256), tmp_path / "acts", meta={"hook_name": "h"}, shard_rows=512,
                           dtype="float32")
    base = ["train", "--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "run"), "--n-latents", "64",
            "--batch-size", "128", "--total-tokens", "1024", "--no-progress"]
    assert main([*base, "--k", "4"]) == 0
    before = snapshot(tmp_path / "run")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saelab.train.trainer.TrainingRun, "train_step", interrupted)
    assert main([*base, "--k", "8", "--overwrite"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; the run being replaced has its earlier results back; the same command starts the " \
           "replacement over" in err and "to resume" not in err
    assert snapshot(tmp_path / "run") == before
    assert main([*base[:4], str(tmp_path / "other"), *base[5:], "--k", "4"]) == 130  # a new run resumes
    assert "interrupted; run the same command again to resume" in capsys.readouterr().err
    # A verb that writes its output only at the end (browse, top, report, ...) promises no resume
    import saelab.report
    monkeypatch.setattr(saelab.report, "write_run_report", interrupted)
    assert main(["report", str(tmp_path / "run")]) == 130
    assert "saelab report: interrupted; nothing of this call was saved; the same command starts over" in \
        capsys.readouterr().err


def test_train_from_a_run_folder_names_the_cache_inside_it(tmp_path, capsys):
    """`train --activations RUN` (a quickstart's run folder): the error points to RUN/activations."""
    from saelab.cli import main

    write_activation_cache(_data().split(256), tmp_path / "run" / "activations", meta={"hook_name": "h"},
                           shard_rows=512, dtype="float32")
    capsys.readouterr()  # the cache writer's progress bar
    assert main(["train", "--activations", str(tmp_path / "run"), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"no activation cache at '{tmp_path / 'run'}' (manifest.json not found); the cache inside "
                        f"it is '{tmp_path / 'run' / 'activations'}'") and len(err.splitlines()) == 1
    assert not (tmp_path / "t").exists()


def _kill_mid_overwrite(run: Path) -> None:
    """What a SIGKILL during an overwrite leaves: the finished run set aside, the new one's partial files."""
    from saelab.utils.atomic import SET_ASIDE

    (run / SET_ASIDE).mkdir()
    for entry in run.iterdir():
        if entry.name not in (LOCK, SET_ASIDE):
            entry.replace(run / SET_ASIDE / entry.name)
    (run / SET_ASIDE / ".all-set-aside").touch()
    (run / "status.json").write_text('{"state": "training", "step": 4}')
    (run / "train_config.json").write_text("{}")


def test_a_run_after_a_killed_overwrite_finds_the_earlier_run_back(tmp_path, capsys):
    """A plain train into a folder an overwrite was killed in: the earlier run is put back first (as Ctrl-C
    would have left it), so the partial new run is not resumed beside a set-aside that a later overwrite
    would put back over it."""
    from saelab.errors import RunExistsError
    from saelab.utils.atomic import SET_ASIDE

    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    before = snapshot(run)
    _kill_mid_overwrite(run)
    with pytest.raises(RunExistsError, match=r"other settings \(train.k 4 -> 8\)"):
        train_sae(_cfg(k=8), _source(_data()), run, d_in=D, progress=False, device="cpu")
    assert snapshot(run) == before and not (run / SET_ASIDE).exists()
    assert f"{run}: an overwrite of this run was cut off; its earlier results are back in place" in \
        capsys.readouterr().err


def test_the_same_train_after_a_killed_overwrite_finds_its_finished_run(tmp_path, capsys):
    """The command that trained the run, given again after an overwrite of it was killed: the earlier run is put
    back before the folder is read for a finished run, and is the answer (not "pass --overwrite")."""
    from saelab.pipeline import train_from_cache

    acts, run = tmp_path / "acts", tmp_path / "run"
    write_activation_cache(_data().split(256), acts, meta={"hook_name": "h"}, shard_rows=512, dtype="float32",
                           progress=False)
    first = train_from_cache(acts, run, _cfg(), progress=False, device="cpu")
    before = snapshot(run)
    _kill_mid_overwrite(run)
    capsys.readouterr()
    again = train_from_cache(acts, run, _cfg(), progress=False, device="cpu")
    assert snapshot(run) == before
    assert torch.equal(again.W_dec, first.W_dec)
    err = capsys.readouterr().err
    assert f"{run}: an overwrite of this run was cut off; its earlier results are back in place" in err
    assert f"{run} already holds this finished run" in err


def test_an_optimizer_state_key_read_from_a_checkpoint_is_named_by_type(tmp_path):
    """A checkpoint whose Adam state has a key that is a tensor viewed from one element (2**10 elements) and a value
    of the wrong shape: the refusal wrote the key out element by element (2**20: 6 MB, 10 s; a view that counts
    for more than 16 times the file and 64 KiB once copied, or takes too long to print, is refused at load:
    tests/test_pickle_check.py)."""
    run, data = tmp_path / "run", _data()
    train_sae(_cfg(total_tokens=4096), _source(data), run, d_in=D, progress=False, device="cpu", stop_after_steps=4)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["optimizer"]["state"][0][torch.zeros(1).expand(*[2] * 10)] = torch.zeros(3)
    torch.save(state, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"optimizer state \(a Tensor\) has shape \(3,\)"):
        train_sae(_cfg(total_tokens=4096), _source(data), run, d_in=D, progress=False, device="cpu")


_LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from saelab.utils.folder_lock import RunLock

    run, holding, go = map(Path, sys.argv[1:4])
    held = RunLock(run).acquire(), RunLock(run / ".set-aside").acquire()  # as a live train --overwrite holds them
    holding.write_text("")
    deadline = time.monotonic() + 120
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
""")


def test_a_sweep_puts_back_its_own_runs_and_leaves_others_to_their_writer(tmp_path, capsys):
    """The same sweep after an overwrite of one of its runs was killed finds that run (put back, not trained
    again); a folder beside its runs that another process is overwriting now is not its to settle (it was, for a
    moment: the sweep was refused as that folder's second writer)."""
    from saelab.pipeline import sweep_from_cache

    acts, sweep = tmp_path / "acts", tmp_path / "sweep"
    write_activation_cache(_data().split(256), acts, meta={"hook_name": "h"}, shard_rows=512, dtype="float32",
                           progress=False)
    sweep_from_cache(acts, sweep, _cfg(), {"k": [2, 4]}, progress=False, device="cpu")
    before = snapshot(sweep / "k2")
    _kill_mid_overwrite(sweep / "k2")
    _kill_mid_overwrite(sweep / "k4")
    capsys.readouterr()
    holding, go = tmp_path / "holding", tmp_path / "go"
    holder = _start_holding(_LOCK_HOLDER, sweep / "k4", holding, go)
    try:
        saes = sweep_from_cache(acts, sweep, _cfg(), {"k": [2, 8]}, progress=False, device="cpu")
    finally:
        go.write_text("")
        holder.wait(timeout=60)
    assert sorted(saes) == ["k2", "k8"] and snapshot(sweep / "k2") == before
    assert f"{sweep / 'k2'}: an overwrite of this run was cut off; its earlier results are back in place" in \
        capsys.readouterr().err
    assert (sweep / "k4" / ".set-aside").is_dir()  # its writer's


def test_a_sweep_finds_a_run_under_another_name_after_its_overwrite_was_killed(tmp_path, capsys):
    """A grid point that a run beside it trains (n64, given again as n64_k4 with k at its value) is that run, also
    when an overwrite of it was killed: it is put back before the match, not trained again beside it."""
    from saelab.pipeline import sweep_from_cache

    acts, sweep = tmp_path / "acts", tmp_path / "sweep"
    write_activation_cache(_data().split(256), acts, meta={"hook_name": "h"}, shard_rows=512, dtype="float32",
                           progress=False)
    sweep_from_cache(acts, sweep, _cfg(), {"n_latents": [64]}, progress=False, device="cpu")
    before = snapshot(sweep / "n64")
    _kill_mid_overwrite(sweep / "n64")
    capsys.readouterr()
    saes = sweep_from_cache(acts, sweep, _cfg(), {"n_latents": [64], "k": [4]}, progress=False, device="cpu")
    assert sorted(saes) == ["n64"] and sorted(p.name for p in sweep.iterdir()) == ["n64"]
    assert snapshot(sweep / "n64") == before
    assert "sweep point n64_k4 is the finished run" in capsys.readouterr().err


_REPLACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from saelab.train.checkpoint import replacing_run

    run, holding, go = map(Path, sys.argv[1:4])
    try:
        with replacing_run(run):  # as quickstart --overwrite holds it while the model loads and harvests
            holding.write_text("")
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
""")


def test_a_live_overwrite_in_another_process_is_neither_undone_nor_joined(tmp_path):
    """While another process replaces the run (its earlier run set aside, no training yet), an overwrite
    or a plain train here is refused naming that process; the earlier run survives both."""
    from saelab.utils.atomic import SET_ASIDE

    run, holding, go = tmp_path / "run", tmp_path / "holding", tmp_path / "go"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    before = snapshot(run)
    replacer = _start_holding(_REPLACER, run, holding, go)
    try:
        assert (run / SET_ASIDE).is_dir()
        for overwrite in (True, False):
            with pytest.raises(RunFolderBusyError, match=f"being written by another process \\(pid {replacer.pid}\\)"):
                train_sae(_cfg(k=16), _source(_data()), run, d_in=D, progress=False, device="cpu",
                          overwrite=overwrite)
    finally:
        go.write_text("")
        replacer.communicate(timeout=120)
    assert snapshot(run) == before and not (run / SET_ASIDE).exists()


# Holds a folder's lock, as a training or an evaluation of it does, until the file `go` appears.
_LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from saelab.utils.folder_lock import RunLock

    run, holding, go = map(Path, sys.argv[1:4])
    lock = RunLock(run).acquire()
    holding.write_text("")
    deadline = time.monotonic() + 180
    while not go.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    lock.release()
""")


def test_eval_of_a_run_takes_its_lock(tmp_path, capsys):
    """An evaluation into a run folder is one of its writers: refused while a training (or another
    evaluation) holds the run, in one line naming the holder, before any model loads."""
    from transformers import GPT2Config

    from saelab.cli import main
    from saelab.pipeline import evaluate_run, paper_suite, train_from_cache

    cache = tmp_path / "acts"
    write_activation_cache(iter(_data().split(512)), cache, meta={"hook_name": "blocks.0.hook_resid_post"},
                           dtype="float32", progress=False)
    run = tmp_path / "run"
    train_from_cache(cache, run, _cfg(), device="cpu", progress=False)
    (run / "metrics.json").write_text("{}")  # stands for an earlier evaluation: no refusal may touch it
    before = snapshot(run)
    holding, go = tmp_path / "holding", tmp_path / "go"
    holder = _start_holding(_LOCK_HOLDER, run, holding, go)
    try:
        busy = f"run folder {run} is being written by another process \\(pid {holder.pid}\\)"
        with pytest.raises(RunFolderBusyError, match=busy):
            evaluate_run(run, device="cpu", progress=False)
        # a model of the SAE's width (16; the offline default's 576 is refused first), from its config alone
        GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=128).save_pretrained(tmp_path / "model")
        with pytest.raises(RunFolderBusyError, match=busy):
            paper_suite(run, lm=str(tmp_path / "model"), device="cpu", progress=False)
        capsys.readouterr()
        assert main(["eval", str(run), "--device", "cpu", "--no-progress"]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("saelab eval: error: ") and f"pid {holder.pid}" in err and len(err.splitlines()) == 1, err
        assert snapshot(run) == {**before, LOCK: f"{holder.pid}\n".encode()}
    finally:
        go.write_text("")
        holder.communicate(timeout=60)


def test_a_resume_on_another_cache_is_refused(tmp_path):
    """train_config.json records the cache a run trains on: resuming it (or reusing a finished one) on
    another cache is refused in one line, before training; a run recorded without it resumes as before."""
    from saelab.pipeline import train_from_cache

    first = _cache_damaged_at_batch_10(tmp_path / "acts")
    other = write_activation_cache(iter([_data() * 2]), tmp_path / "other", meta={"hook_name": "h"},
                                   dtype="float32", shard_rows=512, progress=False)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError):  # stops at batch 10: an unfinished run with a checkpoint
        train_from_cache(first.folder, run, _cfg(), progress=False, device="cpu")
    before = snapshot(run)
    with pytest.raises(RunExistsError, match=f"unfinished run with a different config \\(differs in --activations "
                                             f"{tmp_path / 'acts'} -> {tmp_path / 'other'}\\)"):
        train_from_cache(other.folder, run, _cfg(), progress=False, device="cpu")
    assert snapshot(run) == before
    # A run from before the record: taken as trained on the cache given.
    config = json.loads((run / "train_config.json").read_text())
    assert config.pop("data")["activations"] == str(tmp_path / "acts")
    (run / "train_config.json").write_text(json.dumps(config))
    train_from_cache(other.folder, run, _cfg(), progress=False, device="cpu")
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    # The finished run is not the answer for a third cache: refused, naming the caches.
    third = write_activation_cache(iter([_data() * 3]), tmp_path / "third", meta={"hook_name": "h"},
                                   dtype="float32", shard_rows=512, progress=False)
    with pytest.raises(RunExistsError, match=f"finished run trained with other settings \\(--activations "
                                             f"{tmp_path / 'other'} -> {tmp_path / 'third'}\\)"):
        train_from_cache(third.folder, run, _cfg(), progress=False, device="cpu")
    assert train_from_cache(other.folder, run, _cfg(), progress=False, device="cpu") is not None  # the same: reused


def _eval_while_trained(holder_script: str, run: Path, tmp_path: Path, capsys) -> tuple[list[str], str, int]:
    """`saelab eval RUN` while a training started by ``holder_script`` holds RUN: the folder's names at
    that moment, eval's refusal and the training's pid."""
    from saelab.cli import main

    holding, go = tmp_path / "holding", tmp_path / "go"
    holder = _start_holding(holder_script, run, holding, go, {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        names = sorted(p.name for p in run.iterdir())
        capsys.readouterr()
        assert main(["eval", str(run), "--device", "cpu", "--no-progress"]) != 0
        return names, capsys.readouterr().err.strip(), holder.pid
    finally:
        go.write_text("")
        holder.communicate(timeout=300)


def _being_trained(run: Path, pid: int) -> str:
    return (f"saelab eval: error: {run} is being trained by another process (pid {pid}) and has no sae/ yet; "
            "wait for the training to finish, then run this command again")


def test_eval_of_a_run_in_training_says_it_is_being_trained(tmp_path, capsys):
    """A run whose training is in progress has no SAE yet: eval names the training process and says to
    wait, where it said to run the training again (which would be refused as a second writer)."""
    from saelab.cli import main

    run = tmp_path / "run"
    _, err, pid = _eval_while_trained(_HOLDER, run, tmp_path, capsys)
    assert err == _being_trained(run, pid)
    # Cut off (no process holds it): the training is what finishes it.
    cut = tmp_path / "cut"
    train_sae(_cfg(), _source(_data()), cut, d_in=D, progress=False, device="cpu", stop_after_steps=3)
    assert main(["eval", str(cut), "--device", "cpu", "--no-progress"]) != 0
    assert "whose training has not finished (no sae/ yet); run the same `saelab train`" in capsys.readouterr().err
    assert (cut / LOCK).read_text() == ""


def test_report_of_a_run_in_training_gives_its_latest_step(tmp_path, capsys):
    """status.json is written only at checkpoints: report of a run in training said "training at step 0 of 16"
    and called the latest logged batch the final one. It gives the step of the metrics log, and the holder."""
    from saelab.cli import main

    run, holding, go = tmp_path / "run", tmp_path / "holding", tmp_path / "go"
    rare_checkpoints = _HOLDER.replace("checkpoint_every=2", "checkpoint_every=8")  # none before the hold
    holder = _start_holding(rare_checkpoints, run, holding, go, {**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert main(["report", str(run)]) == 0
        report = (run / "report.md").read_text()
    finally:
        go.write_text("")
        holder.communicate(timeout=300)
    assert f"| status | training now (pid {holder.pid}), at step 4 of 16 |" in report
    assert "Latest batch nMSE" in report and "Final batch" not in report
    assert main(["report", str(run)]) == 0  # finished: the status and the last batch as they were
    report = (run / "report.md").read_text()
    assert "| status | finished at step 16 of 16 |" in report and "Final batch nMSE" in report


# _HOLDER as an overwrite of a finished run, held before its first batch: the folder then holds only the
# lock and the earlier run set aside, no train_config.json yet.
_OVERWRITE_HOLDER = _HOLDER.replace("b == 4", "b == 0").replace('device="cpu")', 'device="cpu", overwrite=True)')


def test_eval_in_the_first_moments_of_an_overwrite_says_it_is_being_trained(tmp_path, capsys):
    """eval RUN just after `train --overwrite` of RUN started read the folder as an SAE folder: "folder has no
    cfg.json (found ['.saelab.lock', '.set-aside'])"; it names the training, as it does a moment later."""
    from saelab.utils.atomic import SET_ASIDE

    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    names, err, pid = _eval_while_trained(_OVERWRITE_HOLDER, run, tmp_path, capsys)
    assert names == [LOCK, SET_ASIDE] and err == _being_trained(run, pid)


def test_a_report_written_under_this_process_s_own_lock_does_not_name_it_as_the_trainer(tmp_path):
    """An evaluation holds the run's lock while it writes report.md: the report of a cut-off run called
    the evaluation's own process the training in progress ("training now (pid <its own>)")."""
    from saelab.report.markdown import write_run_report

    cut = tmp_path / "cut"
    train_sae(_cfg(), _source(_data()), cut, d_in=D, progress=False, device="cpu", stop_after_steps=3)
    lock = RunLock(cut).acquire()
    try:
        write_run_report(cut)
    finally:
        lock.release()
    report = (cut / "report.md").read_text()
    assert "training now" not in report and f"pid {os.getpid()}" not in report
    assert "| status |" in report


def test_a_writer_is_not_refused_for_a_look_at_its_folder(tmp_path):
    """held_by (eval and report asking whether a run is in training) locks a free folder for an instant: a
    training starting in that instant was refused as a second writer ("pid unknown")."""
    import fcntl
    import threading

    run = tmp_path / "run"
    RunLock(run).acquire().release()  # the lock file exists, free
    fd = os.open(run / LOCK, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a look, as held_by takes it
    threading.Timer(0.05, lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd))).start()
    lock = RunLock(run).acquire()  # waits out the look
    try:
        assert (run / LOCK).read_text() == f"{os.getpid()}\n"
    finally:
        lock.release()


def test_two_looks_at_a_free_folder_see_no_writer(tmp_path):
    """Two processes asking held_by at once (two evals or reports naming a sweep's unfinished runs) each
    locked the free folder for an instant and saw the other as a writer, "pid unknown", ~2 % of the time."""
    run = tmp_path / "run"
    RunLock(run).acquire().release()  # the lock file exists, free
    look = textwrap.dedent("""
        import sys, time
        from saelab.utils.folder_lock import held_by
        end, seen = time.monotonic() + 1.5, set()
        while time.monotonic() < end:
            seen.add(held_by(sys.argv[1]))
        print(sorted(map(str, seen)))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    looks = [subprocess.Popen([sys.executable, "-c", look, str(run)], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert [p.communicate(timeout=60)[0].strip() for p in looks] == ["['None']"] * 2
    lock = RunLock(run).acquire()  # a writer is still seen by a look
    try:
        assert subprocess.run([sys.executable, "-c", "import sys; from saelab.utils.folder_lock import held_by; "
                               "print(held_by(sys.argv[1]))", str(run)], env=env, capture_output=True,
                              text=True).stdout.strip() == f"pid {os.getpid()}"
    finally:
        lock.release()


def test_save_sae_refuses_a_run_folder_and_its_sae_folder(tmp_path):
    """The run's training is the one writer of its folder: saving another SAE into RUN mixed it with the
    run's results, and into RUN/sae replaced the run's SAE under its config and log. Both are refused in
    one line, nothing written; a retraining of the run (--overwrite) still writes its sae/."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae, save_sparsify

    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data()), run, d_in=D, progress=False, device="cpu")
    before = snapshot(run)
    other = TopKSAE(SAEConfig(d_in=D, n_latents=32, k=2))
    refusals = {run: f"{run} is a run folder (train_config.json): saving an SAE there would mix it with the run's "
                     "results; pick another folder",
                run / "sae": f"{run / 'sae'} is the SAE of the run {run}: saving there would make the run describe "
                             "another SAE; pick another folder"}
    for folder, message in refusals.items():
        for save in (save_sae, save_sparsify):
            with pytest.raises(ConfigError) as refused:
                save(other, folder)
            assert str(refused.value) == message
    assert snapshot(run) == before
    assert save_sae(other, tmp_path / "elsewhere") == tmp_path / "elsewhere"  # another folder is the way on
    train_sae(_cfg(k=8), _source(_data()), run, d_in=D, progress=False, device="cpu", overwrite=True)
    assert json.loads((run / "sae" / "cfg.json").read_text())["k"] == 8


def test_save_sae_refuses_a_run_folder_in_an_overwrites_first_moments(tmp_path):
    """An overwrite first sets the earlier run aside (RUN/.set-aside/ holds its train_config.json, RUN none):
    that folder is a run all the same, as run_folder counts it, and so is its sweep."""
    from saelab.sae import SAEConfig, TopKSAE, save_sae
    from saelab.utils.atomic import SET_ASIDE

    run = tmp_path / "sweep" / "run"
    (run / SET_ASIDE).mkdir(parents=True)
    (run / SET_ASIDE / "train_config.json").write_text("{}")
    other = TopKSAE(SAEConfig(d_in=D, n_latents=32, k=2))
    for folder, words in ((run, "is a run folder"), (run / "sae", "is the SAE of the run"),
                          (run / "evals", "is inside the run folder"), (tmp_path / "sweep", "is a sweep folder")):
        with pytest.raises(ConfigError, match=words):
            save_sae(other, folder)
    assert not (run / "sae").exists() and not (run / "evals").exists()


def test_save_sae_refuses_a_sweep_folder_and_any_folder_inside_a_run(tmp_path, capsys):
    """Saving into a sweep folder put an SAE's cfg.json beside its runs, so the folder read as that one SAE and
    no longer as a sweep; saving into a run's evals/ or browser/ (or any folder inside the run) mixed the SAE
    with results the run's commands write and read there. Each is refused in one line before anything is
    written, by save_sae, save_sparsify and `saelab export`; a new or empty folder of one's own still takes it."""
    from saelab.cli import main
    from saelab.pipeline import sweep_from_cache
    from saelab.run_folder import is_sweep
    from saelab.sae import SAEConfig, TopKSAE, save_sae, save_sparsify

    cache = write_activation_cache(iter(_data().split(512)), tmp_path / "acts",
                                   meta={"hook_name": "blocks.0.hook_resid_post"}, dtype="float32", progress=False)
    sweep = tmp_path / "sweep"
    sweep_from_cache(cache, sweep, _cfg(), {"k": [2, 4]}, device="cpu", progress=False)
    run = sweep / "k4"
    (run / "evals").mkdir()  # as `eval RUN --suite paper` and `browse RUN` lay them out
    (run / "evals" / "suite.json").write_text("{}")
    (run / "browser").mkdir()
    (run / "browser" / "index.html").write_text("")
    before = snapshot(sweep)
    other = TopKSAE(SAEConfig(d_in=D, n_latents=32, k=2, hook_name="blocks.0.hook_resid_post"))
    inside = ("is inside the run folder {run}: saving an SAE there would mix it with the run's results; pick a "
              "folder outside the run")
    refusals = {sweep: f"{sweep} is a sweep folder (a folder of runs): saving an SAE there would make it read as "
                       "that SAE instead of its runs; pick another folder",
                **{folder: f"{folder} " + inside.format(run=run)
                   for folder in (run / "evals", run / "browser", run / "evals" / "mine", run / "mine")}}
    for folder, message in refusals.items():
        for save in (save_sae, save_sparsify):
            with pytest.raises(ConfigError) as refused:
                save(other, folder)
            assert str(refused.value) == message
        assert main(["export", str(run), str(folder), "--format", "saelens"]) == 2
        assert capsys.readouterr().err == f"saelab export: error: OUT {message}\n"
    assert snapshot(sweep) == before and is_sweep(sweep)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new"):  # a folder of one's own is the way on
        assert save_sae(other, folder) == folder
    assert main(["export", str(run), str(tmp_path / "exported"), "--format", "saelens"]) == 0


def test_save_sae_refuses_an_activation_cache(tmp_path, capsys):
    """Saving into an activation cache (`saelab harvest --out CACHE`) put an SAE's cfg.json and weights among its
    shards and manifest. save_sae, save_sparsify and `saelab export` refuse it in one line, nothing written; a
    manifest.json of another format does not make a cache."""
    from saelab.cli import main
    from saelab.sae import SAEConfig, TopKSAE, save_sae, save_sparsify

    cache = tmp_path / "acts"
    write_activation_cache(iter(_data().split(512)), cache, meta={"hook_name": "blocks.0.hook_resid_post"},
                           dtype="float32", progress=False)
    before = snapshot(cache)
    other = TopKSAE(SAEConfig(d_in=D, n_latents=32, k=2, hook_name="blocks.0.hook_resid_post"))
    message = (f"{cache} is an activation cache (manifest.json): saving an SAE there would mix it with the cache's "
               "files; pick another folder")
    for save in (save_sae, save_sparsify):
        with pytest.raises(ConfigError) as refused:
            save(other, cache)
        assert str(refused.value) == message
    exported = save_sae(other, tmp_path / "exported")
    assert main(["export", str(exported), str(cache), "--format", "saelens"]) == 2
    assert capsys.readouterr().err == f"saelab export: error: OUT {message}\n"
    assert snapshot(cache) == before
    # an overwrite interrupted while moving its cache in: the old manifest gone, the new one still in .overwrite/
    stage = tmp_path / "stage"
    write_activation_cache(iter(_data().split(512)), stage, meta={"hook_name": "blocks.0.hook_resid_post"},
                           dtype="float32", progress=False)
    (cache / "manifest.json").unlink()
    stage.rename(cache / ".overwrite")
    with pytest.raises(ConfigError) as refused:
        save_sae(other, cache)
    assert str(refused.value) == message
    # nor does a run go there (train / sweep --out), nor an evaluation (eval --out), nor does it open as an SAE
    from saelab.run_folder import check_output_folder, open_sae
    with pytest.raises(CheckpointError, match=r"^--out .* is an activation cache \(manifest.json\); expected a new"):
        check_output_folder(cache, "--out", "run")
    with pytest.raises(CheckpointError, match=r" is an activation cache \(manifest.json\), not an SAE"):
        open_sae(cache)
    assert main(["eval", str(exported), "--out", str(cache)]) == 2
    assert "is an activation cache (manifest.json)" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"format": "another-tool"}')
    assert save_sae(other, tmp_path / "other") == tmp_path / "other"
