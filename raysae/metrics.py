"""Mergeable metric accumulators: float64 sums with `update`, `merge`, `compute`.

Across batches, workers and shards the result equals one pass over the concatenated data, so
distributed runs combine the *sums* (never average ratios). Definitions (x: input, x̂:
reconstruction, μ: mean of x over all tokens seen, N tokens, d = d_in):

    fvu                 FVU_A = Σ‖x − x̂‖² / Σ‖x − μ‖²           primary; predicting μ gives 1
    explained_variance  1 − fvu
    fvu_b               mean_i ‖x_i − x̂_i‖² / ‖x_i − μ_ref‖²   the SAELens/SAEBench "legacy" value;
                        needs a reference mean fixed in advance (per-token ratios cannot be
                        re-centred after the fact), so it is reported only when one is given;
                        tokens equal to μ_ref (ratio undefined) are left out of the mean
    mse                 Σ‖x − x̂‖² / (N · d)
    cos_sim             mean_i cos(x_i, x̂_i)                   over tokens with x_i ≠ 0 (a
                        per-token ratio is undefined for x_i = 0); 0 where x̂_i = 0
    l2_ratio            mean_i ‖x̂_i‖ / ‖x_i‖                   over tokens with x_i ≠ 0
    relative_reconstruction_bias   Σ‖x̂‖² / Σ⟨x, x̂⟩   argmin_γ Σ‖x̂/γ − x‖² (Rajamanoharan et al.
                        2024): 1 when unbiased, c for x̂ = c·x, < 1 when the SAE shrinks
    l0                  mean over tokens of ‖f‖₀ (f: latents)
    l1                  mean over tokens of Σ_i |f_i| · n_i, n_i = `latent_norms`: the length,
                        in units of the input activations, of what one unit of latent i adds
                        to x̂ (for an SAE ‖W_dec[i]‖ / input_scale). One definition for
                        training, its held-out evaluation and `raysae eval`, whether the
                        SAE's input scale is folded in or not, and for the baselines
    dead_fraction       latents that did not fire in the last `dead_window` tokens
    dense_fraction      latents firing on more than 10 % of tokens

The variance about the mean is kept with Chan et al.'s pairwise update (count, mean, M2), not
as Σx² − (Σx)²/N, which loses everything to cancellation when |μ| ≫ σ (in float32 that gave
4.4e7 for a true 2.6e5, a bug another library shipped).

State lives on the device of the data it was updated with, so `update` never waits for the
GPU; `compute` copies the few sums to the host.

Across workers: all-gather each worker's `state_tensor()` and fold the states together with
`from_state_tensor(...)` and `merge`. Do not SUM-all-reduce the state: the variance merges by
Chan's update and the last-fired positions by max; every other field is a plain sum.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from raysae.saes.sparse import SparseLatents

DENSE_THRESHOLD = 0.1
"""A latent firing on more than this fraction of tokens is 'dense'."""

_TINY = torch.finfo(torch.float64).tiny
"""Denominator floor: 0/0 per-token ratios become 0 rather than NaN."""

_BLOCK_ELEMENTS = 1 << 17
"""ReconstructionStats on CPU works through a batch in blocks of about this many elements
(1 MiB of float64), so its temporaries stay in cache and are reused, never page-faulted."""


class Moments:
    """Count, mean and scatter of d-vectors, merged exactly (Chan, Golub & LeVeque 1979).

        n, mean x̄, scatter = Σ (x − x̄)(x − x̄)ᵀ   (full=True: a (d, d) matrix, for PCA)
                          or Σ ‖x − x̄‖²          (full=False: its trace, a scalar)

    Two parts combine as n = n_a + n_b, δ = x̄_b − x̄_a, x̄ = x̄_a + δ·n_b/n,
    scatter = scatter_a + scatter_b + δδᵀ·n_a·n_b/n — stable however large |x̄| is.
    """

    def __init__(self, d: int, full: bool = False):
        self.d, self.full = d, full
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean = torch.zeros(self.d, dtype=torch.float64)
        self.scatter = torch.zeros((self.d, self.d) if self.full else (), dtype=torch.float64)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """x: (B, d), any float dtype and device."""
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"expected x of shape (B, {self.d}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        x = x.detach().to(torch.float64)
        mean = x.mean(0)
        centred = x - mean
        scatter = centred.T @ centred if self.full else centred.pow(2).sum()
        self._combine(x.shape[0], mean, scatter)

    @torch.no_grad()
    def update_from_groups(self, n: int, counts: Tensor, means: Tensor, scatters: Tensor) -> None:
        """Fold in groups of n rows in all, given by their counts (g,), means (g, d) and
        scatters (g,) (full=False only): the rows' mean is the count-weighted mean of the
        groups' means and their scatter Σ scatter_g + Σ n_g ‖x̄_g − x̄‖², a sum of non-negative
        terms. `n` is passed, not summed from `counts`, so nothing waits for a device."""
        if self.full:
            raise ValueError("update_from_groups needs Moments(d, full=False)")
        if n == 0:
            return
        mean = (counts[:, None] * means).sum(0) / n
        scatter = scatters.sum() + (counts * (means - mean).pow(2).sum(-1)).sum()
        self._combine(n, mean, scatter)

    def merge(self, other: "Moments") -> "Moments":
        """Fold `other` into self; returns self."""
        if (other.d, other.full) != (self.d, self.full):
            raise ValueError(
                f"cannot merge Moments(d={other.d}, full={other.full}) into "
                f"Moments(d={self.d}, full={self.full})"
            )
        if other.n:
            self._combine(other.n, other.mean, other.scatter)
        return self

    def _combine(self, n_b: int, mean_b: Tensor, scatter_b: Tensor) -> None:
        device = mean_b.device
        self.mean, self.scatter = self.mean.to(device), self.scatter.to(device)
        n = self.n + n_b
        delta = mean_b - self.mean
        cross = torch.outer(delta, delta) if self.full else delta.pow(2).sum()
        self.scatter = self.scatter + scatter_b.to(device) + cross * (self.n * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    def total_variance(self) -> Tensor:
        """Σ‖x − x̄‖² (a 0-dim float64 tensor): the total sum of squares about the mean."""
        return self.scatter.trace() if self.full else self.scatter

    def covariance(self) -> Tensor:
        """(d, d) population covariance scatter / n (full=True only)."""
        if not self.full:
            raise ValueError("covariance() needs Moments(d, full=True)")
        return self.scatter / max(self.n, 1)


class ReconstructionStats:
    """Accumulates reconstruction quality of x̂ against x. See the module docstring."""

    SUMS = ("sse", "fvu_b", "n_fvu_b", "cos", "l2_ratio", "n_nonzero", "xhat_sq", "x_dot_xhat")
    """Sums over tokens kept in `sums` (float64), in this order; n_fvu_b and n_nonzero count
    the tokens that the fvu_b and the cos_sim / l2_ratio means are taken over."""

    def __init__(self, d_in: int, reference_mean: Optional[Tensor] = None):
        self.d_in = d_in
        if reference_mean is not None and tuple(reference_mean.shape) != (d_in,):
            raise ValueError(
                f"reference_mean has shape {tuple(reference_mean.shape)}, "
                f"expected ({d_in},): one mean per activation dimension"
            )
        self.reference_mean = (
            None if reference_mean is None else reference_mean.detach().to(torch.float64).cpu()
        )
        self.reset()

    def reset(self) -> None:
        self.moments = Moments(self.d_in)
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64)

    @property
    def n(self) -> int:
        """Tokens seen."""
        return self.moments.n

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: (B, d_in), any float dtype, same device."""
        if x.shape != x_hat.shape or x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(
                f"expected x and x_hat of shape (B, {self.d_in}), "
                f"got {tuple(x.shape)} and {tuple(x_hat.shape)}"
            )
        if x.shape[0] == 0:
            return
        x, x_hat = x.detach(), x_hat.detach()
        # On CPU, in row blocks of about a megabyte of float64: the whole batch's float64 copies
        # and temporaries (19 MB each at B=4096, d=576) were fresh allocations that page-faulted
        # on every step, 30–45 ms a batch against 7–11 ms in blocks (BENCHMARKS.md, "Loop
        # per-batch work"). Only the (rows, d) passes run per block, writing per-row norms and
        # products into (B,) vectors and each block's mean and scatter; everything after them
        # runs once per batch on those vectors (per-op dispatch, not arithmetic, was most of a
        # block's cost). Each block is exact float64 arithmetic; the blocks' moments combine
        # exactly (Moments.update_from_groups). A GPU takes the batch whole (one block).
        B = x.shape[0]
        rows = B if x.device.type != "cpu" else max(1, _BLOCK_ELEMENTS // self.d_in)
        f64 = dict(dtype=torch.float64, device=x.device)
        err, dot, x_norm, xhat_norm, spread = torch.empty(5, B, **f64)
        starts = range(0, B, rows)
        means = torch.empty(len(starts), self.d_in, **f64)
        scatters = torch.empty(len(starts), **f64)
        reference = None if self.reference_mean is None else self.reference_mean.to(x.device)
        norm = torch.linalg.vector_norm
        for i, lo in enumerate(starts):
            hi = min(lo + rows, B)
            xb, hb = x[lo:hi].to(torch.float64), x_hat[lo:hi].to(torch.float64)
            # Squared norms as vector_norm(...)² (squared below): one fused pass, no temporary.
            norm(xb - hb, dim=-1, out=err[lo:hi])
            torch.sum(xb * hb, -1, out=dot[lo:hi])
            norm(xb, dim=-1, out=x_norm[lo:hi])
            norm(hb, dim=-1, out=xhat_norm[lo:hi])
            if reference is not None:
                norm(xb - reference, dim=-1, out=spread[lo:hi])
            torch.mean(xb, 0, out=means[i])
            norm(xb - means[i], out=scatters[i])
        err.pow_(2)
        counts = torch.full((len(starts),), float(rows), **f64)
        counts[-1] = B - starts[-1]  # the last block may be short
        self.moments.update_from_groups(B, counts, means, scatters.pow_(2))
        nonzero = x_norm > 0
        zero = torch.zeros((), **f64)
        fvu_b, n_fvu_b = zero, zero
        if reference is not None:
            spread.pow_(2)
            fvu_b = torch.where(spread > 0, err / spread.clamp_min(_TINY), 0.0).sum()
            n_fvu_b = (spread > 0).sum().to(torch.float64)
        cos = dot / (x_norm * xhat_norm).clamp_min(_TINY)
        l2_ratio = torch.where(nonzero, xhat_norm / x_norm.clamp_min(_TINY), 0.0)
        batch = torch.stack(
            [
                err.sum(),
                fvu_b,
                n_fvu_b,
                cos.sum(),
                l2_ratio.sum(),
                nonzero.sum().to(torch.float64),
                xhat_norm.pow(2).sum(),
                dot.sum(),
            ]
        )
        self.sums = self.sums.to(x.device) + batch

    def merge(self, other: "ReconstructionStats") -> "ReconstructionStats":
        """Fold `other` into self (order-independent up to float64 rounding); returns self."""
        if other.d_in != self.d_in:
            raise ValueError(f"cannot merge stats of d_in={other.d_in} into d_in={self.d_in}")
        if not _same_reference(self.reference_mean, other.reference_mean):
            raise ValueError(
                "cannot merge ReconstructionStats with different reference means: "
                "fvu_b sums are only comparable about the same mean; give every "
                "worker the same reference_mean"
            )
        if other.n:
            self.sums = self.sums + other.sums.to(self.sums.device)
            self.moments.merge(other.moments)
        return self

    def compute(self) -> dict[str, float]:
        n = self.n
        sums = dict(zip(self.SUMS, self.sums.tolist()))
        tss = float(self.moments.total_variance())
        fvu = _ratio(sums["sse"], tss)
        out = {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": _ratio(sums["sse"], n * self.d_in),
            "cos_sim": _ratio(sums["cos"], sums["n_nonzero"]),
            "l2_ratio": _ratio(sums["l2_ratio"], sums["n_nonzero"]),
            "relative_reconstruction_bias": _ratio(sums["xhat_sq"], sums["x_dot_xhat"]),
            "n_tokens": n,
        }
        if self.reference_mean is not None:
            out["fvu_b"] = _ratio(sums["fvu_b"], sums["n_fvu_b"])
        return out

    def state_tensor(self) -> Tensor:
        """Flat float64 state [n, Σ‖x − x̄‖², *sums, *mean], for all-gather across workers."""
        head = torch.stack(
            [torch.tensor(float(self.n), dtype=torch.float64), self.moments.total_variance().cpu()]
        )
        return torch.cat(
            [head.to(self.sums.device), self.sums, self.moments.mean.to(self.sums.device)]
        )

    @classmethod
    def from_state_tensor(
        cls, t: Tensor, d_in: int, reference_mean: Optional[Tensor] = None
    ) -> "ReconstructionStats":
        expected = 2 + len(cls.SUMS) + d_in
        if t.shape != (expected,):
            raise ValueError(
                f"state tensor has shape {tuple(t.shape)}, expected ({expected},) for d_in={d_in}"
            )
        s = cls(d_in, reference_mean)
        t = t.to(torch.float64)
        s.moments.n = int(round(float(t[0])))
        s.moments.scatter = t[1].clone()
        s.sums = t[2 : 2 + len(cls.SUMS)].clone()
        s.moments.mean = t[2 + len(cls.SUMS) :].clone()
        return s


def latent_norms(model) -> Tensor:
    """(n_latents,) float64: ‖W_dec[i]‖ / input_scale, the weights of `SparsityStats`'s l1.

    model: an SAE or a raysae.baselines.Baseline; `W_dec` (n_latents, d_in) is what one unit of
    each latent adds to the reconstruction in the model's (scaled) input space, `input_scale`
    (1 if absent, or once folded in) the factor inputs were multiplied by. Weighted so, l1 is
    the length in input units that the code writes: the ReLU SAE's sparsity penalty
    Σ|f_i|‖W_dec[i]‖ (Conerly et al. 2024) in input units. The `loss/l1` term of ReLU and Gated
    SAEs, in scaled units, is l1 · input_scale. Moving scale between latents and decoder cannot
    change it. (A plain mean ‖f‖₁ did: training's latents are in scaled units, the folded
    checkpoint's are those / input_scale, so training and `raysae eval` disagreed by that factor.)
    """
    # Each row's norm in W_dec's own dtype (float32 at least), then float64: casting the whole
    # (n, d) matrix first made a 2.25 GiB temporary at n=131072, d=2304 on every training step,
    # and float64 norms run 10-50x slower on CPU (BENCHMARKS.md, "Large dictionaries on CPU").
    # A float32 norm is good to ~1e-7 relative, far inside what l1 is read for.
    W = model.W_dec.detach()
    norms = W.to(torch.promote_types(W.dtype, torch.float32)).norm(dim=-1).to(torch.float64)
    scale = getattr(model, "input_scale", 1.0)
    if isinstance(scale, Tensor):
        scale = scale.detach().to(norms.device, torch.float64)
    return norms / scale


class SparsityStats:
    """Accumulates latent sparsity: L0, L1, firing counts, dead and dense latents.

    Every token has a position in the stream. `last_fired[i]` is the position of the last token
    on which latent i fired (−1: never); positions begin..end−1 have been tracked. Latent i is
    dead if it did not fire in the last min(dead_window, end − begin) positions, i.e.
    end − 1 − last_fired[i] ≥ that window: with fewer than dead_window tokens tracked, dead means
    never fired. `update(latents, start)` places a batch at positions start..start+B−1 (default:
    right after the last position seen). Merging sums the counts and takes the max of the
    last-fired positions (the min of `begin`, the max of `end`), so it is exact, associative
    and commutative whenever the merged accumulators cover disjoint positions of one stream:
    the parts of a batch, successive batches, or the workers' shares of a step (start = tokens
    before the step + the rank's offset within it).

    `reset_counts()` starts a new logging interval: L0, L1 and frequencies restart while dead
    latents are still judged over the whole window.
    """

    N_HIST_BINS = 20
    """Bins of the log10 firing-frequency histogram in `compute`."""

    def __init__(self, n_latents: int, dead_window: int = 10_000_000):
        if dead_window <= 0:
            raise ValueError(f"dead_window={dead_window} must be a positive number of tokens")
        self.n_latents = n_latents
        self.dead_window = dead_window
        self.reset()

    def reset(self) -> None:
        self.begin = self.end = 0  # begin == end: nothing tracked
        self.last_fired = torch.full((self.n_latents,), -1, dtype=torch.int64)
        self.reset_counts()

    def reset_counts(self) -> None:
        """Zero the token count, L0/L1 sums and fire counts; keep the last-fired positions."""
        self.n = 0
        self.sums = torch.zeros(2, dtype=torch.float64)  # Σ_tokens ‖f‖₀, Σ_tokens Σ_i |f_i| n_i
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.int64)

    @torch.no_grad()
    def update(
        self,
        latents: Union[Tensor, SparseLatents],
        start: Optional[int] = None,
        *,
        latent_norms: Tensor,
    ) -> None:
        """latents: (B, n_latents), or a SparseLatents (the TopK family's active latents, the
        same result without a (B, n_latents) tensor); start: stream position of the first row
        (default self.end); latent_norms: (n_latents,) the l1 weights, from `latent_norms`
        (required: l1 in input units needs the model's decoder norms and input scale)."""
        sparse = isinstance(latents, SparseLatents)
        shape = (latents.n_rows, latents.n_latents) if sparse else tuple(latents.shape)
        if len(shape) != 2 or shape[1] != self.n_latents:
            raise ValueError(f"expected latents of shape (B, {self.n_latents}), got {shape}")
        b = shape[0]
        start = self.end if start is None else start
        if start < 0:
            raise ValueError(f"start={start}: stream positions are >= 0")
        if tuple(latent_norms.shape) != (self.n_latents,):
            raise ValueError(
                f"expected latent_norms of shape ({self.n_latents},), "
                f"got {tuple(latent_norms.shape)}"
            )
        if b == 0:
            return
        self._track(start, start + b)
        self.n += b
        counts, last, abs_sums = (
            _sparse_counts(latents, start) if sparse else _dense_counts(latents.detach(), start)
        )
        self._to(counts.device)
        self.fire_counts += counts
        self.last_fired = torch.maximum(self.last_fired, last)
        l1 = abs_sums @ latent_norms.to(counts.device, torch.float64)
        self.sums += torch.stack([counts.sum().to(torch.float64), l1])

    def _track(self, begin: int, end: int) -> None:
        if begin == end:
            return
        tracked = self.end > self.begin
        self.begin = min(self.begin, begin) if tracked else begin
        self.end = max(self.end, end) if tracked else end

    def _to(self, device: torch.device) -> None:
        self.sums, self.fire_counts, self.last_fired = (
            t.to(device) for t in (self.sums, self.fire_counts, self.last_fired)
        )

    def merge(self, other: "SparsityStats") -> "SparsityStats":
        """Fold in `other` (positions in the same stream); returns self."""
        if other.n_latents != self.n_latents:
            raise ValueError(
                f"cannot merge stats of {other.n_latents} latents into {self.n_latents}"
            )
        device = self.sums.device
        self.sums = self.sums + other.sums.to(device)
        self.fire_counts = self.fire_counts + other.fire_counts.to(device)
        self.last_fired = torch.maximum(self.last_fired, other.last_fired.to(device))
        self.n += other.n
        self._track(other.begin, other.end)
        return self

    def frequencies(self) -> Tensor:
        """(n_latents,) float64 on the CPU: fraction of tokens on which each latent fired."""
        return self.fire_counts.cpu().to(torch.float64) / max(self.n, 1)

    def tokens_since_fired(self) -> Tensor:
        """(n_latents,) int64 on the CPU: positions since each latent last fired (end if never)."""
        return self.end - 1 - self.last_fired.cpu()

    def dead(self) -> Tensor:
        """(n_latents,) bool on the CPU: no firing within the window (see the class docstring)."""
        return self.tokens_since_fired() >= min(self.dead_window, self.end - self.begin)

    def compute(self) -> dict:
        n, tracked = self.n, self.end > self.begin
        l0, l1 = self.sums.tolist()
        freq = self.frequencies()
        return {
            "l0": l0 / n if n else math.nan,
            "l1": l1 / n if n else math.nan,
            "dead_fraction": float(self.dead().double().mean()) if tracked else math.nan,
            "dense_fraction": float((freq > DENSE_THRESHOLD).double().mean()) if n else math.nan,
            "frequency_histogram": frequency_histogram(freq, self.N_HIST_BINS),
        }

    def state_tensor(self) -> Tensor:
        """Flat float64 state [n, begin, end, Σ‖f‖₀, l1 sum, *fire_counts, *last_fired], for
        all-gather. Counts and positions stay exact in float64 up to 2^53 tokens."""
        device = self.sums.device
        head = torch.tensor([self.n, self.begin, self.end], dtype=torch.float64, device=device)
        return torch.cat(
            [head, self.sums, self.fire_counts.to(torch.float64), self.last_fired.to(torch.float64)]
        )

    @classmethod
    def from_state_tensor(
        cls, t: Tensor, n_latents: int, dead_window: int = 10_000_000
    ) -> "SparsityStats":
        expected = 5 + 2 * n_latents
        if t.shape != (expected,):
            raise ValueError(
                f"state tensor has shape {tuple(t.shape)}, expected ({expected},) "
                f"for n_latents={n_latents}"
            )
        s = cls(n_latents, dead_window)
        t = t.to(torch.float64)
        s.n, s.begin, s.end = (int(round(v)) for v in t[:3].tolist())
        s.sums = t[3:5].clone()
        s.fire_counts = t[5 : 5 + n_latents].round().to(torch.int64)
        s.last_fired = t[5 + n_latents :].round().to(torch.int64)
        return s


def _dense_counts(latents: Tensor, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per latent of (B, n) latents: fire count, last stream position fired (−1: none) and
    Σ_tokens |f_i| in float64."""
    active = latents != 0
    # 1 + row of each latent's last firing, 0 if none (int32 keeps the (B, n) temporary small).
    rows = torch.arange(1, latents.shape[0] + 1, dtype=torch.int32, device=latents.device)
    last_row = (active * rows[:, None]).amax(0).to(torch.int64)
    last = torch.where(last_row > 0, start + last_row - 1, -1)
    # Σ_tokens |f_i| per latent (weighted after): (B, n) → (n,) costs what a plain sum did.
    return active.sum(0), last, latents.abs().sum(0, dtype=torch.float64)


def _sparse_counts(latents: SparseLatents, start: int) -> tuple[Tensor, Tensor, Tensor]:
    """`_dense_counts` from the listed entries only: O(nnz), not O(B · n). Integers equal the
    dense ones exactly; the |f| sums to float64 rounding (another order of addition). No
    boolean indexing, so nothing waits for the device."""
    n, values, cols = latents.n_latents, latents.values, latents.cols
    active = values != 0
    counts = torch.zeros(n, dtype=torch.int64, device=values.device)
    counts.index_add_(0, cols, active.to(torch.int64))
    positions = torch.where(active, latents.rows + start, -1)
    last = torch.full((n,), -1, dtype=torch.int64, device=values.device)
    last.scatter_reduce_(0, cols, positions, "amax")
    abs_sums = torch.zeros(n, dtype=torch.float64, device=values.device)
    abs_sums.index_add_(0, cols, values.abs().to(torch.float64))
    return counts, last, abs_sums


def frequency_histogram(freq: Tensor, bins: int = 20) -> dict:
    """Histogram of log10 firing frequency over [1e-8, 1], plus the count that never fired."""
    freq = freq.double().cpu().numpy()
    fired = freq[freq > 0]
    counts, edges = np.histogram(np.log10(np.clip(fired, 1e-8, 1.0)), bins=bins, range=(-8.0, 0.0))
    return {
        "log10_edges": edges.tolist(),
        "counts": counts.tolist(),
        "never_fired": int((freq == 0).sum()),
    }


def scalars(metrics: dict) -> dict:
    """The int and float entries of a metrics dict (drops histograms and other structures)."""
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _same_reference(a: Optional[Tensor], b: Optional[Tensor]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)
