"""Decoder geometry: blocked max cosine equals the plain Gram-matrix computation; the random
baseline behaves as theory says."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from raysae.geometry import (
    block_rows,
    decoder_geometry,
    max_cosine_to_others,
    random_unit_directions,
    summarize_cosines,
)


def plain_max_cosine(W: torch.Tensor) -> torch.Tensor:
    """Reference: the whole (n, n) cosine matrix in float64, diagonal excluded."""
    unit = W.double() / W.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = unit @ unit.T
    cos.fill_diagonal_(-math.inf)
    return cos.amax(-1)


@given(
    st.integers(2, 40), st.integers(1, 8), st.integers(1, 200), st.integers(0, 2**16), st.booleans()
)
def test_blocked_max_cosine_equals_the_full_gram_matrix(n, d, budget, seed, duplicate):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g).add(0.1)  # any norms
    if duplicate:
        W[-1] = -3.0 * W[0]  # anti-parallel: cosine −1 between them, not +1
        W[1] = 2.0 * W[0]  # a near-duplicate latent: max cosine 1
    got = max_cosine_to_others(W, max_block_elements=budget)
    torch.testing.assert_close(got.double(), plain_max_cosine(W).clamp(-1, 1), atol=1e-5, rtol=0)
    if duplicate:
        assert got[0] > 1 - 1e-5 and got[1] > 1 - 1e-5


def test_blocks_fit_the_budget_at_131072_latents():
    n = 131072
    rows = block_rows(n)
    assert rows * n <= 2**26 and rows == 512  # 256 MiB of float32 per block
    assert block_rows(n, max_block_elements=10) == 1  # never zero rows
    assert block_rows(5) == 5


def test_single_row_has_no_neighbour():
    assert max_cosine_to_others(torch.ones(1, 4)).isnan().all()


def test_random_baseline_matches_theory():
    # E max over n of the cosines of random unit vectors ≈ √(2 ln n / d); RMS cosine 1/√d.
    n, d = 2048, 256
    u = random_unit_directions(n, d, seed=1)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(n))
    cos = u[:200] @ u.T
    off_diagonal = cos[~torch.eye(200, n, dtype=torch.bool)]
    assert abs(float(off_diagonal.pow(2).mean().sqrt()) * math.sqrt(d) - 1) < 0.05
    geo = decoder_geometry(u, seed=2)
    expected = geo["random_expected_max"]
    assert abs(geo["decoder"]["median"] - expected) < 0.2 * expected
    assert abs(geo["random_baseline"]["median"] - geo["decoder"]["median"]) < 0.02


def test_orthogonal_decoder_sits_below_random():
    W = torch.linalg.qr(torch.randn(64, 64))[0]  # 64 orthonormal rows: max cosine ≈ 0
    geo = decoder_geometry(W)
    assert geo["decoder"]["max"] < 1e-5 < geo["random_baseline"]["min"]
    assert geo["decoder"]["near_duplicate_fraction"] == 0.0


def test_summary_histogram_counts_every_value():
    s = summarize_cosines(torch.tensor([-1.0, -0.5, 0.0, 0.95, 1.0, float("nan")]), bins=4)
    assert s["count"] == 5 and sum(s["histogram"]["counts"]) == 5
    assert s["near_duplicate_fraction"] == 0.4 and s["min"] == -1.0 and s["max"] == 1.0


def test_sampled_rows_are_the_full_values_of_those_rows():
    W = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([0, 7, 150, 299])
    full = max_cosine_to_others(W, max_block_elements=900)
    got = max_cosine_to_others(W, max_block_elements=900, rows=rows)
    assert torch.allclose(got, full[rows], atol=1e-6)  # blocks differ: GEMM rounding
    sampled = decoder_geometry(W, max_rows=100)
    assert sampled["scored_rows"] == sampled["decoder"]["count"] == 100
    assert decoder_geometry(W)["scored_rows"] == 300
