"""Baselines an SAE must beat, scored on the same data through the same accumulators.

Each baseline is a tiny autoencoder with a centre μ (the data mean, playing b_dec) and a
decoder D (n_latents, d_in); `forward(x)` returns (x̂, latents) like an SAE, so
raysae.evaluate scores it exactly as it scores the SAE:

    mean              x̂ = μ                                   no latents; FVU_A = 1 by definition
    pca_k             x̂ = μ + V_kᵀ V_k (x − μ)                V_k: top-k principal directions;
                      the best any k-dimensional linear code can do (Eckart–Young); L0 = k, dense
    kmeans_K          x̂ = c_j, the nearest of K centroids     an SAE with L0 = 1 and magnitude 1
    kmeans_K_scaled   x̂ = μ + a (c_j − μ), a ≥ 0, with the centroid and magnitude that minimise
                      ‖x − x̂‖²: an L0 = 1 SAE with b_dec = μ and a free magnitude; never worse
                      than the nearest centroid (a = 1 is one of its choices)

(k-means explains ~72–87 % of the variance of GPT-2/Pythia residual streams, SAEs 90 %+.)

PCA comes from the exact float64 covariance of a metrics.Moments accumulator (one pass,
mergeable) through `torch.linalg.eigh`. k-means is scikit-learn's MiniBatchKMeans, fitted on a
sample held in memory (centred on μ, in float64); centroids are then used in float64.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from raysae.metrics import Moments

_TINY = torch.finfo(torch.float64).tiny


class Baseline:
    """A fixed reconstruction rule. `forward(x)`: x (B, d_in) → (x̂ (B, d_in), latents (B, n))."""

    name: str

    def __init__(self, name: str, mean: Tensor, decoder: Tensor):
        self.name = name
        self.mean = mean.detach().to(torch.float64)
        """(d_in,) the data mean μ."""
        self.decoder = decoder.detach().to(torch.float64)
        """(n_latents, d_in) what one unit of each latent adds to μ."""

    @property
    def W_dec(self) -> Tensor:
        """The decoder under an SAE's name, so raysae.metrics.latent_norms reads both."""
        return self.decoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.forward(x)

    def _centred(self, x: Tensor) -> Tensor:
        self.mean, self.decoder = self.mean.to(x.device), self.decoder.to(x.device)
        return x.detach().to(torch.float64) - self.mean


class MeanBaseline(Baseline):
    """Predicts the data mean for every token."""

    def __init__(self, mean: Tensor):
        super().__init__("mean", mean, torch.zeros(0, mean.shape[0]))

    def forward(self, x):
        z = self._centred(x)
        return self.mean.expand_as(z), z.new_zeros(z.shape[0], 0)


class PCABaseline(Baseline):
    """Projects onto the top-k principal directions; latents are the k coordinates."""

    def __init__(self, mean: Tensor, components: Tensor):
        super().__init__(f"pca_k={components.shape[0]}", mean, components)

    def forward(self, x):
        coords = self._centred(x) @ self.decoder.T
        return self.mean + coords @ self.decoder, coords


class KMeansBaseline(Baseline):
    """One centroid per token: the nearest (scaled=False), or the best with a free magnitude."""

    def __init__(self, mean: Tensor, centroids: Tensor, scaled: bool):
        suffix = "_scaled" if scaled else ""
        super().__init__(
            f"kmeans_K={centroids.shape[0]}{suffix}",
            mean,
            centroids.to(torch.float64) - mean.to(torch.float64),
        )
        self.scaled = scaled

    def forward(self, x):
        z = self._centred(x)
        # float64 throughout: in float32, near-parallel centroids tie and the scaled choice
        # could come out worse than the nearest centroid (see tests/test_baselines.py).
        dots = z @ self.decoder.T  # (B, K)
        sq_norms = self.decoder.pow(2).sum(-1)
        if self.scaled:
            # Error of the best a ≥ 0 for centroid j: ‖z‖² − relu(⟨z, D_j⟩)² / ‖D_j‖².
            j = (dots.clamp_min(0).pow(2) / sq_norms.clamp_min(_TINY)).argmax(-1)
            a = (dots.gather(1, j[:, None]).squeeze(1) / sq_norms[j].clamp_min(_TINY)).clamp_min(0)
        else:
            # ‖z − D_j‖² = ‖z‖² − 2⟨z, D_j⟩ + ‖D_j‖²
            j = (sq_norms - 2 * dots).argmin(-1)
            a = torch.ones(z.shape[0], dtype=z.dtype, device=z.device)
        latents = torch.zeros(dots.shape, dtype=z.dtype, device=z.device)
        latents.scatter_(1, j[:, None], a[:, None])
        return self.mean + a[:, None] * self.decoder[j], latents


def pca_baselines(moments: Moments, ks: Sequence[int]) -> list[PCABaseline]:
    """PCA-k for each k, from an accumulator of the data's full (d, d) scatter."""
    if not moments.full:
        raise ValueError("PCA needs the full covariance: accumulate with Moments(d, full=True)")
    bad = [k for k in ks if not 0 < k <= moments.d]
    if bad:
        raise ValueError(f"PCA k={bad[0]} must be in 1..d_in={moments.d}")
    if not ks:
        return []
    _, vectors = torch.linalg.eigh(moments.covariance())  # eigenvalues ascending
    principal = vectors.flip(-1).T  # (d, d), rows by decreasing variance
    return [PCABaseline(moments.mean, principal[:k]) for k in ks]


def kmeans_baselines(
    sample: Tensor, mean: Tensor, ks: Sequence[int], seed: int = 0
) -> list[KMeansBaseline]:
    """For each K, MiniBatchKMeans on `sample` (N, d_in); both the nearest-centroid and the
    scaled baseline share the centroids."""
    from sklearn.cluster import MiniBatchKMeans  # imported here: it takes ~1 s

    out: list[KMeansBaseline] = []
    mean = mean.detach().to(torch.float64).cpu()
    # Fitted on x − μ (centroids of raw activations with |μ| ≫ σ would carry rounding of |μ|),
    # in float64: for float32 input scikit-learn's k-means++ upcasts the distances chunk by
    # chunk, ~7× slower (measured: 117 s against 16 s for K=256 on 6,144 rows, d=576); with
    # K=2048 that seeding was most of `raysae eval`'s 6-10 minutes on the quickstart data.
    data = (sample.detach().cpu().to(torch.float64) - mean).numpy()
    for k in ks:
        if not 0 < k <= len(data):
            raise ValueError(
                f"k-means K={k} needs 1..{len(data)} centroids: the k-means sample "
                f"has {len(data)} tokens; lower K or raise the sample size"
            )
        km = MiniBatchKMeans(
            n_clusters=k, batch_size=min(2048, len(data)), n_init=1, random_state=seed
        ).fit(data)
        centroids = mean + torch.from_numpy(np.asarray(km.cluster_centers_, dtype=np.float64))
        out += [
            KMeansBaseline(mean, centroids, scaled=False),
            KMeansBaseline(mean, centroids, scaled=True),
        ]
    return out


def fit_baselines(
    moments: Moments,
    kmeans_sample: Tensor,
    pca_ks: Sequence[int],
    kmeans_ks: Sequence[int],
    seed: int = 0,
) -> list[Baseline]:
    """The mean, PCA-k for each k and k-means (both kinds) for each K."""
    if moments.n == 0:
        raise ValueError("no data to fit baselines on: the evaluation stream was empty")
    return [
        MeanBaseline(moments.mean),
        *pca_baselines(moments, pca_ks),
        *kmeans_baselines(kmeans_sample, moments.mean, kmeans_ks, seed),
    ]


def default_kmeans_k(n_latents: int, sample_tokens: int, min_tokens_per_centroid: int = 4) -> int:
    """K = the SAE's dictionary size, capped so each centroid has a few sample tokens."""
    return max(1, min(n_latents, sample_tokens // min_tokens_per_centroid))


def default_pca_k(l0: float, d_in: int) -> int:
    """k = the SAE's measured L0 rounded (at least 1, at most d_in): PCA at the same L0."""
    return int(min(d_in, max(1, round(l0)))) if math.isfinite(l0) else 1
