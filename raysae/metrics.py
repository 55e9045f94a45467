"""Mergeable metric accumulators: float64 sums with `update`, `merge`, `compute`.

Across batches, workers and shards the result equals one pass over the concatenated data, so
distributed runs combine the *sums* (never average ratios). Definitions (x: input, x̂:
reconstruction, μ: mean of x over all tokens seen, N tokens):

    fvu                 FVU_A = Σ‖x − x̂‖² / Σ‖x − μ‖²           primary; predicting μ gives 1 exactly
    explained_variance  1 − fvu
    fvu_b               mean_i ‖x_i − x̂_i‖² / ‖x_i − μ_ref‖²   the SAELens/SAEBench "legacy" value;
                        needs a reference mean fixed in advance (per-token ratios cannot be
                        re-centred after the fact), so it is reported only when one is given
    mse                 Σ‖x − x̂‖² / (N · d)
    cos_sim             mean_i cos(x_i, x̂_i)
    l2_ratio            mean_i ‖x̂_i‖ / ‖x_i‖
    relative_reconstruction_bias   Σ‖x̂‖² / Σ⟨x, x̂⟩   (1 when unbiased; c for x̂ = c·x)

The variance about the mean is kept with Chan et al.'s pairwise update (count, mean, M2), not
as Σx² − (Σx)²/N, which loses everything to cancellation when |μ| ≫ σ (in float32 that gave
4.4e7 for a true 2.6e5; see notes/sae-reference.md).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens is 'dense'."""


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


class ReconstructionStats:
    """Accumulates reconstruction quality of x̂ against x. See the module docstring."""

    def __init__(self, d_in: int, reference_mean: Optional[Tensor] = None):
        self.d_in = d_in
        self.reference_mean = None if reference_mean is None else _f64(reference_mean).cpu()
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean = torch.zeros(self.d_in, dtype=torch.float64)
        self.m2 = 0.0  # Σ‖x − mean‖² over tokens seen
        self.sse = 0.0  # Σ‖x − x̂‖²
        self.sum_fvu_b = 0.0
        self.sum_cos = 0.0
        self.sum_l2_ratio = 0.0
        self.sum_xhat_sq = 0.0
        self.sum_x_dot_xhat = 0.0

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: (B, d_in), any float dtype and device."""
        if x.shape != x_hat.shape or x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected x and x_hat of shape (B, {self.d_in}), "
                             f"got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        x, x_hat = _f64(x).cpu(), _f64(x_hat).cpu()
        b = x.shape[0]
        if b == 0:
            return
        err = (x - x_hat).pow(2).sum(-1)
        x_norm, xhat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.sse += float(err.sum())
        self.sum_cos += float(((x * x_hat).sum(-1) / (x_norm * xhat_norm).clamp_min(1e-30)).sum())
        self.sum_l2_ratio += float((xhat_norm / x_norm.clamp_min(1e-30)).sum())
        self.sum_xhat_sq += float(xhat_norm.pow(2).sum())
        self.sum_x_dot_xhat += float((x * x_hat).sum())
        if self.reference_mean is not None:
            denom = (x - self.reference_mean).pow(2).sum(-1).clamp_min(1e-30)
            self.sum_fvu_b += float((err / denom).sum())
        batch_mean = x.mean(0)
        self._merge_moments(b, batch_mean, float((x - batch_mean).pow(2).sum()))

    def _merge_moments(self, n_b: int, mean_b: Tensor, m2_b: float) -> None:
        n = self.n + n_b
        delta = mean_b - self.mean
        self.m2 += m2_b + float(delta.pow(2).sum()) * self.n * n_b / n
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    def merge(self, other: "ReconstructionStats") -> "ReconstructionStats":
        """Fold `other` into self (order-independent up to float64 rounding); returns self."""
        if other.d_in != self.d_in:
            raise ValueError(f"cannot merge stats of d_in={other.d_in} into d_in={self.d_in}")
        if other.n:
            for name in ("sse", "sum_fvu_b", "sum_cos", "sum_l2_ratio", "sum_xhat_sq",
                         "sum_x_dot_xhat"):
                setattr(self, name, getattr(self, name) + getattr(other, name))
            self._merge_moments(other.n, other.mean, other.m2)
        return self

    def compute(self) -> dict[str, float]:
        n = max(self.n, 1)
        fvu = self.sse / self.m2 if self.m2 > 0 else math.nan
        out = {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sse / (n * self.d_in),
            "cos_sim": self.sum_cos / n,
            "l2_ratio": self.sum_l2_ratio / n,
            "relative_reconstruction_bias": (self.sum_xhat_sq / self.sum_x_dot_xhat
                                             if self.sum_x_dot_xhat else math.nan),
            "n_tokens": self.n,
        }
        if self.reference_mean is not None:
            out["fvu_b"] = self.sum_fvu_b / n
        return out

    # Flat float64 vector of the state, for all-reduce / all-gather across workers.
    def state_tensor(self) -> Tensor:
        scalars = torch.tensor([self.n, self.m2, self.sse, self.sum_fvu_b, self.sum_cos,
                                self.sum_l2_ratio, self.sum_xhat_sq, self.sum_x_dot_xhat],
                               dtype=torch.float64)
        return torch.cat([scalars, self.mean])

    @classmethod
    def from_state_tensor(cls, t: Tensor, d_in: int, reference_mean=None) -> "ReconstructionStats":
        s = cls(d_in, reference_mean)
        t = t.to(torch.float64).cpu()
        (n, s.m2, s.sse, s.sum_fvu_b, s.sum_cos, s.sum_l2_ratio, s.sum_xhat_sq,
         s.sum_x_dot_xhat) = t[:8].tolist()
        s.n = int(round(n))
        s.mean = t[8:].clone()
        return s


class SparsityStats:
    """Accumulates latent sparsity: L0, L1, firing counts, dead and dense latents.

    Dead latents are counted over a window in *tokens*: `tokens_since_fired[i]` is how many
    tokens have passed since latent i last fired (exact, to the token). A latent is dead if it has
    not fired within the last min(dead_window, n_tokens) tokens. Merging treats `other` as the
    data that came after self (concatenation), which is associative.
    """

    N_HIST_BINS = 20

    def __init__(self, n_latents: int, dead_window: int = 10_000_000):
        self.n_latents = n_latents
        self.dead_window = dead_window
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.int64)
        self.tokens_since_fired = torch.zeros(self.n_latents, dtype=torch.int64)

    @torch.no_grad()
    def update(self, latents: Tensor) -> None:
        """latents: (B, n_latents)."""
        if latents.ndim != 2 or latents.shape[1] != self.n_latents:
            raise ValueError(f"expected latents of shape (B, {self.n_latents}), "
                             f"got {tuple(latents.shape)}")
        b = latents.shape[0]
        active = (latents != 0).cpu()
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(_f64(latents).abs().sum())
        counts = active.sum(0)
        self.fire_counts += counts
        # Tokens since the last firing within this batch = its distance from the batch end;
        # argmax over the reversed flags finds the first True from the end (no (B, n) index tensor).
        if b:
            since_in_batch = active.flip(0).to(torch.uint8).argmax(0).to(torch.int64)
            self.tokens_since_fired = torch.where(counts > 0, since_in_batch,
                                                  self.tokens_since_fired + b)
        self.n += b

    def merge(self, other: "SparsityStats") -> "SparsityStats":
        """Fold in `other`, taken to follow self in the token stream; returns self."""
        if other.n_latents != self.n_latents:
            raise ValueError(f"cannot merge stats of {other.n_latents} latents into {self.n_latents}")
        fired_later = other.fire_counts > 0
        self.tokens_since_fired = torch.where(fired_later, other.tokens_since_fired,
                                              self.tokens_since_fired + other.n)
        self.sum_l0 += other.sum_l0
        self.sum_l1 += other.sum_l1
        self.fire_counts = self.fire_counts + other.fire_counts
        self.n += other.n
        return self

    def frequencies(self) -> Tensor:
        """(n_latents,) fraction of tokens on which each latent fired."""
        return self.fire_counts.to(torch.float64) / max(self.n, 1)

    def compute(self) -> dict:
        n = max(self.n, 1)
        freq = self.frequencies()
        window = min(self.dead_window, self.n)
        dead = self.tokens_since_fired >= window if self.n else torch.zeros_like(freq, dtype=torch.bool)
        return {
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "dead_fraction": float(dead.double().mean()),
            "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()),
            "frequency_histogram": frequency_histogram(freq, self.N_HIST_BINS),
        }


def frequency_histogram(freq: Tensor, bins: int = 20) -> dict:
    """Histogram of log10 firing frequency over [1e-8, 1], plus the count that never fired."""
    freq = freq.double().cpu().numpy()
    fired = freq[freq > 0]
    counts, edges = np.histogram(np.log10(np.clip(fired, 1e-8, 1.0)), bins=bins, range=(-8.0, 0.0))
    return {"log10_edges": edges.tolist(), "counts": counts.tolist(),
            "never_fired": int((freq == 0).sum())}
