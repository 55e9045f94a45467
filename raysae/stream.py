"""Streaming reader: a dataset URI → Ray Data → torch batches (B, d_in), for Ray Train workers.

::

    ds = build_dataset("s3://bucket/acts/smollm2/layer_3")          # driver
    trainer = TorchTrainer(loop, datasets={"train": ds}, ...)        # Train streaming_splits it

    def loop(config):                                                # each worker
        shard = ray.train.get_dataset_shard("train")
        for x in iter_torch_batches(shard, batch_size=4096, dtype=torch.float32, d_in=576):
            ...                                                      # x: (4096, 576) float32

Mixing documents: harvest already shuffles tokens across many documents inside each part;
here the part files are read in a random order (``shuffle_files``), and
``local_shuffle_buffer_size`` optionally mixes rows of several parts as well.

Decoding is :func:`raysae.shards.collate`, shared with the single-process reader: the ``act``
bytes are viewed as a tensor and cast once into the training dtype — no per-row copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyarrow as pa
import ray.data
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from raysae import shards, storage


def build_dataset(
    uri: str,
    *,
    shuffle_files: bool = True,
    seed: int | None = None,
    columns: Sequence[str] = ("act",),
    parts: Sequence[str] | None = None,
    read_cpus: float = 1.0,
) -> ray.data.Dataset:
    """A lazy Ray Dataset over the committed dataset at ``uri`` (validated first).

    Reads the parts named ``parts`` (default all), one read task per part (parts are sized for
    it, see ``shards.PART_BYTES``), in a random order seeded by ``seed`` when
    ``shuffle_files``. ``columns`` selects what is read; Ray pushes the selection down into
    the Parquet read. ``read_cpus`` is what each read task reserves: below 1 lets reads run
    beside fractional-CPU Train workers on a small machine. (Ray 2.60's file-listing step
    always takes 1 CPU: leave at least one CPU outside the Train workers' reservations, or
    the stream waits for it forever.)
    """
    manifest = shards.open_dataset(uri)
    fs, root = storage.filesystem_and_path(uri)
    paths = [f"{root}/{part.name}" for part in shards.select_parts(uri, manifest, parts)]
    dataset = ray.data.read_parquet(
        paths,
        filesystem=fs,
        shuffle=ray.data.FileShuffleConfig(seed=seed) if shuffle_files else None,
        override_num_blocks=len(paths),
        ray_remote_args={"num_cpus": read_cpus},
    )
    return dataset.select_columns(list(columns))


class ActCollateFn(ArrowBatchCollateFn):
    """Ray collate: Arrow batch → act tensor (B, d_in), or a dict of tensors (see shards.collate)."""

    def __init__(self, *, d_in: int, dtype: torch.dtype, columns: Sequence[str] = ("act",)) -> None:
        self.d_in, self.dtype, self.columns = d_in, dtype, tuple(columns)

    def __call__(self, batch: pa.Table) -> torch.Tensor | dict[str, torch.Tensor]:
        # The stored dtype comes from the act field's metadata, which Ray carries with each block.
        return shards.collate(batch, d_in=self.d_in, out_dtype=self.dtype, columns=self.columns)


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
    """Batches (B, d_in) in ``dtype`` from a Dataset or a Train worker's dataset shard.

    ``columns`` beyond ``("act",)`` yields dicts of tensors. ``local_shuffle_buffer_size``
    rows are buffered and sampled at random (costs one copy per batch). ``device`` None lets
    Ray choose (the Train worker's device, else CPU). A batch in the stored dtype shares memory
    with Ray's buffers when no copy was needed: do not modify it in place.
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
