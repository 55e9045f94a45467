"""Activation shards: the data contract between harvest, readers and training.

A dataset is a prefix (local directory or ``s3://bucket/prefix``) holding Parquet parts and a
``manifest.json`` written last. The manifest's presence is the commit: parts without a
manifest are an unfinished or failed write, and readers refuse them.

Layout::

    <prefix>/part-00000-<write_id>.parquet   one file per ~64 MiB of activations
    <prefix>/part-00001-<write_id>.parquet
    <prefix>/manifest.json                   written last; lists the parts

Part names carry a random ``write_id`` (as Spark's ``part-00000-<uuid>`` do) so that a new
write into a prefix never touches the files of the dataset already committed there.

Columns, one row per token:

    act       fixed_size_binary(d_in · itemsize)  the activation vector's raw bytes
    token_id  int32                               vocabulary id of the token
    doc_id    int64                               source document
    pos       int32                               token index within its document

``act`` typing — chosen by measurement
---------------------------------------
``bench/act_encoding.py`` on this machine (2 cores, warm page cache), 100,000 × 576 float16
rows (115 MB), reading ``act`` into a torch tensor, median of 5::

    act typing                                     write s  file MB  read MB/s
    fixed_size_list<f16> (dictionary, snappy)         4.39    111.4         79
    fixed_size_list<f16> plain, uncompressed          1.64    115.7        449
    fixed_size_binary(d*2) plain, uncompressed        0.05    115.4       3080
    fixed_size_binary(d*2) plain, snappy              0.07    115.4       2764
    fixed_size_binary(d*2) plain, zstd(1)             0.21    106.1        954

A list column stores one repetition level per value and is decoded value by value; a
fixed-size binary column is one memcpy per page, 7× faster than the best list typing and 39×
faster than pyarrow's default. Ray's tensor extension types are lists inside Parquet, so they
decode like the list rows. Activations are near-incompressible floats (zstd saved 8 % at a 3×
read cost), so parts are written plain and uncompressed, without dictionary pages or
statistics. bfloat16 has no Arrow type; its bit patterns are stored as 2-byte values.

Statistics
----------
The manifest keeps float64 *sums* (count, per-dimension sum, sum of squared norms) rather than
means, so statistics of parts, workers or datasets merge by addition; :class:`ActStats` derives
the per-dimension mean and mean squared norm used for input scaling and b_dec initialisation.
"""

from __future__ import annotations

import json
import re
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raysae import storage

FORMAT_VERSION = 1
"""Version of this layout; readers refuse manifests from a newer one."""

MANIFEST_NAME = "manifest.json"
"""File whose presence commits a dataset."""

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
"""Arrow field-metadata key on ``act`` recording the stored dtype (bfloat16 and float16 bits
are both 2-byte values, so the width alone cannot tell them apart)."""

_PARQUET_OPTIONS = {
    "use_dictionary": False,
    "compression": "none",
    # min/max of 1 KiB binary values would bloat the footer and serve no reader.
    "write_statistics": ["token_id", "doc_id", "pos"],
}
_PART_PATTERN = re.compile(r"^part-\d{5,}(-[0-9a-f]+)?\.parquet$")
_NOT_WRITABLE = "The given NumPy array is not writable"


def row_bytes(d_in: int, dtype: str) -> int:
    """Bytes of one stored activation vector."""
    return d_in * STORAGE_DTYPES[dtype][1].itemsize


def default_rows_per_part(d_in: int, dtype: str) -> int:
    """Default rows per part: about PART_BYTES of activations (at least 1024 rows)."""
    return max(1024, PART_BYTES // row_bytes(d_in, dtype))


class DatasetError(ValueError):
    """A dataset is missing, incomplete or inconsistent; the message names the file and the fix."""


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True, eq=False)
class ActStats:
    """Float64 sums over activation rows; merging two is adding their sums.

    mean = sum / count (d_in,); mean_squared_norm = squared_norm_sum / count.
    """

    count: int
    """Rows summed."""
    sum: np.ndarray = field(repr=False)
    """Per-dimension sum of activations, float64 (d_in,)."""
    squared_norm_sum: float
    """Sum over rows of ‖x‖², float64."""

    def __eq__(self, other: object) -> bool:
        """Exact equality of the sums (the dataclass default cannot compare numpy arrays)."""
        if not isinstance(other, ActStats):
            return NotImplemented
        same_scalars = (self.count, self.squared_norm_sum) == (other.count, other.squared_norm_sum)
        return same_scalars and np.array_equal(self.sum, other.sum)

    @classmethod
    def empty(cls, d_in: int) -> ActStats:
        """Statistics of no rows."""
        return cls(0, np.zeros(d_in, dtype=np.float64), 0.0)

    @classmethod
    def of(cls, acts: torch.Tensor, chunk_rows: int = 8192) -> ActStats:
        """Statistics of ``acts`` (N, d_in), summed in float64 chunk by chunk to bound memory."""
        total = torch.zeros(acts.shape[1], dtype=torch.float64)
        squared = 0.0
        for chunk in acts.split(chunk_rows):
            chunk = chunk.to(device="cpu", dtype=torch.float64)
            total += chunk.sum(0)
            squared += float(chunk.pow(2).sum())
        return cls(int(acts.shape[0]), total.numpy(), squared)

    def merge(self, other: ActStats) -> ActStats:
        """Statistics of the union of both row sets."""
        if self.sum.shape != other.sum.shape:
            raise ValueError(
                f"cannot merge statistics of d_in={self.sum.size} and d_in={other.sum.size}"
            )
        return ActStats(
            self.count + other.count,
            self.sum + other.sum,
            self.squared_norm_sum + other.squared_norm_sum,
        )

    @property
    def mean(self) -> np.ndarray:
        """Per-dimension mean, float64 (d_in,)."""
        return self.sum / max(self.count, 1)

    @property
    def mean_squared_norm(self) -> float:
        """Mean of ‖x‖² over rows."""
        return self.squared_norm_sum / max(self.count, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; Python's float repr round-trips float64 exactly."""
        return {
            "count": self.count,
            "sum": self.sum.tolist(),
            "squared_norm_sum": self.squared_norm_sum,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ActStats:
        """Inverse of :meth:`to_dict`; unknown or missing keys are an error."""
        _check_keys("stats", data, {"count", "sum", "squared_norm_sum"})
        return cls(
            int(data["count"]),
            np.asarray(data["sum"], dtype=np.float64),
            float(data["squared_norm_sum"]),
        )


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Part:
    """One Parquet file of a dataset."""

    name: str
    """File name inside the dataset prefix."""
    rows: int
    """Rows (tokens) in the file."""
    bytes: int
    """File size in bytes; a mismatch means a truncated or replaced file."""


@dataclass(frozen=True)
class Manifest:
    """What a dataset holds; validated on construction, serialised as ``manifest.json``."""

    model: str
    """Model the activations came from (hub id or local path), or a label for toy data."""
    revision: str | None
    """Model revision (hub commit or tag); None for local files."""
    hook: str
    """Where in the model: TransformerLens-style name, e.g. ``blocks.3.hook_resid_post``."""
    layer: int | None
    """Block index the activations follow, or None for data not taken from a model."""
    d_in: int
    """Width of each activation vector."""
    dtype: str
    """Stored dtype: float16, bfloat16 or float32."""
    n_tokens: int
    """Total rows; equals the sum of ``parts[*].rows``."""
    parts: tuple[Part, ...]
    """The Parquet files, in write order."""
    stats: ActStats
    """Float64 running sums over all rows."""
    harvest: dict[str, Any]
    """Settings that produced the data (free-form, JSON-serialisable; never credentials)."""
    format_version: int = FORMAT_VERSION
    """Layout version (see FORMAT_VERSION)."""

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise DatasetError(
                f"manifest format_version={self.format_version}, this raysae reads {FORMAT_VERSION}: "
                "upgrade raysae or re-harvest"
            )
        if self.dtype not in STORAGE_DTYPES:
            raise DatasetError(
                f"manifest dtype={self.dtype!r}: expected one of {sorted(STORAGE_DTYPES)}"
            )
        if self.d_in <= 0:
            raise DatasetError(f"manifest d_in={self.d_in}: must be positive")
        names = [part.name for part in self.parts]
        bad = [name for name in names if not _PART_PATTERN.match(name)]
        if bad or len(set(names)) != len(names):
            raise DatasetError(f"manifest part names invalid or repeated: {bad or names}")
        listed = sum(part.rows for part in self.parts)
        if listed != self.n_tokens or self.stats.count != self.n_tokens:
            raise DatasetError(
                f"manifest row counts disagree: n_tokens={self.n_tokens}, parts sum to {listed}, "
                f"stats count {self.stats.count}; the manifest is corrupt — re-harvest"
            )
        if self.stats.sum.shape != (self.d_in,):
            raise DatasetError(
                f"manifest stats.sum has {self.stats.sum.size} values, d_in={self.d_in}"
            )

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored activation vector."""
        return row_bytes(self.d_in, self.dtype)

    def to_json(self) -> str:
        """The manifest as JSON text."""
        data = asdict(self)
        data["parts"] = [asdict(part) for part in self.parts]
        data["stats"] = self.stats.to_dict()
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse and validate manifest JSON; unknown or missing keys are an error."""
        data = json.loads(text)
        _check_keys("manifest", data, {f.name for f in fields(cls)})
        parts = []
        for part in data["parts"]:
            _check_keys("manifest part", part, {"name", "rows", "bytes"})
            parts.append(Part(**part))
        return cls(**{**data, "parts": tuple(parts), "stats": ActStats.from_dict(data["stats"])})


def _check_keys(what: str, data: Any, expected: set[str]) -> None:
    """Raise DatasetError unless ``data`` is a dict with exactly the ``expected`` keys."""
    if not isinstance(data, dict):
        raise DatasetError(f"{what} must be a JSON object, got {type(data).__name__}")
    unknown, missing = set(data) - expected, expected - set(data)
    if unknown or missing:
        raise DatasetError(
            f"{what}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
        )


# ---------------------------------------------------------------- act codec


def encode_act(
    acts: torch.Tensor | np.ndarray, dtype: str, *, copy: bool = False
) -> pa.FixedSizeBinaryArray:
    """Activations (N, d_in) → ``act`` column in the stored ``dtype``.

    Shares memory with ``acts`` when they are already contiguous in that dtype on the CPU,
    unless ``copy``.
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
    """Values per row that an ``act`` column of ``act_type`` holds, or None if it is no act type."""
    if pa.types.is_fixed_size_binary(act_type):
        return act_type.byte_width // row_bytes(1, dtype)
    if pa.types.is_fixed_size_list(act_type):
        return act_type.list_size
    return None


def check_act_type(act_type: pa.DataType, *, d_in: int, dtype: str, where: str) -> None:
    """Raise DatasetError unless ``act_type`` is the fixed_size_binary this dataset expects."""
    expected = pa.binary(row_bytes(d_in, dtype))
    if act_type == expected:
        return
    width = act_width(act_type, dtype)
    if width is not None and width != d_in:
        raise DatasetError(f"{where}: act has {width} values per row, manifest says d_in={d_in}")
    raise DatasetError(
        f"{where}: act column is {act_type}, expected {expected} ({dtype} × d_in={d_in})"
    )


def _as_tensor(values: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` for arrays over Arrow memory, which is immutable and so read-only."""
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
    """``act`` column → tensor (N, d_in) in ``out_dtype`` (default: the stored ``dtype``).

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
    """Arrow batch → the act tensor (B, d_in) if ``columns`` is ``("act",)``, else a dict of tensors.

    ``dtype`` is the stored dtype, by default read from the batch's schema (see
    :func:`stored_dtype`). Shared by the plain reader (:func:`iter_batches`) and the Ray Data
    reader (``raysae.stream``).
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


def check_finite(acts: torch.Tensor, *, where: str, first_row: int = 0) -> None:
    """Raise DatasetError naming the first row of ``acts`` that holds a NaN or ±Inf."""
    bad = ~torch.isfinite(acts).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        kind = "NaN" if bool(acts[row].isnan().any()) else "Inf"
        raise DatasetError(
            f"{where} row {first_row + row}: activation holds {kind}; "
            "if it overflowed float16, harvest with dtype bfloat16 or float32"
        )


# ---------------------------------------------------------------- writing


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
    the types already match, unless ``copy``)."""
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
    """Arrow schema of a part; ``act`` carries its stored dtype so a part describes itself."""
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
    """The stored dtype recorded on a part's ``act`` field."""
    metadata = schema.field("act").metadata or {}
    if DTYPE_KEY.encode() not in metadata:
        raise DatasetError(f"act field has no {DTYPE_KEY} metadata; it was not written by raysae")
    return metadata[DTYPE_KEY.encode()].decode()


class Rebatcher:
    """Regroups a stream of Arrow tables into tables of exactly ``rows`` rows (zero-copy slices)."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def push(self, table: pa.Table) -> Iterator[pa.Table]:
        """Add ``table``; yield every full group now available."""
        self._pending.append(table)
        self._pending_rows += len(table)
        while self._pending_rows >= self.rows:
            buffered = pa.concat_tables(self._pending)
            rest = buffered.slice(self.rows)
            self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)
            yield buffered.slice(0, self.rows)

    def rest(self) -> pa.Table | None:
        """The rows left over (fewer than ``rows``), or None; empties the buffer."""
        if not self._pending_rows:
            return None
        table = pa.concat_tables(self._pending)
        self._pending, self._pending_rows = [], 0
        return table


def part_name(index: int, write_id: str) -> str:
    """Name of part ``index`` of the write ``write_id``."""
    return f"part-{index:05d}-{write_id}.parquet"


def new_write_id() -> str:
    """A short random id distinguishing one write's parts from another's in the same prefix."""
    return uuid.uuid4().hex[:8]


def write_part(uri: str, name: str, table: pa.Table) -> Part:
    """Write ``table`` (shard schema, rows :func:`check_finite`-ed by the caller) as part ``name``."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(len(table), 1), **_PARQUET_OPTIONS)
    data = sink.getvalue()
    storage.write_bytes(storage.join(uri, name), data)
    return Part(name, len(table), data.size)


def prepare_prefix(uri: str, *, overwrite: bool) -> None:
    """Check that a new dataset may be written at ``uri``.

    Refuses a committed dataset unless ``overwrite`` and any file raysae did not write (so a
    mistyped prefix never has a user's files deleted by the cleanup in :func:`commit_dataset`).
    """
    present = storage.list_files(uri)
    if MANIFEST_NAME in present and not overwrite:
        raise FileExistsError(
            f"{uri} already holds a committed dataset ({MANIFEST_NAME}); pass overwrite=True "
            "(CLI: --overwrite) to replace it, or choose another prefix"
        )
    foreign = sorted(name for name in present if name != MANIFEST_NAME and not _is_ours(name))
    if foreign:
        raise FileExistsError(
            f"{uri} holds files raysae did not write ({', '.join(foreign[:5])}); choose an empty prefix"
        )


def _is_ours(name: str) -> bool:
    """Whether ``name`` is a part or a temporary file raysae writes."""
    return bool(_PART_PATTERN.match(name)) or ".tmp-" in name


def commit_dataset(uri: str, manifest: Manifest, *, overwrite: bool) -> None:
    """Commit: write ``manifest.json`` (atomically), then delete parts it does not list.

    Before this call an older manifest at ``uri`` stays valid and its parts untouched, because
    new parts have new names. Afterwards the older parts (and parts of failed writes) are
    deleted, so a reader still streaming the *old* dataset at that moment loses its files.
    """
    if not manifest.parts:
        raise DatasetError(f"nothing was written to {uri}; refusing to commit an empty dataset")
    present = storage.list_files(uri)
    if MANIFEST_NAME in present and not overwrite:
        raise FileExistsError(
            f"another writer committed a dataset at {uri} while this one was writing"
        )
    listed = {part.name for part in manifest.parts}
    wrong = sorted(part.name for part in manifest.parts if present.get(part.name) != part.bytes)
    if wrong:
        raise DatasetError(
            f"cannot commit {uri}: parts {wrong[:5]} are missing or not the size written"
        )
    storage.write_bytes(storage.join(uri, MANIFEST_NAME), manifest.to_json().encode())
    for name in present:
        if name not in listed and name != MANIFEST_NAME and _is_ours(name):
            storage.delete(storage.join(uri, name))


class DatasetWriter:
    """Write a dataset part by part; :meth:`commit` makes it visible, anything else leaves none.

    ::

        with DatasetWriter(uri, d_in=576) as writer:
            writer.write(acts, token_id, doc_id, pos)   # any number of times
            writer.commit(model="toy", hook="synthetic")

    Rows are buffered into parts of ``rows_per_part`` and the float64 statistics accumulate as
    they arrive. Leaving the ``with`` block by an exception aborts (deletes the parts written so
    far; a crash may leave some, which the next commit into the prefix deletes). With
    ``overwrite=True`` an existing dataset stays readable until the commit replaces it.
    """

    def __init__(
        self,
        uri: str,
        *,
        d_in: int,
        dtype: str = "float16",
        rows_per_part: int | None = None,
        overwrite: bool = False,
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(STORAGE_DTYPES)}")
        self.uri, self.d_in, self.dtype, self.overwrite = uri, d_in, dtype, overwrite
        self.rows_per_part = rows_per_part or default_rows_per_part(d_in, dtype)
        prepare_prefix(uri, overwrite=overwrite)
        self._write_id = new_write_id()
        self._rebatcher = Rebatcher(self.rows_per_part)
        self._parts: list[Part] = []
        self._stats = ActStats.empty(d_in)
        self._rows_seen = 0
        self._closed = False

    def write(
        self,
        acts: torch.Tensor | np.ndarray,
        token_id: np.ndarray | torch.Tensor | None = None,
        doc_id: np.ndarray | torch.Tensor | None = None,
        pos: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Append rows: ``acts`` (N, d_in); token_id / doc_id / pos (N,) default to -1 / row index / 0."""
        if self._closed:
            raise RuntimeError(f"DatasetWriter for {self.uri} is already committed or aborted")
        n = int(acts.shape[0])
        if acts.ndim != 2 or acts.shape[1] != self.d_in:
            raise ValueError(
                f"activations have shape {tuple(acts.shape)}, expected (N, d_in={self.d_in})"
            )
        rows = np.arange(self._rows_seen, self._rows_seen + n)
        token_id = np.full(n, -1) if token_id is None else token_id
        doc_id = rows if doc_id is None else doc_id
        pos = np.zeros(n, dtype=np.int32) if pos is None else pos
        # A copy: rows wait in the buffer, and the caller may reuse its arrays meanwhile.
        table = shard_table(acts, token_id, doc_id, pos, dtype=self.dtype, copy=True)
        stored = decode_act(table.column("act"), d_in=self.d_in, dtype=self.dtype)
        check_finite(stored, where=f"write to {self.uri}", first_row=self._rows_seen)
        self._stats = self._stats.merge(ActStats.of(stored))
        self._rows_seen += n
        for part in self._rebatcher.push(table):
            self._write(part)

    def _write(self, table: pa.Table) -> None:
        """Write ``table`` as the next part."""
        self._parts.append(write_part(self.uri, part_name(len(self._parts), self._write_id), table))

    def commit(
        self,
        *,
        model: str,
        hook: str,
        layer: int | None = None,
        revision: str | None = None,
        harvest: dict[str, Any] | None = None,
    ) -> Manifest:
        """Write the remaining rows and the manifest; returns the committed manifest."""
        rest = self._rebatcher.rest()
        if rest is not None:
            self._write(rest)
        manifest = Manifest(
            model=model,
            revision=revision,
            hook=hook,
            layer=layer,
            d_in=self.d_in,
            dtype=self.dtype,
            n_tokens=self._rows_seen,
            parts=tuple(self._parts),
            stats=self._stats,
            harvest=harvest or {},
        )
        commit_dataset(self.uri, manifest, overwrite=self.overwrite)
        self._closed = True
        return manifest

    def abort(self) -> None:
        """Delete the parts written so far; the prefix's previous state (if any) is untouched."""
        self._closed = True
        for part in self._parts:
            storage.delete(storage.join(self.uri, part.name))

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        if not self._closed:
            self.abort()
            if exc_type is None:
                raise RuntimeError(
                    f"DatasetWriter for {self.uri} left without commit(); its parts were deleted"
                )


def write_dataset(
    uri: str,
    acts: torch.Tensor | np.ndarray,
    *,
    model: str = "synthetic",
    hook: str = "synthetic",
    layer: int | None = None,
    dtype: str = "float16",
    token_id: np.ndarray | torch.Tensor | None = None,
    doc_id: np.ndarray | torch.Tensor | None = None,
    pos: np.ndarray | torch.Tensor | None = None,
    rows_per_part: int | None = None,
    overwrite: bool = False,
    harvest: dict[str, Any] | None = None,
) -> Manifest:
    """Write in-memory activations (N, d_in) as a committed dataset (toy data, tests)."""
    with DatasetWriter(
        uri, d_in=int(acts.shape[1]), dtype=dtype, rows_per_part=rows_per_part, overwrite=overwrite
    ) as writer:
        writer.write(acts, token_id, doc_id, pos)
        return writer.commit(model=model, hook=hook, layer=layer, harvest=harvest)


# ---------------------------------------------------------------- reading


def read_manifest(uri: str) -> Manifest:
    """The manifest of the dataset at ``uri``, parsed and validated (parts are not checked)."""
    path = storage.join(uri, MANIFEST_NAME)
    try:
        text = storage.read_bytes(path).decode()
    except FileNotFoundError:
        raise DatasetError(
            f"no {MANIFEST_NAME} at {uri}: not a raysae dataset, or its harvest did not finish"
        ) from None
    try:
        return Manifest.from_json(text)
    except (json.JSONDecodeError, TypeError, DatasetError) as err:
        raise DatasetError(f"{path}: {err}") from err


def open_dataset(uri: str, *, verify: bool = False) -> Manifest:
    """Read the manifest and check the parts against it; returns the manifest.

    Always: every part exists with the listed size and its Parquet footer has the listed rows
    and act width. With ``verify``: additionally read every row and reject NaN/Inf (slow: one
    full pass over the data).
    """
    manifest = read_manifest(uri)
    present = storage.list_files(uri)
    for part in manifest.parts:
        if part.name not in present:
            raise DatasetError(
                f"{uri}: part {part.name} listed in {MANIFEST_NAME} is missing; re-harvest"
            )
        if present[part.name] != part.bytes:
            raise DatasetError(
                f"{uri}: part {part.name} is {present[part.name]} bytes, {MANIFEST_NAME} says {part.bytes} "
                "(truncated or replaced); re-harvest"
            )
    with ThreadPoolExecutor(
        max_workers=8
    ) as pool:  # footers are small reads: overlap their latency
        list(pool.map(lambda part: _check_footer(uri, manifest, part), manifest.parts))
    if verify:
        for part in manifest.parts:
            first_row = 0
            for batch in read_part(
                uri,
                part,
                d_in=manifest.d_in,
                dtype=manifest.dtype,
                columns=["act"],
                batch_size=65536,
            ):
                acts = decode_act(batch.column("act"), d_in=manifest.d_in, dtype=manifest.dtype)
                check_finite(acts, where=f"{uri}: part {part.name}", first_row=first_row)
                first_row += len(acts)
    return manifest


def _open_part(uri: str, part: Part) -> pq.ParquetFile:
    """Open one part (close it after use), naming it if its footer cannot be read."""
    fs, path = storage.filesystem_and_path(storage.join(uri, part.name))
    try:
        return pq.ParquetFile(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as err:
        raise DatasetError(
            f"{uri}: part {part.name} is not readable Parquet (truncated or corrupt: {err}); re-harvest"
        ) from err


def _check_footer(uri: str, manifest: Manifest, part: Part) -> None:
    """Check one part's row count and act type from its footer alone."""
    with _open_part(uri, part) as parquet:
        rows, schema = parquet.metadata.num_rows, parquet.schema_arrow
    if rows != part.rows:
        raise DatasetError(
            f"{uri}: part {part.name} has {rows} rows, {MANIFEST_NAME} says {part.rows}; re-harvest"
        )
    missing = [name for name in COLUMNS if name not in schema.names]
    if missing:
        raise DatasetError(f"{uri}: part {part.name} lacks columns {missing}")
    check_act_type(
        schema.field("act").type,
        d_in=manifest.d_in,
        dtype=manifest.dtype,
        where=f"{uri}: part {part.name}",
    )


def read_part(
    uri: str,
    part: Part,
    *,
    d_in: int,
    dtype: str,
    columns: Sequence[str],
    batch_size: int | None = None,
) -> Iterator[pa.Table]:
    """One part's rows as tables of ``batch_size`` rows (default: the whole part at once).

    Checks the act type against ``d_in`` / ``dtype``; read errors name the part. Shared by the
    plain reader and the Ray Data read tasks (raysae.stream).
    """
    with _open_part(uri, part) as parquet:
        check_act_type(
            parquet.schema_arrow.field("act").type,
            d_in=d_in,
            dtype=dtype,
            where=f"{uri}: part {part.name}",
        )
        try:
            for batch in parquet.iter_batches(
                batch_size=batch_size or max(part.rows, 1), columns=list(columns), use_threads=False
            ):
                yield pa.Table.from_batches([batch])
        except (pa.ArrowInvalid, OSError) as err:
            raise DatasetError(f"{uri}: part {part.name} is corrupt ({err}); re-harvest") from err


def select_parts(uri: str, manifest: Manifest, names: Sequence[str] | None) -> list[Part]:
    """The parts called ``names`` in that order (all parts, in manifest order, if None)."""
    if names is None:
        return list(manifest.parts)
    by_name = {part.name: part for part in manifest.parts}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise DatasetError(f"{uri}: no parts named {unknown[:5]} in {MANIFEST_NAME}")
    return [by_name[name] for name in names]


def iter_batches(
    uri: str,
    batch_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    columns: Sequence[str] = ("act",),
    parts: Sequence[str] | None = None,
    drop_last: bool = False,
    seed: int | None = None,
) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
    """Read a dataset in one process with pyarrow: tensors (B, d_in) in ``dtype``.

    Reads the parts named ``parts`` (default all) in that order, or shuffled by ``seed`` when
    given. Yields the act tensor, or a dict of tensors if ``columns`` names more than ``act``
    (see :func:`collate`). The single-process trainer's reader and the ingest baseline.
    """
    manifest = open_dataset(uri)
    parts = select_parts(uri, manifest, parts)
    if seed is not None:
        parts = [parts[i] for i in np.random.default_rng(seed).permutation(len(parts))]
    rebatcher = Rebatcher(batch_size)
    for part in parts:
        for table in read_part(
            uri,
            part,
            d_in=manifest.d_in,
            dtype=manifest.dtype,
            columns=columns,
            batch_size=batch_size,
        ):
            for batch in rebatcher.push(table):
                yield collate(
                    batch,
                    d_in=manifest.d_in,
                    dtype=manifest.dtype,
                    out_dtype=dtype,
                    columns=columns,
                )
    rest = rebatcher.rest()
    if rest is not None and not drop_last:
        yield collate(
            rest, d_in=manifest.d_in, dtype=manifest.dtype, out_dtype=dtype, columns=columns
        )
