"""raysae.scoring: a pass over the scored rows split into shares and merged equals one pass.

This is what lets `raysae eval --scoring ray` fold each part on a Ray actor: the SAE's and the
baselines' stats, a Matryoshka SAE's views and the latent browser's tables, whatever the split
and the merge order. The Ray run itself is tested against the local one in test_pages.py (on a
harvested dataset, with the report).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import fold_tree, merge_trees, partitions

from raysae.baselines import MeanBaseline
from raysae.config import SAEConfig
from raysae.latents import LatentTops, sample_keys
from raysae.saes import build_sae
from raysae.scoring import RAY_ROWS, MomentsFold, Scorer, choose, parts_for, run_local
from raysae.views import ViewStats


def sparse_latents(rows: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(rows, n, generator=g) * 5
    return values * (torch.rand(rows, n, generator=g) < 0.3)


def tables(t: LatentTops) -> tuple:
    return (t.top_keys, t.sample_keys, t.sample_values, t.counts, t.hist)


@given(st.data())
def test_latent_tops_of_shares_merge_into_the_tops_of_one_pass(data):
    rows, n = 90, 7
    latents = sparse_latents(rows, n, data.draw(st.integers(0, 3)))
    ids = {"pos": torch.arange(rows) % 11}
    whole = LatentTops(n, top=4, sample=3, log_range=(-2.0, 1.0))
    whole.update(latents, 0, ids)
    shares = []
    for lo, hi in data.draw(partitions(rows)):
        share = LatentTops(n, top=4, sample=3, log_range=(-2.0, 1.0))
        share.update(latents[lo:hi], torch.arange(lo, hi), {"pos": ids["pos"][lo:hi]})
        shares.append(share)
    merged = fold_tree(data.draw(merge_trees(len(shares))), shares, lambda a, b: a.merge(b))
    for mine, theirs in zip(tables(merged), tables(whole)):
        assert torch.equal(mine, theirs)
    assert merged.n_rows == rows
    assert (merged.columns()["pos"] == ids["pos"].numpy()).all()
    for latent in range(n):  # what the browser shows: the latent's own firings
        assert all(latents[r, latent] == v for r, v in merged.top(latent) + merged.sample(latent))


def test_merge_refuses_tables_binned_differently():
    a, b = LatentTops(3, log_range=(-1.0, 1.0)), LatentTops(3, log_range=(-2.0, 1.0))
    with pytest.raises(ValueError, match="histogram ranges differ"):
        a.merge(b)


def test_sample_keys_sample_firings_uniformly():
    """Every latent fires on all 400 rows: its 6 largest keys must be 6 rows drawn uniformly.
    Over 2000 latents the sampled rows fall evenly into 8 bins of 50 rows (chi-square, 7 dof:
    p < 1e-4 beyond 30), and no latent's sample repeats another's (the latent is in the hash)."""
    rows, n, top = 400, 2000, 6
    r = torch.arange(rows).repeat_interleave(n)
    latent = torch.arange(n).repeat(rows)
    keys = sample_keys(r, latent, seed=0).view(rows, n)
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**32
    picked = keys.topk(top, dim=0).indices  # (top, n) rows
    counts = torch.bincount((picked // 50).flatten(), minlength=8).double()
    expected = top * n / 8
    assert float(((counts - expected) ** 2 / expected).sum()) < 30
    assert len({tuple(sorted(picked[:, i].tolist())) for i in range(n)}) > 0.99 * n
    other = sample_keys(r, latent, seed=1).view(rows, n).topk(top, dim=0).indices
    assert (other != picked).any()


@pytest.mark.parametrize("architecture", ["topk", "matryoshka_batchtopk"])
def test_a_scoring_pass_of_shares_merges_into_one_pass(architecture):
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=8, n_latents=24, k=3, architecture=architecture))
    x = torch.randn(300, 8) * 2 + 1
    mean = MeanBaseline(x.double().mean(0))

    def observers():
        return {"views": ViewStats(), "tops": LatentTops(24, log_range=(-3.0, 2.0))}

    scorer = Scorer({"sae": sae, "mean": mean}, 8, x.double().mean(0), 300, observers)
    with sae.evaluating():
        whole, seen = run_local(scorer, [{"act": x[:170]}, {"act": x[170:]}], 300)
        shares = []
        for lo, hi in [(200, 300), (0, 120), (120, 200)]:
            share = scorer.fresh()
            scorer.update(share, {"act": x[lo:hi]}, torch.arange(lo, hi))
            shares.append(share)
    merged = shares[0].merge(shares[1]).merge(shares[2])
    assert seen == 300 and merged.n_rows == whole.n_rows == 300
    for name in ("sae", "mean"):
        a = {**whole.recon[name].compute(), **whole.sparsity[name].compute()}
        b = {**merged.recon[name].compute(), **merged.sparsity[name].compute()}
        for key, value in a.items():
            if isinstance(value, float) and not math.isnan(value):
                assert b[key] == pytest.approx(value, rel=1e-9), (name, key)
    views = {k: v for k, v in whole.observers["views"].compute().items()}
    assert bool(views) == (architecture != "topk")
    for key, value in views.items():
        assert merged.observers["views"].compute()[key] == pytest.approx(value, rel=1e-9)
    for mine, theirs in zip(tables(merged.observers["tops"]), tables(whole.observers["tops"])):
        assert torch.equal(mine, theirs)


def test_a_chunk_must_hold_consecutive_rows():
    sae = build_sae(SAEConfig(d_in=4, n_latents=8, k=2))
    scorer = Scorer({"sae": sae}, 4, None, 10)
    with pytest.raises(ValueError, match="not consecutive"):
        scorer.update(scorer.fresh(), {"act": torch.randn(3, 4)}, torch.tensor([0, 1, 5]))


def test_moments_fold_is_the_mean():
    x = torch.randn(50, 3, dtype=torch.float64)
    state, seen = run_local(MomentsFold(3), [{"act": x[:20]}, {"act": x[20:]}], 45)
    assert seen == 45 and state.n == 45
    assert torch.allclose(state.mean, x[:45].mean(0))


def test_where_the_passes_run():
    assert choose("auto", RAY_ROWS - 1, True) == "local"
    assert choose("auto", RAY_ROWS, True) == "ray"
    assert choose("auto", RAY_ROWS, False) == "local"  # toy data
    assert choose("ray", 10, True) == "ray"
    with pytest.raises(ValueError, match="choose one of"):
        choose("gpu", 10, True)


def test_only_the_parts_holding_the_first_rows_are_read():
    class Part:
        def __init__(self, name, rows):
            self.name, self.rows = name, rows

    class Data:
        parts = [Part("a", 100), Part("b", 100), Part("c", 100)]

    assert parts_for(Data(), 100) == ["a"]
    assert parts_for(Data(), 101) == ["a", "b"]
    assert parts_for(Data(), 10**9) == ["a", "b", "c"]


def test_equal_activations_rank_the_earlier_row_first_however_split():
    latents = torch.tensor([[2.0, 0.0], [1.0, 3.0], [2.0, 3.0], [0.5, 0.0]])
    whole = LatentTops(2, top=2, sample=0, log_range=(-1.0, 1.0))
    whole.update(latents, 0)
    late_first = (
        LatentTops(2, top=2, sample=0, log_range=(-1.0, 1.0))
        .merge(_tops(latents[2:], 2))
        .merge(_tops(latents[:2], 0))
    )
    for tops in (whole, late_first):
        assert tops.top(0) == [(0, 2.0), (2, 2.0)] and tops.top(1) == [(1, 3.0), (2, 3.0)]


def _tops(latents, first_row):
    tops = LatentTops(latents.shape[1], top=2, sample=0, log_range=(-1.0, 1.0))
    tops.update(latents, first_row)
    return tops
