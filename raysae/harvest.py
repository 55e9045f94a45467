"""Harvest: run a transformers causal LM over a corpus and write its activations as shards.

Pipeline::

    corpus → documents → token windows (driver, raysae.text) → shuffled part jobs
        → Ray Data map_batches on an actor pool holding the model (one job = one part per layer)
        → <output>/layer_<L>/part-*.parquet, then one manifest.json per layer (driver, last)

What is recorded
    The residual stream after block L: `hidden_states[L + 1]` of a forward pass with
    `output_hidden_states=True` (entry 0 is the embedding output; see raysae.lm for the
    model, its hooks and the names). Blocks after the deepest
    requested layer cannot change it, so the model is loaded with that many blocks plus one;
    the extra block matters because transformers applies the final norm to the *last* entry
    of `hidden_states`, which therefore never is a requested layer.

Tokens
    One row per recorded token of the windows raysae.text cuts (its module docstring): BOS and
    other special tokens are not recorded by default, (doc_id, pos) identifies a row, and the
    budget `n_tokens` counts recorded rows exactly.

Mixing documents
    Windows are shuffled across the whole corpus before being grouped into part jobs, and the
    rows of each part are shuffled again, so a part mixes tokens of hundreds of documents; the
    reader then shuffles the part order. All layers share one row order: row i of every layer
    dataset is the same token.

Commit
    Each layer's manifest is written only after every part of every layer exists. A harvest
    that fails or is interrupted leaves parts but no manifest; re-running writes new parts and
    deletes the stale ones when it commits. A prefix holding a manifest is refused unless
    `overwrite`, and the old dataset stays readable until the new one commits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from raysae import data
from raysae.data import storage
from raysae.lm import hook_name, load_config, load_model, load_tokenizer
from raysae.settings import ConfigError, Location, Options, check_positive, from_dict
from raysae.text import TextWindows, Window, corpus_windows, keep_mask, pad_windows


@dataclass(frozen=True)
class HarvestConfig(TextWindows):
    """Settings of one harvest run (and, keyword-only, the TextWindows settings)."""

    model: str
    """Causal LM: a hub id, a local model directory, or a local `.gguf` file."""
    layers: tuple[int, ...]
    """Blocks whose output (the residual stream after block L) to record; 0-based."""
    output: Location
    """Prefix (local directory or s3://bucket/prefix); layer L is written to <output>/layer_<L>."""
    revision: str | None = None
    """Model revision (branch, tag or commit) for hub models; recorded in the manifest."""
    n_tokens: int = 1_000_000
    """Rows to record per layer (exact)."""
    batch_size: int = 16
    """Windows per forward pass."""
    tokens_per_part: int | None = None
    """Rows per Parquet part; default: about data.PART_BYTES of activations."""
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """Stored activation dtype."""
    num_actors: int = 1
    """Model replicas (Ray actors) running in parallel."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor; torch uses that many threads."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: one GPU per actor when the Ray cluster has GPUs, else CPU."""
    seed: int = 0
    """Seed of the window and row shuffles."""
    overwrite: bool = False
    """Replace datasets already committed under `output`."""

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 0 or len(set(self.layers)) != len(self.layers):
            raise ConfigError(
                f"harvest.layers={list(self.layers)}: give one or more distinct block indices >= 0"
            )
        check_positive(
            self,
            "n_tokens",
            "batch_size",
            "num_actors",
            "tokens_per_part",
            "cpus_per_actor",
            where="harvest",
        )
        self._check_windows("harvest")  # context_length and every Literal field

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HarvestConfig:
        """Build from plain data (YAML, CLI) with raysae.settings.from_dict's checks; `layers`
        may be a single int."""
        return from_dict(cls, data, "harvest")


def layer_uri(output: str, layer: int) -> str:
    """Dataset prefix of `layer` under a harvest's `output`."""
    return storage.join(output, f"layer_{layer}")


# ---------------------------------------------------------------- part jobs


def part_jobs(windows: list[Window], *, tokens_per_part: int, seed: int) -> list[pa.Table]:
    """Shuffle windows across the corpus and group them into one-row tables, one per part."""
    order = np.random.default_rng(seed).permutation(len(windows))
    jobs, group, rows = [], [], 0
    for i in order:
        group.append(windows[i])
        rows += windows[i].kept
        if rows >= tokens_per_part:
            jobs.append(_job_table(len(jobs), group))
            group, rows = [], 0
    if group:
        jobs.append(_job_table(len(jobs), group))
    return jobs


def _nested(arrays: list[np.ndarray], arrow_type: pa.DataType) -> pa.Array:
    """One row holding a list of variable-length arrays (built from offsets, no Python lists)."""
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    inner = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(np.concatenate(arrays), type=arrow_type)
    )
    return pa.ListArray.from_arrays(pa.array([0, len(arrays)], type=pa.int32()), inner)


def _job_table(part: int, windows: list[Window]) -> pa.Table:
    """The Ray Data row describing one part: its index and its windows."""
    return pa.table(
        {
            "part": pa.array([part], type=pa.int32()),
            "doc_id": pa.array([[w.doc_id for w in windows]], type=pa.list_(pa.int64())),
            "pos": _nested([w.pos for w in windows], pa.int32()),
            "input_ids": _nested([w.input_ids for w in windows], pa.int32()),
        }
    )


# ---------------------------------------------------------------- actor


class Rows(NamedTuple):
    """Recorded rows of one part job, all tensors in the same row order."""

    acts: dict[int, torch.Tensor]
    """Layer → activations (N, d_model) in the stored dtype."""
    token_id: torch.Tensor
    """(N,) token ids."""
    doc_id: torch.Tensor
    """(N,) document indices."""
    pos: torch.Tensor
    """(N,) positions within the document."""


class PartHarvester:
    """Ray Data actor: holds the model; turns each part job into one written part per layer."""

    def __init__(
        self,
        *,
        cfg: HarvestConfig,
        uris: dict[int, str],
        excluded: np.ndarray,
        write_id: str,
        n_blocks: int,
        use_gpu: bool,
    ) -> None:
        self.cfg, self.uris, self.excluded, self.write_id = cfg, uris, excluded, write_id
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = load_model(
            cfg.model, revision=cfg.revision, dtype=cfg.model_dtype, n_blocks=n_blocks
        ).to(self.device)

    def __call__(self, jobs: pa.Table) -> pa.Table:
        records = [self._harvest(jobs.slice(i, 1)) for i in range(len(jobs))]
        return pa.concat_tables(records)

    def _harvest(self, job: pa.Table) -> pa.Table:
        """Forward one job's windows, shuffle its rows, write one part per layer."""
        part = job.column("part")[0].as_py()
        doc_ids = job.column("doc_id")[0].values.to_numpy()
        positions = _unnest(job.column("pos"))
        windows = _unnest(job.column("input_ids"))
        rows = self._forward(windows, doc_ids, positions)
        perm = torch.from_numpy(
            np.random.default_rng([self.cfg.seed, part]).permutation(len(rows.token_id))
        )
        token_id, doc_id, pos = rows.token_id[perm], rows.doc_id[perm], rows.pos[perm]
        name = data.part_name(part, self.write_id)
        records = []
        for layer, layer_acts in rows.acts.items():
            table = data.shard_table(layer_acts[perm], token_id, doc_id, pos, dtype=self.cfg.dtype)
            stored = data.decode_act(
                table.column("act"), d_in=layer_acts.shape[1], dtype=self.cfg.dtype
            )
            data.check_finite(stored, where=f"layer {layer} {name}")
            written = data.write_part(self.uris[layer], name, table)
            stats = data.ActStats.of(stored)
            records.append(
                {
                    "layer": layer,
                    "name": name,
                    "rows": written.rows,
                    "bytes": written.bytes,
                    "sha256": written.sha256,
                    "crc32": written.crc32,
                    "sum": stats.sum.tolist(),
                    "squared_norm_sum": stats.squared_norm_sum,
                }
            )
        return pa.Table.from_pylist(records)

    @torch.inference_mode()
    def _forward(
        self, windows: list[np.ndarray], doc_ids: np.ndarray, positions: list[np.ndarray]
    ) -> Rows:
        """Run the model over `windows` in batches; the recorded rows, in window order."""
        acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.cfg.layers}
        token_id, doc_id, pos = [], [], []
        order = np.argsort(
            [len(w) for w in windows], kind="stable"
        )  # similar lengths: less padding
        for start in range(0, len(order), self.cfg.batch_size):
            batch = order[start : start + self.cfg.batch_size]
            ids, batch_pos, attention = pad_windows(
                [windows[i] for i in batch], [positions[i] for i in batch]
            )
            # Padding is on the right: causal attention keeps it out of every real token.
            out = self.model.base_model(
                input_ids=ids.to(self.device),
                attention_mask=attention.to(self.device),
                output_hidden_states=True,
            )
            keep = attention.bool() & torch.from_numpy(keep_mask(ids.numpy(), self.excluded))
            for layer in self.cfg.layers:
                hidden = out.hidden_states[layer + 1][keep.to(self.device)]
                acts[layer].append(hidden.to("cpu", data.STORAGE_DTYPES[self.cfg.dtype][0]))
            token_id.append(ids[keep])
            pos.append(batch_pos[keep])
            doc_id.append(torch.from_numpy(doc_ids[batch]).unsqueeze(1).expand_as(ids)[keep])
        return Rows(
            {layer: torch.cat(a) for layer, a in acts.items()},
            torch.cat(token_id),
            torch.cat(doc_id),
            torch.cat(pos),
        )


def _unnest(column: pa.ChunkedArray) -> list[np.ndarray]:
    """The list of arrays stored in the single row of a nested list column."""
    inner = column.combine_chunks().flatten()
    offsets, values = inner.offsets.to_numpy(), inner.flatten().to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(inner))]


# ---------------------------------------------------------------- driver


class Progress(NamedTuple):
    """Where a running harvest stands; passed to the `progress` callback after each part."""

    parts_done: int
    """Parts written (every layer's file for that part exists)."""
    parts_total: int
    """Parts in this harvest."""
    tokens_done: int
    """Rows written per layer so far."""
    tokens_total: int
    """Rows per layer when done (`n_tokens`)."""
    elapsed_s: float
    """Seconds since the model actors were started."""


def print_progress(progress: Progress) -> None:
    """Default progress display: one line per part on stderr."""
    rate = progress.tokens_done / max(progress.elapsed_s, 1e-9)
    print(
        f"harvest: part {progress.parts_done}/{progress.parts_total}, "
        f"{progress.tokens_done:,}/{progress.tokens_total:,} tokens, {rate:,.0f} tokens/s",
        file=sys.stderr,
        flush=True,
    )


def harvest(
    cfg: HarvestConfig, *, progress: Callable[[Progress], None] | None = print_progress
) -> dict[int, data.Manifest]:
    """Harvest `cfg.layers` of `cfg.model` over `cfg.corpus`; returns layer → committed manifest.

    Raises before any work if an output prefix holds a dataset (and not `cfg.overwrite`) or
    files raysae did not write. An exception from `progress` aborts the harvest like any
    other: no manifest is written.
    """
    uris = {layer: layer_uri(cfg.output, layer) for layer in cfg.layers}
    for uri in uris.values():
        data.prepare_prefix(uri, overwrite=cfg.overwrite)
    config = load_config(cfg.model, cfg.revision)
    _check_layers(cfg, config.num_hidden_layers)
    windows, excluded = corpus_windows(cfg, load_tokenizer(cfg.model, cfg.revision), cfg.n_tokens)
    tokens_per_part = cfg.tokens_per_part or data.default_rows_per_part(
        config.hidden_size, cfg.dtype
    )
    jobs = part_jobs(windows, tokens_per_part=tokens_per_part, seed=cfg.seed)
    # Later blocks cannot change the requested layers; one extra block keeps the final norm
    # (applied to the last entry of hidden_states) off them. _check_layers made this ≤ the total.
    n_blocks = max(cfg.layers) + 2
    records = _run(cfg, jobs, uris, excluded, n_blocks, progress)
    return {
        layer: _commit(cfg, layer, uris[layer], records, config.hidden_size) for layer in cfg.layers
    }


def _check_layers(cfg: HarvestConfig, n_blocks: int) -> None:
    """Reject layers the model does not have, and its last block (see module docstring)."""
    bad = [layer for layer in cfg.layers if layer >= n_blocks - 1]
    if bad:
        raise ValueError(
            f"layers {bad} not available: {cfg.model} has {n_blocks} blocks, and transformers reports "
            f"the last one ({n_blocks - 1}) after the final norm, not as residual stream; "
            f"choose layers < {n_blocks - 1}"
        )


def _run(
    cfg: HarvestConfig,
    jobs: list[pa.Table],
    uris: dict[int, str],
    excluded: np.ndarray,
    n_blocks: int,
    progress: Callable[[Progress], None] | None,
) -> list[dict[str, Any]]:
    """Run the part jobs on the actor pool; the written parts' records (layer, name, rows, sums)."""
    import ray  # here, not at the top: settings and specs import this module without Ray
    import ray.data

    if not ray.is_initialized():
        ray.init()
    use_gpu = cfg.device == "cuda" or (
        cfg.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1
    )
    harvested = ray.data.from_arrow(jobs).map_batches(
        PartHarvester,
        fn_constructor_kwargs={
            "cfg": cfg,
            "uris": uris,
            "excluded": excluded,
            "write_id": data.new_write_id(),
            "n_blocks": n_blocks,
            "use_gpu": use_gpu,
        },
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(cfg.num_actors, len(jobs))),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    records: list[dict[str, Any]] = []
    start = time.monotonic()
    for batch in harvested.iter_batches(batch_size=None, batch_format="pyarrow"):
        records.extend(batch.to_pylist())
        if progress is not None:
            done = [r for r in records if r["layer"] == cfg.layers[0]]
            progress(
                Progress(
                    len(done),
                    len(jobs),
                    sum(r["rows"] for r in done),
                    cfg.n_tokens,
                    time.monotonic() - start,
                )
            )
    return records


def _commit(
    cfg: HarvestConfig, layer: int, uri: str, records: list[dict[str, Any]], d_model: int
) -> data.Manifest:
    """Merge one layer's part records into its manifest and commit it."""
    mine = sorted((r for r in records if r["layer"] == layer), key=lambda r: r["name"])
    stats = data.ActStats.empty(d_model)
    for record in mine:  # fixed order: the float64 sums come out identical on every run
        stats = stats.merge(
            data.ActStats(record["rows"], np.asarray(record["sum"]), record["squared_norm_sum"])
        )
    settings = {key: value for key, value in dataclasses.asdict(cfg).items() if key != "overwrite"}
    settings["python"] = sys.version.split()[0]  # the stdlib corpus differs between versions
    settings = json.loads(json.dumps(settings))  # JSON types, so this equals the manifest read back
    manifest = data.Manifest(
        model=cfg.model,
        revision=cfg.revision,
        hook=hook_name(layer),
        layer=layer,
        d_in=d_model,
        dtype=cfg.dtype,
        n_tokens=stats.count,
        parts=tuple(
            data.Part(r["name"], r["rows"], r["bytes"], r["sha256"], r["crc32"]) for r in mine
        ),
        stats=stats,
        harvest=settings,
    )
    data.commit_dataset(uri, manifest, overwrite=cfg.overwrite)
    return manifest


# ---------------------------------------------------------------- command line


OPTIONS = Options(HarvestConfig)
"""`raysae harvest`'s options: one per HarvestConfig field."""


def add_harvest_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per HarvestConfig field (`--n-tokens` for `n_tokens`; help = its docstring)."""
    return OPTIONS.add(parser)


def run_harvest_cli(args: argparse.Namespace) -> int:
    """`raysae harvest`: run a harvest from parsed arguments; returns the exit status."""
    cfg = HarvestConfig.from_dict(OPTIONS.values(args))
    for layer, manifest in harvest(cfg).items():
        uri = layer_uri(cfg.output, layer)
        print(
            f"layer {layer}: {manifest.n_tokens:,} tokens × d_in={manifest.d_in} ({manifest.dtype}) → {uri}"
        )
    return 0
