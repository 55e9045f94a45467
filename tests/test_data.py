"""raysae.data: format, manifest, writer, validation and the single-process reader."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raysae import data
from raysae.data import storage

DTYPES = sorted(data.STORAGE_DTYPES)


def toy(rows: int = 1000, d_in: int = 16, seed: int = 0) -> torch.Tensor:
    """Random activations (rows, d_in) float32."""
    return torch.randn(rows, d_in, generator=torch.Generator().manual_seed(seed))


def read_all(uri: str, **kwargs) -> torch.Tensor:
    """Every row of a dataset through the plain reader, in manifest order."""
    return torch.cat(list(data.iter_batches(uri, 257, **kwargs)))


def rewrite_manifest(uri: str, **changes) -> None:
    """Replace fields of the committed manifest (to build inconsistent datasets on purpose)."""
    manifest = dataclasses.replace(data.read_manifest(uri), **changes)
    storage.write_bytes(storage.join(uri, data.MANIFEST_NAME), manifest.to_json().encode())


def replace_part(uri: str, index: int, table: pa.Table) -> data.Part:
    """Overwrite part ``index`` with ``table`` and make the manifest agree on rows and bytes."""
    manifest = data.read_manifest(uri)
    written = data.write_part(uri, manifest.parts[index].name, table)
    parts = list(manifest.parts)
    parts[index] = written
    rewrite_manifest(uri, parts=tuple(parts))
    return written


# ---------------------------------------------------------------- round trips


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 300),
    d_in=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    rows_per_part=st.integers(1, 120),
    batch_size=st.integers(1, 100),
)
def test_round_trip_equals_cast_input(
    tmp_path_factory, rows, d_in, dtype, rows_per_part, batch_size
) -> None:
    uri = str(tmp_path_factory.mktemp("ds"))
    acts = toy(rows, d_in) * 10
    manifest = data.write_dataset(uri, acts, dtype=dtype, rows_per_part=rows_per_part)
    assert manifest.n_tokens == rows and len(manifest.parts) == -(-rows // rows_per_part)
    batches = list(data.iter_batches(uri, batch_size))
    assert all(len(b) == batch_size for b in batches[:-1])
    stored = acts.to(data.STORAGE_DTYPES[dtype][0])
    assert torch.equal(torch.cat(batches), stored.float())
    np.testing.assert_allclose(
        manifest.stats.mean, stored.double().mean(0).numpy(), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_allclose(
        manifest.stats.mean_squared_norm, stored.double().pow(2).sum(1).mean().item(), rtol=1e-12
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_reader_dtype_and_metadata_columns(tmp_path, dtype: str) -> None:
    acts = toy(500, 8)
    data.write_dataset(
        str(tmp_path),
        acts,
        dtype=dtype,
        doc_id=np.arange(500) // 10,
        pos=np.arange(500) % 10,
        token_id=np.arange(500),
    )
    batches = list(
        data.iter_batches(
            str(tmp_path),
            128,
            dtype=torch.bfloat16,
            columns=("act", "doc_id", "pos", "token_id"),
            drop_last=True,
        )
    )
    assert len(batches) == 3
    first = batches[0]
    assert first["act"].dtype == torch.bfloat16 and first["act"].shape == (128, 8)
    assert first["doc_id"].dtype == torch.int64 and first["pos"].dtype == torch.int32
    assert torch.equal(first["doc_id"], torch.arange(128) // 10)
    assert torch.equal(
        first["act"], acts[:128].to(data.STORAGE_DTYPES[dtype][0]).to(torch.bfloat16)
    )


def test_decode_is_zero_copy_in_stored_dtype() -> None:
    column = data.encode_act(toy(64, 16).half(), "float16")
    tensor = data.decode_act(column, d_in=16, dtype="float16")
    assert tensor.data_ptr() == column.buffers()[1].address
    sliced = data.decode_act(column.slice(10, 5), d_in=16, dtype="float16")
    assert torch.equal(sliced, tensor[10:15]) and sliced.data_ptr() == tensor[10].data_ptr()


def test_decode_concatenates_chunks_in_one_cast() -> None:
    acts = toy(100, 4)
    column = pa.chunked_array(
        [data.encode_act(acts[:30], "bfloat16"), data.encode_act(acts[30:], "bfloat16")]
    )
    assert torch.equal(
        data.decode_act(column, d_in=4, dtype="bfloat16", out_dtype=torch.float32),
        acts.bfloat16().float(),
    )


@settings(max_examples=20, deadline=None)
@given(split=st.integers(0, 50), seed=st.integers(0, 1000))
def test_stats_merge_equals_one_pass(split: int, seed: int) -> None:
    acts = toy(50, 6, seed) * 100
    merged = data.ActStats.of(acts[:split]).merge(data.ActStats.of(acts[split:]))
    whole = data.ActStats.of(acts)
    assert merged.count == whole.count
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-13, atol=1e-9)
    assert merged.squared_norm_sum == pytest.approx(whole.squared_norm_sum, rel=1e-13)


def test_manifest_json_round_trip_is_exact(tmp_path) -> None:
    manifest = data.write_dataset(
        str(tmp_path), toy(300, 5), layer=3, hook="blocks.3.hook_resid_post", harvest={"seed": 1}
    )
    again = data.Manifest.from_json(manifest.to_json())
    assert again.to_json() == manifest.to_json()
    assert np.array_equal(again.stats.sum, manifest.stats.sum)
    assert data.open_dataset(str(tmp_path)).manifest.layer == 3


@pytest.mark.parametrize("where", ["top", "part", "stats"])
def test_manifest_rejects_unknown_keys(tmp_path, where: str) -> None:
    fields = json.loads(data.write_dataset(str(tmp_path), toy(10, 2)).to_json())
    {"top": fields, "part": fields["parts"][0], "stats": fields["stats"]}[where]["colour"] = "blue"
    with pytest.raises(data.DatasetError, match="unknown keys \\['colour'\\]"):
        data.Manifest.from_json(json.dumps(fields))


# ---------------------------------------------------------------- writer semantics


def test_refuses_existing_dataset_and_leaves_it_intact(tmp_path) -> None:
    uri, acts = str(tmp_path), toy(100, 4)
    data.write_dataset(uri, acts)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        data.write_dataset(uri, toy(100, 4, seed=1))
    assert torch.equal(read_all(uri), acts.half().float())


def test_overwrite_keeps_old_dataset_readable_until_commit(tmp_path) -> None:
    uri, old, new = str(tmp_path), toy(300, 4), toy(200, 4, seed=1)
    old_parts = {p.name for p in data.write_dataset(uri, old, rows_per_part=100).parts}
    with data.DatasetWriter(uri, d_in=4, rows_per_part=100, overwrite=True) as writer:
        writer.write(new)
        assert torch.equal(read_all(uri), old.half().float())  # new parts written, not committed
        writer.commit(model="toy", hook="synthetic")
    assert torch.equal(read_all(uri), new.half().float())
    assert not old_parts & set(os.listdir(uri))  # superseded parts deleted at commit


def test_exception_inside_writer_leaves_no_manifest_and_no_parts(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with data.DatasetWriter(str(tmp_path), d_in=4, rows_per_part=10) as writer:
            writer.write(toy(35, 4))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(data.DatasetError, match="harvest did not finish"):
        data.open_dataset(str(tmp_path))


def test_leaving_writer_without_commit_is_an_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="without commit"):
        with data.DatasetWriter(str(tmp_path), d_in=4) as writer:
            writer.write(toy(5, 4))
    assert os.listdir(tmp_path) == []


def test_leftover_parts_of_a_failed_write_are_removed_by_the_next_commit(tmp_path) -> None:
    data.write_part(
        str(tmp_path),
        data.part_name(0, "deadbeef"),
        data.shard_table(toy(5, 4), np.zeros(5), np.zeros(5), np.zeros(5), dtype="float16"),
    )
    manifest = data.write_dataset(str(tmp_path), toy(5, 4))
    assert sorted(os.listdir(tmp_path)) == sorted([data.MANIFEST_NAME, manifest.parts[0].name])


def test_refuses_prefix_with_foreign_files(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        data.write_dataset(str(tmp_path), toy(5, 4))
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_writer_rejects_non_finite_rows_naming_the_row(tmp_path) -> None:
    acts = toy(50, 4)
    acts[37, 2] = float("inf")
    with pytest.raises(data.DatasetError, match="row 37: activation holds Inf"):
        data.write_dataset(str(tmp_path), acts)
    big = toy(5, 4)
    big[1, 0] = 1e6  # overflows float16
    with pytest.raises(data.DatasetError, match="row 1: .*bfloat16 or float32"):
        data.write_dataset(str(tmp_path), big)
    assert os.listdir(tmp_path) == []


def test_writer_rejects_wrong_width(tmp_path) -> None:
    with data.DatasetWriter(str(tmp_path), d_in=4) as writer:
        with pytest.raises(ValueError, match="expected \\(N, d_in=4\\)"):
            writer.write(toy(5, 3))
        writer.abort()


# ---------------------------------------------------------------- bad datasets


def test_missing_manifest(tmp_path) -> None:
    with pytest.raises(
        data.DatasetError,
        match=f"no manifest.json at {tmp_path}: not a raysae dataset, or its harvest did not finish",
    ):
        data.open_dataset(str(tmp_path))


def test_part_with_wrong_act_width(tmp_path) -> None:
    uri = str(tmp_path)
    manifest = data.write_dataset(uri, toy(100, 16), rows_per_part=50)
    replace_part(
        uri,
        1,
        data.shard_table(toy(50, 12), np.zeros(50), np.zeros(50), np.zeros(50), dtype="float16"),
    )
    with pytest.raises(
        data.DatasetError,
        match=f"part {manifest.parts[1].name}: act has 12 values per row, manifest says d_in=16",
    ):
        data.open_dataset(uri)


def test_truncated_part(tmp_path) -> None:
    uri = str(tmp_path)
    name = data.write_dataset(uri, toy(100, 16), rows_per_part=50).parts[0].name
    with open(tmp_path / name, "r+b") as part:
        part.truncate(1000)
    with pytest.raises(
        data.DatasetError,
        match=f"part {name} is 1000 bytes, manifest.json says .* \\(truncated or replaced\\)",
    ):
        data.open_dataset(uri)


def test_corrupt_part_of_the_right_size(tmp_path) -> None:
    uri = str(tmp_path)
    name = data.write_dataset(uri, toy(100, 16), rows_per_part=50).parts[1].name
    size = os.path.getsize(tmp_path / name)
    with open(tmp_path / name, "r+b") as part:
        part.seek(size - 64)
        part.write(b"\xff" * 64)  # clobbers the footer
    with pytest.raises(
        data.DatasetError, match=f"part {name} is not readable Parquet \\(truncated or corrupt"
    ):
        data.open_dataset(uri)


def test_footer_column_name_made_invalid_utf8_is_refused(tmp_path) -> None:
    """Found by flipping every byte of a part: the footer is not checksummed by Parquet, and a
    column name that no longer decodes raised a raw UnicodeDecodeError."""
    uri = str(tmp_path)
    name = data.write_dataset(uri, toy(100, 16), rows_per_part=50).parts[0].name
    content = bytearray((tmp_path / name).read_bytes())
    at = content.index(b"token_id")  # its first place in the footer: the schema
    content[at] ^= 0x80  # 't' becomes a UTF-8 lead byte that "oken_id" does not continue
    (tmp_path / name).write_bytes(bytes(content))
    with pytest.raises(
        data.DatasetError,
        match=f"part {name} is not readable Parquet \\(a column name is not UTF-8",
    ):
        data.open_dataset(uri)


def test_non_finite_part_names_part_and_row(tmp_path) -> None:
    uri = str(tmp_path)
    data.write_dataset(uri, toy(100, 4), rows_per_part=50)
    bad = toy(50, 4)
    bad[17, 1] = float("nan")
    written = replace_part(
        uri, 1, data.shard_table(bad, np.zeros(50), np.zeros(50), np.zeros(50), dtype="float16")
    )
    data.open_dataset(uri)  # the cheap checks pass: footers are fine
    with pytest.raises(
        data.DatasetError, match=f"part {written.name} row 17: activation holds NaN"
    ):
        data.open_dataset(uri, verify=True)


@pytest.mark.parametrize(
    ("dtype", "value", "kind"),
    [
        ("float16", 1e5, "Inf"),
        ("bfloat16", float("-inf"), "Inf"),
        ("float32", float("nan"), "NaN"),
    ],
)
def test_reading_a_non_finite_row_stops_naming_part_and_row(tmp_path, dtype, value, kind) -> None:
    """Every reader (plain, and Ray Data's read tasks: both call read_part) stops at the first
    non-finite row, naming the part and the row within it, however the part is batched."""
    uri = str(tmp_path)
    data.write_dataset(uri, toy(150, 4), rows_per_part=50, dtype=dtype)
    bad = toy(50, 4)
    bad[37, 2] = value  # 1e5 is finite, but +Inf once stored as float16
    written = replace_part(
        uri, 1, data.shard_table(bad, np.zeros(50), np.zeros(50), np.zeros(50), dtype=dtype)
    )
    dataset = data.open_dataset(uri)
    for batch_size in (16, 50, 1000):
        with pytest.raises(data.BadDataError) as err:
            list(dataset.batches(batch_size))
        assert f"part {written.name} row 37: activation holds {kind}" in str(err.value)
        assert f"raysae verify {uri}" in str(err.value)
    assert len(list(dataset.select([dataset.parts[0].name]).batches(16))) == 4  # the rest reads


def test_manifest_row_counts_disagree_with_parts(tmp_path) -> None:
    uri = str(tmp_path)
    manifest = data.write_dataset(uri, toy(100, 4), rows_per_part=50)
    fields = json.loads(manifest.to_json())
    fields["n_tokens"] = 120
    storage.write_bytes(storage.join(uri, data.MANIFEST_NAME), json.dumps(fields).encode())
    with pytest.raises(
        data.DatasetError, match="row counts disagree: n_tokens=120, parts sum to 100"
    ):
        data.read_manifest(uri)


def test_part_footer_rows_disagree_with_manifest(tmp_path) -> None:
    uri = str(tmp_path)
    manifest = data.write_dataset(uri, toy(100, 4), rows_per_part=50)
    parts = (
        dataclasses.replace(manifest.parts[0], rows=40),
        dataclasses.replace(manifest.parts[1], rows=60),
    )
    rewrite_manifest(uri, parts=parts)
    with pytest.raises(
        data.DatasetError, match=f"part {parts[0].name} has 50 rows, manifest.json says 40"
    ):
        data.open_dataset(uri)


def test_missing_part(tmp_path) -> None:
    uri = str(tmp_path)
    name = data.write_dataset(uri, toy(100, 4), rows_per_part=50).parts[0].name
    os.remove(tmp_path / name)
    with pytest.raises(data.DatasetError, match=f"part {name} listed in manifest.json is missing"):
        data.open_dataset(uri)


def test_s3_round_trip_matches_local_bytes(tmp_path, s3_prefix: str) -> None:
    acts = toy(400, 8)
    local = data.write_dataset(str(tmp_path), acts, rows_per_part=150)
    remote = data.write_dataset(s3_prefix, acts, rows_per_part=150)
    assert [p.bytes for p in local.parts] == [p.bytes for p in remote.parts]
    assert torch.equal(read_all(s3_prefix), read_all(str(tmp_path)))
