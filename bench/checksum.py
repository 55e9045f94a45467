"""Checksum candidates for verifying a part on read: throughput, and cost inside a read.

    PYTHONPATH=. python bench/checksum.py            # 64 MiB of random bytes, a page-cached file

For each hash (the standard library's zlib and hashlib, ISA-L's CRC-32 from `isal`, and
`xxhash` / `google-crc32c` if installed): GB/s over a 64 MiB buffer already in RAM (one pass,
out of the CPU cache), GB/s over 1 MiB chunks that stay in cache, and the cost of hashing while
reading a page-cached 64 MiB file into memory in `READ_CHUNK`s (raysae's read,
`raysae.data.dataset._read_local`) as a share of the same bare read (no decode, no cast: the
whole ingest's share is smaller, see bench/ingest.py --checksum-cost). Medians of
`--repeats`, each candidate's runs interleaved with the bare read's.

    PYTHONPATH=. python bench/checksum.py --parts    # raysae's own reads, part by part

With `--parts`: the dataset of bench/ingest.py (400,000 × 576 float16 rows, 7 parts) as written
(crc32) and without any checksum (none, see `ingest.checksum_cases`), each part read in turn
from one and then the other (in turn first), `--repeats` rounds: by the plain reader (`Dataset.batches`, float32
batches of 4096) and as a Ray read task reads it (`read_part`, the whole part as one table).
Many short pairs resist a shared machine's load better than whole passes; reported are the
median of the per-pair time ratios and the ratio of the summed times.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable

import pyarrow as pa

from raysae.data.dataset import READ_CHUNK

SIZE = 64 << 20


def candidates() -> dict[str, Callable]:
    """name → update(chunk, state) → state, starting from state None."""
    found: dict[str, Callable] = {
        "zlib.crc32": lambda chunk, crc: zlib.crc32(chunk, crc or 0),
        "zlib.adler32": lambda chunk, value: zlib.adler32(chunk, 1 if value is None else value),
    }
    for name in ("md5", "sha1", "sha256", "blake2b"):
        found[f"hashlib.{name}"] = lambda chunk, h, name=name: _update(
            h or hashlib.new(name), chunk
        )
    from isal import isal_zlib

    found["isal crc32"] = lambda chunk, crc: isal_zlib.crc32(chunk, crc or 0)
    try:
        import xxhash

        found["xxhash xxh3_64"] = lambda chunk, h: _update(h or xxhash.xxh3_64(), chunk)
    except ImportError:
        print("xxhash not installed: skipped")
    try:
        import google_crc32c

        # It takes only read-only buffers: a zero-copy read-only pyarrow view of the chunk.
        found["google-crc32c"] = lambda chunk, crc: google_crc32c.extend(
            crc or 0, pa.py_buffer(chunk.toreadonly())
        )
    except ImportError:
        print("google-crc32c not installed: skipped")
    return found


def _update(hasher, chunk):
    hasher.update(chunk)
    return hasher


def hash_buffer(update: Callable, view: memoryview, chunk: int, times: int = 1) -> None:
    """Hash `view` in pieces of `chunk` bytes, `times` over."""
    state = None
    for _ in range(times):
        for start in range(0, len(view), chunk):
            state = update(view[start : start + chunk], state)


def read_file(path: str, update: Callable | None) -> None:
    """Read `path` into one buffer in READ_CHUNKs, hashing each chunk as it arrives."""
    view, size, state = memoryview(pa.allocate_buffer(SIZE)), 0, None
    with open(path, "rb", buffering=0) as file:
        while n := file.readinto(view[size : size + READ_CHUNK]):
            if update is not None:
                state = update(view[size : size + n], state)
            size += n


def seconds(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def part_reads(repeats: int) -> None:
    """Time raysae's reads of each part with its CRC-32 checked and of the same part with none."""
    import sys

    import torch

    from raysae import data

    sys.path.insert(0, os.path.dirname(__file__))
    from ingest import checksum_cases

    def plain(dataset: data.Dataset) -> None:
        for batch in dataset.batches(4096, dtype=torch.float32):
            float(batch[0, 0])

    def read_task(dataset: data.Dataset) -> None:
        for table in dataset.read_part(dataset.parts[0], columns=["act"]):
            assert len(table) == dataset.parts[0].rows

    with tempfile.TemporaryDirectory() as tmp:
        acts = torch.randn(400_000, 576, generator=torch.Generator().manual_seed(0))
        data.write_dataset(os.path.join(tmp, "ingest"), acts, dtype="float16")
        del acts
        cases = dict(checksum_cases(os.path.join(tmp, "ingest"), tmp))
        crc32, none = data.open_dataset(cases["crc32"]), data.open_dataset(cases["none"])
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        for label, read in (("plain reader", plain), ("read task", read_task)):
            times: dict[str, list[float]] = {"crc32": [], "none": []}
            for round_ in range(repeats + 1):  # round 0 warms the page cache
                for index in range(len(crc32.parts)):
                    pair = [("crc32", crc32), ("none", none)]
                    for case, dataset in pair[:: 1 if (round_ + index) % 2 else -1]:  # ABBA
                        part = dataset.select([dataset.parts[index].name])
                        took = seconds(lambda: read(part))
                        if round_:
                            times[case].append(took)
            ratios = [a / b for a, b in zip(times["crc32"], times["none"])]
            print(
                f"{label:<12} crc32 ÷ none time: median {statistics.median(ratios):.3f} of "
                f"{len(ratios)} pairs, summed {sum(times['crc32']) / sum(times['none']):.3f}; "
                f"none {statistics.median(times['none']) * 1e3:.0f} ms per part"
            )
        print(f"load average after: {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--parts", action="store_true", help="time raysae's part reads")
    args = parser.parse_args()
    if args.parts:
        part_reads(args.repeats)
        return
    content = os.urandom(SIZE)
    view = memoryview(content)
    with tempfile.NamedTemporaryFile() as file:
        file.write(content)
        file.flush()
        read_file(file.name, None)  # into the page cache
        print(f"load average before: {os.getloadavg()[0]:.1f}")
        print(f"{'hash':<16} {'RAM GB/s':>9} {'cache GB/s':>11} {'+ bare read':>11}")
        for name, update in candidates().items():
            ram, cache, cost = [], [], []
            for _ in range(args.repeats):
                ram.append(SIZE / seconds(lambda: hash_buffer(update, view, SIZE)) / 1e9)
                in_cache = view[:READ_CHUNK]  # hashed SIZE / READ_CHUNK times over
                run = lambda: hash_buffer(update, in_cache, READ_CHUNK, SIZE // READ_CHUNK)  # noqa: E731
                cache.append(SIZE / seconds(run) / 1e9)
                bare = seconds(lambda: read_file(file.name, None))
                hashed = seconds(lambda: read_file(file.name, update))
                cost.append(hashed / bare - 1)
            print(
                f"{name:<16} {statistics.median(ram):>9.2f} {statistics.median(cache):>11.2f} "
                f"{statistics.median(cost):>10.1%}"
            )
        print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
