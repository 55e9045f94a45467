"""raysae.data.stream: the Ray Data reader agrees with the plain reader, locally and on S3."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pytest
import ray.data
import torch

from raysae import data
from raysae.data import stream

pytestmark = pytest.mark.timeout(300)

ROWS, D_IN, DOC_ROWS = 8000, 16, 64


def toy(seed: int = 0) -> torch.Tensor:
    """(ROWS, D_IN) activations whose documents are DOC_ROWS consecutive rows (worst case for mixing)."""
    return torch.randn(ROWS, D_IN, generator=torch.Generator().manual_seed(seed)) * 3


def write(uri: str, dtype: str = "float16") -> torch.Tensor:
    """Write the toy dataset (8 parts, row index in ``pos``); returns what was stored, as float32."""
    acts = toy()
    data.write_dataset(
        uri,
        acts,
        dtype=dtype,
        rows_per_part=1000,
        doc_id=np.arange(ROWS) // DOC_ROWS,
        pos=np.arange(ROWS),
    )
    return acts.to(data.STORAGE_DTYPES[dtype][0]).float()


def read_rows(
    dataset_or_shard, dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (act, row index) through stream.iter_torch_batches, sorted by row index."""
    batches = list(
        stream.iter_torch_batches(
            dataset_or_shard,
            batch_size=300,
            dtype=dtype,
            d_in=D_IN,
            columns=("act", "pos"),
            drop_last=False,
            **kwargs,
        )
    )
    acts, rows = (
        torch.cat([b["act"] for b in batches]),
        torch.cat([b["pos"] for b in batches]).long(),
    )
    order = rows.argsort()
    return acts[order], rows[order]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_ray_read_equals_written_rows(ray_cluster, tmp_path, dtype: str) -> None:
    stored = write(str(tmp_path), dtype)
    acts, rows = read_rows(stream.build_dataset(str(tmp_path), seed=0, columns=("act", "pos")))
    assert torch.equal(rows, torch.arange(ROWS))
    assert torch.equal(acts, stored)


def test_s3_read_is_byte_identical_to_local(ray_cluster, tmp_path, s3_prefix: str) -> None:
    write(str(tmp_path))
    write(s3_prefix)
    local, _ = read_rows(
        stream.build_dataset(str(tmp_path), columns=("act", "pos")), dtype=torch.float16
    )
    remote, rows = read_rows(
        stream.build_dataset(s3_prefix, columns=("act", "pos")), dtype=torch.float16
    )
    assert torch.equal(rows, torch.arange(ROWS))
    assert torch.equal(remote.view(torch.int16), local.view(torch.int16))


def test_part_order_is_new_each_epoch_and_reproducible(tmp_path) -> None:
    write(str(tmp_path))
    manifest = data.read_manifest(str(tmp_path))

    def planned_orders(seed: int, executions: int) -> list[list[str]]:
        """Part order of the read tasks of successive executions (what Ray schedules, in order)."""
        source = stream.PartsDatasource(
            data.Dataset(str(tmp_path), manifest, manifest.parts), shuffle=True, seed=seed
        )
        context = ray.data.DataContext.get_current()
        return [
            [t.metadata.input_files[0] for t in source.get_read_tasks(1, data_context=context)]
            for _ in range(executions)
        ]

    epoch_0, epoch_1 = planned_orders(seed=7, executions=2)
    assert sorted(epoch_0) == sorted(epoch_1) == sorted(p.name for p in manifest.parts)
    assert epoch_0 != epoch_1
    assert planned_orders(seed=7, executions=1) == [epoch_0]
    assert planned_orders(seed=8, executions=1) != [epoch_0]


def test_act_only_batches_are_plain_tensors(ray_cluster, tmp_path) -> None:
    write(str(tmp_path))
    dataset = stream.build_dataset(
        str(tmp_path),
        shuffle_files=False,
        parts=[data.read_manifest(str(tmp_path)).parts[0].name],
    )
    batches = list(
        stream.iter_torch_batches(dataset, batch_size=256, dtype=torch.float32, d_in=D_IN)
    )
    assert len(batches) == 1000 // 256  # drop_last by default
    assert all(
        isinstance(b, torch.Tensor) and b.shape == (256, D_IN) and b.dtype == torch.float32
        for b in batches
    )


def distinct_docs_per_batch(dataset, **kwargs) -> float:
    """Mean number of distinct documents in a batch of 256 rows."""
    batches = stream.iter_torch_batches(
        dataset, batch_size=256, dtype=torch.float32, d_in=D_IN, columns=("doc_id",), **kwargs
    )
    return float(np.mean([len(torch.unique(b["doc_id"])) for b in batches]))


def test_local_shuffle_buffer_mixes_documents(ray_cluster, tmp_path) -> None:
    write(str(tmp_path))
    dataset = stream.build_dataset(str(tmp_path), columns=("doc_id",), seed=0)
    in_order = distinct_docs_per_batch(dataset)
    mixed = distinct_docs_per_batch(dataset, local_shuffle_buffer_size=3000, local_shuffle_seed=0)
    assert in_order <= 6  # 256 consecutive rows span at most 5 documents of 64 rows
    assert mixed >= 30, f"only {mixed:.1f} documents per batch with a 3000-row shuffle buffer"


def test_streaming_split_gives_each_worker_disjoint_rows(ray_cluster, tmp_path) -> None:
    write(str(tmp_path))
    shards_ = stream.build_dataset(str(tmp_path), columns=("act", "pos")).streaming_split(
        2, equal=True
    )
    results: list = [None, None]

    def consume(i: int) -> None:  # every split must be pulled at the same time, as Train workers do
        results[i] = read_rows(shards_[i])[1]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, second = results
    assert len(first) == len(second) == ROWS // 2
    assert torch.equal(torch.cat([first, second]).sort().values, torch.arange(ROWS))


def test_collate_decodes_chunked_batches_in_place_of_ray_default() -> None:
    acts = torch.randn(10, D_IN)
    table = pa.concat_tables(
        [
            data.shard_table(acts[:4], np.zeros(4), np.arange(4), np.zeros(4), dtype="bfloat16"),
            data.shard_table(
                acts[4:], np.zeros(6), np.arange(4, 10), np.zeros(6), dtype="bfloat16"
            ),
        ]
    )
    batch = stream.ActCollateFn(d_in=D_IN, dtype=torch.float32, columns=("act", "doc_id"))(table)
    assert torch.equal(batch["act"], acts.bfloat16().float())
    assert torch.equal(batch["doc_id"], torch.arange(10))


def test_uncommitted_prefix_is_refused_before_reading(tmp_path) -> None:
    with pytest.raises(data.DatasetError, match="harvest did not finish"):
        stream.build_dataset(str(tmp_path))


@pytest.mark.timeout(240)
def test_feeds_a_ray_train_run(ray_cluster, tmp_path) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer

    write(str(tmp_path))

    def loop(config: dict) -> None:
        shard = ray.train.get_dataset_shard("train")
        rows = sum(
            len(x)
            for x in stream.iter_torch_batches(
                shard, batch_size=500, dtype=torch.float32, d_in=D_IN
            )
        )
        rank = ray.train.get_context().get_world_rank()
        (tmp_path / f"rows-{rank}").write_text(
            str(rows)
        )  # Train V2 keeps metrics only with checkpoints
        ray.train.report({"rows": rows})

    trainer = TorchTrainer(
        loop,
        datasets={"train": stream.build_dataset(str(tmp_path))},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(
            name="stream-feeds-train", storage_path=str(tmp_path / "runs")
        ),
    )
    assert trainer.fit().error is None
    assert [int((tmp_path / f"rows-{rank}").read_text()) for rank in range(2)] == [
        ROWS // 2
    ] * 2  # a half each
