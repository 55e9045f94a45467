"""Start-up cost of `raysae sweep` on an S3 dataset of many parts: time and S3 requests to the
first training step.

    python bench/open.py --tree /tmp/before     # a checkout from before the open-once refactor
    python bench/open.py                        # this checkout (the tree holding this file)
    python bench/open.py --parts 3000 --json open-3000.json
    python bench/open.py --show open-3000.json   # print a saved result's table again

Opening a dataset reads its manifest, lists its prefix and reads every part's Parquet footer.
If every layer of a sweep (the driver's checks, each trial, each Ray Train run) re-opens the
dataset once per sweep point, start-up costs O(points × parts) requests; opened once, O(parts).

How: a moto S3 server runs in this process on 127.0.0.1, behind a WSGI middleware that counts
every request by method and by kind of key (manifest.json, parts, listings, other). A dataset
of --parts tiny parts (8 rows × d_in 16, float16) is written under s3://<bucket>/acts/ — one
part written by raysae's own writer, its bytes uploaded under N part names, the manifest last —
and an 8-point sweep (n_latents × k × lr, one SAE per trial, one trial at a time) is run over it
as `python -m raysae sweep SPEC` with PYTHONPATH=--tree. The clock stops at the first progress
line (`tokens n/total | fvu …`, printed by the Ray Train worker after its first step); then the
sweep's process group and any Ray process it left behind are killed. A sweep that prints no
step within --timeout is reported as a lower bound ("> X s") with the requests made so far.

moto answers requests one Python thread at a time in this process, so absolute seconds are
moto's, not S3's: compare the request counts and the ratio of times between trees.

Counts are HTTP requests, not reads: pyarrow reads an object by path with a HEAD and then GETs
(about 256 KiB each, so a 30,000-part manifest of 2.5 MB is 1 HEAD + 10 GETs per read).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

REPO_ROOT = Path(__file__).resolve().parent.parent
BUCKET = "raysae-bench-open"
PREFIX = "acts"
D_IN, ROWS_PER_PART = 16, 8

FAKE_AWS_ENV = {  # as tests/conftest_data.py: credentials moto accepts
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# trainer.format_record; Ray prefixes worker output with "(RayTrainWorker pid=…)", so search.
FIRST_STEP = re.compile(r"tokens\s+[\d,]+/[\d,]+ \| fvu")
# raysae.sweep.run_sweep logs this after its driver-side checks, once Ray is up, before Tune.
TUNE_START = re.compile(r"SAE\(s\) in \d+ trial")
HEARTBEAT_S = 60.0
KINDS = ("manifest", "part", "list", "other")


# -- counting S3 server ----------------------------------------------------------------------


class RequestCounter:
    """Thread-safe counts of S3 requests by (kind, method); werkzeug serves each connection
    on its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, kind: str, method: str) -> None:
        with self._lock:
            self._counts[kind, method] += 1

    def snapshot(self) -> Counter[tuple[str, str]]:
        with self._lock:
            return Counter(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


def request_kind(method: str, path: str, query: str) -> str:
    """Kind of an S3 request in path-style addressing (/bucket/key), which both boto3 and
    pyarrow use for an IP-address endpoint."""
    _bucket, _, key = path.lstrip("/").partition("/")
    if not key:
        # A GET on the bucket itself is ListObjects(V2); a bare GET lists too.
        params = parse_qs(query, keep_blank_values=True)
        listing = not params or {"list-type", "prefix", "delimiter", "continuation-token"} & set(
            params
        )
        return "list" if method == "GET" and listing else "other"
    if key.rsplit("/", 1)[-1] == "manifest.json":
        return "manifest"
    if key.endswith(".parquet"):
        return "part"
    return "other"


class CountingApp:
    """WSGI middleware: count the request, then hand it to moto unchanged."""

    def __init__(self, app, counter: RequestCounter) -> None:
        self.app, self.counter = app, counter

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        kind = request_kind(method, environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        self.counter.add(kind, method)
        return self.app(environ, start_response)


def start_s3(counter: RequestCounter):
    """A moto ThreadedMotoServer on 127.0.0.1 (free port) whose requests ``counter`` counts;
    returns (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    # ThreadedMotoServer builds its werkzeug server and WSGI app inside its thread and offers no
    # hook; werkzeug's handler calls `self.server.app` on every request, so swapping that
    # attribute wraps every later request. None can arrive earlier: nobody knows the port yet.
    wsgi_server = getattr(server, "_server", None)
    if wsgi_server is None or not hasattr(wsgi_server, "app"):
        sys.exit("moto's ThreadedMotoServer changed: no ._server.app to wrap for counting")
    wsgi_server.app = CountingApp(wsgi_server.app, counter)
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


# -- the dataset -----------------------------------------------------------------------------


def raysae_data():
    """(data-contract module, storage module) of the raysae on sys.path: ``raysae.data`` after
    the data-plane refactor, ``raysae.shards`` / ``raysae.storage`` before it. Both write and
    read the same format (manifest FORMAT_VERSION 1), so either tree can write the dataset."""
    try:
        from raysae import data
        from raysae.data import storage
    except ImportError:
        from raysae import shards as data
        from raysae import storage
    return data, storage


def write_s3_dataset(s3, n_parts: int) -> tuple[str, float]:
    """N identical parts under s3://BUCKET/PREFIX/, then their manifest; returns (uri, seconds).

    One part is written by raysae's writer to a local directory; its bytes are uploaded under
    N part names (so every footer is a real raysae footer), and the manifest is that part's,
    with N entries and the statistics scaled by N, built by raysae's Manifest so it validates.
    """
    import dataclasses

    import torch

    data, _ = raysae_data()

    acts = torch.randn(ROWS_PER_PART, D_IN, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as local:
        one = data.write_dataset(local, acts, rows_per_part=ROWS_PER_PART, model="bench-open")
        (single,) = one.parts
        body = Path(local, single.name).read_bytes()
    write_id = data.new_write_id()
    parts = tuple(
        data.Part(data.part_name(i, write_id), single.rows, single.bytes) for i in range(n_parts)
    )
    manifest = dataclasses.replace(
        one,
        n_tokens=n_parts * single.rows,
        parts=parts,
        stats=data.ActStats(
            one.stats.count * n_parts, one.stats.sum * n_parts, one.stats.squared_norm_sum * n_parts
        ),
    )
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:  # PUTs are latency-bound: overlap them
        list(
            pool.map(
                lambda part: s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{part.name}", Body=body),
                parts,
            )
        )
    # Last: the manifest's presence commits the dataset.
    s3.put_object(
        Bucket=BUCKET, Key=f"{PREFIX}/{data.MANIFEST_NAME}", Body=manifest.to_json().encode()
    )
    return f"s3://{BUCKET}/{PREFIX}", time.perf_counter() - start


def footer_cost(uri: str, endpoint: str, counter: RequestCounter) -> Counter[tuple[str, str]]:
    """Requests that opening one part by path costs, ``pq.ParquetFile(path, filesystem=fs)``
    as the pre-refactor open_dataset did for every part: a reference for the part counts (a
    reader told the part's size can skip the HEAD)."""
    import pyarrow.parquet as pq

    data, storage = raysae_data()
    first = data.read_manifest(uri).parts[0]
    fs, path = storage.filesystem_and_path(storage.join(uri, first.name), endpoint=endpoint)
    counter.reset()
    with pq.ParquetFile(path, filesystem=fs) as parquet:
        parquet.metadata.num_rows, parquet.schema_arrow  # noqa: B018 — what the check reads
    return counter.snapshot()


# -- the sweep -------------------------------------------------------------------------------


def write_spec(workdir: Path, uri: str) -> tuple[Path, int]:
    """An 8-point sweep spec over ``uri``; returns (path, points after expansion)."""
    import yaml

    from raysae.sweep_spec import expand, load_sweep_spec

    spec = {
        "name": "open-bench",
        "output": str(workdir / "out"),
        "base": {
            "sae": {"architecture": "topk", "d_in": D_IN, "n_latents": 32, "k": 4},
            "train": {
                "total_tokens": 640,  # 10 batches: the first step is well before the end
                "batch_size": 64,
                "log_every_tokens": 64,  # so the first step prints a progress line
                "init_tokens": 64,
            },
            "data": {"uri": uri, "eval_parts": 1, "read_cpus": 0.25},
            "scaling": {
                "num_workers": 1,
                "cpus_per_worker": 0.5,
                "checkpoint_every_tokens": 1_000_000,
            },
        },
        "space": {"sae.n_latents": [32, 64], "sae.k": [2, 4], "train.lr": [1e-3, 2e-3]},
        "pack": 1,
        "max_concurrent_trials": 1,
    }
    path = workdir / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, len(expand(load_sweep_spec(str(path))))


def sweep_env(tree: Path, endpoint: str, ray_tmp: str) -> dict[str, str]:
    """The sweep's environment: raysae from ``tree``, S3 at the moto server, a Ray of its own."""
    env = {**os.environ, **FAKE_AWS_ENV}
    env.pop("RAY_ADDRESS", None)  # never join someone else's Ray cluster
    env.update(
        PYTHONPATH=str(tree),
        AWS_ENDPOINT_URL_S3=endpoint,
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=ray_tmp,  # its own Ray session dir: marks its processes, hides other clusters
        RAY_USAGE_STATS_ENABLED="0",  # no network here: skip the usage-stats report
        PYTHONUNBUFFERED="1",  # the driver's lines must reach the pipe when printed
    )
    return env


def check_import(env: dict[str, str], cwd: Path, tree: Path) -> str:
    """Where `python -m raysae` will import raysae from; exit unless it is inside ``tree``
    (an editable install elsewhere could shadow PYTHONPATH)."""
    origin = subprocess.run(
        [sys.executable, "-c", "import raysae; print(raysae.__file__)"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(origin).resolve().is_relative_to(tree):
        sys.exit(f"python -m raysae would import {origin}, not the tree {tree}")
    return origin


@dataclass
class Milestone:
    seconds: float
    counts: Counter


@dataclass
class SweepRun:
    milestones: dict[str, Milestone] = field(default_factory=dict)
    end: Milestone | None = None
    reached: bool = False
    exit_code: int | None = None
    log: list[str] = field(default_factory=list)


def is_progress_bar(line: str) -> bool:
    """Ray Data's tqdm redraws (many a second, mostly cursor moves): kept in the log, not echoed."""
    return "%|" in line or "row/s]" in line or not line.replace("\x1b[A", "").strip()


def read_lines(stream, lines: queue.Queue) -> None:
    """Thread: each line of the child's output with its arrival time; None at EOF."""
    for line in stream:
        lines.put((time.perf_counter(), line.rstrip("\n")))
    lines.put(None)


def run_sweep(
    spec: Path, env: dict, cwd: Path, counter: RequestCounter, timeout: float, echo: bool
) -> SweepRun:
    """Run the sweep until its first training step, its exit, or ``timeout``; then kill it."""
    run = SweepRun()
    counter.reset()
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "raysae", "sweep", str(spec)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group, so it can be killed as a whole
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(child.stdout, lines), daemon=True).start()
    next_beat = start + HEARTBEAT_S
    try:
        while True:
            now = time.perf_counter()
            if now - start >= timeout:
                break
            try:
                item = lines.get(timeout=max(0.01, min(next_beat, start + timeout) - now))
            except queue.Empty:
                if time.perf_counter() >= next_beat:
                    print(
                        f"  [{time.perf_counter() - start:7.1f} s] no step yet; requests so "
                        f"far: {format_kinds(counter.snapshot())}",
                        flush=True,
                    )
                    next_beat += HEARTBEAT_S
                continue
            if item is None:  # the sweep exited (or closed its output) before its first step
                run.exit_code = child.wait()
                break
            arrived, line = item
            elapsed = arrived - start
            run.log.append(f"[{elapsed:7.1f} s] {line}")
            if echo and not is_progress_bar(line):
                print(f"  {run.log[-1]}", flush=True)
            if TUNE_START.search(line) and "tune start" not in run.milestones:
                run.milestones["tune start"] = Milestone(elapsed, counter.snapshot())
            if FIRST_STEP.search(line):
                run.reached = True
                run.end = Milestone(elapsed, counter.snapshot())
                return run
    finally:
        if run.end is None:
            run.end = Milestone(time.perf_counter() - start, counter.snapshot())
        stop(child, env["RAY_TMPDIR"])
    return run


def stop(child: subprocess.Popen, ray_tmp: str) -> None:
    """SIGKILL the sweep's process group, then any process still carrying its RAY_TMPDIR (Ray
    daemons and workers inherit it; some Ray processes leave the group). Never `ray stop`:
    that would stop other people's Ray instances on this machine."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()
    for _ in range(10):
        left = leftover_pids(ray_tmp)
        if not left:
            break
        print(f"  killing {len(left)} leftover Ray process(es): {sorted(left)}", flush=True)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    else:
        print(
            f"  WARNING: processes with RAY_TMPDIR={ray_tmp} still alive: {leftover_pids(ray_tmp)}"
        )
    shutil.rmtree(ray_tmp, ignore_errors=True)


def leftover_pids(ray_tmp: str) -> set[int]:
    """Live processes (not zombies, not this one) whose environment holds RAY_TMPDIR=ray_tmp."""
    marker = f"RAY_TMPDIR={ray_tmp}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:  # gone, or someone else's
            continue
        found.add(int(entry.name))
    return found


# -- report ----------------------------------------------------------------------------------


def by_kind(counts: Counter) -> dict[str, int]:
    return {kind: sum(n for (k, _), n in counts.items() if k == kind) for kind in KINDS}


def format_kinds(counts: Counter) -> str:
    return ", ".join(f"{kind} {n:,}" for kind, n in by_kind(counts).items())


def format_detail(counts: Counter) -> str:
    return ", ".join(f"{kind} {method} {n:,}" for (kind, method), n in sorted(counts.items()))


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


def print_table(result: dict) -> None:
    seconds = result["seconds_to_first_step"]
    shown = f"{seconds:,.1f}" if result["reached_first_step"] else f"> {seconds:,.0f}"
    k = result["requests_by_kind"]
    total = sum(k.values())
    # Part requests per part: O(points) before the refactor, about 1 after it (Ray Data's
    # reads of the first parts' rows are part GETs too, so a little over).
    per_part = k["part"] / max(result["parts"], 1)
    print(
        "\n| tree | parts | points | s to first step | manifest GETs | part requests "
        "| part requests / part | list requests | total requests |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {result['tree']} | {result['parts']:,} | {result['points']} | {shown} "
        f"| {result['manifest_gets']:,} | {k['part']:,} | {per_part:.1f} | {k['list']:,} "
        f"| {total:,} |"
    )
    print(f"\nrequests by kind and method: {result['requests_detail']}")
    print(
        f"opening one part by path (pq.ParquetFile) costs "
        f"{sum(result['footer_requests'].values())} request(s): {result['footer_detail']}"
    )
    for name, m in result["milestones"].items():
        print(f"{name}: {m['seconds']:.1f} s, requests so far {m['kinds']}")
    print(
        f"load average (1, 5, 15 min): before {result['load_before']}; after {result['load_after']}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()),  # the first paragraph
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--tree",
        type=Path,
        default=REPO_ROOT,
        help=f"raysae checkout to measure (default: {REPO_ROOT})",
    )
    parser.add_argument("--parts", type=int, default=30_000, help="parts in the S3 dataset")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1500.0,
        help="seconds to wait for the first step before reporting a lower bound",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the numbers here")
    parser.add_argument("--quiet", action="store_true", help="do not echo the sweep's output")
    parser.add_argument(
        "--show",
        type=Path,
        metavar="JSON",
        help="print the table of a saved --json result, run nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.show:
        print_table(json.loads(args.show.read_text()))
        return
    tree = args.tree.resolve()
    if not (tree / "raysae" / "__init__.py").is_file():
        sys.exit(f"--tree {tree} holds no raysae package")
    # Dataset and spec are written by the tree under test, so they are what its reader expects.
    sys.path.insert(0, str(tree))
    os.environ.update(FAKE_AWS_ENV)  # for this process's own S3 clients (boto3, pyarrow)
    import boto3

    print("command: " + " ".join([sys.executable, *sys.argv]), flush=True)
    counter = RequestCounter()
    server, endpoint = start_s3(counter)
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint  # raysae's readers in this process too
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=BUCKET)
    workdir = Path(tempfile.mkdtemp(prefix="raysae-bench-open-"))
    ray_tmp = tempfile.mkdtemp(prefix="rbo-", dir="/tmp")  # short: Ray's socket paths grow from it
    try:
        uri, upload_s = write_s3_dataset(s3, args.parts)
        print(
            f"dataset: {args.parts:,} parts × {ROWS_PER_PART} rows (d_in {D_IN}, float16) at "
            f"{uri} on {endpoint}; upload took {upload_s:.1f} s",
            flush=True,
        )
        footer = footer_cost(uri, endpoint, counter)
        spec, points = write_spec(workdir, uri)
        if points != 8:
            sys.exit(f"the spec expands to {points} points, expected 8")
        env = sweep_env(tree, endpoint, ray_tmp)
        origin = check_import(env, workdir, tree)
        print(
            f"sweep: {points} points, 1 SAE per trial, 1 trial at a time; raysae from {origin}",
            flush=True,
        )
        load_before = load()
        run = run_sweep(spec, env, workdir, counter, args.timeout, echo=not args.quiet)
        load_after = load()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)  # stop() removes it too; not if none ran
    if not run.reached and run.exit_code is not None:
        print("\n".join(run.log[-30:]))
        sys.exit(f"the sweep exited with code {run.exit_code} before its first training step")
    counts = run.end.counts
    result = {
        "tree": str(tree),
        "parts": args.parts,
        "points": points,
        "reached_first_step": run.reached,
        "seconds_to_first_step": round(run.end.seconds, 2),
        "timeout_s": args.timeout,
        "upload_s": round(upload_s, 2),
        "manifest_gets": counts["manifest", "GET"],
        "requests_by_kind": by_kind(counts),
        "requests_detail": format_detail(counts),
        "requests": {f"{k} {m}": n for (k, m), n in sorted(counts.items())},
        "footer_requests": {f"{k} {m}": n for (k, m), n in sorted(footer.items())},
        "footer_detail": format_detail(footer),
        "milestones": {
            name: {"seconds": round(m.seconds, 2), "kinds": format_kinds(m.counts)}
            for name, m in run.milestones.items()
        },
        "load_before": load_before,
        "load_after": load_after,
    }
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
