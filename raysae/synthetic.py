"""Toy activations with ground-truth features, and a score for how well an SAE recovers them.

Each token is a sparse non-negative combination of `n_features` unit directions in `d_in`
dimensions (n_features > d_in: superposition, Elhage et al. 2022):

    x = Σ_i a_i m_i f_i + noise,   a_i ∈ {0, 1} active flags, m_i ≥ 0 magnitudes, f_i ∈ R^d unit

Feature frequencies can follow a power law. Two structured cases researchers use to probe SAEs:
- correlated groups: when a group's first feature fires, each other member also fires with
  probability `correlation` (on top of its own base rate) — tempts an SAE to merge features;
- one-hot sets: exactly one feature of each set fires per token ("two sets of one-hot
  features", composition) — tempts an SAE to learn the products instead of the factors.

The score: for every true feature, the max cosine between its direction and any decoder row.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from raysae.config import ToyDataConfig

HELD_OUT_STREAM = 1
"""The `stream` of held-out toy data: final evaluation of `raysae train` and `raysae eval`."""


class ToyData:
    """A seeded, infinite stream of toy activations. `directions` holds the true features.

    `stream` picks an independent token stream over the same features (e.g. 1 for held-out data).
    """

    def __init__(self, cfg: ToyDataConfig, d_in: int, stream: int = 0):
        if cfg.n_features <= 0 or d_in <= 0:
            raise ValueError("toy data needs n_features > 0 and d_in > 0")
        self.cfg, self.d_in = cfg, d_in
        g = torch.Generator().manual_seed(cfg.seed)
        directions = torch.randn(cfg.n_features, d_in, generator=g)
        self.directions = directions / directions.norm(dim=-1, keepdim=True)
        self._layout()
        self._generator = torch.Generator().manual_seed(cfg.seed + 1 + 1_000_003 * stream)

    def _layout(self) -> None:
        """Place correlated groups first, one-hot sets next, independent features last."""
        c = self.cfg
        n_grouped = c.n_correlated_groups * c.correlated_group_size
        n_one_hot = c.n_one_hot_sets * c.one_hot_set_size
        self.groups = torch.arange(n_grouped).view(c.n_correlated_groups, c.correlated_group_size)
        self.one_hot_sets = (torch.arange(n_one_hot) + n_grouped).view(
            c.n_one_hot_sets, c.one_hot_set_size
        )
        # Base firing probabilities of the non-one-hot features: power law, scaled so the expected
        # number of active features per token (one-hot sets contribute one each) is as asked.
        free = torch.cat(
            [torch.arange(n_grouped), torch.arange(n_grouped + n_one_hot, c.n_features)]
        )
        rank = torch.arange(1, len(free) + 1, dtype=torch.float64)
        weights = rank.pow(-c.frequency_decay)
        target = max(c.active_per_token - c.n_one_hot_sets, 0.0)
        p = torch.zeros(c.n_features, dtype=torch.float64)
        if len(free):
            p[free] = (weights * target / weights.sum()).clamp(max=1.0)
        self.probabilities = p.float()

    def sample(self, n_tokens: int) -> tuple[Tensor, Tensor]:
        """(n_tokens, d_in) activations and the (n_tokens, n_features) true feature activations."""
        c = self.cfg
        g = self._generator
        active = torch.rand(n_tokens, c.n_features, generator=g) < self.probabilities
        if c.n_correlated_groups:
            leaders = active[:, self.groups[:, 0]]  # (N, groups)
            follow = torch.rand(n_tokens, *self.groups[:, 1:].shape, generator=g) < c.correlation
            active[:, self.groups[:, 1:]] |= leaders[:, :, None] & follow
        if c.n_one_hot_sets:
            choice = torch.randint(c.one_hot_set_size, (n_tokens, c.n_one_hot_sets), generator=g)
            active[:, self.one_hot_sets] = torch.nn.functional.one_hot(
                choice, c.one_hot_set_size
            ).bool()
        magnitudes = (
            c.magnitude_mean + c.magnitude_std * torch.randn(n_tokens, c.n_features, generator=g)
        ).clamp_min(0.0)
        features = active * magnitudes
        x = features @ self.directions
        if c.noise_std:
            x = x + c.noise_std * torch.randn(n_tokens, self.d_in, generator=g)
        return x, features

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Infinite iterator of (batch_size, d_in) activation batches."""
        while True:
            yield self.sample(batch_size)[0]


@torch.no_grad()
def feature_recovery(
    true_directions: Tensor, W_dec: Tensor, threshold: float = 0.9, chunk: int = 4096
) -> dict:
    """How well decoder rows recover true features.

    true_directions: (n_features, d); W_dec: (n_latents, d). For each true feature, the max cosine
    to any decoder row. Returns mean_max_cos, fraction_recovered (max cos ≥ threshold), and the
    per-feature values.
    """
    t = true_directions.float() / true_directions.float().norm(dim=-1, keepdim=True)
    w = W_dec.detach().float().cpu()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    best = torch.cat([(t[i : i + chunk] @ w.T).amax(-1) for i in range(0, len(t), chunk)])
    return {
        "mean_max_cos": float(best.mean()),
        "fraction_recovered": float((best >= threshold).float().mean()),
        "threshold": threshold,
        "max_cos": best.tolist(),
    }


def recovery_line(recovery: dict) -> str:
    """One console line for a `feature_recovery` result."""
    return (
        f"toy features recovered (max cos ≥ {recovery['threshold']}): "
        f"{recovery['fraction_recovered']:.1%}, mean max cos {recovery['mean_max_cos']:.3f}"
    )


def write_toy_dataset(
    uri: str,
    cfg: ToyDataConfig,
    d_in: int,
    n_tokens: int,
    rows_per_part: int,
    overwrite: bool = False,
):
    """Write `n_tokens` toy activations as a raysae dataset (float32 parts + manifest).

    The manifest's `harvest` records the toy config, so the true features can be rebuilt from
    it (`toy_directions`) to score feature recovery of SAEs trained on the dataset.
    """
    from raysae import data
    from raysae.settings import to_dict

    x, _ = ToyData(cfg, d_in).sample(n_tokens)
    return data.write_dataset(
        uri,
        x,
        dtype="float32",
        rows_per_part=rows_per_part,
        model="toy",
        hook="toy",
        overwrite=overwrite,
        harvest={"toy": to_dict(cfg), "n_tokens": n_tokens},
    )


def toy_directions(manifest) -> Tensor | None:
    """The true feature directions of a dataset written by `write_toy_dataset`, else None."""
    from raysae.settings import from_dict

    toy = (manifest.harvest or {}).get("toy")
    if toy is None:
        return None
    return ToyData(from_dict(ToyDataConfig, toy, "toy"), manifest.d_in).directions
