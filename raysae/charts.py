"""The report's charts as inline SVG text, drawn with matplotlib (already raysae's plotting
library: raysae.report), so a page embeds them and needs no network, no server, no files.

Each function takes the report's JSON sections (raysae.evaluate) and returns one `<svg>` element.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Sequence

from raysae.metrics import DENSE_THRESHOLD

SAE, RANDOM, ALT = "#1f77b4", "#999999", "#d62728"


def _figure(width: float = 6.0, height: float = 3.2, **grid):
    """A matplotlib figure and its axes (plt.subplots's keywords in `grid`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: searchable, small
    return plt.subplots(figsize=(width, height), dpi=100, **grid)


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: inline in HTML


def frequency_histogram(hist: dict, n_latents: int) -> str:
    """Latents by log10 firing frequency, with the never-fired latents as a bar of their own at
    the left and the dense threshold marked."""
    fig, ax = _figure()
    edges, counts = hist["log10_edges"], hist["counts"]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=SAE, label="fired")
    if hist["never_fired"]:
        ax.bar([edges[0] - 1.0], [hist["never_fired"]], width=0.8, color=ALT, label="never fired")
    ax.axvline(math.log10(DENSE_THRESHOLD), color="k", linestyle="--", linewidth=1)
    ax.text(math.log10(DENSE_THRESHOLD), ax.get_ylim()[1] * 0.9, " dense →", fontsize=8)
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(
        f"Firing frequency of {n_latents:,} latents ({hist['never_fired']:,} never fired)",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    return _svg(fig)


def decoder_cosines(geometry: dict) -> str:
    """Histogram of each decoder row's max cosine to another, beside random unit directions."""
    fig, ax = _figure()
    for key, label, color in (
        ("random_baseline", "random unit directions", RANDOM),
        ("decoder", "SAE decoder", SAE),
    ):
        g = geometry[key]
        if g.get("count"):
            h = g["histogram"]
            ax.stairs(
                h["counts"],
                h["edges"],
                label=label,
                color=color,
                fill=key == "decoder",
                alpha=0.6 if key == "decoder" else 1.0,
                linewidth=1.5,
            )
    ax.axvline(geometry["random_expected_max"], color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("max cosine of a latent's decoder row to any other")
    ax.set_ylabel("latents")
    ax.set_title(
        "Decoder nearest neighbours vs random directions (dotted: √(2 ln n / d))", fontsize=10
    )
    ax.legend(fontsize=8)
    return _svg(fig)


def decoder_norm_shares(split: dict) -> str:
    """A crosscoder's latents by source 1's share of their decoder norm (raysae.views): near 0
    the latent writes only to source 0, near 1 only to source 1, in the middle to both."""
    fig, ax = _figure()
    edges, counts = split["bin_edges"], split["source_1_share_histogram"]
    widths = [b - a for a, b in zip(edges, edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color=SAE)
    for x in (0.1, 0.3, 0.7, 0.9):
        ax.axvline(x, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("source 1's share of the decoder norm ‖d₁‖ / (‖d₀‖ + ‖d₁‖)")
    ax.set_ylabel("latents")
    ax.set_title(
        f"Relative decoder norms of {split['latents']:,} latents: "
        f"{split['source_0_specific']:.0%} source 0 only, {split['shared']:.0%} shared, "
        f"{split['source_1_specific']:.0%} source 1 only",
        fontsize=9,
    )
    return _svg(fig)


def by_position(rows: Sequence[dict], title: str, harvest_context: Optional[int] = None) -> str:
    """FVU (and L0) by position bucket; with splice rows, CE increase and KL on a second panel."""
    splice = any("ce_loss_increase" in r for r in rows)
    fig, axes = _figure(
        6.0, 5.2 if splice else 3.2, nrows=2 if splice else 1, sharex=True, squeeze=False
    )
    mid = [(r["lo"] + (r["hi"] if r["hi"] is not None else r["lo"] + 1) - 1) / 2 for r in rows]
    ax = axes[0][0]
    ax.plot(mid, [r["fvu"] for r in rows], marker="o", color=SAE, label="FVU")
    ax.set_ylabel("FVU", color=SAE)
    twin = ax.twinx()
    twin.plot(mid, [r["l0"] for r in rows], marker=".", color=RANDOM, label="L0")
    twin.set_ylabel("L0", color=RANDOM)
    ax.set_title(title, fontsize=10)
    for a in axes[:, 0]:
        if harvest_context:
            a.axvline(harvest_context - 0.5, color=ALT, linestyle="--", linewidth=1)
        a.grid(True, alpha=0.3)
    if harvest_context:
        ax.text(harvest_context, ax.get_ylim()[0], " harvest context", color=ALT, fontsize=8)
    if splice:
        ax2 = axes[1][0]
        ax2.plot(
            mid,
            [r["ce_loss_increase"] for r in rows],
            marker="o",
            color=SAE,
            label="CE increase (nats)",
        )
        ax2.plot(mid, [r["kl_spliced"] for r in rows], marker="s", color=ALT, label="KL (nats)")
        ax2.legend(fontsize=8)
        ax2.set_ylabel("nats / token")
    axes[-1][0].set_xlabel("position in the context window (BOS = 0)")
    return _svg(fig)


def training_curves(history: Sequence[dict]) -> str:
    """FVU, L0 and the dead fraction against training tokens, from metrics.json's history."""
    tokens = [r["tokens"] for r in history]
    fig, axes = _figure(9.0, 2.8, ncols=3)
    for ax, key in zip(axes, ("fvu", "l0", "dead_fraction")):
        ax.plot(tokens, [r.get(key, math.nan) for r in history], marker=".", color=SAE)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("training tokens")
        ax.grid(True, alpha=0.3)
    return _svg(fig)


def pareto(points: Sequence[dict]) -> str:
    """L0 (log) vs FVU, one colour per architecture, each point labelled with its k or L1
    coefficient, the frontier joined; points carry their row index for the page's links."""
    fig, ax = _figure(7.0, 4.4)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    archs = sorted({p["architecture"] for p in points})
    for i, arch in enumerate(archs):
        mine = [p for p in points if p["architecture"] == arch]
        ax.scatter(
            [p["l0"] for p in mine], [p["fvu"] for p in mine], color=colors[i % 6], label=arch
        )
        front = sorted((p for p in mine if p.get("pareto")), key=lambda p: p["l0"])
        ax.plot([p["l0"] for p in front], [p["fvu"] for p in front], color=colors[i % 6])
        for p in mine:
            ax.annotate(
                p["label"],
                (p["l0"], p["fvu"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    if points:
        ax.set_xscale("log")
    ax.set_xlabel("L0 (mean active latents per token)")
    ax.set_ylabel("FVU")
    ax.set_title(
        "Sparsity vs reconstruction (lines: each architecture's Pareto frontier)", fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)
