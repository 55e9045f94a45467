"""Metrics by token position: where in its context an SAE reconstructs well or badly.

A token's position is its index in the forward-pass window the model saw, BOS first at 0 (the
first text token of a window with BOS is at 1). SAEs trained on activations harvested at one
context length are known to degrade at later positions; the published evaluations ask for the
curve. Positions fall into buckets `[edges[i], edges[i+1])`, the last one open-ended; each
bucket keeps its own mergeable float64 accumulators (raysae.metrics, raysae.splice), so the
result of split-then-merge equals one pass, as for every other metric:

    fvu, mse, cos_sim, …  a ReconstructionStats per bucket: FVU about that bucket's own mean
                          (1 = predicting the mean activation at those positions)
    l0                    Σ_tokens ‖f‖₀ / tokens of the bucket
    ce_*, kl_*            a SpliceStats per bucket (with the LM): the prediction made at a
                          position counts at that position

Two sources: a harvested dataset's rows (their `pos` column is the index in the *document*;
`window_positions` turns it into the index in the window with the harvest's context length),
which only reach the harvest's context length; or a fresh LM pass (raysae.splice) at any
context length, which also gives CE and KL by position.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from raysae.metrics import ReconstructionStats
from raysae.saes.sparse import SparseLatents


def bucket_edges(context_length: int) -> list[int]:
    """Bucket lower edges covering 0..context_length−1: single positions 0 and 1, powers of two
    to 32, then 16 wide to 64, 32 wide to 256, 64 wide to 512, 128 wide beyond (fine where the
    curve bends early, coarse where it is flat)."""
    edges, p = [0, 1, 2, 4, 8, 16, 32], 32
    while p < context_length:
        p += 16 if p < 64 else 32 if p < 256 else 64 if p < 512 else 128
        edges.append(p)
    return [e for e in edges if e < max(context_length, 1)] or [0]


def window_positions(pos: Tensor, context_length: int, prepend_bos: bool) -> Tensor:
    """Document positions (a dataset's `pos` column; −1 for a prepended BOS) → positions in
    the window, as raysae.text cuts documents: windows of context_length − 1 text tokens after
    a BOS (context_length without one)."""
    step = context_length - int(prepend_bos)
    return torch.where(pos < 0, 0, pos % step + int(prepend_bos))


def l0_per_row(codes: Union[Tensor, SparseLatents]) -> Tensor:
    """(B,) float64 active latents per token, from dense (B, n) latents or a SparseLatents."""
    if isinstance(codes, SparseLatents):
        out = torch.zeros(codes.n_rows, dtype=torch.float64, device=codes.values.device)
        return out.index_add_(0, codes.rows, (codes.values != 0).to(torch.float64))
    return (codes != 0).sum(-1, dtype=torch.float64)


class PositionStats:
    """Per-bucket reconstruction, L0 and (optionally) splice sums; `update`, `merge`, `compute`."""

    def __init__(
        self,
        d_in: int,
        edges: Sequence[int],
        splice: bool = False,
        mean_ablation: bool = True,
        end: Optional[int] = None,
    ):
        """edges: bucket lower edges; end: the context length, which closes the last bucket
        (None: open-ended); splice: also keep SpliceStats per bucket."""
        edges = list(edges)
        if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bucket edges {edges} must start at 0 and increase")
        self.d_in, self.edges, self.end = d_in, edges, end
        self.recon = [ReconstructionStats(d_in) for _ in edges]
        self.l0 = torch.zeros(len(edges), dtype=torch.float64)
        self.splice = None
        if splice:
            from raysae.splice import SpliceStats  # the LM side only where it is used

            self.splice = [SpliceStats(mean_ablation) for _ in edges]

    def buckets(self, positions: Tensor) -> Tensor:
        """(N,) bucket index of each position (≥ 0)."""
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError("token positions are >= 0 (BOS is 0)")
        edges = torch.tensor(self.edges[1:], dtype=torch.int64, device=positions.device)
        return torch.bucketize(positions.to(torch.int64), edges, right=True)

    @torch.no_grad()
    def update(
        self,
        x: Tensor,
        x_hat: Tensor,
        codes: Union[Tensor, SparseLatents],
        positions: Tensor,
    ) -> None:
        """x, x_hat: (B, d_in); codes: the SAE's latents of those rows; positions: (B,)."""
        if positions.shape != (x.shape[0],):
            raise ValueError(f"positions {tuple(positions.shape)} for {x.shape[0]} rows")
        bucket = self.buckets(positions)
        l0 = l0_per_row(codes)
        self.l0 = self.l0.to(l0.device).index_add_(0, bucket.to(l0.device), l0)
        for b in bucket.unique().tolist():
            rows = bucket == b
            self.recon[b].update(x[rows], x_hat[rows])

    @torch.no_grad()
    def update_splice(self, positions: Tensor, targets: Tensor, **runs: Optional[Tensor]) -> None:
        """Per-bucket SpliceStats.update: positions, targets (N,), runs' logits (N, vocab)."""
        bucket = self.buckets(positions)
        for b in bucket.unique().tolist():
            rows = bucket == b
            self.splice[b].update(
                targets[rows], **{k: None if v is None else v[rows] for k, v in runs.items()}
            )

    def merge(self, other: PositionStats) -> PositionStats:
        """Fold `other` (same edges) into self; returns self."""
        if (other.edges, other.end) != (self.edges, self.end) or (other.splice is None) != (
            self.splice is None
        ):
            raise ValueError("cannot merge PositionStats with different buckets")
        for mine, theirs in zip(self.recon, other.recon):
            mine.merge(theirs)
        self.l0 = self.l0 + other.l0.to(self.l0.device)
        for mine, theirs in zip(self.splice or [], other.splice or []):
            mine.merge(theirs)
        return self

    def compute(self) -> list[dict]:
        """One dict per non-empty bucket: lo, hi (exclusive; None: open), the metrics."""
        out = []
        l0 = self.l0.tolist()
        for i, lo in enumerate(self.edges):
            recon = self.recon[i]
            splice = self.splice[i].compute() if self.splice else None
            if not recon.n and not (splice and splice["n_tokens"]):
                continue
            row = {"lo": lo, "hi": self.edges[i + 1] if i + 1 < len(self.edges) else self.end}
            metrics = recon.compute()
            row.update(
                n_tokens=recon.n,
                fvu=metrics["fvu"],
                mse=metrics["mse"],
                cos_sim=metrics["cos_sim"],
                l0=l0[i] / recon.n if recon.n else math.nan,
            )
            if splice:
                row["n_predictions"] = splice["n_tokens"]
                for key in ("ce_clean", "ce_spliced", "ce_loss_increase", "ce_loss_recovered"):
                    row[key] = splice[key]
                row["kl_spliced"] = splice["kl_spliced"]
            out.append(row)
        return out


def position_span(row: dict) -> str:
    """ "7", "8–15" or "256+": a bucket's positions."""
    lo, hi = row["lo"], row["hi"]
    return f"{lo}+" if hi is None else str(lo) if hi == lo + 1 else f"{lo}–{hi - 1}"


def position_lines(rows: list[dict], source: str) -> list[str]:
    """The console form of `PositionStats.compute()`."""
    splice = any("ce_loss_increase" in r for r in rows)
    head = f"{'positions':>11} {'tokens':>8} {'fvu':>8} {'l0':>8} {'mse':>10}"
    if splice:
        head += f" {'ce_incr':>8} {'kl':>8} {'ce_rec':>8}"
    lines = [f"by token position in the window (BOS = 0), {source}:", head]
    for r in rows:
        span = position_span(r)
        line = f"{span:>11} {r['n_tokens']:>8,} {r['fvu']:>8.4f} {r['l0']:>8.2f} {r['mse']:>10.4g}"
        if splice:
            line += (
                f" {r.get('ce_loss_increase', math.nan):>8.4f} {r.get('kl_spliced', math.nan):>8.4f}"
                f" {r.get('ce_loss_recovered', math.nan):>8.4f}"
            )
        lines.append(line)
    return lines
