"""`raysae meta CHECKPOINT OUT`: a meta-SAE (Bussmann, Leask, Bloom & Nanda 2024, "Showing SAE
Latents Are Not Atomic Using Meta-SAEs") trained on the decoder rows of a trained SAE.

    data     the base SAE's decoder rows W_dec[i], i < n_latents (unit directions in d_in)
    model    a BatchTopK SAE by default (`--architecture`), d_in = the base's d_in,
             `--n-latents` meta-latents, `--k` of them per base latent on average
    training many epochs over this small dataset, the rows in a new seeded order each epoch,
             through the one training loop (raysae.loop.fit)
    output   OUT/sae            the meta-SAE (raysae's checkpoint format)
             OUT/meta.json      FVU_A on the decoder rows (the meta-SAE in inference mode), L0,
                                and for each meta-latent the base latents that use it most
                                (largest meta-latent activation on their decoder row)

A base latent's decoder row is then read as a sum of a few meta-latents: which latents share a
meta-latent says what they have in common. Not built: links from meta.json into the latent
browser (the base latents are named by index, which the browser takes).
Imports no Ray: it is one process over a few thousand rows.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from raysae.checkpoint import load_sae, save_sae
from raysae.config import SAEConfig, TrainConfig
from raysae.loop import fit
from raysae.metrics import ReconstructionStats, SparsityStats, latent_norms, scalars
from raysae.saes import SparseAutoencoder, build_sae

META_FILE = "meta.json"
"""What `raysae meta` writes beside the meta-SAE."""


def decoder_rows(model: SparseAutoencoder) -> Tensor:
    """(n_latents, d_in) float32 decoder rows of `model`, in input units' directions (unit norm:
    the input scale only rescales magnitudes, so folded or not gives the same rows)."""
    w = model.W_dec.detach().float().cpu()
    return w / w.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def epochs_of(rows: Tensor, batch_size: int, seed: int) -> Iterator[Tensor]:
    """Endless batches of `rows`, every row once per epoch in a new seeded order."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=g)
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield rows[order[start : start + batch_size]]


@torch.no_grad()
def score(meta: SparseAutoencoder, rows: Tensor, top: int) -> dict:
    """FVU and sparsity of `meta` on `rows` and, per meta-latent, the `top` rows (base
    latents) that use it most."""
    recon, sparsity = ReconstructionStats(rows.shape[1]), SparsityStats(meta.cfg.n_latents)
    with meta.evaluating():
        out = meta(rows)
        acts = out.latents.cpu()
    recon.update(rows, out.x_hat)
    sparsity.update(acts, latent_norms=latent_norms(meta).cpu())
    values, indices = acts.topk(min(top, len(rows)), dim=0)  # (top, n_meta)
    fired = (acts > 0).sum(0)
    meta_latents = []
    for j in range(meta.cfg.n_latents):
        keep = values[:, j] > 0
        meta_latents.append(
            {
                "meta_latent": j,
                "base_latents_using_it": int(fired[j]),
                "top_base_latents": indices[keep, j].tolist(),
                "activations": [round(float(v), 6) for v in values[keep, j]],
            }
        )
    return {
        **recon.compute(),
        **{k: v for k, v in scalars(sparsity.compute()).items() if k in ("l0", "dead_fraction")},
        "meta_latents": meta_latents,
    }


def train_meta(
    checkpoint: str,
    out: str,
    *,
    n_latents: Optional[int] = None,
    k: int = 4,
    architecture: str = "batchtopk",
    epochs: int = 200,
    batch_size: int = 1024,
    lr: Optional[float] = None,
    seed: int = 0,
    top: int = 10,
    report: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train a meta-SAE on the decoder rows of the SAE at `checkpoint`; write OUT/sae and
    OUT/meta.json; return what meta.json holds. With `report` (the base SAE's `raysae eval
    --report` folder) also OUT/index.html, each meta-latent's base latents linked to their
    pages in that report's latent browser."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder for the meta-SAE")
    if report is not None and not (Path(report) / "index.html").is_file():
        raise FileNotFoundError(
            f"--report {report}: no index.html there; give the folder `raysae eval "
            f"{checkpoint} --data … --report DIR` wrote for the base SAE"
        )
    base = load_sae(checkpoint)
    rows = decoder_rows(base)
    n_base, d_in = rows.shape
    n_latents = n_latents or max(2, n_base // 8)
    batch_size = min(batch_size, n_base)
    cfg = SAEConfig(d_in=d_in, n_latents=n_latents, k=k, architecture=architecture)
    total = epochs * (n_base // batch_size) * batch_size
    train = TrainConfig(
        total_tokens=total,
        batch_size=batch_size,
        lr=lr,
        log_every_tokens=max(batch_size, total // 10),
        init_tokens=n_base,
        dead_tokens=max(batch_size, total // epochs * 10),  # dead: 10 epochs without firing
        seed=seed,
    )
    log(
        f"meta-SAE: {architecture} with {n_latents} latents (k={k}) on the {n_base} decoder "
        f"rows (d_in={d_in}) of {checkpoint}, {epochs} epochs ({total:,} rows)"
    )
    torch.manual_seed(seed)
    meta = build_sae(cfg)
    t0 = time.perf_counter()
    history = fit(meta, epochs_of(rows, batch_size, seed), train, log=log)
    result = {
        "checkpoint": str(checkpoint),
        "base_latents": n_base,
        "config": {"sae": cfg.__dict__, "epochs": epochs, "batch_size": batch_size, "seed": seed},
        "wall_s": time.perf_counter() - t0,
        "history": history,
        **score(meta, rows, top),
    }
    save_sae(meta, Path(out) / "sae")
    if report is not None:
        result["base_report"] = os.path.relpath(Path(report) / "index.html", out)
        (Path(out) / "index.html").write_text(meta_page(result))
    (Path(out) / META_FILE).write_text(json.dumps(result, indent=1, default=list))
    log(
        f"meta-SAE on the decoder rows: fvu {result['fvu']:.4f} l0 {result['l0']:.2f} "
        f"dead {result['dead_fraction']:.3f}; wrote {out}/sae and {out}/{META_FILE}"
    )
    return result


def meta_page(result: dict) -> str:
    """OUT/index.html: the meta-SAE's numbers and, per meta-latent that fired, its top base
    latents as links into the base SAE's latent browser (`report#latent=ID`)."""
    import html

    from raysae.pages import page

    link = html.escape(result["base_report"])
    rows = []
    for m in result["meta_latents"]:
        if not m["top_base_latents"]:
            continue
        base = " ".join(
            f"<a class=lat href='{link}#latent={i}'>{i}</a> ({a:.3g})"
            for i, a in zip(m["top_base_latents"], m["activations"])
        )
        rows.append(
            f"<tr><td>{m['meta_latent']}</td><td>{m['base_latents_using_it']}</td>"
            f"<td>{base}</td></tr>"
        )
    body = (
        f"<h1>Meta-SAE of {html.escape(result['checkpoint'])}</h1>"
        f"<p>{result['base_latents']:,} decoder rows; FVU {result['fvu']:.4f}, L0 "
        f"{result['l0']:.2f}, dead {result['dead_fraction']:.3f}. Each base latent links to "
        f"its page in <a href='{link}'>the base SAE's report</a>.</p>"
        "<table><tr><th>meta-latent</th><th>base latents using it</th>"
        "<th>top base latents (activation)</th></tr>" + "".join(rows) + "</table>"
    )
    return page(f"Meta-SAE of {result['checkpoint']}", body)
