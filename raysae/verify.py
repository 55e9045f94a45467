"""`raysae verify DATASET`: read every byte of a dataset and check each part against its manifest.

Per part (`raysae.data.verify_part`): present, the listed size, the SHA-256 the writer recorded
(manifests written before raysae recorded hashes have none: said in the summary), the footer's
rows and columns, every Parquet page's CRC-32, and no NaN/Inf. Prints one line per bad part on
stdout, progress on stderr; exits 1 if any part is bad. Imports no Ray.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from raysae import data

PROGRESS_SECONDS = 5.0
"""Seconds between progress lines on stderr."""


def _problem(uri: str, manifest: data.Manifest, part: data.Part) -> str | None:
    """What is wrong with `part`, or None."""
    try:
        data.verify_part(uri, manifest, part)
    except data.DatasetError as err:
        return str(err)
    return None


def verify_dataset(
    uri: str,
    *,
    threads: int = 4,
    out: TextIO | None = None,
    progress: TextIO | None = None,
    every: float = PROGRESS_SECONDS,
) -> int:
    """Check every part of the dataset at `uri`; the number of bad parts.

    `threads` parts are read at once (to overlap S3 latency; hashing and decoding release the
    GIL); results are reported in manifest order, on `out` (default stdout), progress on
    `progress` (default stderr).
    """
    out, progress = out or sys.stdout, progress or sys.stderr
    manifest = data.read_manifest(uri)
    parts = manifest.parts
    bad, checked_bytes, start = 0, 0, time.monotonic()
    last = start
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = pool.map(lambda part: _problem(uri, manifest, part), parts)
        for done, (part, problem) in enumerate(zip(parts, problems), 1):
            checked_bytes += part.bytes
            if problem is not None:
                bad += 1
                print(f"BAD {problem}", file=out, flush=True)
            now = time.monotonic()
            if now - last >= every or done == len(parts):
                last = now
                print(
                    f"verify: {done}/{len(parts)} parts, {checked_bytes / 1e6:,.0f} MB, "
                    f"{bad} bad, {now - start:.0f} s",
                    file=progress,
                    flush=True,
                )
    unhashed = sum(part.sha256 is None for part in parts)
    if unhashed:
        print(
            f"note: {unhashed} of {len(parts)} parts have no SHA-256 in {data.MANIFEST_NAME} "
            "(written by an older raysae): hashes were not recorded, so their bytes were checked "
            "against page checksums only",
            file=out,
        )
    summary = f"{uri}: {len(parts)} parts, {manifest.n_tokens:,} rows"
    if bad:
        print(f"{summary}: {bad} bad; re-harvest the dataset", file=out)
    else:
        print(f"{summary}: all good", file=out)
    return bad
