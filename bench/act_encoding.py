"""Measure how the Parquet typing of the ``act`` column decides read speed.

Writes the same N×d float16 activations once per candidate encoding, then times reading the
``act`` column back into a torch float16 tensor (B, d) from a warm page cache: Parquet decode
plus Arrow → torch, median of repeats. MB/s counts activation bytes (N·d·2), not file bytes.

    PYTHONPATH=. python bench/act_encoding.py --rows 100000 --d-in 576 --repeats 5

The numbers are in BENCHMARKS.md; the choice they led to is explained in ``raysae/data/format.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


@dataclass(frozen=True)
class Candidate:
    """One way of typing ``act`` in Parquet."""

    name: str
    """Label printed in the results table."""
    to_arrow: Callable[[np.ndarray], pa.Array]
    """(N, d) float16 array → Arrow column."""
    write_options: dict
    """Keyword arguments for ``pq.write_table``."""
    to_torch: Callable[[pa.ChunkedArray, int], torch.Tensor]
    """Arrow column read back → (N, d) float16 tensor."""


def list_column(acts: np.ndarray) -> pa.Array:
    """fixed_size_list<halffloat>[d]: Arrow's natural type for a vector per row."""
    return pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), acts.shape[1])


def binary_column(acts: np.ndarray) -> pa.Array:
    """fixed_size_binary(d·2): each row's vector as one opaque fixed-width value."""
    width = acts.shape[1] * acts.itemsize
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(acts), [None, pa.py_buffer(np.ascontiguousarray(acts))]
    )


def list_to_torch(column: pa.ChunkedArray, d: int) -> torch.Tensor:
    """Zero-copy where Arrow allows: flatten the list values and view them as (N, d)."""
    values = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return torch.from_numpy(values.reshape(-1, d))


def binary_to_torch(column: pa.ChunkedArray, d: int) -> torch.Tensor:
    """View the fixed-width value buffer as float16 (N, d) without copying."""
    array = column.combine_chunks()
    data = np.frombuffer(array.buffers()[1], dtype=np.float16, count=len(array) * d)
    return torch.from_numpy(data.reshape(-1, d))


# Arrow buffers are read-only; these views are only read, so torch's warning is noise here.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

PLAIN = {"use_dictionary": False, "compression": "none"}

CANDIDATES = [
    Candidate(
        "fixed_size_list<f16> (pyarrow defaults: dictionary, snappy)",
        list_column,
        {},
        list_to_torch,
    ),
    Candidate("fixed_size_list<f16> plain, uncompressed", list_column, PLAIN, list_to_torch),
    Candidate("fixed_size_binary(d*2) plain, uncompressed", binary_column, PLAIN, binary_to_torch),
    Candidate(
        "fixed_size_binary(d*2) plain, snappy",
        binary_column,
        {"use_dictionary": False, "compression": "snappy"},
        binary_to_torch,
    ),
    Candidate(
        "fixed_size_binary(d*2) plain, zstd(1)",
        binary_column,
        {"use_dictionary": False, "compression": "zstd", "compression_level": 1},
        binary_to_torch,
    ),
]


def time_read(path: str, candidate: Candidate, d: int, repeats: int) -> float:
    """Median seconds to read ``act`` from ``path`` into a torch tensor (first read warms the cache)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        tensor = candidate.to_torch(pq.read_table(path, columns=["act"])["act"], d)
        times.append(time.perf_counter() - start)
        assert tensor.shape[1] == d
    return statistics.median(times[1:])


def main() -> None:
    """Write each candidate, read it back, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((args.rows, args.d_in), dtype=np.float32).astype(np.float16)
    megabytes = acts.nbytes / 1e6
    print(f"{args.rows} rows x d_in={args.d_in} float16 = {megabytes:.0f} MB of activations")
    print(f"{'act typing':<62} {'write s':>8} {'file MB':>8} {'read MB/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, candidate in enumerate(CANDIDATES):
            path = os.path.join(tmp, f"{i}.parquet")
            start = time.perf_counter()
            pq.write_table(
                pa.table({"act": candidate.to_arrow(acts)}), path, **candidate.write_options
            )
            write_s = time.perf_counter() - start
            read_s = time_read(path, candidate, args.d_in, args.repeats)
            size = os.path.getsize(path) / 1e6
            print(f"{candidate.name:<62} {write_s:>8.2f} {size:>8.1f} {megabytes / read_s:>10.0f}")
            os.remove(path)


if __name__ == "__main__":
    main()
