"""Integrity from the bytes up: page checksums on every read, part hashes, `raysae verify`, and
a fuzz of corrupted datasets (every one either reads back bit-identical or is refused, named)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import event, given, settings
from strategies import dataset_mutations

from raysae import data
from raysae.__main__ import main
from raysae.data import storage

ROWS, D_IN, ROWS_PER_PART = 72, 16, 24


def small_dataset(uri: str) -> dict[str, torch.Tensor]:
    """Write 3 parts of 24 rows × d_in 16 (float16); every column as written, in part order."""
    g = torch.Generator().manual_seed(0)
    columns = {
        "act": torch.randn(ROWS, D_IN, generator=g).half(),
        "token_id": torch.randint(0, 1000, (ROWS,), generator=g, dtype=torch.int32),
        "doc_id": torch.arange(ROWS, dtype=torch.int64) // 5,
        "pos": torch.arange(ROWS, dtype=torch.int32) % 5,
    }
    data.write_dataset(
        uri,
        columns["act"],
        dtype="float16",
        token_id=columns["token_id"],
        doc_id=columns["doc_id"],
        pos=columns["pos"],
        rows_per_part=ROWS_PER_PART,
    )
    return columns


def read_back(uri: str) -> dict[str, torch.Tensor]:
    """Every column of every part through open_dataset and the plain reader."""
    batches = list(data.open_dataset(uri).batches(1000, dtype=torch.float16, columns=data.COLUMNS))
    return {name: torch.cat([batch[name] for batch in batches]) for name in data.COLUMNS}


def flip(path: str, position: int, mask: int = 0x01) -> None:
    """XOR the byte at `position` of the file at `path` with `mask`."""
    with open(path, "r+b") as file:
        file.seek(position)
        byte = file.read(1)[0]
        file.seek(position)
        file.write(bytes([byte ^ mask]))


def act_chunk(path: str) -> tuple[int, int]:
    """(offset, bytes) of the act column chunk (its page header and data page) in a part."""
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert column.path_in_schema == "act"
    return column.data_page_offset, column.total_compressed_size


def verify(uri: str, capsys) -> tuple[int, str, str]:
    """`raysae verify URI`: (exit code, stdout, stderr)."""
    code = main(["verify", uri])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- checksums on read


def without_crc32(uri: str) -> None:
    """Drop every part's CRC-32 from the manifest at `uri`, as raysae wrote manifests before it
    recorded them (parts then still carry page checksums)."""
    path = os.path.join(uri, data.MANIFEST_NAME)
    manifest = json.loads(storage.read_bytes(path))
    for part in manifest["parts"]:
        del part["crc32"]
    storage.write_bytes(path, json.dumps(manifest).encode())


def test_every_flipped_byte_of_a_part_fails_the_read_naming_the_part(tmp_path) -> None:
    """The part's CRC-32 covers every byte (page headers and footer too, which page checksums
    leave out): a changed byte anywhere fails the read itself, before any row is decoded, even
    when the dataset was opened (footers checked) before the change."""
    uri = str(tmp_path / "ds")
    small_dataset(uri)
    dataset = data.open_dataset(uri)
    part = dataset.parts[1]
    path = os.path.join(uri, part.name)
    with open(path, "rb") as file:
        original = file.read()
    for position in range(len(original)):
        flip(path, position, 0x01 if position % 2 else 0xFF)
        with pytest.raises(
            data.DatasetError,
            match=f"{uri}: part {part.name}: its CRC-32 differs from the one in manifest.json "
            f"\\(corrupt or replaced\\); re-harvest, or run `raysae verify {uri}`",
        ):
            list(dataset.read_part(part, columns=data.COLUMNS))
        with open(path, "wb") as file:
            file.write(original)
    assert [len(t) for t in dataset.read_part(part, columns=data.COLUMNS)] == [part.rows]


def test_writer_records_the_crc32_of_the_uploaded_bytes(tmp_path) -> None:
    import zlib

    small_dataset(str(tmp_path))
    for part in data.read_manifest(str(tmp_path)).parts:
        assert part.crc32 == zlib.crc32((tmp_path / part.name).read_bytes())


def test_wrong_crc32_in_the_manifest_is_refused_by_read_and_verify(tmp_path, capsys) -> None:
    uri = str(tmp_path)
    small_dataset(uri)
    manifest = json.loads((tmp_path / data.MANIFEST_NAME).read_text())
    manifest["parts"][2]["crc32"] ^= 1 << 31  # the part itself is intact, its SHA-256 matches
    (tmp_path / data.MANIFEST_NAME).write_text(json.dumps(manifest))
    name = manifest["parts"][2]["name"]
    with pytest.raises(data.DatasetError, match=f"part {name}: its CRC-32 differs"):
        read_back(uri)
    code, out, _ = verify(uri, capsys)
    assert code == 1 and f"BAD {uri}: part {name}: its CRC-32 differs" in out


def test_flipped_byte_in_an_s3_part_fails_the_read(s3_prefix: str, s3_requests) -> None:
    import boto3

    small_dataset(s3_prefix)
    name = data.read_manifest(s3_prefix).parts[0].name
    bucket, prefix = s3_prefix[len("s3://") :].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    content = bytearray(s3.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read())
    content[len(content) // 2] ^= 0x04
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=bytes(content))
    dataset = data.open_dataset(s3_prefix)
    part = dataset.parts[0]
    start = len(s3_requests.requests)
    with pytest.raises(data.DatasetError, match=f"part {name}: its CRC-32 differs"):
        list(dataset.read_part(part, columns=["act"]))
    gets = [r for r in s3_requests.since(start) if r[0] == "GET" and r[1].endswith(name)]
    assert len(gets) == 1  # the whole part in one request


@pytest.mark.timeout(120)
def test_flipped_byte_fails_the_ray_data_read_naming_the_part(ray_cluster, tmp_path) -> None:
    from raysae.data import stream

    uri = str(tmp_path)
    small_dataset(uri)
    dataset = data.open_dataset(uri)
    name = dataset.parts[2].name
    flip(str(tmp_path / name), os.path.getsize(tmp_path / name) // 3)
    batches = stream.iter_torch_batches(
        stream.build_dataset(dataset), batch_size=8, dtype=torch.float32, d_in=D_IN
    )
    with pytest.raises(data.DatasetError, match=f"part {name}: its CRC-32 differs"):
        list(batches)


def test_old_manifest_without_crc32_checks_page_checksums(tmp_path) -> None:
    uri = str(tmp_path)
    small_dataset(uri)
    without_crc32(uri)
    name = data.read_manifest(uri).parts[1].name
    offset, size = act_chunk(str(tmp_path / name))
    flip(str(tmp_path / name), offset + size - 10)  # inside the values, past the page header
    dataset = data.open_dataset(uri)  # the footer is intact: opening cannot tell
    with pytest.raises(
        data.DatasetError,
        match=f"{uri}: part {name} is corrupt .*CRC checksum verification failed.*"
        f"re-harvest, or run `raysae verify {uri}`",
    ):
        list(dataset.batches(10))


def test_old_manifest_every_flip_in_the_act_page_header_is_refused_or_harmless(tmp_path) -> None:
    """Without a part CRC-32, reads rely on page checksums, which cover page data, not page
    headers; a header flip that still parses may miscount the values, which the row check
    against the manifest catches."""
    uri = str(tmp_path / "good")
    written = small_dataset(uri)
    without_crc32(uri)
    name = data.read_manifest(uri).parts[0].name
    offset, _ = act_chunk(os.path.join(uri, name))
    outcomes = {"identical": 0, "refused": 0}
    for position in range(offset, offset + 24):  # the page header is ~20 bytes
        for mask in (0x01, 0x10, 0x80):
            with open(os.path.join(uri, name), "rb") as file:
                original = file.read()
            flip(os.path.join(uri, name), position, mask)
            try:
                got = read_back(uri)
            except data.DatasetError as err:
                assert name in str(err)
                outcomes["refused"] += 1
            else:
                assert all(torch.equal(got[k], written[k]) for k in written), (position, mask)
                outcomes["identical"] += 1
            with open(os.path.join(uri, name), "wb") as file:
                file.write(original)
    assert outcomes["refused"] > 0


def test_writer_records_the_sha256_of_the_uploaded_bytes(tmp_path) -> None:
    import hashlib

    small_dataset(str(tmp_path))
    for part in data.read_manifest(str(tmp_path)).parts:
        assert part.sha256 == hashlib.sha256((tmp_path / part.name).read_bytes()).hexdigest()


# ---------------------------------------------------------------- raysae verify


def test_verify_a_good_dataset(tmp_path, capsys) -> None:
    small_dataset(str(tmp_path))
    code, out, err = verify(str(tmp_path), capsys)
    assert code == 0
    assert out.strip() == f"{tmp_path}: 3 parts, 72 rows: all good"
    assert "verify: 3/3 parts" in err


@pytest.mark.parametrize(
    "damage, problem",
    [
        ("flip", "its SHA-256 differs from the one in manifest.json"),
        ("truncate", "is 1000 bytes, manifest.json says .* \\(truncated or replaced\\)"),
        ("missing", "listed in manifest.json is missing"),
    ],
)
def test_verify_names_each_bad_part(tmp_path, capsys, damage: str, problem: str) -> None:
    uri = str(tmp_path)
    small_dataset(uri)
    parts = data.read_manifest(uri).parts
    for part in parts[::2]:  # parts 0 and 2; part 1 stays good
        path = str(tmp_path / part.name)
        if damage == "flip":
            offset, size = act_chunk(path)
            flip(path, offset + size // 2)
        elif damage == "truncate":
            os.truncate(path, 1000)
        else:
            os.remove(path)
    code, out, err = verify(uri, capsys)
    assert code == 1, err
    lines = out.splitlines()
    for line, part in zip(lines, parts[::2]):
        assert line.startswith(f"BAD {uri}: part {part.name}")
        assert re.search(problem, line), line
    assert parts[1].name not in out
    assert lines[-1] == f"{uri}: 3 parts, 72 rows: 2 bad; re-harvest the dataset"


def test_verify_without_a_manifest_is_an_error(tmp_path, capsys) -> None:
    code, _, err = verify(str(tmp_path), capsys)
    assert code == 2 and f"raysae verify: error: no manifest.json at {tmp_path}" in err


def test_old_manifest_without_hashes_reads_and_verify_says_so(tmp_path, capsys) -> None:
    uri = str(tmp_path)
    written = small_dataset(uri)
    manifest = json.loads((tmp_path / data.MANIFEST_NAME).read_text())
    for part in manifest["parts"]:
        del part["sha256"], part["crc32"]  # as raysae wrote manifests before it recorded hashes
    (tmp_path / data.MANIFEST_NAME).write_text(json.dumps(manifest))
    got = read_back(uri)
    assert all(torch.equal(got[k], written[k]) for k in written)
    code, out, _ = verify(uri, capsys)
    assert code == 0
    assert "3 of 3 parts have no SHA-256 in manifest.json" in out
    assert "hashes were not recorded" in out and out.splitlines()[-1].endswith("all good")


def test_verify_imports_no_ray(tmp_path) -> None:
    small_dataset(str(tmp_path))
    check = (
        "import sys; from raysae.__main__ import main; code = main(['verify', sys.argv[1]]); "
        "assert 'ray' not in sys.modules, 'ray imported'; sys.exit(code)"
    )
    run = subprocess.run(
        [sys.executable, "-c", check, str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr


# ---------------------------------------------------------------- fuzz


def mutate(uri: str, mutation: tuple) -> str:
    """Apply a `strategies.dataset_mutations` corruption; the name of the file it changed."""
    manifest_path = os.path.join(uri, data.MANIFEST_NAME)
    if mutation[0] == "flip":
        _, index, where, position, mask = mutation
        name = data.read_manifest(uri).parts[index].name
        path = os.path.join(uri, name)
        start, size = act_chunk(path) if where == "act" else (0, os.path.getsize(path))
        flip(path, start + position % size, mask)
        return name
    text = storage.read_bytes(manifest_path)
    if mutation[0] == "truncate":
        storage.write_bytes(manifest_path, text[: mutation[1] % len(text)])
        return data.MANIFEST_NAME
    _, path, edit = mutation
    fields = json.loads(text)
    parent = fields
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if edit == "delete":
        del parent[key]
    elif edit == "add":
        parent["extra"] = 1
    elif edit == "negate" and isinstance(parent[key], (int, float)):
        parent[key] = -parent[key]
    elif edit == "negate" and isinstance(parent[key], list) and key == "sum":
        parent[key] = [-value for value in parent[key]]
    else:  # retype (and negate of what has no sign)
        value = parent[key]
        parent[key] = {str: 7, int: str(value), float: str(value), type(None): 0, list: {}}.get(
            type(value), []
        )
    storage.write_bytes(manifest_path, json.dumps(fields).encode())
    return data.MANIFEST_NAME


def outcome(uri: str, written: dict[str, torch.Tensor], changed: str) -> str:
    """ "identical" if the dataset at `uri` reads back exactly as `written`, "refused" if it is
    refused with a DatasetError naming a file; fails on anything else."""
    try:
        got = read_back(uri)
    except data.DatasetError as err:
        names = [changed, data.MANIFEST_NAME]
        assert any(name in str(err) for name in names), f"names no file: {err}"
        return "refused"
    for name, column in written.items():
        assert torch.equal(got[name], column), f"accepted with a changed {name} column"
    return "identical"


@settings(max_examples=60, deadline=None)
@given(mutation=dataset_mutations())
def test_corrupted_dataset_reads_identical_or_is_refused(tmp_path_factory, mutation) -> None:
    uri = str(tmp_path_factory.mktemp("ds"))
    written = small_dataset(uri)
    changed = mutate(uri, mutation)
    event(f"{mutation[0]}: {outcome(uri, written, changed)}")
