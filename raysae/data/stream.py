"""Streaming reader: a dataset URI → Ray Data → torch batches (B, d_in), for Ray Train workers.

::

    ds = build_dataset("s3://bucket/acts/smollm2/layer_3")          # driver
    trainer = TorchTrainer(loop, datasets={"train": ds}, ...)        # Train streaming_splits it

    def loop(config):                                                # each worker
        shard = ray.train.get_dataset_shard("train")
        for x in iter_torch_batches(shard, batch_size=4096, dtype=torch.float32, d_in=576):
            ...                                                      # x: (4096, 576) float32

Reading: one Ray read task per part, from the manifest
    The manifest already lists every part with its rows and bytes, and `open_dataset` has
    checked their footers, so the dataset is read by `PartsDatasource`: one read task
    per part (parts are sized for it, see `data.PART_BYTES`), each returning the part as
    one Arrow block through `data.read_part`. `ray.data.read_parquet` was the first
    choice, but in Ray 2.60 (Parquet datasource V2) each execution — every epoch — first lists
    the files and reads every footer on a pool of 32 `FooterReader` actors, which made the
    first batch several times slower (BENCHMARKS.md, "Ingest").

Mixing documents
    Harvest already shuffles tokens across many documents inside each part. Here the part
    order is shuffled again at every execution (a new, seed-reproducible order each epoch,
    like Ray's `FileShuffleConfig`), and `local_shuffle_buffer_size` optionally mixes rows
    of several parts.

Decoding is `raysae.data.collate`, shared with the single-process reader: the `act`
bytes are viewed as a tensor and cast once into the training dtype — no per-row copies.
Column selection (`columns=` or `Dataset.select_columns`) is pushed down into the read.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import ray.data
import torch
from ray.data.block import BlockMetadata
from ray.data.collate_fn import ArrowBatchCollateFn

from raysae import data


class PartsDatasource(ray.data.Datasource):
    """The parts of one committed dataset as a Ray Data source: one read task per part."""

    def __init__(
        self, source: data.Dataset, *, shuffle: bool, seed: int | None, row_numbers: bool = False
    ):
        super().__init__()
        self._projection_map = (
            None  # all columns until Ray pushes a select_columns down (as Ray's own sources do)
        )
        # Not the Dataset itself: its manifest lists every part, and the source is pickled.
        self.read = source.part_reader()
        self.parts, self.shuffle, self.seed = source.parts, shuffle, seed
        # Each part's first row among the source's parts, in their listed order.
        offsets = np.cumsum([0] + [part.rows for part in source.parts])
        self.first_rows = (
            {part.name: int(o) for part, o in zip(source.parts, offsets)} if row_numbers else None
        )
        self._executions = 0

    def supports_projection_pushdown(self) -> bool:
        return True

    def estimate_inmemory_data_size(self) -> int:
        return sum(part.bytes for part in self.parts)  # plain, uncompressed: file bytes ≈ memory

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list:
        """One task per part. Ray passes `data_context` when it executes the dataset; only
        those calls advance the shuffle, so execution k reads in the order of rng([seed, k])."""
        parts = self.parts
        if self.shuffle and data_context is not None:
            rng = np.random.default_rng(
                None if self.seed is None else [self.seed, self._executions]
            )
            parts = [parts[i] for i in rng.permutation(len(parts))]
            self._executions += 1
        columns = self._get_data_columns() or list(data.COLUMNS)
        columns = [c for c in columns if c != "row"]  # made by `_numbered`, not stored
        return [
            ray.data.ReadTask(
                functools.partial(self.read, part, columns=tuple(columns))
                if self.first_rows is None
                else functools.partial(
                    _numbered, self.read, part, tuple(columns), self.first_rows[part.name]
                ),
                BlockMetadata(
                    num_rows=part.rows,
                    size_bytes=part.bytes,
                    exec_stats=None,
                    input_files=(part.name,),
                ),
            )
            for part in parts
        ]


def _numbered(read, part: data.Part, columns: tuple[str, ...], first_row: int):
    """The part's tables with an int64 `row` column: each row's number among the dataset's rows."""
    row = first_row
    for table in read(part, columns=columns):
        yield table.append_column("row", pa.array(np.arange(row, row + len(table), dtype=np.int64)))
        row += len(table)


def build_dataset(
    source: str | data.Dataset,
    *,
    shuffle_files: bool = True,
    seed: int | None = None,
    columns: Sequence[str] = ("act",),
    parts: Sequence[str] | None = None,
    read_cpus: float = 1.0,
    row_numbers: bool = False,
) -> ray.data.Dataset:
    """A lazy Ray Dataset over `source`: a `raysae.data.Dataset` (as opened by the
    command, never reopened here) or a URI, opened and validated first.

    Reads the parts named `parts` (default: all of the source's), in a shuffled order per execution when
    `shuffle_files` (reproducible from `seed`), and only `columns`. `read_cpus` is what
    each read task reserves: below 1 lets reads run beside fractional-CPU Train workers on a
    small machine. There is no separate listing step (the manifest lists the parts), so reads
    need no CPU beyond their own reservation. `row_numbers` adds an int64 `row` column: each
    row's place among the rows of `parts` in their listed order (raysae.scoring's passes).
    """
    dataset = data.open_dataset(source) if isinstance(source, str) else source
    if parts is not None:
        dataset = dataset.select(parts)
    reader = PartsDatasource(dataset, shuffle=shuffle_files, seed=seed, row_numbers=row_numbers)
    dataset = ray.data.read_datasource(
        reader, override_num_blocks=len(reader.parts), num_cpus=read_cpus
    )
    return dataset.select_columns(list(columns) + (["row"] if row_numbers else []))


class ActCollateFn(ArrowBatchCollateFn):
    """Ray collate: Arrow batch → act tensor (B, d_in), or a dict of tensors (see data.collate)."""

    def __init__(self, *, d_in: int, dtype: torch.dtype, columns: Sequence[str] = ("act",)) -> None:
        self.d_in, self.dtype, self.columns = d_in, dtype, tuple(columns)

    def __call__(self, batch: pa.Table) -> torch.Tensor | dict[str, torch.Tensor]:
        # The stored dtype comes from the act field's metadata, which Ray carries with each block.
        return data.collate(batch, d_in=self.d_in, out_dtype=self.dtype, columns=self.columns)


def iter_torch_batches(
    dataset_or_shard: ray.data.Dataset | ray.data.DataIterator,
    *,
    batch_size: int,
    dtype: torch.dtype,
    d_in: int,
    columns: Sequence[str] = ("act",),
    local_shuffle_buffer_size: int | None = None,
    local_shuffle_seed: int | None = None,
    drop_last: bool = True,
    device: str | torch.device | None = None,
    prefetch_batches: int = 2,
) -> Iterable[torch.Tensor | dict[str, torch.Tensor]]:
    """Batches (B, d_in) in `dtype` from a Dataset or a Train worker's dataset shard.

    `columns` beyond `("act",)` yields dicts of tensors (the dataset must hold them:
    `build_dataset(columns=...)`). `local_shuffle_buffer_size` rows are buffered and
    sampled at random (costs one copy per batch). `device` None lets Ray choose (the Train
    worker's device, else CPU). A batch in the stored dtype shares memory with Ray's buffers
    when no copy was needed: do not modify it in place.
    """
    return dataset_or_shard.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=ActCollateFn(d_in=d_in, dtype=dtype, columns=columns),
        device="auto" if device is None else device,
        drop_last=drop_last,
        local_shuffle_buffer_size=local_shuffle_buffer_size,
        local_shuffle_seed=local_shuffle_seed,
        prefetch_batches=prefetch_batches,
    )
