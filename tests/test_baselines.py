"""Baselines through the same accumulators: mean → FVU 1, PCA-k → its eigenvalue tail, k-means
as an L0 = 1 SAE (best-scaled never worse than nearest)."""

import math

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from strategies import activations

from raysae.baselines import (
    KMeansBaseline,
    MeanBaseline,
    default_kmeans_k,
    default_pca_k,
    fit_baselines,
    kmeans_baselines,
    pca_baselines,
)
from raysae.evaluate import score
from raysae.metrics import Moments


def fvu_of(baseline, x) -> float:
    recon, _ = score({"b": baseline}, [x], x.shape[1], None, dead_window=x.shape[0])["b"]
    return recon.compute()["fvu"]


def moments_of(x) -> Moments:
    m = Moments(x.shape[1], full=True)
    m.update(x)
    return m


def spread(x) -> bool:
    x = x.double()
    return float((x - x.mean(0)).pow(2).sum()) > 1e-12 * float(x.pow(2).sum()) + 1e-300


@given(activations())
def test_mean_baseline_has_fvu_one(x):
    assume(spread(x))
    assert math.isclose(fvu_of(MeanBaseline(moments_of(x).mean), x), 1.0, rel_tol=1e-9)


@given(activations(min_tokens=4, max_d=8, mean_ratios=(0.0, 1.0, 1e2)))
def test_pca_fvu_equals_the_eigenvalue_tail(x):
    # In-sample, Σ‖x − x̂_k‖² = Σ_{j>k} λ_j · N exactly (Eckart–Young), so FVU_A(PCA-k) is the
    # fraction of the covariance's trace outside the top k eigenvalues.
    assume(spread(x))
    moments = moments_of(x)
    eig = torch.linalg.eigvalsh(moments.covariance()).flip(0).clamp_min(0)
    d = x.shape[1]
    fvus = [fvu_of(b, x) for b in pca_baselines(moments, range(1, d + 1))]
    for k, fvu in enumerate(fvus, start=1):
        want = float(eig[k:].sum() / eig.sum())
        assert math.isclose(fvu, want, abs_tol=1e-8), (k, fvu, want)
    assert all(a >= b - 1e-9 for a, b in zip(fvus, fvus[1:]))  # more components never hurt


A = [-17524.7715, -8137.1152, 114791.8281, 188937.4531, -27912.6035]
B = [-17421.2852, -8162.1128, 114811.2656, 188707.9375, -27671.8379]


@given(
    activations(min_tokens=8, max_d=6, mean_ratios=(0.0, 1.0, 1e3)),
    st.integers(1, 6),
    st.integers(0, 100),
)
# Bug found by this property (deep profile): two distinct tokens with |μ| ≫ σ and K = 5 gave
# near-duplicate float32 centroids; choosing the scaled centroid in float32 picked a
# near-parallel one, FVU 1.4e-8 against the nearest centroid's 0. Fixed by fitting on x − μ and
# choosing in float64.
@example(x=torch.tensor([A, A, A, A, B, A, B, A]), k=5, seed=1)
def test_kmeans_best_scaled_is_never_worse_than_nearest_and_l0_is_one(x, k, seed):
    assume(spread(x))
    moments = moments_of(x)
    nearest, scaled = kmeans_baselines(x, moments.mean, [min(k, x.shape[0])], seed)
    results = score({"nearest": nearest, "scaled": scaled}, [x], x.shape[1], None, x.shape[0])
    (rn, sn), (rs, ss) = results["nearest"], results["scaled"]
    assert rs.compute()["fvu"] <= rn.compute()["fvu"] * (1 + 1e-6) + 1e-9
    assert sn.compute()["l0"] == 1.0 and ss.compute()["l0"] <= 1.0
    # each nearest-centroid reconstruction is a centroid
    x_hat, latents = nearest(x)
    centroids = nearest.mean + nearest.decoder
    assert torch.allclose(x_hat, centroids[latents.argmax(-1)])


def test_kmeans_on_separated_clusters_explains_nearly_everything():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(4, 8, generator=g)
    x = centres[torch.arange(400) % 4] + 0.01 * torch.randn(400, 8, generator=g)
    baselines = fit_baselines(moments_of(x), x, pca_ks=[2], kmeans_ks=[4], seed=0)
    names = [b.name for b in baselines]
    assert names == ["mean", "pca_k=2", "kmeans_K=4", "kmeans_K=4_scaled"]
    fvu = {b.name: fvu_of(b, x) for b in baselines}
    assert fvu["kmeans_K=4"] < 1e-4 and fvu["kmeans_K=4_scaled"] <= fvu["kmeans_K=4"] + 1e-12
    assert fvu["pca_k=2"] > fvu["kmeans_K=4"] and fvu["mean"] == pytest.approx(1.0, rel=1e-12)


def test_kmeans_scaled_recovers_magnitudes_along_a_centroid():
    # Tokens a·c along one direction: the best-scaled L0 = 1 code is exact, the nearest is not.
    mean = torch.zeros(3, dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0, 2.0], [-2.0, 1.0, 0.0]], dtype=torch.float64)
    x = torch.tensor([0.5, 1.0, 3.0])[:, None] * c[0]
    scaled = KMeansBaseline(mean, c, scaled=True)
    x_hat, latents = scaled(x)
    torch.testing.assert_close(x_hat, x.double())
    torch.testing.assert_close(latents[:, 0], torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64))
    assert float((KMeansBaseline(mean, c, scaled=False)(x)[0] - x).abs().max()) > 0.5


def test_bad_sizes_are_named():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"PCA k=4 must be in 1..d_in=3"):
        pca_baselines(moments_of(x), [4])
    with pytest.raises(ValueError, match="k-means K=11 needs 1..10 centroids"):
        kmeans_baselines(x, x.mean(0), [11])
    with pytest.raises(ValueError, match="needs the full covariance"):
        pca_baselines(Moments(3), [1])


def test_defaults():
    assert default_pca_k(7.6, 64) == 8 and default_pca_k(0.2, 64) == 1
    assert default_pca_k(100.0, 64) == 64 and default_pca_k(math.nan, 64) == 1
    assert default_kmeans_k(1024, 65536) == 1024 and default_kmeans_k(131072, 65536) == 16384
