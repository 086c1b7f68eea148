"""The README's Python code blocks run as written, from a folder holding a (small) quickstart run."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture(scope="module")
def quickstart_folder(smollm2, data_dir, tmp_path_factory) -> Path:
    """A folder with runs/quickstart/ as the README's first command leaves it (a small budget)."""
    from saelab.pipeline import EvalConfig, HarvestConfig, QuickstartConfig, quickstart
    from saelab.train import TrainConfig

    folder = tmp_path_factory.mktemp("user")
    cfg = QuickstartConfig(harvest=HarvestConfig(context_size=32, n_tokens=8192, buffer_tokens=8192),
                           train=TrainConfig(n_latents=256, k=8, batch_size=512, total_tokens=8192),
                           eval=EvalConfig(recon_tokens=1024, downstream_tokens=512, ablations=()))
    quickstart(cfg, folder / "runs" / "quickstart", lm=smollm2, progress=False)
    return folder


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs(index, quickstart_folder, monkeypatch, capsys):
    monkeypatch.chdir(quickstart_folder)
    exec(compile(python_blocks()[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # each block shows the user something
