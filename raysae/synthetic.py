"""Toy activations with ground-truth features, and a score for how well an SAE recovers them.

Each token is a sparse non-negative combination of `n_features` unit directions in `d_in`
dimensions (n_features > d_in: superposition, Elhage et al. 2022):

    x = Σ_i a_i m_i f_i + noise,   a_i ∈ {0, 1} active flags, m_i ≥ 0 magnitudes, f_i ∈ R^d unit

Feature frequencies can follow a power law. Two structured cases researchers use to probe SAEs:
- correlated groups: when a group's first feature fires, each other member also fires with
  probability `correlation` (on top of its own base rate) — tempts an SAE to merge features;
- one-hot sets: exactly one feature of each set fires per token ("two sets of one-hot
  features", composition) — tempts an SAE to learn the products instead of the factors;
- hierarchies: a parent feature whose children fire only with it (each with probability
  `child_probability` when it fires) — tempts an SAE to absorb the parent into its children
  (the parent's latent then stays off when a child fires; `parent_recall` measures it).

`PairedToyData` is the crosscoder's toy: the same features seen from several sources, each
feature present in some of them (source A only, B only, or both).

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
        """Place correlated groups first, one-hot sets next, then hierarchies (parents, then
        their children, parent-major), independent features last."""
        c = self.cfg
        n_grouped = c.n_correlated_groups * c.correlated_group_size
        n_one_hot = c.n_one_hot_sets * c.one_hot_set_size
        self.groups = torch.arange(n_grouped).view(c.n_correlated_groups, c.correlated_group_size)
        self.one_hot_sets = (torch.arange(n_one_hot) + n_grouped).view(
            c.n_one_hot_sets, c.one_hot_set_size
        )
        start = n_grouped + n_one_hot
        self.parents = torch.arange(c.n_hierarchies) + start
        n_children = c.n_hierarchies * c.children_per_parent
        self.children = (torch.arange(n_children) + start + c.n_hierarchies).view(
            c.n_hierarchies, c.children_per_parent
        )
        # Base firing probabilities of the free features (not one-hot, not children): power
        # law, scaled so the expected number of active free features per token (one-hot sets
        # contribute one each; children come on top) is as asked.
        free = torch.cat(
            [
                torch.arange(n_grouped),
                self.parents,
                torch.arange(start + c.n_hierarchies + n_children, c.n_features),
            ]
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
        if c.n_hierarchies:
            parent_on = active[:, self.parents]  # (N, parents)
            child_on = torch.rand(n_tokens, *self.children.shape, generator=g)
            active[:, self.children] = parent_on[:, :, None] & (child_on < c.child_probability)
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


class PairedToyData(ToyData):
    """Toy features seen from two sources at once (a crosscoder's data): each token is
    [x_A; x_B], d_in = 2 · d_source. The first third of the features is in source A only, the
    second in B only, the rest in both: `presence` (n_features, 2) says which. A feature's
    direction is a unit vector in each source it is in (zero in the other), so a shared
    feature writes with equal norm to both."""

    def __init__(self, cfg: ToyDataConfig, d_source: int, stream: int = 0):
        super().__init__(cfg, 2 * d_source, stream)
        n = cfg.n_features
        third = n // 3
        self.presence = torch.ones(n, 2, dtype=torch.bool)
        self.presence[:third, 1] = False
        self.presence[third : 2 * third, 0] = False
        per_source = self.directions.view(n, 2, d_source)
        per_source = per_source / per_source.norm(dim=-1, keepdim=True) * self.presence[..., None]
        self.directions = per_source.reshape(n, 2 * d_source)

    def by_presence(self) -> dict[str, Tensor]:
        """Feature indices by where they are: "a_only", "b_only", "shared"."""
        a, b = self.presence[:, 0], self.presence[:, 1]
        return {
            "a_only": (a & ~b).nonzero().flatten(),
            "b_only": (~a & b).nonzero().flatten(),
            "shared": (a & b).nonzero().flatten(),
        }


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


@torch.no_grad()
def parent_recall(toy: ToyData, sae, n_tokens: int = 8192) -> Tensor:
    """(n_hierarchies,) for each planted parent, the fraction of the tokens where it is active
    on which its latent fires — its latent being the one whose decoder row is closest (cosine)
    to the parent's direction. An SAE that absorbed the parent into its children leaves that
    latent off whenever a child fires (Chanin et al. 2024, "A is for Absorption")."""
    w = sae.W_dec.detach().float()
    cos = (toy.directions[toy.parents] @ (w / w.norm(dim=-1, keepdim=True)).T).abs()
    latent = cos.argmax(-1)  # (parents,)
    x, features = toy.sample(n_tokens)
    with sae.evaluating():
        fires = sae.encode(x)[:, latent] > 0  # (N, parents)
    on = features[:, toy.parents] > 0
    return (fires & on).sum(0) / on.sum(0).clamp_min(1)


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
