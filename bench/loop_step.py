"""What the training loop spends per batch beyond the bare step, for one TopK SAE, in raysae
checkouts side by side.

    python bench/loop_step.py [--tree PATH ...] [--sizes d,n,k,B ...] [--rounds 10]

Cases, timed per call (ms):
- gemm: the encoder's forward GEMM alone, F.linear(batch, W_enc, b_enc): the yardstick every
  other case is printed as a multiple of;
- step: `raysae.step.train_step` on the batch (the bare step);
- loop: what the loop does per batch, `raysae.step.check_batch` then the real
  `raysae.loop._step_members` on a one-member pack (step, ReconstructionStats.update,
  SparsityStats.update);
- recon, sparsity: those two metric updates alone, on one training forward's output.

Each `--tree` (default: this checkout; an older one from `git archive <commit> | tar -x -C DIR`)
runs in its own worker process that imports raysae from that folder (PYTHONPATH) and builds the
same SAE (seed 0) and batch; the parent asks the workers for one case at a time, rotating
trees and cases each round, so slow spells of the shared machine hit every case alike. The
table gives medians, the ratios loop/step (of the medians, and the median of the per-round
ratios, the steadier one on a noisy machine) and x/gemm; the load average is printed before
and after. AuxK is off (no latent goes dead within the run), as in bench/step.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BIG = 2**62
CASES = ("gemm", "step", "loop", "recon", "sparsity")


# -- worker: runs inside one tree ----------------------------------------------------------------


def worker(size: str, threads: int) -> None:
    import torch
    import torch.nn.functional as F

    from raysae.config import SAEConfig, TrainConfig
    from raysae.loop import Member, World, _step_members
    from raysae.metrics import latent_norms
    from raysae.saes import build_sae
    from raysae.step import check_batch, train_step

    torch.set_num_threads(threads)
    d, n, k, b = (int(v) for v in size.split(","))
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_in=d, n_latents=n, k=k, architecture="topk", normalize_inputs=False, b_dec_init="zeros"
    )
    model = build_sae(cfg)
    train = TrainConfig(
        total_tokens=BIG, batch_size=b, decay_fraction=0.0, warmup_tokens=0, dead_tokens=BIG
    )
    member = Member.of(model, train, torch.zeros(d))
    batch = torch.randn(b, d, generator=torch.Generator().manual_seed(1))
    world = World()
    out = model(batch)  # a training forward's output, for the metric updates alone
    codes = getattr(out, "codes", None)
    codes = out.latents if codes is None else codes  # trees before SparseLatents

    def gemm():
        with torch.no_grad():
            F.linear(batch, model.W_enc, model.b_enc)

    def step():
        train_step(member.model, member.optimizer, batch, member.state, member.train)

    def loop():
        check_batch(batch, d, "bench")
        _step_members([member], batch, b, world)

    def recon():
        member.recon.update(batch, out.x_hat)

    def sparsity():
        member.sparsity.update(codes, latent_norms=latent_norms(model))

    cases = {"gemm": gemm, "step": step, "loop": loop, "recon": recon, "sparsity": sparsity}
    for f in cases.values():  # warm-up
        f()
    print("ready", flush=True)
    for line in sys.stdin:
        f = cases[line.strip()]
        t0 = time.perf_counter()
        f()
        print(json.dumps((time.perf_counter() - t0) * 1e3), flush=True)


# -- parent --------------------------------------------------------------------------------------


def start(tree: str, size: str, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": tree}
    p = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", size, "--threads", str(threads)],
        env=env,
        cwd=tree,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if p.stdout.readline().strip() != "ready":
        raise SystemExit(f"worker for {tree} did not start")
    return p


def ask(p: subprocess.Popen, case: str) -> float:
    p.stdin.write(case + "\n")
    p.stdin.flush()
    return json.loads(p.stdout.readline())


def run_size(size: str, trees: list[str], rounds: int, threads: int) -> None:
    workers = {t: start(t, size, threads) for t in trees}
    times = {(t, c): [] for t in trees for c in CASES}
    try:
        for r in range(rounds):
            order = [(t, c) for c in CASES for t in trees]
            shift = r % len(order)
            for t, c in order[shift:] + order[:shift]:
                times[t, c].append(ask(workers[t], c))
    finally:
        for p in workers.values():
            p.stdin.close()
            p.wait()
    d, n, k, b = size.split(",")
    print(f"\nd_in={d} n_latents={n} k={k} batch={b}, {rounds} rounds (median ms)\n")
    print(
        "| tree | gemm | step | loop | recon | sparsity | loop/step | (per round) "
        "| step/gemm | loop/gemm |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in trees:
        m = {c: statistics.median(times[t, c]) for c in CASES}
        cells = " | ".join(f"{m[c]:,.1f}" for c in CASES)
        per_round = statistics.median(a / b for a, b in zip(times[t, "loop"], times[t, "step"]))
        ratios = f"{m['loop'] / m['step']:.2f}× | {per_round:.2f}× | "
        ratios += f"{m['step'] / m['gemm']:.1f}× | "
        ratios += f"{m['loop'] / m['gemm']:.1f}×"
        print(f"| {t} | {cells} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", help="a raysae checkout (repeatable)")
    parser.add_argument("--sizes", nargs="+", default=["576,4608,32,4096"], help="d,n,k,B")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.threads)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [os.path.abspath(t) for t in args.tree or [here]]
    print(f"load average before: {os.getloadavg()}")
    t0 = time.perf_counter()
    for size in args.sizes:
        run_size(size, trees, args.rounds, args.threads)
    print(f"\nload average after: {os.getloadavg()}; {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
