"""The part format: how activations are laid out in a Parquet part, and the act codec.

Columns, one row per token:

    act       fixed_size_binary(d_in · itemsize)  the activation vector's raw bytes
    token_id  int32                               vocabulary id of the token
    doc_id    int64                               source document
    pos       int32                               token index within its document

`act` typing — chosen by measurement
---------------------------------------
`act` is a plain, uncompressed `fixed_size_binary` column without dictionary pages or
statistics: a list column stores one repetition level per value and is decoded value by value,
while a fixed-size binary column is one memcpy per page (BENCHMARKS.md, "Parquet typing of
act": several times faster than the best list typing, and far faster than pyarrow's default).
Ray's tensor extension types are lists inside Parquet, so they decode like the list rows.
Activations are near-incompressible floats, so compression costs read speed for little space.
bfloat16 has no Arrow type; its bit patterns are stored as 2-byte values.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

PART_BYTES = 64 * 2**20
"""Target activation bytes per part: large enough to amortise S3 requests, small enough that
file-order shuffling mixes well and a Ray read task holds a few parts in memory."""

COLUMNS = ("act", "token_id", "doc_id", "pos")
"""Columns of every part, in order."""

STORAGE_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.int16)),  # numpy has no bfloat16: keep the bits
    "float32": (torch.float32, np.dtype(np.float32)),
}
"""Stored dtype name → (torch dtype, numpy dtype of the stored bytes)."""

DTYPE_KEY = "raysae.dtype"
"""Arrow field-metadata key on `act` recording the stored dtype (bfloat16 and float16 bits
are both 2-byte values, so the width alone cannot tell them apart)."""

_NOT_WRITABLE = "The given NumPy array is not writable"


class DatasetError(ValueError):
    """A dataset is missing, incomplete or inconsistent; the message names the file and the fix."""


class BadDataError(DatasetError):
    """Values a run must not train on: NaN/±Inf in a row, or rows of the wrong width. The same
    bytes fail the same way on every read, so a run stops at the first one (never retried as if a
    worker had crashed: raysae.loop.STOPS_RUN)."""


def row_bytes(d_in: int, dtype: str) -> int:
    """Bytes of one stored activation vector."""
    return d_in * STORAGE_DTYPES[dtype][1].itemsize


def default_rows_per_part(d_in: int, dtype: str) -> int:
    """Default rows per part: about PART_BYTES of activations (at least 1024 rows)."""
    return max(1024, PART_BYTES // row_bytes(d_in, dtype))


def encode_act(
    acts: torch.Tensor | np.ndarray, dtype: str, *, copy: bool = False
) -> pa.FixedSizeBinaryArray:
    """Activations (N, d_in) → `act` column in the stored `dtype`.

    Shares memory with `acts` when they are already contiguous in that dtype on the CPU,
    unless `copy`.
    """
    torch_dtype, numpy_dtype = STORAGE_DTYPES[dtype]
    tensor = torch.as_tensor(acts).to(device="cpu", dtype=torch_dtype, copy=copy).contiguous()
    if tensor.ndim != 2:
        raise ValueError(f"activations must be 2-D (N, d_in), got shape {tuple(tensor.shape)}")
    bits = tensor.view(torch.int16) if dtype == "bfloat16" else tensor
    values = bits.numpy()
    width = tensor.shape[1] * numpy_dtype.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(values), [None, pa.py_buffer(values)]
    )


def act_width(act_type: pa.DataType, dtype: str) -> int | None:
    """Values per row that an `act` column of `act_type` holds, or None if it is no act type."""
    if pa.types.is_fixed_size_binary(act_type):
        return act_type.byte_width // row_bytes(1, dtype)
    if pa.types.is_fixed_size_list(act_type):
        return act_type.list_size
    return None


def check_act_type(act_type: pa.DataType, *, d_in: int, dtype: str, where: str) -> None:
    """Raise DatasetError unless `act_type` is the fixed_size_binary this dataset expects."""
    expected = pa.binary(row_bytes(d_in, dtype))
    if act_type == expected:
        return
    width = act_width(act_type, dtype)
    if width is not None and width != d_in:
        raise BadDataError(f"{where}: act has {width} values per row, manifest says d_in={d_in}")
    raise BadDataError(
        f"{where}: act column is {act_type}, expected {expected} ({dtype} × d_in={d_in})"
    )


def _as_tensor(values: np.ndarray) -> torch.Tensor:
    """`torch.from_numpy` for arrays over Arrow memory, which is immutable and so read-only."""
    with warnings.catch_warnings():
        # Callers get a read-only view or a fresh copy (see decode_act); the warning adds nothing.
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE)
        return torch.from_numpy(values)


def _view_chunk(chunk: pa.FixedSizeBinaryArray, d_in: int, dtype: str) -> torch.Tensor:
    """A torch view (rows, d_in) of one Arrow chunk's value buffer, without copying."""
    torch_dtype, numpy_dtype = STORAGE_DTYPES[dtype]
    if chunk.null_count:
        raise DatasetError("act column has null rows; parts written by raysae never do")
    count = len(chunk) * d_in
    values = np.frombuffer(
        chunk.buffers()[1],
        dtype=numpy_dtype,
        count=count,
        offset=chunk.offset * chunk.type.byte_width,
    )
    return _as_tensor(values).view(len(chunk), d_in).view(torch_dtype)


def decode_act(
    column: pa.Array | pa.ChunkedArray,
    *,
    d_in: int,
    dtype: str,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`act` column → tensor (N, d_in) in `out_dtype` (default: the stored `dtype`).

    One chunk in its stored dtype is returned as a zero-copy view of Arrow memory: read it, do
    not write it. Otherwise the result is built with exactly one copy (cast and concatenation
    in the same pass) and is the caller's to modify.
    """
    check_act_type(column.type, d_in=d_in, dtype=dtype, where="act column")
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    chunks = [chunk for chunk in chunks if len(chunk)]
    out_dtype = out_dtype or STORAGE_DTYPES[dtype][0]
    if len(chunks) == 1:
        return _view_chunk(chunks[0], d_in, dtype).to(out_dtype)
    out = torch.empty((sum(len(chunk) for chunk in chunks), d_in), dtype=out_dtype)
    start = 0
    for chunk in chunks:
        out[start : start + len(chunk)].copy_(_view_chunk(chunk, d_in, dtype))
        start += len(chunk)
    return out


def collate(
    table: pa.Table,
    *,
    d_in: int,
    out_dtype: torch.dtype,
    columns: Sequence[str] = ("act",),
    dtype: str | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Arrow batch → the act tensor (B, d_in) if `columns` is `("act",)`, else a dict of tensors.

    `dtype` is the stored dtype, by default read from the batch's schema (see
    `stored_dtype`). Shared by the plain reader (`iter_batches`) and the Ray Data
    reader (`raysae.data.stream`).
    """
    batch = {}
    for name in columns:
        if name == "act":
            stored = dtype or stored_dtype(table.schema)
            batch[name] = decode_act(
                table.column("act"), d_in=d_in, dtype=stored, out_dtype=out_dtype
            )
        else:
            batch[name] = _as_tensor(table.column(name).to_numpy())
    return batch["act"] if tuple(columns) == ("act",) else batch


def check_finite(
    acts: torch.Tensor,
    *,
    where: str,
    first_row: int = 0,
    fix: str = "if it overflowed float16, harvest with dtype bfloat16 or float32",
) -> None:
    """Raise BadDataError naming the first row of `acts` that holds a NaN or ±Inf, and `fix`.

    One pass without a temporary: NaN propagates through min/max and ±Inf is an extreme, so
    finite extremes mean finite values (measured on a (65536, 576) tensor: ~20× faster than
    `torch.isfinite(acts).all()`, which writes a bool per value). The slow search for the row
    runs only when there is one to find."""
    if not acts.numel():
        return
    low, high = torch.aminmax(acts)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    bad = ~torch.isfinite(acts).all(dim=1)
    row = int(bad.nonzero()[0, 0])
    kind = "NaN" if bool(acts[row].isnan().any()) else "Inf"
    raise BadDataError(f"{where} row {first_row + row}: activation holds {kind}; {fix}")


def shard_table(
    acts: torch.Tensor | np.ndarray,
    token_id: np.ndarray | torch.Tensor,
    doc_id: np.ndarray | torch.Tensor,
    pos: np.ndarray | torch.Tensor,
    *,
    dtype: str,
    copy: bool = False,
) -> pa.Table:
    """One part's rows as an Arrow table in the shard schema (sharing the inputs' memory where
    the types already match, unless `copy`)."""
    act = encode_act(acts, dtype, copy=copy)
    arrays = [act]
    for name, values, arrow_type in (
        ("token_id", token_id, pa.int32()),
        ("doc_id", doc_id, pa.int64()),
        ("pos", pos, pa.int32()),
    ):
        values = torch.as_tensor(values).cpu().numpy()
        values = values.copy() if copy else values
        if values.shape != (len(act),):
            raise ValueError(
                f"{name} has shape {values.shape}, expected ({len(act)},) to match the activations"
            )
        arrays.append(pa.array(values, type=arrow_type))
    return pa.Table.from_arrays(
        arrays, schema=shard_schema(act.type.byte_width // row_bytes(1, dtype), dtype)
    )


def shard_schema(d_in: int, dtype: str) -> pa.Schema:
    """Arrow schema of a part; `act` carries its stored dtype so a part describes itself."""
    act = pa.field(
        "act",
        pa.binary(row_bytes(d_in, dtype)),
        nullable=False,
        metadata={DTYPE_KEY: dtype},
    )
    return pa.schema(
        [
            act,
            pa.field("token_id", pa.int32()),
            pa.field("doc_id", pa.int64()),
            pa.field("pos", pa.int32()),
        ]
    )


def stored_dtype(schema: pa.Schema) -> str:
    """The stored dtype recorded on a part's `act` field."""
    metadata = schema.field("act").metadata or {}
    if DTYPE_KEY.encode() not in metadata:
        raise DatasetError(f"act field has no {DTYPE_KEY} metadata; it was not written by raysae")
    return metadata[DTYPE_KEY.encode()].decode()


class Rebatcher:
    """Regroups a stream of Arrow tables into tables of exactly `rows` rows (zero-copy slices)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def push(self, table: pa.Table) -> Iterator[pa.Table]:
        """Add `table`; yield every full group now available."""
        self._pending.append(table)
        self._pending_rows += len(table)
        while self._pending_rows >= self.rows:
            buffered = pa.concat_tables(self._pending)
            rest = buffered.slice(self.rows)
            self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
            yield buffered.slice(0, self.rows)

    def rest(self) -> pa.Table | None:
        """The rows left over (fewer than `rows`), or None; empties the buffer."""
        if not self._pending_rows:
            return None
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        return table
