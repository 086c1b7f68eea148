"""Feature families: matching latents across SAE sizes on constructed SAEs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.errors import SaelabError, ShapeMismatchError
from saelab.explore.browser.build import BrowseConfig, SAESource, check_compatible
from saelab.explore.browser.families import CoactivationCounts, family_tree, match_children
from saelab.sae import SAEConfig, TopKSAE

D = 16


def sae_from_directions(dirs_ND: torch.Tensor, k: int = 1, hook: str = "blocks.0.hook_resid_post") -> TopKSAE:
    """An SAE whose encoder and decoder rows are the given unit directions (no biases)."""
    n = dirs_ND.shape[0]
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=n, k=k, hook_name=hook, exclude_first=False))
    with torch.no_grad():
        W = dirs_ND / dirs_ND.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def codes(sae: TopKSAE, x_TD: torch.Tensor):
    x_n, _ = sae.normalize_input(x_TD[None])
    vals, idx, _ = sae.encode_topk(x_n)
    return vals.float(), idx


def constructed_case():
    """Small SAE: latent 0 points along (e0 + e1) / sqrt 2, latents 1..6 along e2..e7.
    Large SAE: latents 0..7 along e0..e7. Tokens: random multiples of one of e0..e7."""
    E = torch.eye(D)
    small = sae_from_directions(torch.stack([E[0] + E[1]] + [E[j] for j in range(2, 8)]))
    large = sae_from_directions(torch.stack([E[j] for j in range(8)]))
    g = torch.Generator().manual_seed(0)
    which = torch.randint(0, 8, (600,), generator=g)
    x = E[which] * (1 + torch.rand(600, 1, generator=g))
    return small, large, x


def test_small_latent_split_across_two_large_latents_is_found():
    small, large, x = constructed_case()
    counts = CoactivationCounts([small, large])
    for chunk in x.split(64):
        counts.update([codes(small, chunk), codes(large, chunk)], chunk.shape[0])
    assert counts.n_tokens == x.shape[0]
    m = match_children(small.W_dec, large.W_dec, counts.both[0], counts.active[1], counts.active[0], 0.3)
    # large latents 0 (e0) and 1 (e1) both belong to small latent 0 = (e0 + e1)/sqrt 2
    assert m["parent"][:2].tolist() == [0, 0]
    torch.testing.assert_close(m["cos"][:2], torch.full((2,), 1 / math.sqrt(2)))
    torch.testing.assert_close(m["containment"][:2], torch.ones(2))
    torch.testing.assert_close(m["score"][:2], torch.full((2,), 2 ** -0.25))
    # their shares of the parent's tokens add up to 1: the parent's tokens are split between them
    assert abs(float(m["share"][:2].sum()) - 1) < 1e-6 and (m["share"][:2] > 0.3).all()
    # the others match one to one
    assert m["parent"][2:8].tolist() == [1, 2, 3, 4, 5, 6]
    torch.testing.assert_close(m["cos"][2:8], torch.ones(6))

    tree = family_tree(["small", "large"], ["a", "b"], [small, large], counts, min_score=0.3, hook="h", model="m")
    split = tree["families"][0]  # the only family with more than one child comes first
    assert (split["sae"], split["latent"], split["n_descendants"], split["depth"]) == ("small", 0, 2, 2)
    assert sorted(c["latent"] for c in split["children"]) == [0, 1]
    assert all(c["sae"] == "large" and c["children"] == [] for c in split["children"])
    assert [f["n_descendants"] for f in tree["families"][1:]] == [1] * 6
    assert tree["links"][0]["n_children_matched"] == 8
    assert tree["singletons"] == {"small": 0, "large": 0}


def test_cosine_alone_does_not_make_a_parent():
    """A child pointing like a parent but never firing with it gets no parent (score = 0)."""
    E = torch.eye(D)
    small = sae_from_directions(torch.stack([E[0], E[1]]))
    large = sae_from_directions(torch.stack([E[0], E[0] + 0.05 * E[2]]), k=1)
    both = torch.tensor([[10, 0], [0, 0]], dtype=torch.int32)  # child 1 never co-fires with parent 0
    m = match_children(small.W_dec, large.W_dec, both, torch.tensor([10, 5]), torch.tensor([10, 3]), 0.3)
    assert m["parent"].tolist() == [0, -1]
    assert m["cos"][1] > 0.99 and m["score"][1] == 0


def test_three_levels_form_a_tree():
    E = torch.eye(D)
    s1 = sae_from_directions(torch.stack([E[0] + E[1] + E[2] + E[3], E[4]]))
    s2 = sae_from_directions(torch.stack([E[0] + E[1], E[2] + E[3], E[4]]))
    s3 = sae_from_directions(torch.stack([E[0], E[1], E[2], E[3], E[4]]))
    g = torch.Generator().manual_seed(1)
    x = E[torch.randint(0, 5, (500,), generator=g)]
    counts = CoactivationCounts([s1, s2, s3])
    counts.update([codes(s, x) for s in (s1, s2, s3)], x.shape[0])
    tree = family_tree(["n2", "n3", "n5"], ["", "", ""], [s1, s2, s3], counts, min_score=0.3, hook="h", model="m")
    root = tree["families"][0]
    assert (root["sae"], root["latent"], root["n_descendants"], root["depth"]) == ("n2", 0, 6, 3)
    kids = {c["latent"]: sorted(g["latent"] for g in c["children"]) for c in root["children"]}
    assert kids == {0: [0, 1], 1: [2, 3]}


def test_sizes_must_be_sorted_and_saes_compatible():
    E = torch.eye(D)
    a, b = sae_from_directions(E[:4]), sae_from_directions(E[:2])
    with pytest.raises(ValueError, match="sorted by size"):
        CoactivationCounts([a, b])
    other_hook = sae_from_directions(E[:8], hook="blocks.1.hook_resid_post")
    with pytest.raises(ShapeMismatchError, match="different hooks.*blocks.1.hook_resid_post"):
        check_compatible([SAESource("a", "run_a", a), SAESource("c", "run_c", other_hook)])
    wide = TopKSAE(SAEConfig(d_in=D + 1, n_latents=8, k=1, hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(ShapeMismatchError, match="different widths: run_w has d_in=17"):
        check_compatible([SAESource("a", "run_a", a), SAESource("w", "run_w", wide)])


def test_build_families_refuses_one_or_equal_sizes(tmp_path):
    from saelab.explore.browser import build_families

    E = torch.eye(D)
    a = SAESource("a", "run_a", sae_from_directions(E[:4]))
    b = SAESource("b", "run_b", sae_from_directions(E[4:8]))
    with pytest.raises(SaelabError, match="at least two SAEs"):
        build_families([a], tmp_path / "f.json", BrowseConfig())
    with pytest.raises(SaelabError, match="different sizes"):
        build_families([a, b], tmp_path / "f.json", BrowseConfig())
