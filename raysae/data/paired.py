"""Paired datasets: several datasets of the same tokens read together, row by row — the
layers of one model, or two models sharing a tokenizer (a crosscoder's sources,
`data.sources`).

    sources A, B:  part i of A and part i of B hold the same tokens in the same order
    a paired row:  act = [act_A; act_B]   (d_in = d_A + d_B), token_id / doc_id / pos from A

`raysae harvest` writes every layer of a run in one row order with one part layout, so its
layer datasets pair as they are. `open_paired` checks what the manifests can tell (as many
parts, as many rows in each, one stored dtype); every read of a part then checks that the
sources' `doc_id` and `pos` agree row for row, and a misaligned pair stops the run with an
error naming both datasets, the part and the first row that differs.

The act bytes of the sources are laid side by side into one fixed_size_binary column, so
everything downstream (collate, the Ray Data stream, the training loop) reads a paired dataset
as it reads one dataset of width d_A + d_B.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa

from raysae.data.dataset import Dataset, open_dataset, read_part
from raysae.data.format import DTYPE_KEY, DatasetError, row_bytes
from raysae.data.manifest import ActStats, Manifest, Part

ALIGNMENT = ("doc_id", "pos")
"""The columns that must agree, row for row, between paired sources."""


class MisalignedError(DatasetError):
    """Paired sources do not hold the same tokens in the same order."""


@dataclasses.dataclass(frozen=True)
class PairedDataset(Dataset):
    """Datasets of the same tokens read as one: `sources[s].parts[i]` pair up for every i.

    `uri` names every source ("A + B"), `manifest` is the pair's (d_in summed, statistics
    concatenated, `harvest.sources` listing each source's URI, model, hook and d_in) and `parts`
    are the first source's; `select`, `split` and `shard` keep the sources in step.
    """

    sources: tuple[Dataset, ...] = ()
    """The datasets, in the order their activations are concatenated."""

    def select(self, names: Sequence[str]) -> PairedDataset:
        index = {part.name: i for i, part in enumerate(self.sources[0].manifest.parts)}
        unknown = [name for name in names if name not in index]
        if unknown:
            raise DatasetError(f"{self.sources[0].uri}: no parts named {unknown[:5]}")
        return self._each(lambda d: d.select([d.manifest.parts[index[n]].name for n in names]))

    def split(self, held_out: int) -> tuple[PairedDataset, PairedDataset]:
        if not held_out:
            return self, self
        Dataset.split(self.sources[0], held_out)  # its error names the dataset
        cut = len(self.parts) - held_out
        return (
            self._each(lambda d: dataclasses.replace(d, parts=d.parts[:cut])),
            self._each(lambda d: dataclasses.replace(d, parts=d.parts[cut:])),
        )

    def shard(self, rank: int, size: int) -> PairedDataset:
        return self._each(lambda d: d.shard(rank, size))

    def _each(self, change: Callable[[Dataset], Dataset]) -> PairedDataset:
        sources = tuple(change(d) for d in self.sources)
        return dataclasses.replace(self, sources=sources, parts=sources[0].parts)

    def part_reader(self) -> Callable[..., Iterator[pa.Table]]:
        """A picklable `read(part, columns=..., batch_size=None)` for this value's parts (what
        a Ray read task calls)."""
        index = {part.name: i for i, part in enumerate(self.parts)}
        where = tuple((d.uri, d.d_in, d.dtype, d.endpoint) for d in self.sources)
        parts = tuple(d.parts for d in self.sources)
        return functools.partial(_read_paired, where, parts, index)

    def read_part(
        self, part: Part, *, columns: Sequence[str], batch_size: int | None = None
    ) -> Iterator[pa.Table]:
        return self.part_reader()(part, columns=columns, batch_size=batch_size)

    def verify(self) -> None:
        for source in self.sources:
            source.verify()


def open_paired(uris: Sequence[str], *, verify: bool = False) -> PairedDataset:
    """Open each source once and check that they pair up (see the module docstring)."""
    if len(uris) < 2:
        raise DatasetError(f"data.sources lists {len(uris)} dataset(s); a pair needs at least 2")
    sources = tuple(open_dataset(uri, verify=verify) for uri in uris)
    first = sources[0]
    for other in sources[1:]:
        _check_pair(first, other)
    manifest = Manifest(
        model=first.manifest.model if _same(s.manifest.model for s in sources) else "paired",
        revision=first.manifest.revision,
        hook=" + ".join(s.manifest.hook for s in sources),
        layer=None,
        d_in=sum(s.d_in for s in sources),
        dtype=first.dtype,
        n_tokens=first.manifest.n_tokens,
        parts=first.manifest.parts,
        stats=ActStats(
            first.manifest.stats.count,
            np.concatenate([s.manifest.stats.sum for s in sources]),
            sum(s.manifest.stats.squared_norm_sum for s in sources),
        ),
        harvest={
            "sources": [
                {"uri": s.uri, "model": s.manifest.model, "hook": s.manifest.hook, "d_in": s.d_in}
                for s in sources
            ]
        },
    )
    return PairedDataset(
        " + ".join(s.uri for s in sources), manifest, first.parts, None, sources=sources
    )


def _same(values) -> bool:
    return len(set(values)) == 1


def _check_pair(a: Dataset, b: Dataset) -> None:
    """What the manifests tell about two sources pairing up."""
    pair = f"data.sources {a.uri} and {b.uri}"
    if a.dtype != b.dtype:
        raise MisalignedError(f"{pair} store {a.dtype} and {b.dtype}; harvest them with one dtype")
    rows_a = [p.rows for p in a.manifest.parts]
    rows_b = [p.rows for p in b.manifest.parts]
    if rows_a != rows_b:
        where = next(
            (i for i, (x, y) in enumerate(zip(rows_a, rows_b)) if x != y),
            min(len(rows_a), len(rows_b)),
        )
        raise MisalignedError(
            f"{pair} are not aligned: {len(rows_a)} part(s) of {sum(rows_a)} rows against "
            f"{len(rows_b)} of {sum(rows_b)} (first difference at part {where}); pair the "
            "layer outputs of one `raysae harvest` run, which share one row order"
        )


def _read_paired(where, parts, index, part: Part, *, columns, batch_size=None):
    """Part `part` of the first source and its partners, checked row for row on `ALIGNMENT`,
    their act bytes side by side."""
    i = index[part.name]
    want = list(dict.fromkeys([*columns, *ALIGNMENT]))
    readers = [
        read_part(uri, ps[i], d_in=d, dtype=dtype, columns=want, batch_size=batch_size, endpoint=e)
        for (uri, d, dtype, e), ps in zip(where, parts)
    ]
    first_row = 0
    for tables in zip(*readers):
        _check_rows(where, [ps[i] for ps in parts], tables, first_row)
        first_row += len(tables[0])
        out = tables[0].select(list(columns))
        if "act" in columns:
            dtype = where[0][2]
            act = _side_by_side([t.column("act") for t in tables], len(tables[0]))
            field = pa.field(
                "act",
                pa.binary(row_bytes(sum(w[1] for w in where), dtype)),
                False,
                metadata={DTYPE_KEY: dtype},
            )
            out = out.set_column(out.schema.get_field_index("act"), field, act)
        yield out


def _check_rows(where, parts: list[Part], tables: list[pa.Table], first_row: int) -> None:
    a = tables[0]
    for (uri, *_), part, b in zip(where[1:], parts[1:], tables[1:]):
        if len(a) != len(b):
            raise MisalignedError(
                f"data.sources {where[0][0]} (part {parts[0].name}) and {uri} (part "
                f"{part.name}) give {len(a)} and {len(b)} rows in one read; re-harvest them together"
            )
        for name in ALIGNMENT:
            x, y = a.column(name).to_numpy(), b.column(name).to_numpy()
            bad = np.flatnonzero(x != y)
            if bad.size:
                row = int(bad[0])
                raise MisalignedError(
                    f"data.sources {where[0][0]} and {uri} are misaligned: part "
                    f"{parts[0].name} row {first_row + row} has {name}={x[row]} but part "
                    f"{part.name} has {name}={y[row]}; pair the layer outputs of one "
                    "`raysae harvest` run, which share one row order"
                )


def _side_by_side(columns: list[pa.ChunkedArray], rows: int) -> pa.FixedSizeBinaryArray:
    """Fixed-size binary columns of `rows` rows → one column whose row r is their row r's
    bytes concatenated (one copy)."""
    views = []
    for column in columns:
        chunk = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        width = chunk.type.byte_width
        buf = np.frombuffer(
            chunk.buffers()[1], dtype=np.uint8, count=rows * width, offset=chunk.offset * width
        )
        views.append(buf.reshape(rows, width))
    joined = np.ascontiguousarray(np.hstack(views))
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(joined.shape[1]), rows, [None, pa.py_buffer(joined)]
    )
