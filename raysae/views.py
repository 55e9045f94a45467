"""Metrics of parts of an SAE's reconstruction: each crosscoder source, each Matryoshka prefix,
and the crosscoder's per-latent decoder-norm split between sources.

    crosscoder            source_<s>/fvu  FVU_A of source s alone: x_s against x̂_s
    matryoshka_batchtopk  prefix_<j>/fvu  FVU_A of x against the reconstruction from groups
                                          0..j only (every prefix but the whole dictionary,
                                          whose FVU is the SAE's own `fvu`)

Each view is a ReconstructionStats (the float64 accumulator every reconstruction metric uses),
so views merge across batches and workers exactly as the SAE's own metrics do. The decoder
analysis (`decoder_norm_split`) reads only the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch
from torch import Tensor

from raysae.metrics import ReconstructionStats
from raysae.saes import SAEOutput, SparseAutoencoder

SPECIFIC = 0.1
"""A latent whose decoder-norm share in a source is below this writes (almost) only to the
other sources: specific to them."""
SHARED = (0.3, 0.7)
"""Two sources: a latent whose source-1 share lies in this range counts as shared."""

HISTOGRAM_BINS = 20
"""Bins over [0, 1] of the relative-decoder-norm histogram."""


def view_pairs(model: SparseAutoencoder, x: Tensor, out: SAEOutput) -> dict[str, tuple]:
    """{view name: (x part, x̂ part)} of one batch x (B, d_in) and the model's output on it;
    {} for architectures without views."""
    if not has_views(model):
        return {}
    if model.cfg.architecture == "crosscoder":
        S = model.cfg.n_sources
        return {
            f"source_{s}": pair
            for s, pair in enumerate(zip(x.chunk(S, dim=1), out.x_hat.chunk(S, dim=1)))
        }
    s = model.input_scale
    x_s = x.to(model.W_dec.dtype) * s
    *inner, _ = model.prefix_reconstructions(x_s, out.sparse)
    return {f"prefix_{j}": (x, x_hat / s) for j, x_hat in enumerate(inner)}


def has_views(model: SparseAutoencoder) -> bool:
    """Whether `view_pairs` gives `model` any view (a crosscoder of ≥ 2 sources, a Matryoshka
    SAE of ≥ 2 groups), from its config alone."""
    cfg = model.cfg
    if cfg.architecture == "crosscoder":
        return cfg.n_sources > 1
    return cfg.architecture == "matryoshka_batchtopk" and len(model.bounds) > 1


class ViewStats:
    """One ReconstructionStats per view of `model` (see `view_pairs`)."""

    def __init__(self, model: Optional[SparseAutoencoder] = None):
        """model: the SAE `update` reads the views of; None for an observer of a pass
        (raysae.scoring), which is handed the model with every chunk and so pickles small."""
        self.model, self.stats = model, {}

    @torch.no_grad()
    def update(self, x: Tensor, out: SAEOutput, model: Optional[SparseAutoencoder] = None) -> None:
        for name, (part, part_hat) in view_pairs(model or self.model, x, out).items():
            if name not in self.stats:
                self.stats[name] = ReconstructionStats(part.shape[1])
            self.stats[name].update(part, part_hat)

    def observe(self, model: SparseAutoencoder, columns: dict, x: Tensor, out, rows) -> None:
        """raysae.scoring.Observer."""
        self.update(x, out, model)

    def merge(self, other: ViewStats) -> ViewStats:
        """Fold in another share of the rows' views; returns self."""
        for name, stats in other.stats.items():
            if name in self.stats:
                self.stats[name].merge(stats)
            else:
                self.stats[name] = stats
        return self

    def compute(
        self, merge: Callable[[ReconstructionStats], ReconstructionStats] = lambda r: r
    ) -> dict[str, float]:
        """ "<view>/fvu", "<view>/explained_variance" and "<view>/mse" of every view; `merge`
        combines a view's stats across workers (`loop.World.merge_recon`)."""
        out = {}
        for name, stats in self.stats.items():
            metrics = merge(stats).compute()
            out.update({f"{name}/{k}": metrics[k] for k in ("fvu", "explained_variance", "mse")})
        return out


@torch.no_grad()
def view_metrics(model: SparseAutoencoder, batches: Iterable[Tensor], n_tokens: int) -> dict:
    """The views' metrics of `model`, in inference mode, over the first n_tokens rows of
    `batches` (one process), and its `decoder_norm_split` under "decoder_norms/"."""
    views, seen = ViewStats(model), 0
    with model.evaluating():
        for x in batches:
            if seen >= n_tokens:
                break
            x = x[: n_tokens - seen].to(model.W_dec.device)
            views.update(x, model(x))
            seen += x.shape[0]
    return view_report(model, views)


def view_report(model: SparseAutoencoder, views: ViewStats) -> dict:
    """The views' metrics of a pass and the model's `decoder_norm_split` under "decoder_norms/"."""
    split = decoder_norm_split(model)
    return {**views.compute(), **{f"decoder_norms/{k}": v for k, v in split.items()}}


def result_columns(metrics: dict) -> dict:
    """The views' columns of a sweep's results row: each view's FVU and the crosscoder's
    shared / specific fractions (the histogram stays in metrics.json)."""
    return {
        k: v
        for k, v in metrics.items()
        if k.endswith("/fvu") or (k.startswith("decoder_norms/") and isinstance(v, float))
    }


def summary_lines(metrics: dict) -> list[str]:
    """Console lines for the views in an evaluation's metrics (none for a plain SAE)."""
    fvus = {k[: -len("/fvu")]: v for k, v in metrics.items() if k.endswith("/fvu")}
    lines = [" ".join(f"{name} fvu {v:.4f}" for name, v in fvus.items())] if fvus else []
    split = {
        k[len("decoder_norms/") :]: v for k, v in metrics.items() if k.startswith("decoder_norms/")
    }
    return lines + histogram_lines(split)


def decoder_norm_split(model: SparseAutoencoder, fired: Optional[Tensor] = None) -> dict:
    """A crosscoder's latents by how they split their decoder norm between sources; {} for
    other SAEs. For S = 2 the statistic of model diffing (Lindsey et al. 2024): the relative
    norm r_i = ‖W_dec[i, 1]‖ / (‖W_dec[i, 0]‖ + ‖W_dec[i, 1]‖), as a histogram over [0, 1] and
    the fractions of latents specific to source 0 (r < SPECIFIC), to source 1 (r > 1 −
    SPECIFIC), and shared (0.3 ≤ r ≤ 0.7). For S > 2: each source's share histogram. `fired`
    ((n_latents,) bool, e.g. from the held-out evaluation) restricts it to latents that fired."""
    if model.cfg.architecture != "crosscoder" or model.cfg.n_sources < 2:
        return {}
    shares = model.relative_norms().cpu()
    if fired is not None:
        shares = shares[fired.cpu()]
    n = max(len(shares), 1)
    edges = torch.linspace(0, 1, HISTOGRAM_BINS + 1)
    split = {"latents": len(shares), "bin_edges": edges.tolist()}
    for s in range(model.cfg.n_sources):
        split[f"source_{s}_share_histogram"] = (
            torch.histc(shares[:, s], HISTOGRAM_BINS, 0.0, 1.0).long().tolist()
        )
    if model.cfg.n_sources == 2:
        r = shares[:, 1]
        split["source_0_specific"] = float((r < SPECIFIC).sum()) / n
        split["source_1_specific"] = float((r > 1 - SPECIFIC).sum()) / n
        split["shared"] = float(((r >= SHARED[0]) & (r <= SHARED[1])).sum()) / n
    return split


def histogram_lines(split: dict, width: int = 40) -> list[str]:
    """Console lines drawing a `decoder_norm_split` histogram of source 1's share."""
    counts = split.get("source_1_share_histogram")
    if not counts:
        return []
    top, edges = max(max(counts), 1), split["bin_edges"]
    lines = [f"relative decoder norm (source 1 share) of {split['latents']} latents:"]
    for count, lo, hi in zip(counts, edges, edges[1:]):
        lines.append(f"  {lo:4.2f}-{hi:4.2f} {'#' * round(width * count / top):<{width}} {count}")
    lines.append(
        f"  specific to source 0: {split['source_0_specific']:.1%}, to source 1: "
        f"{split['source_1_specific']:.1%}, shared (0.3-0.7): {split['shared']:.1%}"
    )
    return lines
