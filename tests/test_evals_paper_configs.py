"""The paper-metric configs turn into command-line options (for a later `saelab eval --suite paper`)."""

import argparse

import pytest

from saelab.evals.ablation_sparsity import AblationSparsityConfig
from saelab.evals.n2g import N2GConfig
from saelab.evals.probe import ProbeConfig
from saelab.utils.dataclass_args import add_dataclass_args, dataclass_from_args, field_docs


@pytest.mark.parametrize("cls,argv,expect", [
    (AblationSparsityConfig, ["--n-future", "8", "--latents-per-site", "none", "--center", "none"],
     {"n_future": 8, "latents_per_site": None, "center": "none"}),
    (ProbeConfig, ["--tasks", "number", "in_quotes", "--features", "post", "--no-baseline"],
     {"tasks": ("number", "in_quotes"), "features": "post", "baseline": False}),
    (N2GConfig, ["--latents", "3", "17", "--max-len", "4", "--firing-frac", "0.25"],
     {"latents": ("3", "17"), "max_len": 4, "firing_frac": 0.25}),
])
def test_configs_parse_and_document_every_field(cls, argv, expect):
    import dataclasses

    docs = field_docs(cls)
    assert {f.name for f in dataclasses.fields(cls)} <= set(docs)  # every field has help text
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, cls)
    cfg = dataclass_from_args(cls, parser.parse_args(argv))
    for k, v in expect.items():
        assert getattr(cfg, k) == v
