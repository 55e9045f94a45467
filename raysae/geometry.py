"""Decoder geometry: how close each latent's decoder direction is to its nearest other one.

For decoder rows w_i (normalised here, so the statistic does not depend on the norms):

    max_cos_i = max_{j ≠ i} ⟨w_i, w_j⟩ / (‖w_i‖ ‖w_j‖)        signed: anti-parallel rows give −1

Near-duplicate latents (features split too finely, dead latents collapsed together) show as
max_cos ≈ 1. The reference is the same statistic for random unit directions of the same shape:
for n directions in d dimensions it concentrates near √(2 ln n / d) (the maximum of n
near-Gaussian cosines of standard deviation 1/√d),
so a dictionary is more or less spread out than chance only relative to that baseline.

The (n, n) Gram matrix is never formed: rows go through in blocks of `block_rows(n)` so each
(block, n) slab holds at most `max_block_elements` values — 256 MiB in float32 by default,
which puts n = 131072 in blocks of 512 rows.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

MAX_BLOCK_ELEMENTS = 2**26
"""Values in one (block, n) slab of cosines: 2^26 float32 = 256 MiB."""

NEAR_DUPLICATE_COS = 0.9
"""A latent whose max cosine to another is at least this is reported as a near-duplicate."""


def block_rows(n: int, max_block_elements: int = MAX_BLOCK_ELEMENTS) -> int:
    """Rows per block so that a (block, n) slab holds at most max_block_elements values."""
    return max(1, min(n, max_block_elements // max(n, 1)))


@torch.no_grad()
def max_cosine_to_others(
    W: Tensor, max_block_elements: int = MAX_BLOCK_ELEMENTS, rows: Optional[Tensor] = None
) -> Tensor:
    """W: (n, d) rows → (n,) each row's largest cosine to any other row (NaN when n = 1);
    with `rows` (m,) indices, only those rows' values (m,), each still against all n rows.

    Computed in float32 at least (bfloat16 rounding would blur values near 1); zero rows have
    cosine 0 to everything.
    """
    if W.ndim != 2:
        raise ValueError(f"expected a (n_latents, d_in) matrix, got shape {tuple(W.shape)}")
    n = W.shape[0]
    dtype = torch.promote_types(W.dtype, torch.float32)
    unit = W.detach().to(dtype)
    unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    rows = torch.arange(n, device=W.device) if rows is None else rows.to(W.device)
    out = torch.full((len(rows),), float("nan"), dtype=dtype, device=W.device)
    if n < 2:
        return out
    step = block_rows(n, max_block_elements)
    for lo in range(0, len(rows), step):
        block = rows[lo : lo + step]
        cos = unit[block] @ unit.T  # (block, n)
        cos[torch.arange(len(block), device=W.device), block] = float("-inf")  # not to itself
        out[lo : lo + len(block)] = cos.amax(-1)
    return out.clamp(-1.0, 1.0)


def random_unit_directions(
    n: int,
    d: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> Tensor:
    """(n, d) directions uniform on the unit sphere (normalised Gaussians), seeded."""
    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype, device=device)
    return x / x.norm(dim=-1, keepdim=True)


def summarize_cosines(values: Tensor, bins: int = 20) -> dict:
    """Summary statistics and a histogram over [−1, 1] of a vector of cosines."""
    v = values.detach().double().cpu()
    v = v[~v.isnan()]
    if v.numel() == 0:
        return {"count": 0}
    q = torch.quantile(v, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    counts = torch.histc(v, bins=bins, min=-1.0, max=1.0)
    return {
        "count": int(v.numel()),
        "mean": float(v.mean()),
        "std": float(v.std(unbiased=False)),
        "min": float(v.min()),
        "median": q[0],
        "p90": q[1],
        "p99": q[2],
        "max": float(v.max()),
        "near_duplicate_fraction": float((v >= NEAR_DUPLICATE_COS).double().mean()),
        "histogram": {
            "edges": torch.linspace(-1.0, 1.0, bins + 1).tolist(),
            "counts": [int(c) for c in counts.tolist()],
        },
    }


MAX_SCORED_ROWS = 16_384
"""Past this many latents, `decoder_geometry` summarises a uniform sample of this many rows
(each against all n): the n² cosines cost 20 TFLOP per matrix at n = 131072, d = 576, while
the sample's histogram and quantiles estimate the whole one's closely (16384 values)."""


def decoder_geometry(
    W_dec: Tensor,
    seed: int = 0,
    bins: int = 20,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
    max_rows: int = MAX_SCORED_ROWS,
) -> dict:
    """Max cosine of each decoder row to any other, summarised, next to random directions.

    W_dec: (n_latents, d_in), latent-major as stored by raysae SAEs. Returns
    {"decoder": summary, "random_baseline": summary, "random_expected_max": √(2 ln n / d),
    "scored_rows": how many rows the summaries are over} (the max capped at 1); every row when
    n ≤ max_rows, else the same seeded uniform sample of rows of both matrices.
    """
    n, d = W_dec.shape
    random = random_unit_directions(n, d, seed, dtype=torch.float32, device=W_dec.device)
    rows = None
    if n > max_rows:
        g = torch.Generator().manual_seed(seed)
        rows = torch.randperm(n, generator=g)[:max_rows].sort().values
    return {
        "decoder": summarize_cosines(max_cosine_to_others(W_dec, max_block_elements, rows), bins),
        "random_baseline": summarize_cosines(
            max_cosine_to_others(random, max_block_elements, rows), bins
        ),
        "random_expected_max": min(1.0, math.sqrt(2.0 * math.log(max(n, 2)) / d)),
        "scored_rows": n if rows is None else len(rows),
    }
