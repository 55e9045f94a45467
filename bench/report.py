"""What `raysae eval --report` costs: wall time and peak memory at the quickstart size and at
n_latents = 131072, synthetic weights and activations.

    PYTHONPATH=. python bench/report.py                     # both sizes
    PYTHONPATH=. python bench/report.py --sizes 2048        # one

Each size runs in a fresh process (its peak resident memory, ru_maxrss, is its own): a dataset
of d_in = 576 float16 activations like the quickstart's (4 parts of 4096 rows: 1 to fit the
baselines on, the last 3 held out and scored: 12,288 rows, the quickstart's held-out size), a
TopK SAE (k = 32) with random unit decoder rows, then the whole `raysae eval --report DIR`
(baselines, geometry, the scoring pass with the latent browser's tables, the shards, the page);
`--scoring local,ray` runs the pass in the process and on Ray Data (2 actors) side by side.
Synthetic data have no text, so contexts are row numbers and there is no logit lens; on a
harvested dataset add the corpus's re-tokenisation and one unembedding product per published
latent. The phases come from the command's own progress lines.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(n_latents: int, root: str, scoring: str) -> None:
    import torch

    from raysae import data
    from raysae.checkpoint import save_sae
    from raysae.config import SAEConfig
    from raysae.evaluate import eval_command
    from raysae.saes import build_sae
    from raysae.scoring import RayPass

    torch.manual_seed(0)
    acts = torch.randn(4 * 4096, 576, dtype=torch.float16)
    data.write_dataset(f"{root}/acts", acts, dtype="float16", rows_per_part=4096)
    save_sae(build_sae(SAEConfig(d_in=576, n_latents=n_latents, k=32)), f"{root}/sae")
    t0 = time.perf_counter()
    eval_command(
        f"{root}/sae",
        f"{root}/acts",
        eval_parts=3,
        kmeans_ks=[256],
        report_dir=f"{root}/report",
        scoring=scoring,
        ray_pass=RayPass(actors=2, cpus_per_actor=1.0),
        log=lambda line: print(line) if line.startswith("wrote") else None,
    )
    print(f"eval --report: {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,131072", help="n_latents, comma-separated")
    parser.add_argument(
        "--scoring",
        default="local",
        help="comma-separated: local (one process) and/or ray (2 Ray Data actors of 1 CPU on a "
        "local Ray; their memory is not in the peak RSS, which is the driver's)",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.root, args.scoring)
        return
    print(f"load: {os.getloadavg()[0]:.1f} (1-min), torch threads: default", flush=True)
    runs = [(n, w) for n in map(int, args.sizes.split(",")) for w in args.scoring.split(",")]
    for n, where in runs:
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(n), "--root", root, "--scoring", where],
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB
            if done.returncode:
                sys.exit(done.stderr[-3000:])
            size = sum(
                os.path.getsize(os.path.join(d, f))
                for d, _, files in os.walk(f"{root}/report")
                for f in files
            )
            lines = [ln for ln in (done.stdout + done.stderr).splitlines() if "scoring" in ln]
            print(
                f"n_latents={n:>6} scoring {where}: process {wall:6.1f} s, peak RSS {peak:5.2f} GiB (max over "
                f"the runs so far), report {size / 2**20:.1f} MiB; "
                + done.stdout.strip().replace("\n", "; ")
                + (f"; last progress: {lines[-1]}" if lines else ""),
                flush=True,
            )
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
