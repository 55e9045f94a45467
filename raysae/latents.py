"""What each latent responds to: its top and random firing tokens, in one streaming pass.

`LatentTops` watches the SAE's pass over the scored rows (raysae.scoring) and keeps,
for every latent, in bounded memory (nothing grows with the number of rows but the rows'
token / document / position ids):

    top      the `top` rows with the largest activations, a top-N table (top, n_latents) that
             each chunk of rows is folded into with one `torch.topk` over the table and the
             chunk: a heap per latent, vectorised over the latents
    sample   `sample` firings drawn uniformly without replacement: every firing gets a key, a
             hash of (seed, row, latent), and the largest keys are kept (the same top-N fold
             on the keys; a uniform random subset of the firings, however many there are, as
             reservoir sampling, and the same subset however the rows were split)
    counts   firings, and a histogram of log10 activation over one range for all latents
             (fixed before the pass from the first chunk's activations, a decade either side;
             values outside it count in the end bins)

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
    """Per-latent top-N activations, a uniform sample of firings, counts and histograms.

    Each table entry is one int64 key, (a 31-bit rank) << 32 | (2³² − 1 − row): the rank is
    the activation's float32 bits for `top` (for values ≥ 0 the bits order as the values do)
    and a hash of (seed, row, latent) for `sample`; rank 0 is an empty slot. Keys are unique
    (rows are), so `topk` over keys has no ties, breaks equal activations towards the earlier
    row, and the tables of disjoint shares of the rows `merge` into exactly those of one pass
    over all of them (raysae.scoring runs the shares on Ray Data), whatever the split and the
    order. `log_range` fixes the histogram's bins; shares must agree on it (give it, or let the
    first chunk set it: a decade either side of its activations)."""

    def __init__(
        self,
        n_latents: int,
        top: int = 12,
        sample: int = 6,
        seed: int = 0,
        log_range: Optional[tuple[float, float]] = None,
    ):
        if top < 1 or sample < 0:
            raise ValueError(f"top={top} must be >= 1 and sample={sample} >= 0")
        self.n_latents, self.n_top, self.n_sample, self.seed = n_latents, top, sample, seed
        self.top_keys = torch.zeros(top, n_latents, dtype=torch.int64)
        self.sample_keys = torch.zeros(sample, n_latents, dtype=torch.int64)
        self.sample_values = torch.zeros(sample, n_latents)
        self.counts = torch.zeros(n_latents, dtype=torch.int64)
        self.hist = torch.zeros(n_latents * HIST_BINS, dtype=torch.int64)
        self.log_range = log_range
        self.segments: list[tuple[int, dict[str, np.ndarray]]] = []
        """(first row, its consecutive rows' token_id / doc_id / pos), as observed."""
        self.n_rows = 0

    def observe(self, model: Any, columns: dict[str, Tensor], x: Tensor, out: Any, rows: Tensor):
        """raysae.scoring.Observer: fold one chunk of rows' latents in."""
        self.update(out.latents.detach().float().cpu(), rows, columns)

    @torch.no_grad()
    def update(
        self,
        latents: Tensor,
        rows: Tensor | int,
        columns: Optional[dict[str, Tensor]] = None,
    ) -> None:
        """latents: (B, n_latents) of the rows numbered `rows` ((B,) int64, or the first one's
        number); columns: their token_id, doc_id, pos (B,) if the data have them."""
        b = latents.shape[0]
        if latents.shape != (b, self.n_latents):
            raise ValueError(f"latents {tuple(latents.shape)}, expected (B, {self.n_latents})")
        if b == 0:
            return
        if isinstance(rows, int):
            rows = torch.arange(rows, rows + b)
        rows = rows.to(torch.int64).cpu()
        if int(rows.min()) < 0 or int(rows.max()) >= _MASK:
            raise ValueError(f"row numbers must lie in [0, 2^32 − 1): {int(rows.max())}")
        fired = latents > 0
        values = latents.float().masked_fill(~fired, 0.0)
        low = (_MASK - rows)[:, None]
        keys = (values.view(torch.int32).to(torch.int64) << 32) | low
        self.top_keys = torch.cat([self.top_keys, keys]).topk(self.n_top, dim=0).values
        if self.n_sample:
            where = fired.nonzero()
            hashed = sample_keys(rows[where[:, 0]], where[:, 1], self.seed)
            keys = torch.zeros(latents.shape, dtype=torch.int64)
            keys[where[:, 0], where[:, 1]] = ((hashed >> 1) + 1) << 32
            keys |= low
            keys.masked_fill_(~fired, 0)
            self._fold_sample(keys, values)
        self.counts += fired.sum(0)
        self._histogram(latents, fired)
        if columns:
            self.segments.append((int(rows[0]), {k: v.cpu().numpy() for k, v in columns.items()}))
        self.n_rows = max(self.n_rows, int(rows.max()) + 1)

    def _fold_sample(self, keys: Tensor, values: Tensor) -> None:
        """Keep the n_sample largest of the table's keys and `keys` (·, n), with their values."""
        self.sample_keys, pick = torch.cat([self.sample_keys, keys]).topk(self.n_sample, dim=0)
        self.sample_values = torch.cat([self.sample_values, values]).gather(0, pick)

    def merge(self, other: LatentTops) -> LatentTops:
        """Fold in the tables of other rows of the same pass (same latents, sizes, seed and
        histogram range); returns self."""
        same = (other.n_latents, other.n_top, other.n_sample, other.seed) == (
            self.n_latents,
            self.n_top,
            self.n_sample,
            self.seed,
        )
        if not same:
            raise ValueError("cannot merge LatentTops of different latents, sizes or seeds")
        if self.log_range is None:
            self.log_range = other.log_range
        if other.log_range is not None and other.log_range != self.log_range:
            raise ValueError(f"histogram ranges differ: {self.log_range} and {other.log_range}")
        both = torch.cat([self.top_keys, other.top_keys])
        self.top_keys = both.topk(self.n_top, dim=0).values
        if self.n_sample:
            self._fold_sample(other.sample_keys, other.sample_values)
        self.counts += other.counts
        self.hist += other.hist
        self.segments += other.segments
        self.n_rows = max(self.n_rows, other.n_rows)
        return self

    def _histogram(self, latents: Tensor, fired: Tensor) -> None:
        cols = fired.nonzero()[:, 1]
        values = latents[fired]
        if not len(values):
            return
        logs = values.double().log10()
        if self.log_range is None:
            self.log_range = log_range_of(values)
        lo, hi = self.log_range
        bins = ((logs - lo) / (hi - lo) * HIST_BINS).floor().clamp(0, HIST_BINS - 1).long()
        self.hist.index_add_(0, cols * HIST_BINS + bins, torch.ones_like(bins))

    @property
    def top_values(self) -> Tensor:
        """(top, n_latents) float32: the top activations, largest first (0: empty slot)."""
        return (self.top_keys >> 32).to(torch.int32).view(torch.float32)

    @property
    def top_rows(self) -> Tensor:
        """(top, n_latents) int64: their rows (−1: empty slot)."""
        return _rows_of(self.top_keys)

    @property
    def sample_rows(self) -> Tensor:
        """(sample, n_latents) int64: the sampled firings' rows (−1: empty slot)."""
        return _rows_of(self.sample_keys)

    def frequencies(self) -> Tensor:
        """(n_latents,) float64 fraction of rows on which each latent fired."""
        return self.counts.double() / max(self.n_rows, 1)

    def top(self, latent: int) -> list[tuple[int, float]]:
        """(row, activation) of the latent's top firings, largest first."""
        return _pairs(self.top_rows[:, latent], self.top_values[:, latent])

    def sample(self, latent: int) -> list[tuple[int, float]]:
        """(row, activation) of a uniform sample of the latent's firings."""
        return _pairs(self.sample_rows[:, latent], self.sample_values[:, latent])

    def histogram(self, latent: int) -> list[int]:
        return self.hist[latent * HIST_BINS : (latent + 1) * HIST_BINS].tolist()

    def columns(self) -> dict[str, np.ndarray]:
        """Every row's token_id / doc_id / pos by row number (empty for toy data)."""
        if not self.segments:
            return {}
        segments = sorted(self.segments, key=lambda s: s[0])
        rows = sum(len(next(iter(cols.values()))) for _, cols in segments)
        if rows != self.n_rows or segments[0][0] != 0:
            raise ValueError(f"the observed columns cover {rows:,} rows of {self.n_rows:,}")
        return {k: np.concatenate([cols[k] for _, cols in segments]) for k in segments[0][1]}


def log_range_of(values: Tensor) -> tuple[float, float]:
    """The activation histogram's log10 range from some firing activations: a decade below
    their 0.1 % quantile to a decade above their maximum."""
    logs = values[values > 0].double().log10()
    if not len(logs):
        return (-3.0, 3.0)
    return (
        math.floor(float(torch.quantile(logs, 0.001))) - 1.0,
        math.ceil(float(logs.max())) + 1.0,
    )


_MASK = 0xFFFFFFFF


def _rows_of(keys: Tensor) -> Tensor:
    """The rows of table keys (see LatentTops); −1 for empty slots."""
    return torch.where(keys >> 32 > 0, _MASK - (keys & _MASK), -1)


def _mix(h: Tensor) -> Tensor:
    """A 32-bit integer hash (xor-shift-multiply, the constant of Mueller's hash), in int64
    arithmetic: every product stays below 2^59, no overflow."""
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & _MASK
    return h ^ (h >> 16)


def sample_keys(rows: Tensor, latents: Tensor, seed: int) -> Tensor:
    """32-bit sampling keys (int64 in [0, 2^32)) of firings (rows[i], latents[i]): a hash of
    (seed, row, latent), so a firing has the same key however the rows are split. The largest
    keys of a latent's firings are a uniform sample of them (tested)."""
    h = _mix((rows.to(torch.int64) ^ _mix(torch.tensor(seed & _MASK))) & _MASK)
    return _mix((h + latents.to(torch.int64) * 0x9E3779B1) & _MASK)


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
