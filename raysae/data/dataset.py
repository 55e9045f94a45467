"""Reading a dataset: the `Dataset` value, opened and validated once, and its reader.

A command opens each dataset once (`open_dataset`: the manifest, a listing and every
part's footer, O(parts)) and passes the value down: to the sweep's points, the Ray Train
workers and their restarts, the held-out evaluation. Nothing below the command takes a URI to
open again; across a Ray boundary the value travels as it is (URI, manifest, part list).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from isal import isal_zlib

from raysae.data import storage
from raysae.data.format import COLUMNS, Rebatcher, check_act_type, check_finite, collate, decode_act
from raysae.data.manifest import MANIFEST_NAME, DatasetError, Manifest, Part, read_manifest


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A committed dataset whose parts were checked against its manifest, and the parts to read.

    `parts` is every part (from `open_dataset`) or a subset (`select`,
    `split`); readers read exactly these, in this order unless told to shuffle.
    """

    uri: str
    """Where it lives: a local directory or s3://bucket/prefix."""
    manifest: Manifest
    """The whole dataset's manifest (statistics are over all its parts)."""
    parts: tuple[Part, ...]
    """The parts this value reads."""
    endpoint: str | None = None
    """The S3 endpoint it was opened through (None: local, or this process's default), so
    every process reading the value reads the store the command checked."""

    @property
    def d_in(self) -> int:
        """Width of each activation vector."""
        return self.manifest.d_in

    @property
    def dtype(self) -> str:
        """Stored dtype: float16, bfloat16 or float32."""
        return self.manifest.dtype

    @property
    def n_tokens(self) -> int:
        """Rows in `parts`."""
        return sum(part.rows for part in self.parts)

    def select(self, names: Sequence[str]) -> Dataset:
        """The same dataset reading only the parts called `names`, in that order."""
        by_name = {part.name: part for part in self.manifest.parts}
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise DatasetError(f"{self.uri}: no parts named {unknown[:5]} in {MANIFEST_NAME}")
        return dataclasses.replace(self, parts=tuple(by_name[name] for name in names))

    def split(self, held_out: int) -> tuple[Dataset, Dataset]:
        """(training, held-out): the last `held_out` parts are held out; with 0, both are all
        of `parts` (the evaluation then reads training data)."""
        if not held_out:
            return self, self
        if len(self.parts) <= held_out:
            raise DatasetError(
                f"{self.uri} has {len(self.parts)} part(s): holding out {held_out} leaves none"
            )
        cut = len(self.parts) - held_out
        return (
            dataclasses.replace(self, parts=self.parts[:cut]),
            dataclasses.replace(self, parts=self.parts[cut:]),
        )

    def shard(self, rank: int, size: int) -> Dataset:
        """Worker `rank`'s share of `parts` among `size` workers: every size-th part."""
        return dataclasses.replace(self, parts=self.parts[rank::size])

    def read_part(
        self, part: Part, *, columns: Sequence[str], batch_size: int | None = None
    ) -> Iterator[pa.Table]:
        """One part's rows as Arrow tables (see `read_part`)."""
        return read_part(
            self.uri,
            part,
            d_in=self.d_in,
            dtype=self.dtype,
            columns=columns,
            batch_size=batch_size,
            endpoint=self.endpoint,
        )

    def part_reader(self):
        """A picklable `read(part, columns=..., batch_size=None)` of this value's parts (what a
        Ray read task calls): `read_part` with this dataset's place and format."""
        return functools.partial(
            read_part, self.uri, d_in=self.d_in, dtype=self.dtype, endpoint=self.endpoint
        )

    def batches(
        self,
        batch_size: int,
        *,
        dtype: torch.dtype = torch.float32,
        columns: Sequence[str] = ("act",),
        drop_last: bool = False,
        seed: int | None = None,
    ) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Read `parts` in this process with pyarrow: tensors (B, d_in) in `dtype`.

        In order, or shuffled by `seed` when given. Yields the act tensor, or a dict of
        tensors if `columns` names more than `act` (see `collate`). The
        single-process trainer's reader, the held-out evaluation's and the ingest baseline.
        """
        parts = list(self.parts)
        if seed is not None:
            parts = [parts[i] for i in np.random.default_rng(seed).permutation(len(parts))]
        rebatcher = Rebatcher(batch_size)
        for part in parts:
            for table in self.read_part(part, columns=columns, batch_size=batch_size):
                for batch in rebatcher.push(table):
                    yield self._collate(batch, dtype, columns)
        rest = rebatcher.rest()
        if rest is not None and not drop_last:
            yield self._collate(rest, dtype, columns)

    def _collate(self, batch: pa.Table, out_dtype: torch.dtype, columns: Sequence[str]):
        return collate(
            batch, d_in=self.d_in, dtype=self.dtype, out_dtype=out_dtype, columns=columns
        )

    def verify(self) -> None:
        """Read every byte of `parts` and check it (`verify_part`: size, SHA-256 where
        recorded, page checksums, rows, NaN/Inf), naming the first bad part (slow: one full pass
        over the data)."""
        for part in self.parts:
            verify_part(self.uri, self.manifest, part)


def open_dataset(uri: str, *, verify: bool = False) -> Dataset:
    """Open the dataset at `uri`: read its manifest and check every part against it.

    Always: every part exists with the listed size and its Parquet footer has the listed rows
    and act width. With `verify`: additionally read every byte (`Dataset.verify`). Each part's
    CRC-32 (or, in older manifests, its page checksums) is checked whenever rows are read
    (`read_part`).
    """
    storage.check_reachable(uri)  # a dead endpoint fails now, not after the retry budget
    manifest = read_manifest(uri)
    present = storage.list_files(uri)
    for part in manifest.parts:
        if part.name not in present:
            raise DatasetError(
                f"{uri}: part {part.name} listed in {MANIFEST_NAME} is missing; re-harvest"
            )
        if present[part.name] != part.bytes:
            raise DatasetError(
                f"{uri}: part {part.name} is {present[part.name]} bytes, {MANIFEST_NAME} says "
                f"{part.bytes} (truncated or replaced); re-harvest"
            )
    # Footers are small reads: overlap their latency.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda part: _check_footer(uri, manifest, part), manifest.parts))
    dataset = Dataset(
        uri, manifest, manifest.parts, storage.s3_endpoint() if storage.is_s3(uri) else None
    )
    if verify:
        dataset.verify()
    return dataset


_UNREADABLE = (pa.ArrowException, OSError)
"""What pyarrow raises on a corrupt file: OSError (a page checksum, a short read),
ArrowInvalid (a bad page header or footer), ArrowNotImplementedError (a garbled encoding).
An OSError may instead be the store not answering: `storage.raise_if_unreachable` first."""


def _fix(uri: str) -> str:
    """What to do about a bad part of the dataset at `uri`."""
    return f"re-harvest, or run `raysae verify {uri}` to list every bad part"


def _bad_rows_fix(uri: str) -> str:
    """What to do about a part whose rows a run must not train on."""
    return (
        "the part holds corrupt or overflowed activations (float16 overflow: harvest with dtype "
        f"bfloat16 or float32); re-harvest it, or run `raysae verify {uri}` to list every bad part"
    )


def _open_part(
    uri: str, part: Part, content: pa.Buffer, *, page_checksums: bool = True
) -> pq.ParquetFile:
    """Open one part from its bytes in memory (close it after use), its page checksums verified
    on every read unless told not to, naming it if its footer cannot be read."""
    try:
        return pq.ParquetFile(pa.BufferReader(content), page_checksum_verification=page_checksums)
    except _UNREADABLE as err:
        raise DatasetError(
            f"{uri}: part {part.name} is not readable Parquet (truncated or corrupt: {err}); "
            + _fix(uri)
        ) from err


READ_CHUNK = 1 << 18
"""Bytes per read call when a local part is read into memory: small enough that each chunk is
still in the CPU's cache (L2) when its CRC is computed. Over the whole 64 MiB part at once the
CRC pass would stream it from RAM again (4-10 GB/s here, 10-25 % of a page-cached read); chunk
by chunk it runs at cache speed (55-70 GB/s with ISA-L's carry-less-multiply CRC). 256 KiB cost
the least here (bench/checksum.py); 4 MiB chunks cost 4-8x more, 64 KiB more syscalls."""


def _read_checked(uri: str, part: Part, *, endpoint: str | None = None) -> pa.Buffer:
    """The bytes of `part` (through the S3 `endpoint` if given), read whole into memory and
    checked against its size and (where the manifest records it) CRC-32, which is computed as
    the bytes arrive."""
    where = f"{uri}: part {part.name}"
    path = storage.join(uri, part.name)
    try:
        if storage.is_s3(uri):
            # One GET for the part (every read call on an S3 file is a ranged request); the CRC
            # pass over memory costs little beside the transfer.
            content = pa.py_buffer(storage.read_bytes(path, endpoint=endpoint))
            size, extra, crc = content.size, b"", isal_zlib.crc32(content)
        else:
            content, size, extra, crc = _read_local(storage.locate(path).path, part)
    except FileNotFoundError:
        raise DatasetError(f"{where} listed in {MANIFEST_NAME} is missing; re-harvest") from None
    if size != part.bytes or extra:
        raise DatasetError(
            f"{where} is {'more than ' if extra else ''}{size} bytes, {MANIFEST_NAME} says "
            f"{part.bytes} (truncated or replaced); re-harvest"
        )
    if part.crc32 is not None:
        _check_crc32(uri, part, crc)
    return content


def _read_local(path: str, part: Part) -> tuple[pa.Buffer, int, bytes, int]:
    """(buffer, bytes read, a byte past the listed size if any, CRC-32 if recorded) of a local
    part, read in `READ_CHUNK`s straight into one buffer from Arrow's memory pool.

    Python's unbuffered `readinto` rather than a pyarrow stream: it reads into the buffer in
    place, one syscall per chunk, so each chunk can be hashed while it is in cache; pyarrow has
    no hash, nor a read that calls back per chunk."""
    content = pa.allocate_buffer(part.bytes)
    view, size, crc = memoryview(content), 0, 0
    with open(path, "rb", buffering=0) as file:
        while size < part.bytes:
            n = file.readinto(view[size : size + READ_CHUNK])
            if not n:
                break
            if part.crc32 is not None:
                crc = isal_zlib.crc32(view[size : size + n], crc)
            size += n
        extra = file.read(1)
    return content, size, extra, crc


def _check_crc32(uri: str, part: Part, crc: int) -> None:
    """Raise DatasetError unless `crc`, computed over the part's bytes, is the manifest's."""
    if crc != part.crc32:
        raise DatasetError(
            f"{uri}: part {part.name}: its CRC-32 differs from the one in {MANIFEST_NAME} "
            "(corrupt or replaced); " + _fix(uri)
        )


def _read_footer(uri: str, part: Part) -> tuple[int, pa.Schema]:
    """(rows, Arrow schema) from one part's footer, in one read. A pyarrow dataset fragment is
    told the file's size (the listing checked it), so it skips the HEAD request that opening
    by path costs on S3 (apache/arrow#37868): one request per part instead of two."""
    import pyarrow.dataset as pads

    part_uri = storage.join(uri, part.name)
    fs, path = storage.filesystem_and_path(part_uri)
    fragment = pads.ParquetFileFormat().make_fragment(path, filesystem=fs, file_size=part.bytes)
    try:
        return fragment.metadata.num_rows, fragment.physical_schema
    except _UNREADABLE as err:
        storage.raise_if_unreachable(err, part_uri)
        raise DatasetError(
            f"{uri}: part {part.name} is not readable Parquet (truncated or corrupt: {err}); "
            + _fix(uri)
        ) from err


def _check_footer(
    uri: str, manifest: Manifest, part: Part, footer: tuple[int, pa.Schema] | None = None
) -> None:
    """Check one part's row count and act type from its footer alone (read here unless given)."""
    rows, schema = footer or _read_footer(uri, part)
    if rows != part.rows:
        raise DatasetError(
            f"{uri}: part {part.name} has {rows} rows, {MANIFEST_NAME} says {part.rows}; re-harvest"
        )
    missing = [name for name in COLUMNS if name not in _column_names(uri, part, schema)]
    if missing:
        raise DatasetError(f"{uri}: part {part.name} lacks columns {missing}; " + _fix(uri))
    check_act_type(
        schema.field("act").type,
        d_in=manifest.d_in,
        dtype=manifest.dtype,
        where=f"{uri}: part {part.name}",
    )


def _column_names(uri: str, part: Part, schema: pa.Schema) -> list[str]:
    """The schema's column names; a name that is not UTF-8 (a changed byte in the footer, which
    Parquet does not checksum) is a corrupt part, named."""
    try:
        return schema.names
    except UnicodeDecodeError as err:
        raise DatasetError(
            f"{uri}: part {part.name} is not readable Parquet (a column name is not UTF-8: "
            f"{err}); " + _fix(uri)
        ) from err


def read_part(
    uri: str,
    part: Part,
    *,
    d_in: int,
    dtype: str,
    columns: Sequence[str],
    batch_size: int | None = None,
    endpoint: str | None = None,
) -> Iterator[pa.Table]:
    """One part's rows as tables of `batch_size` rows (default: the whole part at once), read
    through the S3 `endpoint` if given (see `storage.locate`).

    The whole part is read into memory first (parts are sized for one read task, and pyarrow
    would hold its column chunks in memory anyway) and checked against its CRC-32 in the
    manifest before any row is decoded; parts listed without one (older manifests) have their
    page CRC-32s checked instead, where they have them. Then checks the act type against
    `d_in` / `dtype`, that every activation is finite (BadDataError naming the row within the
    part) and the rows read against the manifest's; errors name the part. Shared by
    the plain reader and the Ray Data read tasks (raysae.data.stream).
    """
    content = _read_checked(uri, part, endpoint=endpoint)
    # The part's CRC-32 covers every byte, page headers and footer too: its pages need no check.
    with _open_part(uri, part, content, page_checksums=part.crc32 is None) as parquet:
        yield from _read_rows(
            uri,
            part,
            parquet,
            d_in=d_in,
            dtype=dtype,
            columns=columns,
            batch_size=batch_size,
            endpoint=endpoint,
        )


def _read_rows(
    uri: str,
    part: Part,
    parquet: pq.ParquetFile,
    *,
    d_in: int,
    dtype: str,
    columns: Sequence[str],
    batch_size: int | None,
    endpoint: str | None = None,
) -> Iterator[pa.Table]:
    """The rows of an opened part (see `read_part`)."""
    where = f"{uri}: part {part.name}"
    schema = parquet.schema_arrow
    missing = [name for name in columns if name not in _column_names(uri, part, schema)]
    if missing:
        raise DatasetError(f"{where} lacks columns {missing}; " + _fix(uri))
    check_act_type(schema.field("act").type, d_in=d_in, dtype=dtype, where=where)
    rows = 0
    try:
        for batch in parquet.iter_batches(
            batch_size=batch_size or max(part.rows, 1), columns=list(columns), use_threads=False
        ):
            if rows + len(batch) > part.rows:
                rows += len(batch)
                break
            if "act" in columns:
                # Here the part and the row are known; a training step would see neither.
                acts = decode_act(batch.column("act"), d_in=d_in, dtype=dtype)
                check_finite(acts, where=where, first_row=rows, fix=_bad_rows_fix(uri))
            rows += len(batch)
            yield pa.Table.from_batches([batch])
    except _UNREADABLE as err:
        storage.raise_if_unreachable(err, storage.join(uri, part.name), endpoint=endpoint)
        raise DatasetError(f"{where} is corrupt ({err}); " + _fix(uri)) from err
    if rows != part.rows:
        # A page header or the footer (which Parquet does not checksum) miscounts the values.
        raise DatasetError(
            f"{where}: read {'more than ' if rows > part.rows else ''}{rows} rows, "
            f"{MANIFEST_NAME} says {part.rows} (corrupt); " + _fix(uri)
        )


def verify_part(uri: str, manifest: Manifest, part: Part) -> None:
    """Every check of one part, raising DatasetError for the first it fails: it exists, has
    the listed size and (where recorded) SHA-256 and CRC-32, its footer matches the manifest,
    every page's checksum holds, it has the listed rows and no NaN/Inf. One read of the whole
    file."""
    where = f"{uri}: part {part.name}"
    try:
        content = storage.read_bytes(storage.join(uri, part.name))
    except FileNotFoundError:
        raise DatasetError(f"{where} listed in {MANIFEST_NAME} is missing; re-harvest") from None
    if len(content) != part.bytes:
        raise DatasetError(
            f"{where} is {len(content)} bytes, {MANIFEST_NAME} says {part.bytes} "
            "(truncated or replaced); re-harvest"
        )
    if part.sha256 is not None and hashlib.sha256(content).hexdigest() != part.sha256:
        raise DatasetError(
            f"{where}: its SHA-256 differs from the one in {MANIFEST_NAME} (corrupt or replaced); "
            "re-harvest"
        )
    if part.crc32 is not None:
        _check_crc32(uri, part, isal_zlib.crc32(content))
    with _open_part(uri, part, pa.py_buffer(content)) as parquet:
        _check_footer(uri, manifest, part, (parquet.metadata.num_rows, parquet.schema_arrow))
        for _ in _read_rows(  # which checks that every activation is finite
            uri,
            part,
            parquet,
            d_in=manifest.d_in,
            dtype=manifest.dtype,
            columns=COLUMNS,
            batch_size=65536,
        ):
            pass


def iter_batches(
    source: str | Dataset,
    batch_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    columns: Sequence[str] = ("act",),
    parts: Sequence[str] | None = None,
    drop_last: bool = False,
    seed: int | None = None,
) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
    """`Dataset.batches` of `source` (a Dataset, or a URI opened here), reading the
    parts named `parts` (default: all of the source's)."""
    dataset = open_dataset(source) if isinstance(source, str) else source
    if parts is not None:
        dataset = dataset.select(parts)
    return dataset.batches(batch_size, dtype=dtype, columns=columns, drop_last=drop_last, seed=seed)
