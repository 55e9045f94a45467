"""Sweep cost: 8 SAE configs on one dataset vs 1 config, without and with packing.

    python bench/sweep.py [--tokens 65536] [--repeats 1]

Writes a toy dataset (d_in 64) once, then times `run_sweep` end to end (Tune + Train start-up,
training, held-out evaluation, results) for: one config; 8 configs as 8 trials (2 at a time);
8 configs packed 4 to a trial (2 trials); 8 configs packed into one trial. Prints wall times and
ratios to the one-config sweep (target: 8 configs ≤ 2.5× one config). Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def spec(root: Path, name: str, points: int, pack: int, tokens: int) -> dict:
    ks = [4, 8, 16, 32][: max(1, points // 2)] if points > 1 else [8]
    architectures = {"topk": {"sae.k": ks}}
    if points > 1:
        architectures["batchtopk"] = {"sae.k": ks}
    return {
        "name": name,
        "output": str(root / "sweeps"),
        "base": {
            "sae": {"d_in": 64, "n_latents": 1024, "k": 8},
            "train": {
                "total_tokens": tokens,
                "batch_size": 1024,
                "lr": 2e-3,
                "log_every_tokens": tokens // 2,
                "init_tokens": 4096,
            },
            "data": {"uri": str(root / "acts"), "eval_parts": 1, "read_cpus": 0.25},
            "scaling": {
                "num_workers": 1,
                "cpus_per_worker": 0.4,
                "checkpoint_every_tokens": tokens,
            },
        },
        "architectures": architectures,
        "pack": pack,
        "max_concurrent_trials": 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=65_536, help="training tokens per SAE")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case (median)")
    args = parser.parse_args()

    import ray

    from raysae.config import ToyDataConfig
    from raysae.settings import from_dict
    from raysae.sweep import run_sweep
    from raysae.sweep_spec import SweepSpec
    from raysae.synthetic import write_toy_dataset

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        parts = args.tokens // 16_384 + 2
        write_toy_dataset(
            str(root / "acts"),
            ToyDataConfig(n_features=512, active_per_token=5),
            64,
            parts * 16_384,
            16_384,
        )
        cases = [
            ("1 config", 1, 1),
            ("8 configs, 8 trials", 8, 1),
            ("8 configs, pack 4 (2 trials)", 8, 4),
            ("8 configs, pack 8 (1 trial)", 8, 8),
        ]
        times = {}
        for label, points, pack in cases:
            runs = []
            for r in range(args.repeats):
                name = f"{points}-{pack}-{r}"
                t0 = time.perf_counter()
                table = run_sweep(
                    from_dict(SweepSpec, spec(root, name, points, pack, args.tokens)),
                    log=lambda s: None,
                )
                runs.append(time.perf_counter() - t0)
                assert len(table) == points and (table["status"] == "finished").all()
            times[label] = statistics.median(runs)
    base = times["1 config"]
    print(f"\n{'case':32} {'wall s':>8} {'× 1 config':>11}")
    for label, t in times.items():
        print(f"{label:32} {t:8.1f} {t / base:11.2f}")


if __name__ == "__main__":
    main()
