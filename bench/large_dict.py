"""A cluster-size dictionary on CPU: one TopK training step and one held-out evaluation at
n_latents=131072, d_in=2304 (sweeps/cluster-gemma2-2b.yaml's largest), small batch, with the
process's peak memory in each phase set against what it must hold.

    PYTHONPATH=. python bench/large_dict.py                  # n=131072 d=2304 k=64 B=256
    PYTHONPATH=. python bench/large_dict.py --size 256,4096,16,64    # a toy run of the same

Phases, each timed, with the peak resident memory over the phase (Linux: VmHWM, reset before
the phase by writing 5 to /proc/self/clear_refs; glibc's free memory handed back with
malloc_trim first, so a phase's peak is its own) and the resident memory after it:
- build: `build_sae` (W_enc, W_dec, b_enc, b_dec, fp32) and `init_from_sample_` on one batch;
- step 1: `train_step` (the first one also creates Adam's two moments);
- step 2: the steady state: parameters, gradients and Adam already exist;
- loop: the loop's per-batch work once (`check_batch`, then `raysae.loop._step_members` on a
  one-member pack: the step, ReconstructionStats, SparsityStats with `latent_norms`);
- evaluate: `raysae.evaluate.evaluate` on --eval-tokens held-out rows in batches of B;
- geometry (only with --geometry): `raysae.geometry.max_cosine_to_others` over the decoder rows,
  the blocked (n, n) Gram: n²·d = 4·10¹³ multiply-adds at n=131072, about 15 min on 2 cores.

Expected sizes (printed): P = 4 bytes × (2·n·d + n + d) for the parameters; the gradients
another P and Adam's moments 2P once training; (B, n) fp32 pre-activations per forward.
Activations are standard normal (the memory and the arithmetic do not depend on the values).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time

import torch

GIB = 2**30


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}: this bench needs Linux")


def reset_peak() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def phase(name: str, fn, rows: list) -> object:
    reset_peak()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    rows.append((name, seconds, status_kib("VmHWM") / 2**20, status_kib("VmRSS") / 2**20))
    print(f"  {name}: {seconds:.2f} s, peak {rows[-1][2]:.2f} GiB", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2304,131072,64,256", help="d,n,k,B")
    parser.add_argument("--eval-tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--geometry", action="store_true", help="also the decoder geometry")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from raysae.config import SAEConfig, TrainConfig
    from raysae.evaluate import evaluate
    from raysae.geometry import max_cosine_to_others
    from raysae.loop import Member, World, _step_members
    from raysae.saes import build_sae
    from raysae.step import check_batch, train_step

    d, n, k, b = (int(v) for v in args.size.split(","))
    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}", flush=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, d, generator=g) for _ in range(2)]
    held = [torch.randn(b, d, generator=g) for _ in range(-(-args.eval_tokens // b))]
    cfg = SAEConfig(d_in=d, n_latents=n, k=k, b_dec_init="mean")
    train = TrainConfig(total_tokens=10**9, batch_size=b)
    rows: list = []
    base = status_kib("VmRSS") / 2**20

    def build():
        torch.manual_seed(0)
        model = build_sae(cfg)
        model.init_from_sample_(batches[0])
        return model

    model = phase("build", build, rows)
    member = Member.of(model, train, torch.zeros(d))
    for i, x in enumerate(batches):
        step = lambda x=x: train_step(model, member.optimizer, x, member.state, train)  # noqa: E731
        phase(f"step {i + 1}", step, rows)

    def loop():
        check_batch(batches[0], d, "bench")
        _step_members([member], batches[0], b, World())

    phase("loop", loop, rows)
    metrics = phase("evaluate", lambda: evaluate(model, iter(held), args.eval_tokens), rows)
    if args.geometry:
        phase("geometry", lambda: max_cosine_to_others(model.W_dec), rows)

    p = 4 * (2 * n * d + n + d) / GIB
    pre = 4 * b * n / GIB
    print(f"\nd_in={d} n_latents={n} k={k} batch={b}; {args.threads} threads")
    print(f"resident before building (interpreter, torch, batches): {base:.2f} GiB")
    print(f"P (parameters) = {p:.2f} GiB; + gradients + Adam = 4P = {4 * p:.2f} GiB")
    print(f"(B, n) fp32 pre-activations = {pre:.3f} GiB\n")
    print("| phase | s | peak RSS GiB | RSS after GiB | peak − before-building GiB |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds, peak, after in rows:
        print(f"| {name} | {seconds:.2f} | {peak:.2f} | {after:.2f} | {peak - base:.2f} |")
    print(f"\nheld-out evaluation: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
