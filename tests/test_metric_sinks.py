"""Experiment logging (train/metric_sinks.py): TensorBoard event files hold exactly metrics.jsonl's
rows, a resumed run logs each step once, a missing package is one line before anything starts."""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from test_train import _cfg, _data, _source

from saelab.errors import ConfigError, NonFiniteError
from saelab.train import train_many, train_sae
from saelab.train.metric_sinks import TAG_PREFIX, TENSORBOARD_DIR, WANDB_DIR, WANDB_ID_FILE

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                        reason="tensorboard is not installed (pip install -e '.[test]')")


def _jsonl(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of RUN/tensorboard/, read as TensorBoard reads it (stale events purged)."""
    acc = event_accumulator.EventAccumulator(str(run / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(rows) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl's numeric fields as TensorBoard stores them (float32 scalars)."""
    fields = [k for k in rows[0] if k != "step"]
    return {TAG_PREFIX + k: [(r["step"], float(np.float32(r[k]))) for r in rows] for k in fields}


def test_tensorboard_scalars_equal_the_metrics_log(tmp_path):
    run = tmp_path / "run"
    train_sae(_cfg(), _source(_data(), 128), run, d_in=24, progress=False, device="cpu", log_to=("tensorboard",))
    rows = _jsonl(run)
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert _scalars(run) == _expected(rows)


def test_training_without_log_to_writes_no_event_files(tmp_path):
    train_sae(_cfg(), _source(_data(), 128), tmp_path / "run", d_in=24, progress=False, device="cpu")
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()


def test_stopped_and_resumed_run_logs_each_step_once(tmp_path):
    run, data = tmp_path / "run", _data()
    train_sae(_cfg(), _source(data, 128), run, d_in=24, progress=False, device="cpu", stop_after_steps=5,
              log_to="tensorboard")
    train_sae(_cfg(), _source(data, 128), run, d_in=24, progress=False, device="cpu", log_to="tensorboard")
    rows = _jsonl(run)
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert _scalars(run) == _expected(rows)


def _interrupted_at(source, batch: int):
    """``source``, with Ctrl-C pressed as its batch ``batch`` is drawn."""
    def batches_from(start):
        for i, rows in enumerate(source(start)):
            if i == batch:
                raise KeyboardInterrupt
            yield rows
    return batches_from


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_an_overwrite_replaces_the_earlier_runs_event_files(tmp_path, capsys):
    """The earlier run's event files are set aside with its other results: put back by an interrupted
    overwrite, gone once the new run ends, so TensorBoard shows the new run alone."""
    run, data = tmp_path / "run", _data()
    train_sae(_cfg(), _source(data, 128), run, d_in=24, progress=False, device="cpu", log_to="tensorboard")
    before = _files(run / TENSORBOARD_DIR)
    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(k=4), _interrupted_at(_source(data, 128), 10), run, d_in=24, progress=False, device="cpu",
                  overwrite=True, log_to="tensorboard")
    assert "the replacement did not finish; the earlier results are back in place" in capsys.readouterr().err
    assert _files(run / TENSORBOARD_DIR) == before
    train_sae(_cfg(k=4), _source(data, 128), run, d_in=24, progress=False, device="cpu", overwrite=True,
              log_to="tensorboard")
    after = _files(run / TENSORBOARD_DIR)
    assert len(after) == 1 and not set(after) & set(before)
    assert _scalars(run) == _expected(_jsonl(run))


def _tree(folder) -> dict[str, bytes | str]:
    """Every entry under ``folder``: a file's bytes, a link's target, a folder as ""."""
    return {str(p.relative_to(folder)): os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else ""
            for p in sorted(folder.rglob("*"))}


def _write_wandb_files(run, run_id: str = "875871b4da4078fd") -> None:
    """RUN/wandb/ and RUN/wandb_run_id as an offline ``wandb.init(dir=RUN, id=run_id)`` leaves them (wandb 0.31)."""
    offline = f"offline-run-20260101_120000-{run_id}"
    (run / WANDB_DIR / offline / "logs").mkdir(parents=True)
    (run / WANDB_DIR / offline / "files").mkdir()
    (run / WANDB_DIR / offline / "files" / "requirements.txt").write_text("torch\n")
    (run / WANDB_DIR / offline / "logs" / "debug.log").write_text("wandb.init\n")
    (run / WANDB_DIR / offline / f"run-{run_id}.wandb").write_bytes(b":W&B\x00\x00\x00" + bytes(range(256)))
    (run / WANDB_DIR / "latest-run").symlink_to(offline)
    (run / WANDB_DIR / "debug.log").symlink_to(f"{offline}/logs/debug.log")
    (run / WANDB_ID_FILE).write_text(run_id + "\n")


def test_an_overwrite_replaces_the_earlier_runs_wandb_files(tmp_path, capsys, monkeypatch):
    """RUN/wandb/ (W&B's local files) and RUN/wandb_run_id are set aside with the earlier run's other results,
    as RUN/tensorboard/ is: put back by an interrupted overwrite, gone once the new run ends, so W&B's files
    never mix two runs. With wandb installed the runs log to it offline; without, the earlier run's files
    are written as W&B writes them."""
    has_wandb = importlib.util.find_spec("wandb") is not None
    log_to = ("wandb",) if has_wandb else ()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def settled() -> None:
        """W&B's service process goes on writing the files after run.finish(): stop it, so they are complete."""
        if has_wandb:
            import wandb

            wandb.teardown()

    run, data = tmp_path / "run", _data()
    train_sae(_cfg(), _source(data, 128), run, d_in=24, progress=False, device="cpu", log_to=log_to)
    settled()
    if not has_wandb:
        _write_wandb_files(run)
    before, earlier_id = _tree(run / WANDB_DIR), (run / WANDB_ID_FILE).read_bytes()
    earlier_runs = {name for name in before if name.startswith("offline-run-") and "/" not in name}
    assert len(earlier_runs) == 1, sorted(before)
    during = {}

    def interrupted(start):  # Ctrl-C as batch 10 is drawn, once what the folder holds then is noted
        for i, rows in enumerate(_source(data, 128)(start)):
            if i == 10:
                during.update(names=set(_tree(run / WANDB_DIR)) if (run / WANDB_DIR).exists() else set(),
                              run_id=(run / WANDB_ID_FILE).read_bytes() if (run / WANDB_ID_FILE).exists() else None)
                raise KeyboardInterrupt
            yield rows

    with pytest.raises(KeyboardInterrupt):
        train_sae(_cfg(k=4), interrupted, run, d_in=24, progress=False, device="cpu", overwrite=True, log_to=log_to)
    settled()
    assert "the replacement did not finish; the earlier results are back in place" in capsys.readouterr().err
    assert not earlier_runs & during["names"] and during["run_id"] != earlier_id  # set aside while it trained
    assert _tree(run / WANDB_DIR) == before and (run / WANDB_ID_FILE).read_bytes() == earlier_id
    train_sae(_cfg(k=4), _source(data, 128), run, d_in=24, progress=False, device="cpu", overwrite=True,
              log_to=log_to)
    settled()
    after = _tree(run / WANDB_DIR) if (run / WANDB_DIR).exists() else {}
    assert not earlier_runs & set(after) and not (run / ".set-aside").exists()
    assert (run / WANDB_ID_FILE).exists() == has_wandb
    assert not (has_wandb and (run / WANDB_ID_FILE).read_bytes() == earlier_id)


def test_steps_logged_after_the_checkpoint_of_a_crashed_run_are_replaced(tmp_path):
    """A run that dies at step 7 has logged step 6 after its last checkpoint (step 4): the resumed run
    trains and logs steps 5.. again, and TensorBoard shows the new step 6, once."""
    run, data = tmp_path / "run", _data()
    broken = data.clone()
    broken[6 * 128] = float("nan")  # batch 6, i.e. step 7
    with pytest.raises(NonFiniteError):
        train_sae(_cfg(), _source(broken, 128), run, d_in=24, progress=False, device="cpu", log_to="tensorboard")
    crashed = _jsonl(run)
    assert [r["step"] for r in crashed] == [2, 4, 6]
    train_sae(_cfg(), _source(data, 128), run, d_in=24, progress=False, device="cpu", log_to="tensorboard")
    rows = _jsonl(run)
    assert [r["step"] for r in rows] == list(range(2, 17, 2))
    assert rows[2]["tokens_per_s"] != crashed[2]["tokens_per_s"]  # step 6 was logged anew
    assert _scalars(run) == _expected(rows)



def test_overwritten_run_shows_only_the_new_training(tmp_path):
    run, data = tmp_path / "run", _data()
    train_sae(_cfg(), _source(data, 128), run, d_in=24, progress=False, device="cpu", log_to="tensorboard")
    old = _jsonl(run)
    train_sae(_cfg(lr=3e-3), _source(data, 128), run, d_in=24, progress=False, device="cpu", overwrite=True,
              log_to="tensorboard")
    rows = _jsonl(run)
    assert rows[-1]["nmse"] != old[-1]["nmse"]
    assert _scalars(run) == _expected(rows)

def test_sweep_logs_every_run_into_its_own_folder(tmp_path):
    cfgs = [_cfg(k=8), _cfg(k=16, total_tokens=1024)]
    dirs = [tmp_path / "sweep" / "k8", tmp_path / "sweep" / "k16"]
    train_many(cfgs, _source(_data(), 128), dirs, d_in=24, progress=False, device="cpu", log_to=["tensorboard"])
    for d in dirs:
        assert _scalars(d) == _expected(_jsonl(d))


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_package_is_one_line_before_training_starts(package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(ConfigError) as e:
        train_sae(_cfg(), _source(_data(), 128), tmp_path / "run", d_in=24, progress=False, device="cpu",
                  log_to=(package,))
    assert str(e.value) == f"--log-to {package} needs the {package} package: pip install {package}"
    assert not (tmp_path / "run").exists()


def test_unknown_log_target_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--log-to 'mlflow': expected one of tensorboard, wandb"):
        train_sae(_cfg(), _source(_data(), 128), tmp_path / "run", d_in=24, progress=False, device="cpu",
                  log_to=("mlflow",))
    assert not (tmp_path / "run").exists()


def test_cli_log_to_reaches_the_training_run(tmp_path, capsys):
    """`saelab train --log-to tensorboard` on a real activation cache writes the event files."""
    from saelab.cli import main
    from saelab.data import write_activation_cache

    cache = write_activation_cache(iter(_data().split(512)), tmp_path / "acts", meta={}, dtype="float32")
    assert cache.n_rows == 2048
    argv = ["train", "--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "run"), "--n-latents", "128",
            "--k", "8", "--batch-size", "128", "--total-tokens", "1024", "--init-rows", "512", "--log-every", "2",
            "--device", "cpu", "--no-progress", "--log-to", "tensorboard"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = _jsonl(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert _scalars(tmp_path / "run") == _expected(rows)


@pytest.mark.peers
def test_wandb_offline_run_holds_the_metrics_and_resumes_the_same_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (optional: pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run, data = tmp_path / "run", _data()
    train_sae(_cfg(), _source(data, 128), run, d_in=24, progress=False, device="cpu", stop_after_steps=5,
              log_to="wandb")
    first_id = (run / WANDB_ID_FILE).read_text().strip()
    train_sae(_cfg(), _source(data, 128), run, d_in=24, progress=False, device="cpu", log_to="wandb")
    assert (run / WANDB_ID_FILE).read_text().strip() == first_id
    logged = _wandb_history(wandb, run / "wandb")
    assert sorted(logged) == [r["step"] for r in _jsonl(run)]  # each step once
    for r in _jsonl(run):
        assert logged[r["step"]][TAG_PREFIX + "nmse"] == r["nmse"]
    # Each session's folder holds the same W&B run (one started in the same second as the one before gets
    # the folder name offline-run-TIME-ID-1).
    offline = sorted((run / WANDB_DIR).glob("offline-run-*"))
    assert len(offline) == 2 and all((p / f"run-{first_id}.wandb").is_file() for p in offline)



@pytest.mark.peers
def test_wandb_sweep_runs_each_hold_their_own_metrics(tmp_path, monkeypatch):
    """A sweep trains its runs at once in one process: each is its own W&B run (reinit='create_new')."""
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (optional: pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    dirs = [tmp_path / "sweep" / "k8", tmp_path / "sweep" / "k16"]
    train_many([_cfg(k=8), _cfg(k=16, total_tokens=1024)], _source(_data(), 128), dirs, d_in=24, progress=False,
               device="cpu", log_to=["wandb"])
    for d in dirs:
        logged, rows = _wandb_history(wandb, d / "wandb"), _jsonl(d)
        assert sorted(logged) == [r["step"] for r in rows]
        assert all(logged[r["step"]][TAG_PREFIX + "l0"] == r["l0"] for r in rows)

def _wandb_history(wandb, folder) -> dict[int, dict]:
    """step -> logged values, read from the offline runs' .wandb files: W&B's 7-byte header, then
    leveldb-log records (32 KiB blocks; 7-byte record headers: crc, length, type) of Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # the wandb-core service writes these files: stop it so that they are complete
    out: dict[int, dict] = {}
    for path in sorted(folder.glob("offline-run-*/run-*.wandb")):
        for data in _leveldb_records(path.read_bytes(), start=7):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                step = int(items["_step"])
                assert step not in out, f"step {step} logged twice"
                out[step] = items
    return out


def _leveldb_records(raw: bytes, start: int, block: int = 32768):
    pos, parts = start, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        payload, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero fill at the end of the file
            break
        parts = payload if kind in (1, 2) else parts + payload  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            yield parts


def test_quickstart_reports_a_missing_package_before_the_harvest(tmp_path, monkeypatch, capsys):
    from saelab.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    argv = ["quickstart", "--out", "qs", "--n-tokens", "4096", "--log-to", "tensorboard", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("saelab quickstart: error: --log-to tensorboard needs the tensorboard package: "
                       "pip install tensorboard"), err
    assert list(tmp_path.iterdir()) == []  # no model loaded, nothing harvested


def test_data_parallel_run_logs_from_rank_0_only(tmp_path):
    """torchrun with 2 CPU processes (gloo): one event file, holding exactly metrics.jsonl's rows."""
    import subprocess

    from saelab.data import write_activation_cache

    write_activation_cache(iter(_data().split(512)), tmp_path / "acts", meta={}, dtype="float32", progress=False)
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port=29531", "-m", "saelab",
            "train", "--activations", str(tmp_path / "acts"), "--out", str(tmp_path / "run"), "--n-latents", "128",
            "--k", "8", "--batch-size", "256", "--total-tokens", "2048", "--init-rows", "512", "--log-every", "2",
            "--device", "cpu", "--no-progress", "--log-to", "tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "run" / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1
    rows = _jsonl(tmp_path / "run")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert _scalars(tmp_path / "run") == _expected(rows)
