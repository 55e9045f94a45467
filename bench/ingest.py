"""Ingest benchmark: the same shards read (a) by plain single-process pyarrow, (b) through Ray Data.

    PYTHONPATH=. python bench/ingest.py                      # local files and a local S3 server
    PYTHONPATH=. python bench/ingest.py --rows 1000000 --only local
    PYTHONPATH=. python bench/ingest.py --only local --checksum-cost   # what verifying costs

Both readers deliver float32 torch batches (batch_size, d_in) to this process — (a) with
``raysae.data.iter_batches``, (b) with ``raysae.data.stream.build_dataset`` +
``iter_torch_batches``, i.e. what one Ray Train worker sees. Each is run once to warm up
(page cache, Ray workers), then timed ``--repeats`` times, alternating (a) and (b) so that both
see the same load (this machine is shared); medians are reported. MB/s counts
stored activation bytes (rows · d_in · 2 for float16). Target (DESIGN.md): (b)/(a) ≥ 0.6.

The S3 case serves the same parts from a moto server (in a child process, so its Python threads
do not compete with the reader for this process's GIL) on 127.0.0.1. moto is slow; its numbers
compare the two readers against one server, not against real S3.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable

import torch

BUCKET = "raysae-bench"


def consume(read: Callable[[], Iterable[torch.Tensor]]) -> tuple[int, float, float, int, float]:
    """Pull every batch (touching one value, so none is skipped): rows, seconds, seconds to the
    first batch, rows of the first batch (the steady-state rate leaves the first batch out), and
    this process's CPU seconds (all of the plain reader's work; a share of the Ray path's)."""
    rows, first, first_rows = 0, None, 0
    start, cpu = time.perf_counter(), time.process_time()
    for batch in read():
        if first is None:
            first, first_rows = time.perf_counter() - start, batch.shape[0]
        rows += batch.shape[0]
        float(batch[0, 0])
    return rows, time.perf_counter() - start, first or 0.0, first_rows, time.process_time() - cpu


def compare(cases: list[tuple[str, str]], *, batch_size: int, repeats: int, row_bytes: int) -> None:
    """Time both readers on each (label, uri) case, interleaved (every repeat reads every case
    with (a), then (b), the cases in turn forwards and backwards) so all see the same load; print each reader's medians, the
    median of the per-repeat ratios (b)/(a) over the whole pass and in steady state (after the
    first batch, i.e. without the per-epoch start-up) and, with several cases, each case's
    rate over the last case's, per reader, paired within a repeat."""
    from raysae import data
    from raysae.data import stream

    d_in = data.read_manifest(cases[0][1]).d_in

    def plain(uri: str) -> Iterable[torch.Tensor]:
        return data.iter_batches(uri, batch_size, dtype=torch.float32, drop_last=True)

    def ray_data(uri: str) -> Iterable[torch.Tensor]:
        dataset = stream.build_dataset(uri, seed=0)
        return stream.iter_torch_batches(
            dataset, batch_size=batch_size, dtype=torch.float32, d_in=d_in
        )

    readers = {"(a) plain pyarrow": plain, "(b) ray data": ray_data}
    runs: dict[tuple[str, str], list[tuple[int, float, float, int, float]]] = {
        (case, name): [] for case, _ in cases for name in readers
    }
    for repeat in range(repeats + 1):  # repeat 0 warms the page cache and Ray's workers
        # Cases in turn forwards and backwards, so none always comes right after another's run
        # (Arrow's memory pool, the page cache and Ray's workers are as warm for each).
        for case, uri in cases[:: 1 if repeat % 2 else -1]:
            for name, read in readers.items():
                result = consume(lambda: read(uri))
                if repeat:
                    runs[case, name].append(result)
    for (case, name), results in runs.items():
        rows = results[0][0]
        seconds = statistics.median(r[1] for r in results)
        first = statistics.median(r[2] for r in results)
        print(
            f"{case:<7} {name:<18} {seconds:7.2f} s  {rows / seconds:>12,.0f} rows/s  "
            f"{rows * row_bytes / seconds / 1e6:>7,.0f} MB/s  first batch {first:.2f} s"
        )

    def steady(r: tuple) -> float:
        return (r[0] - r[3]) / (r[1] - r[2])

    def whole(r: tuple) -> float:
        return r[0] / r[1]

    def ratio_line(label: str, over: list, under: list, rate) -> str:
        ratios = [rate(x) / rate(y) for x, y in zip(over, under)]
        return (
            f"{label} {statistics.median(ratios):.3f}  "
            f"(median of {repeats} pairs; min {min(ratios):.3f}, max {max(ratios):.3f})"
        )

    (a_name, b_name), base = readers, cases[-1][0]
    for case, _ in cases:
        a, b = runs[case, a_name], runs[case, b_name]
        for what, rate in (("whole pass", whole), ("steady state", steady)):
            print(ratio_line(f"{case:<7} ratio (b)/(a), {what:<12}", b, a, rate))
    for case, _ in cases[:-1]:
        for name in readers:
            label = f"{case:<7} {name:<18} rate ÷ {base}'s, whole pass"
            print(ratio_line(label, runs[case, name], runs[base, name], whole))
        # The plain reader's CPU time is all its work, and less disturbed by other jobs than
        # its wall time on a shared machine: rows per CPU second, over the baseline's.
        label = f"{case:<7} {a_name:<18} rows per CPU s ÷ {base}'s"
        print(ratio_line(label, runs[case, a_name], runs[base, a_name], lambda r: r[0] / r[4]))


def checksum_cases(uri: str, out: str) -> list[tuple[str, str]]:
    """The local dataset `uri` as written (label crc32: each part's CRC-32 checked on read),
    and two copies under `out`: pagecrc, its manifest without CRC-32s, as raysae wrote them
    before it recorded them (reads check the page CRCs instead); none, also without page CRCs
    (nothing is checked: what reading costs without verification, by the same code path)."""
    import dataclasses
    import hashlib
    import shutil

    import pyarrow.parquet as pq

    from raysae import data
    from raysae.data import storage
    from raysae.data.writer import _PARQUET_OPTIONS

    manifest = data.read_manifest(uri)
    cases = [("crc32", uri)]
    for label, page_checksums in (("pagecrc", True), ("none", False)):
        folder, parts = os.path.join(out, label), []
        os.makedirs(folder)
        for part in manifest.parts:
            path = os.path.join(folder, part.name)
            if page_checksums:
                shutil.copyfile(os.path.join(uri, part.name), path)
            else:
                table = pq.read_table(os.path.join(uri, part.name))
                options = {**_PARQUET_OPTIONS, "write_page_checksum": False}
                pq.write_table(table, path, row_group_size=len(table), **options)
            content = open(path, "rb").read()
            sha256 = hashlib.sha256(content).hexdigest()
            parts.append(dataclasses.replace(part, bytes=len(content), sha256=sha256, crc32=None))
        copy = dataclasses.replace(manifest, parts=tuple(parts))
        storage.write_bytes(os.path.join(folder, data.MANIFEST_NAME), copy.to_json().encode())
        cases.append((label, folder))
    return cases


def serve_s3(port: int) -> None:
    """Child process: a moto S3 server on 127.0.0.1:port until terminated."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    while True:
        time.sleep(3600)


def start_s3() -> multiprocessing.Process:
    """Start the moto server, point the AWS environment at it, create the bucket."""
    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = multiprocessing.get_context("spawn").Process(
        target=serve_s3, args=(port,), daemon=True
    )
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
    )
    for _ in range(100):  # wait for the server to accept connections
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            return server
        except Exception:  # noqa: BLE001 — not up yet
            time.sleep(0.1)
    raise RuntimeError(f"moto server on {endpoint} did not start")


def main() -> None:
    """Write the shards, start Ray (and S3), compare the readers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000, help="rows in the local dataset")
    parser.add_argument(
        "--s3-rows", type=int, default=100_000, help="rows in the S3 dataset (moto is slow)"
    )
    parser.add_argument(
        "--d-in", type=int, default=576, help="activation width (SmolLM2-135M: 576)"
    )
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=["local", "s3"], help="run one of the two cases")
    parser.add_argument(
        "--checksum-cost",
        action="store_true",
        help="read the local dataset three ways, interleaved: as written (crc32: each part's "
        "CRC-32 checked), with page CRCs instead (pagecrc: manifests of older raysae) and with "
        "no checksums at all (none); the cost of verifying is each one's rate over none's",
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    server = (
        start_s3() if args.only != "local" else None
    )  # before Ray, so its workers see the endpoint

    import ray

    from raysae import data

    ray.init(
        address="local",  # a new instance even when another Ray cluster runs on this machine
        num_cpus=os.cpu_count(),
        object_store_memory=1 << 30,
        include_dashboard=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    row_bytes = args.d_in * 2
    cases = [("local", args.rows), ("s3", args.s3_rows)]
    with tempfile.TemporaryDirectory() as tmp:
        for label, rows in cases:
            if args.only and label != args.only:
                continue
            uri = f"s3://{BUCKET}/ingest" if label == "s3" else os.path.join(tmp, "ingest")
            acts = torch.randn(rows, args.d_in, generator=torch.Generator().manual_seed(0))
            manifest = data.write_dataset(uri, acts, dtype="float16")
            del acts
            print(
                f"{label:<6} {rows:,} rows × d_in={args.d_in} float16 = {rows * row_bytes / 1e6:,.0f} MB "
                f"in {len(manifest.parts)} parts; batches of {args.batch_size} float32; {os.cpu_count()} CPUs"
            )
            cases = [(label, uri)]
            if label == "local" and args.checksum_cost:
                cases = checksum_cases(uri, tmp)
            compare(cases, batch_size=args.batch_size, repeats=args.repeats, row_bytes=row_bytes)
    ray.shutdown()
    if server is not None:
        server.terminate()


if __name__ == "__main__":
    main()
