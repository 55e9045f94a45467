"""The TopK training step, and the loop's per-batch work, in bfloat16 autocast on a GPU:
milliseconds, TFLOP/s, % of the device's bfloat16 peak and peak memory, after a bf16-vs-fp32
check at a small size. One command for a GPU machine:

    PYTHONPATH=. python bench/gpu.py                        # d=4096 n=131072 k=64 B=4096, cuda
    PYTHONPATH=. python bench/gpu.py --device cpu --small   # the same path at a toy size

What runs (`train.autocast: bfloat16`, raysae.step.autocast): the encoder GEMM and AuxK's in
bfloat16, parameters, gradients, Adam and the losses in float32 (raysae.step.train_step);
`loop` is the loop's real per-batch work (raysae.step.check_batch then raysae.loop._step_members
on a one-member pack: the step plus ReconstructionStats and SparsityStats). `gemm` is the
encoder's forward GEMM alone under the same autocast, the yardstick.

FLOPs counted per step ("useful" work, what a dense-free TopK step must do): the encoder forward
GEMM 2·B·n·d, plus 2·B·k·d each for the sparse decode, the decoder's weight gradient, the
encoder's input gradient and the encoder's weight gradient (8·B·k·d). AuxK is off (dead_tokens
beyond the run, as in bench/step.py); with dead latents it adds a dense (B, n) GEMM pair.

The check (before timing; the run stops if it fails): from one initial SAE and the same
batches (sparse combinations of random unit features, so there is something to learn), train
`--check-steps` steps in float32 and in bfloat16 autocast; the reconstruction loss after the
first step and after the last must agree to CHECK_TOLERANCE (relative).

Peak memory: torch.cuda.max_memory_allocated over one step (CUDA), or the process's peak RSS
(CPU, ru_maxrss: includes the interpreter and torch). Expected, for comparison: parameters,
their gradients and Adam's two moments, 4 × 4 bytes × (2·n·d + n + d), plus the (B, n)
pre-activations in bfloat16 (and their top-k).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from raysae.config import SAEConfig, TrainConfig
from raysae.loop import Member, World, _step_members
from raysae.saes import build_sae
from raysae.step import TrainState, autocast, check_batch, make_optimizer, train_step

BIG = 2**62
CHECK_TOLERANCE = 0.05
"""Largest relative difference of the bf16 run's reconstruction loss from the fp32 run's."""
FULL = (4096, 131072, 64, 4096)
SMALL = (64, 1024, 8, 256)
CHECK_FULL = (512, 8192, 32, 1024)
CHECK_SMALL = (32, 256, 8, 64)
PEAK_BF16_TFLOPS = {  # dense bfloat16 tensor-core peak (no sparsity), from the vendors' sheets
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    if device.type != "cuda":
        return None, "no bf16 peak known for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, name
    return None, f"{name}: peak unknown (pass --peak-tflops)"


def batches_with_features(
    d: int, n_batches: int, b: int, device: torch.device, seed: int
) -> torch.Tensor:
    """(n_batches, b, d) float32: each row a sparse non-negative mix of 4·d unit features."""
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(4 * d, d, generator=g), dim=-1)
    active = torch.rand(n_batches, b, 4 * d, generator=g) < 8 / (4 * d)
    codes = torch.rand(n_batches, b, 4 * d, generator=g) * active
    return (codes @ features).to(device)


def train_config(b: int, mode: str, lr: float | None = None) -> TrainConfig:
    return TrainConfig(
        total_tokens=BIG,
        batch_size=b,
        decay_fraction=0.0,
        dead_tokens=BIG,
        autocast=mode,
        lr=lr,
    )


def check(size: tuple[int, int, int, int], steps: int, device: torch.device) -> None:
    """bf16 autocast against fp32 from the same initial SAE on the same batches."""
    d, n, k, b = size
    batches = batches_with_features(d, steps, b, device, seed=1)
    torch.manual_seed(0)
    init = build_sae(SAEConfig(d_in=d, n_latents=n, k=k))
    init.init_from_sample_(batches.reshape(-1, d)[: 8 * b].cpu())
    losses = {}
    for mode in ("off", "bfloat16"):
        model = build_sae(init.cfg)
        model.load_state_dict(init.state_dict())
        model.to(device)
        train = train_config(b, mode, lr=1e-3)
        opt, state = make_optimizer(model, train), TrainState.fresh(n)
        losses[mode] = [
            float(train_step(model, opt, x, state, train).losses["reconstruction"].detach())
            for x in batches
        ]
    first = abs(losses["bfloat16"][0] - losses["off"][0]) / losses["off"][0]
    last = abs(losses["bfloat16"][-1] - losses["off"][-1]) / losses["off"][-1]
    print(
        f"check d={d} n={n} k={k} B={b}, {steps} steps: reconstruction loss fp32 "
        f"{losses['off'][0]:.4g} -> {losses['off'][-1]:.4g}, bf16 {losses['bfloat16'][0]:.4g} -> "
        f"{losses['bfloat16'][-1]:.4g}; relative difference first {first:.2e}, last {last:.2e}"
    )
    if not (first <= CHECK_TOLERANCE and last <= CHECK_TOLERANCE):
        raise SystemExit(
            f"bf16 vs fp32 check failed: relative loss difference {max(first, last):.2e} > "
            f"{CHECK_TOLERANCE}"
        )
    print("bf16 vs fp32 check passed")


def peak_memory(device: torch.device) -> float:
    """GiB: the CUDA allocator's peak since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run(size: tuple[int, int, int, int], steps: int, device: torch.device, peak) -> None:
    d, n, k, b = size
    torch.manual_seed(0)
    model = build_sae(SAEConfig(d_in=d, n_latents=n, k=k, b_dec_init="zeros")).to(device)
    train = train_config(b, "bfloat16")
    member = Member.of(model, train, torch.zeros(d, device=device))
    world = World(device=device)
    batch = batches_with_features(d, 1, b, torch.device("cpu"), seed=2)[0].to(device)
    with torch.no_grad():
        model.init_from_sample_(batch.cpu())
        model.to(device)

    def gemm():
        with torch.no_grad(), autocast(train, device, model):
            F.linear(batch - model.b_dec, model.W_enc, model.b_enc)

    def step():
        train_step(member.model, member.optimizer, batch, member.state, member.train)

    def loop():
        check_batch(batch, d, "bench")
        _step_members([member], batch, b, world)

    cases = {"gemm": gemm, "step": step, "loop": loop}
    for f in cases.values():  # warm-up (allocator, kernels' autotuning)
        f()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = {c: [] for c in cases}
    for r in range(steps):
        for c in list(cases)[r % 3 :] + list(cases)[: r % 3]:
            sync(device)
            t0 = time.perf_counter()
            cases[c]()
            sync(device)
            times[c].append(time.perf_counter() - t0)
    mem = peak_memory(device)
    gemm_flop = 2 * b * n * d
    step_flop = gemm_flop + 8 * b * k * d
    peak_value, peak_source = peak
    state_gib = 4 * 4 * (2 * n * d + n + d) / 2**30
    pre_gib = 2 * b * n / 2**30
    print(f"\nd_in={d} n_latents={n} k={k} batch={b} on {device}, bf16 autocast, {steps} rounds")
    print(f"peak: {peak_value} TFLOP/s bf16 ({peak_source})\n")
    print("| case | median ms | min ms | TFLOP/s | % of bf16 peak | × gemm |")
    print("|---|---:|---:|---:|---:|---:|")
    gemm_ms = statistics.median(times["gemm"]) * 1e3
    for c, flop in (("gemm", gemm_flop), ("step", step_flop), ("loop", step_flop)):
        ms = statistics.median(times[c]) * 1e3
        tflops = flop / (ms / 1e3) / 1e12
        pct = f"{100 * tflops / peak_value:.1f} %" if peak_value else "—"
        print(
            f"| {c} | {ms:,.2f} | {min(times[c]) * 1e3:,.2f} | {tflops:,.2f} | {pct} "
            f"| {ms / gemm_ms:.2f}× |"
        )
    what = "CUDA allocator peak" if device.type == "cuda" else "process peak RSS"
    print(
        f"\nmemory: {what} {mem:.2f} GiB; expected parameters + gradients + Adam "
        f"{state_gib:.2f} GiB, (B, n) bf16 pre-activations {pre_gib:.2f} GiB"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--small", action="store_true", help=f"d,n,k,B = {SMALL}, not {FULL}")
    parser.add_argument("--size", help="d,n,k,B to time instead (e.g. 2304,131072,64,4096)")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--check-steps", type=int, default=20, help="steps of the bf16 check")
    parser.add_argument("--check-only", action="store_true", help="the check, no timing")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "bench/gpu.py: no CUDA device here; run it on a GPU machine, or pass "
            "--device cpu --small to run the same path on this CPU at a toy size"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.split(",")) if args.size else None
    size = size or (SMALL if args.small else FULL)
    print(f"torch {torch.__version__}; load average {os.getloadavg()}", flush=True)
    check(CHECK_SMALL if args.small else CHECK_FULL, args.check_steps, device)
    if args.check_only:
        return
    run(size, args.steps, device, peak_tflops(device, args.peak_tflops))
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
