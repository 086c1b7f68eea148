"""The paper-metric configs turn into command-line options: every field documented, typed values."""

import dataclasses

import pytest

from saelab.cli.common import Parser
from saelab.evals.ablation_sparsity import AblationSparsityConfig
from saelab.evals.n2g import N2GConfig
from saelab.evals.probe import ProbeConfig


@pytest.mark.parametrize("cls,argv,expect", [
    (AblationSparsityConfig, ["--n-future", "8", "--center", "none"],
     {"n_future": 8, "latents_per_site": None, "center": "none"}),
    (ProbeConfig, ["--tasks", "number", "in_quotes", "--features", "post", "--no-baseline"],
     {"tasks": ("number", "in_quotes"), "features": "post", "baseline": False}),
    (N2GConfig, ["--latents", "3", "17", "--max-len", "4", "--firing-frac", "0.25"],
     {"latents": (3, 17), "max_len": 4, "firing_frac": 0.25}),
])
def test_configs_parse_and_document_every_field(cls, argv, expect):
    parser = Parser(add_config_path_arg=False)
    parser.add_arguments(cls, dest="cfg")
    cfg = parser.parse_args(argv).cfg
    helps = {a.dest.split(".")[-1]: a.help for a in parser._actions}  # the options exist once parsed
    options = [f.name for f in dataclasses.fields(cls) if f.metadata.get("cmd", True)]
    assert options and all(helps.get(name) for name in options)  # every option has help text
    assert not {"hook", "exclude_first", "progress"} & set(helps)  # set at run time, not options
    for k, v in expect.items():
        assert getattr(cfg, k) == v
