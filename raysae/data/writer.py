"""Writing a dataset: parts first, under names no other write uses, then the manifest (the commit).

Part names carry a random `write_id` (as Spark's `part-00000-<uuid>` do) so that a new
write into a prefix never touches the files of the dataset already committed there.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from isal import isal_zlib

from raysae.data import storage
from raysae.data.format import (
    STORAGE_DTYPES,
    Rebatcher,
    check_finite,
    decode_act,
    default_rows_per_part,
    shard_table,
)
from raysae.data.manifest import (
    _PART_PATTERN,
    MANIFEST_NAME,
    ActStats,
    DatasetError,
    Manifest,
    Part,
)

_PARQUET_OPTIONS = {
    "use_dictionary": False,
    "compression": "none",
    # min/max of 1 KiB binary values would bloat the footer and serve no reader.
    "write_statistics": ["token_id", "doc_id", "pos"],
    # A CRC-32 of every data page: what reads check for parts whose manifest entry has no
    # whole-part CRC-32 (Part.crc32), and what `raysae verify` checks besides the SHA-256.
    "write_page_checksum": True,
}


def part_name(index: int, write_id: str) -> str:
    """Name of part `index` of the write `write_id`."""
    return f"part-{index:05d}-{write_id}.parquet"


def new_write_id() -> str:
    """A short random id distinguishing one write's parts from another's in the same prefix."""
    return uuid.uuid4().hex[:8]


def write_part(uri: str, name: str, table: pa.Table) -> Part:
    """Write `table` (shard schema, rows `check_finite`-ed by the caller) as part `name`; the
    returned `Part` records the size, SHA-256 and CRC-32 of exactly the bytes uploaded."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(len(table), 1), **_PARQUET_OPTIONS)
    data = sink.getvalue()
    storage.write_bytes(storage.join(uri, name), data)
    return Part(
        name, len(table), data.size, hashlib.sha256(data).hexdigest(), isal_zlib.crc32(data)
    )


def prepare_prefix(uri: str, *, overwrite: bool) -> None:
    """Check that a new dataset may be written at `uri`.

    Refuses a committed dataset unless `overwrite` and any file raysae did not write (so a
    mistyped prefix never has a user's files deleted by the cleanup in `commit_dataset`).
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
    """Whether `name` is a part or a temporary file raysae writes."""
    return bool(_PART_PATTERN.match(name)) or ".tmp-" in name


def commit_dataset(uri: str, manifest: Manifest, *, overwrite: bool) -> None:
    """Commit: write `manifest.json` (atomically), then delete parts it does not list.

    Before this call an older manifest at `uri` stays valid and its parts untouched, because
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
    """Write a dataset part by part; `commit` makes it visible, anything else leaves none.

    ::

        with DatasetWriter(uri, d_in=576) as writer:
            writer.write(acts, token_id, doc_id, pos)   # any number of times
            writer.commit(model="toy", hook="synthetic")

    Rows are buffered into parts of `rows_per_part` and the float64 statistics accumulate as
    they arrive. Leaving the `with` block by an exception aborts (deletes the parts written so
    far; a crash may leave some, which the next commit into the prefix deletes). With
    `overwrite=True` an existing dataset stays readable until the commit replaces it.
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
        """Append rows: `acts` (N, d_in); token_id / doc_id / pos (N,) default to -1 / row index / 0."""
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
        """Write `table` as the next part."""
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
