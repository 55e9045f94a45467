"""What each latent responds to: its top and random firing tokens, in one streaming pass.

`LatentTops` watches the SAE's pass over the scored rows (raysae.evaluate.token_pass) and keeps,
for every latent, in bounded memory (nothing grows with the number of rows but the rows'
token / document / position ids):

    top      the `top` rows with the largest activations, a top-N table (top, n_latents) that
             each chunk of rows is folded into with one `torch.topk` over the table and the
             chunk: a heap per latent, vectorised over the latents
    sample   `sample` firings drawn uniformly without replacement: every firing gets a random
             key and the largest keys are kept (the same top-N fold on the keys; a uniform
             random subset of the firings, however many there are, as reservoir sampling)
    counts   firings, and a histogram of log10 activation over one range for all latents
             (fixed from the first chunk's activations, a decade either side; values
             outside it count in the end bins)

Contexts are the text around each row's token: the scored rows' own token_id / doc_id / pos
columns say which token of which document it was, and the document is tokenised again from
the dataset's manifest (the harvest's corpus and windows; raysae.text), with no LM pass. The
re-tokenised token must be the row's token_id, or the corpus has changed since the harvest
and the contexts are refused. Toy data have no text: a context is then the row number.

For large dictionaries the browser publishes the `publish // 2` most frequent latents plus a
uniform sample of the others (every latent's frequency is published either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

HIST_BINS = 16
"""Bins of each latent's activation histogram."""


class LatentTops:
    """Per-latent top-N activations, a uniform sample of firings, counts and histograms."""

    def __init__(self, n_latents: int, top: int = 12, sample: int = 6, seed: int = 0):
        if top < 1 or sample < 0:
            raise ValueError(f"top={top} must be >= 1 and sample={sample} >= 0")
        self.n_latents, self.n_top, self.n_sample = n_latents, top, sample
        self.generator = torch.Generator().manual_seed(seed)
        self.top_values = torch.zeros(top, n_latents)
        self.top_rows = torch.full((top, n_latents), -1, dtype=torch.int64)
        self.sample_keys = torch.full((sample, n_latents), -1.0)
        self.sample_rows = torch.full((sample, n_latents), -1, dtype=torch.int64)
        self.sample_values = torch.zeros(sample, n_latents)
        self.counts = torch.zeros(n_latents, dtype=torch.int64)
        self.hist = torch.zeros(n_latents * HIST_BINS, dtype=torch.int64)
        self.log_range: Optional[tuple[float, float]] = None
        self.rows: list[dict[str, np.ndarray]] = []
        self.n_rows = 0

    def observe(self, batch: dict[str, Tensor], x: Tensor, out: Any, first_row: int) -> None:
        """raysae.evaluate.TokenObserver: fold one chunk of rows' latents in."""
        self.update(out.latents.detach().float().cpu(), first_row, batch)

    @torch.no_grad()
    def update(
        self, latents: Tensor, first_row: int, columns: Optional[dict[str, Tensor]] = None
    ) -> None:
        """latents: (B, n_latents) of rows first_row..first_row+B−1; columns: their token_id,
        doc_id, pos (B,) if the data have them."""
        b = latents.shape[0]
        if latents.shape != (b, self.n_latents):
            raise ValueError(f"latents {tuple(latents.shape)}, expected (B, {self.n_latents})")
        fired = latents > 0
        values = latents.masked_fill(~fired, 0.0)
        self.top_values, pick = torch.cat([self.top_values, values]).topk(self.n_top, dim=0)
        self.top_rows = _rows(self.top_rows, pick, first_row)
        if self.n_sample:
            keys = torch.rand(latents.shape, generator=self.generator).masked_fill(~fired, -1.0)
            self.sample_keys, pick = torch.cat([self.sample_keys, keys]).topk(self.n_sample, dim=0)
            self.sample_rows = _rows(self.sample_rows, pick, first_row)
            self.sample_values = torch.cat([self.sample_values, values]).gather(0, pick)
        self.counts += fired.sum(0)
        self._histogram(latents, fired)
        if columns:
            self.rows.append({k: v.cpu().numpy() for k, v in columns.items()})
        self.n_rows = max(self.n_rows, first_row + b)

    def _histogram(self, latents: Tensor, fired: Tensor) -> None:
        cols = fired.nonzero()[:, 1]
        values = latents[fired]
        if not len(values):
            return
        logs = values.double().log10()
        if self.log_range is None:
            lo = math.floor(float(torch.quantile(logs, 0.001))) - 1.0
            self.log_range = (lo, math.ceil(float(logs.max())) + 1.0)
        lo, hi = self.log_range
        bins = ((logs - lo) / (hi - lo) * HIST_BINS).floor().clamp(0, HIST_BINS - 1).long()
        self.hist.index_add_(0, cols * HIST_BINS + bins, torch.ones_like(bins))

    def frequencies(self) -> Tensor:
        """(n_latents,) float64 fraction of rows on which each latent fired."""
        return self.counts.double() / max(self.n_rows, 1)

    def top(self, latent: int) -> list[tuple[int, float]]:
        """(row, activation) of the latent's top firings, largest first."""
        return _pairs(self.top_rows[:, latent], self.top_values[:, latent])

    def sample(self, latent: int) -> list[tuple[int, float]]:
        """(row, activation) of a uniform sample of the latent's firings."""
        keep = self.sample_keys[:, latent] >= 0
        return _pairs(self.sample_rows[keep, latent], self.sample_values[keep, latent])

    def histogram(self, latent: int) -> list[int]:
        return self.hist[latent * HIST_BINS : (latent + 1) * HIST_BINS].tolist()

    def columns(self) -> dict[str, np.ndarray]:
        """Every row's token_id / doc_id / pos, concatenated (empty for toy data)."""
        if not self.rows:
            return {}
        return {k: np.concatenate([r[k] for r in self.rows]) for k in self.rows[0]}


def _rows(kept: Tensor, pick: Tensor, first_row: int) -> Tensor:
    """Rows of the entries `topk` picked from cat([table (N, n), chunk (B, n)]): the table's own
    for picks < N, first_row + (pick − N) for the chunk's; no (B, n) table of row numbers."""
    n = kept.shape[0]
    return torch.where(pick < n, kept.gather(0, pick.clamp(max=n - 1)), first_row + pick - n)


def _pairs(rows: Tensor, values: Tensor) -> list[tuple[int, float]]:
    return [(int(r), float(v)) for r, v in zip(rows.tolist(), values.tolist()) if v > 0 and r >= 0]


def choose_published(freq: Tensor, publish: int, seed: int = 0) -> list[int]:
    """Latents the browser details: all when there are at most `publish`, else the
    publish // 2 most frequent and a uniform sample of the rest, in id order."""
    n = len(freq)
    if n <= publish:
        return list(range(n))
    frequent = torch.argsort(freq, descending=True, stable=True)[: publish // 2]
    rest = torch.ones(n, dtype=torch.bool)
    rest[frequent] = False
    others = rest.nonzero()[:, 0]
    g = torch.Generator().manual_seed(seed)
    picked = others[torch.randperm(len(others), generator=g)[: publish - len(frequent)]]
    return sorted(torch.cat([frequent, picked]).tolist())


# ---------------------------------------------------------------- contexts as text


@dataclass
class Contexts:
    """Decoded text around scored rows, from the re-tokenised corpus of a harvested dataset."""

    tokens: dict[int, tuple[list[str], int]]
    """row → (the window's tokens around it, index of the row's token among them)."""


def text_contexts(
    manifest: Any,
    columns: dict[str, np.ndarray],
    rows: set[int],
    tokenizer: Any,
    before: int = 20,
    after: int = 6,
) -> Contexts:
    """For each of `rows` (scored-row numbers), the tokens of its window from `before` tokens
    before it to `after` after, decoded, by re-cutting the manifest's corpus (raysae.text)."""
    from raysae.splice_config import FROM_HARVEST
    from raysae.text import TextWindows, corpus_windows

    harvest = manifest.harvest or {}
    settings = TextWindows(**{k: harvest[k] for k in FROM_HARVEST if k in harvest})
    wanted: dict[tuple[int, int], list[int]] = {}
    for row in rows:
        wanted.setdefault((int(columns["doc_id"][row]), int(columns["pos"][row])), []).append(row)
    windows, _ = corpus_windows(settings, tokenizer, int(harvest["n_tokens"]))
    decode = _decoder(tokenizer)
    out: dict[int, tuple[list[str], int]] = {}
    for w in windows:
        for col, pos in enumerate(w.pos.tolist()):
            for row in wanted.get((w.doc_id, pos), ()):
                if int(w.input_ids[col]) != int(columns["token_id"][row]):
                    raise ValueError(
                        f"document {w.doc_id} position {pos}: the corpus gives token "
                        f"{int(w.input_ids[col])}, the dataset's row has "
                        f"{int(columns['token_id'][row])}: the corpus changed since the "
                        "harvest, so the contexts cannot be shown; re-harvest, or drop --report"
                    )
                lo = max(0, col - before)
                ids = w.input_ids[lo : col + after + 1].tolist()
                out[row] = ([decode(i) for i in ids], col - lo)
    return Contexts(out)


def _decoder(tokenizer: Any):
    cache: dict[int, str] = {}

    def decode(i: int) -> str:
        if i not in cache:
            cache[i] = tokenizer.decode([i])
        return cache[i]

    return decode


@torch.no_grad()
def logit_lens(
    W_dec: Tensor, unembed: Tensor, gain: Optional[Tensor], top: int = 8, block: int = 256
) -> tuple[Tensor, Tensor]:
    """Each decoder row through the unembedding: (n, top) token ids and logits of the tokens
    it promotes most. unembed: (vocab, d); gain: the final norm's (d,) weight, applied to the
    direction first (the model scales its last residual so before unembedding), or None.
    Rows in blocks so at most (block, vocab) logits exist at once."""
    W = W_dec.float() * (1.0 if gain is None else gain.float())
    ids, values = [], []
    for lo in range(0, len(W), block):
        logits = W[lo : lo + block] @ unembed.float().T
        v, i = logits.topk(min(top, logits.shape[1]), dim=1)
        ids.append(i)
        values.append(v)
    return torch.cat(ids), torch.cat(values)


# ---------------------------------------------------------------- the browser's data


def unembedding(manifest: Any) -> tuple[Optional[tuple[Tensor, Optional[Tensor]]], str]:
    """((unembedding (vocab, d), final-norm gain (d,) or None), note) of the model a dataset
    was harvested from, or (None, why not)."""
    if manifest is None or manifest.layer is None:
        return None, "no language model (toy or synthetic data)"
    from raysae.lm import load_model

    try:
        model = load_model(manifest.model, revision=manifest.revision)
    except (OSError, ValueError) as e:
        return None, f"model {manifest.model} cannot be loaded here ({e})"
    norm = getattr(model.base_model, "norm", None)
    gain = getattr(norm, "weight", None)
    weights = model.get_output_embeddings().weight.detach()
    return (weights, None if gain is None else gain.detach()), f"{manifest.model}'s unembedding"


def _tokenizer(manifest: Any) -> tuple[Any, str]:
    """The tokenizer of a harvested dataset's model, or (None, why not)."""
    harvest = (manifest.harvest or {}) if manifest is not None else {}
    if manifest is None or manifest.layer is None or "n_tokens" not in harvest:
        return None, "row numbers (the data have no text)"
    from raysae.lm import load_tokenizer

    try:
        tokenizer = load_tokenizer(manifest.model, manifest.revision)
    except (OSError, ValueError) as e:
        return None, f"row numbers (the tokenizer of {manifest.model} cannot be loaded: {e})"
    corpus = harvest.get("corpus", "stdlib")
    return tokenizer, f"text of {corpus} re-tokenised, the firing token highlighted"


def publish(
    tops: LatentTops,
    W_dec: Tensor,
    manifest: Any,
    out: Any,
    *,
    publish_latents: int = 4096,
    seed: int = 0,
    log: Any = print,
) -> dict:
    """Write the browser's data files under `out` (a Path: latents/shard-*.js, tokens.js);
    returns the meta the page embeds."""
    from raysae.pages import SHARD, write_js

    freq = tops.frequencies()
    published = choose_published(freq, publish_latents, seed)
    tokenizer, contexts_note = _tokenizer(manifest)
    contexts = None
    if tokenizer is not None:
        wanted = {r for i in published for r, _ in tops.top(i) + tops.sample(i)}
        log(f"report: contexts of {len(wanted):,} rows from the re-tokenised corpus")
        contexts = text_contexts(manifest, tops.columns(), wanted, tokenizer)
    lens_ids = None
    weights, lens_note = unembedding(manifest) if tokenizer is not None else (None, "")
    if weights is not None:
        log(f"report: logit lens of {len(published):,} latents through {lens_note}")
        lens_ids, _ = logit_lens(W_dec[published].cpu(), *weights)
    decode = _decoder(tokenizer) if tokenizer is not None else None

    def entries(pairs: list[tuple[int, float]]) -> list:
        if contexts is None:
            return [[a, r, None, 0] for r, a in pairs]
        return [[a, r, *contexts.tokens[r]] for r, a in pairs]

    (out / "latents").mkdir(parents=True, exist_ok=True)
    details: dict[int, dict] = {}
    index: dict[str, dict[int, int]] = {}
    for j, i in enumerate(published):
        top = entries(tops.top(i))
        d = {
            "max": top[0][0] if top else 0.0,
            "hist": tops.histogram(i),
            "top": top,
            "random": entries(tops.sample(i)),
        }
        if lens_ids is not None:
            d["lens"] = [decode(t) for t in lens_ids[j].tolist()]
        details[i] = d
        for c in top:
            if c[2] is not None:
                key = c[2][c[3]].strip().lower()
                index.setdefault(key, {}).setdefault(i, 0)
                index[key][i] += 1
    for s in range(0, math.ceil(tops.n_latents / SHARD)):
        ids = range(s * SHARD, min((s + 1) * SHARD, tops.n_latents))
        write_js(
            out / "latents" / f"shard-{s:05d}.js",
            "shard",
            [
                s,
                {
                    "freq": freq[ids.start : ids.stop].tolist(),
                    "latents": {i: details[i] for i in ids if i in details},
                },
            ],
        )
    tokens = {k: sorted(v.items(), key=lambda kv: -kv[1])[:50] for k, v in index.items() if k}
    write_js(out / "latents" / "tokens.js", "tokens", [tokens])
    frequent = sorted(published, key=lambda i: -float(freq[i]))[:24]
    return {
        "n_latents": tops.n_latents,
        "n_rows": tops.n_rows,
        "shard": SHARD,
        "published": len(published),
        "frequent": frequent,
        "log_range": list(tops.log_range or (0.0, 0.0)),
        "contexts": contexts_note,
        "logit_lens": lens_note if lens_ids is not None else (lens_note or "not available"),
    }
