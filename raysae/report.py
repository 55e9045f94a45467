"""Sweep results: the table, its Pareto frontier (L0 vs FVU), the plot and the printed summary.

A point is on the frontier when no other point has both lower-or-equal L0 and lower-or-equal
FVU with one of them strictly lower (fewer active latents and better reconstruction are both
better). Frontiers are computed per architecture and over all points.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import pandas as pd

from raysae.data import storage

COLUMNS = [
    "trial_id",
    "member",
    "status",
    "architecture",
    "d_in",
    "n_latents",
    "k",
    "l1_coefficient",
    "l0_coefficient",
    "lr",
    "seed",
    "total_tokens",
    "l0",
    "fvu",
    "fvu_b",
    "explained_variance",
    "mse",
    "dead_fraction",
    "dense_fraction",
    "tokens",
    "rows_read",
    "wall_s",
    "checkpoint",
    "feature_recovery",
]
"""Columns of results.csv / results.parquet, in order (missing values are empty)."""


def pareto_mask(l0: Sequence[float], fvu: Sequence[float]) -> list[bool]:
    """True for points not dominated by any other (lower is better on both axes).

    NaN values are never on the frontier.
    """
    points = list(zip(l0, fvu))
    mask = []
    for i, (a0, a1) in enumerate(points):
        if math.isnan(a0) or math.isnan(a1):
            mask.append(False)
            continue
        dominated = any(
            b0 <= a0 and b1 <= a1 and (b0 < a0 or b1 < a1)
            for j, (b0, b1) in enumerate(points)
            if j != i and not (math.isnan(b0) or math.isnan(b1))
        )
        mask.append(not dominated)
    return mask


def with_frontiers(table: pd.DataFrame) -> pd.DataFrame:
    """Adds `pareto` (frontier of its architecture) and `pareto_all` (frontier over all rows)."""
    table = table.copy()
    table["pareto_all"] = pareto_mask(table["l0"].astype(float), table["fvu"].astype(float))
    table["pareto"] = False
    for _, group in table.groupby("architecture"):
        mask = pareto_mask(group["l0"].astype(float), group["fvu"].astype(float))
        table.loc[group.index, "pareto"] = mask
    return table


def frontier_table(table: pd.DataFrame) -> pd.DataFrame:
    """The per-architecture frontier points, sorted by architecture then L0."""
    cols = [
        c
        for c in (
            "architecture",
            "n_latents",
            "k",
            "l1_coefficient",
            "lr",
            "l0",
            "fvu",
            "checkpoint",
        )
        if c in table
    ]
    return table[table["pareto"]].sort_values(["architecture", "l0"])[cols]


def plot_pareto(table: pd.DataFrame) -> bytes:
    """PNG bytes: L0 (log x) vs FVU for every SAE, one colour per architecture, frontiers joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    table = table[(table["l0"].astype(float) > 0) & table["fvu"].notna()]  # plottable on log x
    for arch, group in table.groupby("architecture"):
        dots = ax.scatter(group["l0"], group["fvu"], label=arch, alpha=0.8)
        front = group[group["pareto"]].sort_values("l0")
        ax.plot(front["l0"], front["fvu"], color=dots.get_facecolor()[0], linewidth=1.5)
    if len(table):
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no finished SAE to plot", ha="center", transform=ax.transAxes)
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.set_title("Sparsity vs reconstruction — lines join each architecture's Pareto frontier")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="architecture")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_results(table: pd.DataFrame, out: str) -> None:
    """results.parquet, results.csv, pareto.csv and pareto.png under `out` (local or s3://)."""
    table = table[[c for c in COLUMNS if c in table] + ["pareto", "pareto_all"]]
    parquet = io.BytesIO()
    table.to_parquet(parquet, index=False)
    storage.write_bytes(storage.join(out, "results.parquet"), parquet.getvalue())
    storage.write_bytes(storage.join(out, "results.csv"), table.to_csv(index=False).encode())
    storage.write_bytes(
        storage.join(out, "pareto.csv"), frontier_table(table).to_csv(index=False).encode()
    )
    storage.write_bytes(storage.join(out, "pareto.png"), plot_pareto(table))


def summary(table: pd.DataFrame, out: str) -> str:
    """A short text summary naming the frontier points."""
    lines = [
        f"{len(table)} SAE(s) trained; results in {out}/results.csv, plot in {out}/pareto.png",
        "Pareto frontier (L0 vs FVU) per architecture:",
    ]
    for _, row in frontier_table(table).iterrows():
        params = ", ".join(
            f"{c}={row[c]:g}" if isinstance(row[c], float) else f"{c}={row[c]}"
            for c in ("n_latents", "k", "l1_coefficient", "lr")
            if c in row
        )
        lines.append(
            f"  {row['architecture']:>10}  L0 {row['l0']:8.2f}  FVU {row['fvu']:.4f}  ({params})"
        )
    return "\n".join(lines)
