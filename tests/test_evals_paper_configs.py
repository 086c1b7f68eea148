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


def test_shared_settings_are_defined_once_and_listed_after_each_metrics_own():
    """seed, n_boot, ci_level, exclude_first and hook come from one base (one default, one check) into every metric's
    settings; each metric lists them after its own options and words its seed and n_boot for itself, as its --help
    read when each metric defined them."""
    from saelab.errors import ConfigError
    from saelab.evals.config import ComputeEquivalentConfig, MetricSettings, SampledMetricSettings

    assert issubclass(ComputeEquivalentConfig, MetricSettings)
    assert not issubclass(ComputeEquivalentConfig, SampledMetricSettings)  # no sampling of its own: no seed
    seeds = set()
    for cls in (AblationSparsityConfig, ProbeConfig, N2GConfig):
        assert issubclass(cls, SampledMetricSettings)
        options = [f.name for f in dataclasses.fields(cls) if f.metadata.get("cmd", True)]
        assert options[-3:] == ["seed", "n_boot", "ci_level"] and options.count("seed") == 1
        with pytest.raises(ConfigError, match=r"^n_boot must be an integer >= 0 \(0 = no intervals\), got -1$"):
            cls(n_boot=-1)
        assert cls(seed=3, hook="blocks.0.hook_resid_post").seed == 3
        parser = Parser(add_config_path_arg=False)
        parser.add_arguments(cls, dest="cfg")
        parser.parse_args([])
        helps = {a.dest.split(".")[-1]: a.help for a in parser._actions}
        assert helps["ci_level"].startswith("Coverage of the intervals.")
        seeds.add(helps["seed"])
    assert len(seeds) == 3  # what each metric's seed draws
