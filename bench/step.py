"""Time one TopK SAE training step: raysae against SAELens, EleutherAI sparsify and plain torch.

Every implementation gets the same sizes (d_in, n_latents, k, batch), fp32 on CPU, Adam with the
same lr and betas, and the same initial W_enc, b_enc, W_dec, b_dec (copied into each peer's
layout). AuxK is off everywhere (no latent is ever dead within the run). Before timing, one step
from the shared initial weights is checked: reconstruction loss, x̂, the gradient handed to Adam
and the parameters after the update must agree with raysae's (where the peer's rule is the same;
tolerances below); a disagreement stops the benchmark. Timing interleaves the implementations
round-robin (the machine is shared and noisy) and reports per-step medians.

    PYTHONPATH=. python bench/step.py                       # raysae + plain torch in any venv
    PYTHONPATH=. /work/bench-venv/bin/python bench/step.py  # + the peers (see BENCHMARKS.md)

Peers are optional and never project dependencies; install them in a separate venv:
    pip install eai-sparsify==1.3.3 sae-lens==6.54.12

What each step does, per implementation (each as its own trainer does it):
- raysae: `raysae.step.train_step` — sparse top-k decode (embedding_bag) and sparse encoder
  backward; removes the decoder-parallel gradient, clips the grad norm, Adam, renormalises W_dec.
- raysae loop: what `raysae train` runs per batch — `check_batch`, then the loop's
  `_step_members` on a one-member pack: the same `train_step`, then the `ReconstructionStats`
  and `SparsityStats` updates (from the TopK family's sparse latents). The peers' rows include
  their own per-batch bookkeeping (sparsify's fired flags and tokens-since-fired, SAELens's
  trainer step with its firing counters), so "raysae loop" is the row to set beside them.
- encoder GEMM (timed, not trained): the encoder's forward product x W_encᵀ + b_enc alone, the
  floor any step pays; the script prints raysae's step and loop as multiples of it.
- plain torch: the obvious dense version written here — ReLU, topk, scatter into dense latents,
  dense decoder matmul, autograd; same constraint handling and clipping as raysae.
- sparsify: its `SparseCoder` forward (fused top-k encoder with index_add backward, embedding_bag
  decode) and the steps of `sparsify.Trainer.fit` with loss_fn=fvu and Adam: renormalise W_dec,
  FVU loss, remove the parallel gradient, Adam. No grad clipping (sparsify has none), no lr
  warm-up scheduler (constant lr so the first step is comparable).
- SAELens: `SAETrainer.step` on a `TopKTrainingSAE` with dense latents and a dense decoder. It
  always clips the grad norm at 1.0, keeps W_dec unnormalised and instead divides by its row
  norms (`rescale_acts_by_decoder_norm`, its default), and removes no parallel gradient.
- SAELens sparse: the same with `use_sparse_activations=True` (COO latents, torch.sparse.mm
  decode), which its docs recommend for fp32 without autocast. Its backward fails on CPU with
  the default `rescale_acts_by_decoder_norm=True`, so this row turns that off: W_dec then has
  no norm constraint at all (no effect on one step from unit-norm rows, or on cost).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BIG = 2**62  # "never": token budgets and dead-latent windows that the benchmark cannot reach


@dataclass(frozen=True)
class Size:
    """One benchmark configuration."""

    d_in: int
    n_latents: int
    k: int
    batch: int

    def __str__(self) -> str:
        return f"d_in={self.d_in} n_latents={self.n_latents} k={self.k} batch={self.batch}"

    @property
    def lr(self) -> float:
        """2e-4 / sqrt(n_latents / 2^14): sparsify's default (raysae's is twice it), given to all."""
        return 2e-4 / math.sqrt(self.n_latents / 2**14)


@dataclass(frozen=True)
class Init:
    """Shared initial parameters, in raysae's layout: W_enc, W_dec (n, d); b_enc (n,); b_dec (d,)."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor


@dataclass
class Stepper:
    """One implementation, built and ready to train."""

    step: Callable[[Tensor], tuple[Tensor, Tensor]]
    """batch (B, d) → (mean_b ‖x − x̂‖², x̂ (B, d)) from this step's forward pass."""
    parameters: dict[str, nn.Parameter]
    """Its parameters by raysae's names (W_enc, b_enc, W_dec, b_dec), in its own layout."""
    optimizer: torch.optim.Optimizer
    """Its Adam; after one step, state["exp_avg"] = (1 − β1) × the gradient it was given."""
    transposed: tuple[str, ...] = ()
    """Parameters stored as the transpose of raysae's layout."""
    compare: tuple[str, ...] = ("W_enc", "b_enc", "W_dec", "b_dec")
    """Parameters whose gradient and update rule are raysae's, so they must agree after a step."""
    sync: Callable[[], None] = lambda: None
    """Bring the parameters to the state raysae leaves them in at the end of a step."""


# -- implementations ------------------------------------------------------------------------


def build_raysae(size: Size, init: Init, grad_clip: float, loop: bool = False) -> Stepper:
    """raysae's `train_step`; with `loop`, what `raysae train`'s loop does per batch instead:
    `check_batch`, then `raysae.loop._step_members` (the step, ReconstructionStats and
    SparsityStats updates) on a one-member pack."""
    from raysae.config import SAEConfig, TrainConfig
    from raysae.loop import Member, World, _step_members
    from raysae.saes import build_sae
    from raysae.step import TrainState, check_batch, make_optimizer, train_step

    sae_cfg = SAEConfig(
        d_in=size.d_in,
        n_latents=size.n_latents,
        architecture="topk",
        k=size.k,
        normalize_inputs=False,
        b_dec_init="zeros",
    )
    train_cfg = TrainConfig(
        total_tokens=BIG,
        batch_size=size.batch,
        lr=size.lr,
        decay_fraction=0.0,
        grad_clip=grad_clip,
        dead_tokens=BIG,
    )
    sae = build_sae(sae_cfg)
    with torch.no_grad():
        for name, value in vars(init).items():
            getattr(sae, name).copy_(value)
    parameters = {name: getattr(sae, name) for name in vars(init)}
    if loop:
        member, world = Member.of(sae, train_cfg, torch.zeros(size.d_in)), World()

        def loop_step(x: Tensor) -> tuple[Tensor, Tensor]:
            check_batch(x, size.d_in, "bench")
            (out,) = _step_members([member], x, x.shape[0], world)
            return out.losses["reconstruction"], out.x_hat

        return Stepper(loop_step, parameters, member.optimizer)
    optimizer = make_optimizer(sae, train_cfg)
    state = TrainState.fresh(size.n_latents)

    def step(x: Tensor) -> tuple[Tensor, Tensor]:
        out = train_step(sae, optimizer, x, state, train_cfg)
        return out.losses["reconstruction"], out.x_hat

    return Stepper(step, parameters, optimizer)


def encoder_gemm(size: Size, init: Init) -> Stepper:
    """Not a trainer: the encoder's forward GEMM alone (x W_encᵀ + b_enc, into one reused
    output buffer, so no page faults of a fresh (B, n) result either), the floor of a step."""
    W, b = init.W_enc.clone(), init.b_enc.clone()
    out = torch.empty(size.batch, size.n_latents)

    def step(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return torch.addmm(b, x, W.t(), out=out), x

    return Stepper(step, {}, None)


class PlainTopKSAE(nn.Module):
    """The obvious TopK SAE: dense latents, dense decoder matmul, autograd for everything.

    f = scatter(topk_k(ReLU(W_enc (x − b_dec) + b_enc)));  x̂ = f W_dec + b_dec
    """

    def __init__(self, init: Init, k: int):
        super().__init__()
        self.k = k
        for name, value in vars(init).items():
            setattr(self, name, nn.Parameter(value.clone()))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, d) → (x̂ (B, d), latents (B, n))."""
        pre = F.relu(F.linear(x - self.b_dec, self.W_enc, self.b_enc))
        values, indices = pre.topk(self.k, dim=-1, sorted=False)
        latents = torch.zeros_like(pre).scatter(-1, indices, values)
        return latents @ self.W_dec + self.b_dec, latents


def build_plain(size: Size, init: Init, grad_clip: float) -> Stepper:
    sae = PlainTopKSAE(init, size.k)
    optimizer = torch.optim.Adam(sae.parameters(), lr=size.lr, betas=(0.9, 0.999))
    tokens_since_fired = torch.zeros(size.n_latents, dtype=torch.long)

    def step(x: Tensor) -> tuple[Tensor, Tensor]:
        nonlocal tokens_since_fired
        x_hat, latents = sae(x)
        loss = (x_hat - x).pow(2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():  # keep W_dec rows on the unit sphere
            W, g = sae.W_dec, sae.W_dec.grad
            g -= (g * W).sum(-1, keepdim=True) * W
        if grad_clip:
            nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
        optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
            fired = (latents > 0).any(0)
            tokens_since_fired = torch.where(fired, 0, tokens_since_fired + x.shape[0])
        return loss, x_hat

    return Stepper(step, {name: getattr(sae, name) for name in vars(init)}, optimizer)


def build_sparsify(size: Size, init: Init, grad_clip: float) -> Stepper:
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(size.d_in, SparseCoderConfig(num_latents=size.n_latents, k=size.k))
    with torch.no_grad():  # encoder is an nn.Linear: weight (n, d), like raysae's W_enc
        sae.encoder.weight.copy_(init.W_enc)
        sae.encoder.bias.copy_(init.b_enc)
        sae.W_dec.copy_(init.W_dec)
        sae.b_dec.copy_(init.b_dec)
    optimizer = torch.optim.Adam(sae.parameters(), lr=size.lr, betas=(0.9, 0.999))
    tokens_since_fired = torch.zeros(size.n_latents, dtype=torch.long)
    did_fire = torch.zeros(size.n_latents, dtype=torch.bool)

    def step(x: Tensor) -> tuple[Tensor, Tensor]:
        # The order of sparsify.Trainer.fit (loss_fn="fvu", one micro-batch, no AuxK).
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            tokens_since_fired.add_(x.shape[0])
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        # FVU = Σ‖e‖² / Σ‖x − mean‖²; raysae's loss is mean_b ‖e‖², so rescale to compare.
        return out.fvu.detach() * total_variance / x.shape[0], out.sae_out

    parameters = {
        "W_enc": sae.encoder.weight,
        "b_enc": sae.encoder.bias,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    # sparsify renormalises W_dec at the start of the next step rather than the end of this one.
    return Stepper(step, parameters, optimizer, sync=sae.set_decoder_norm_to_unit_norm)


def build_saelens(size: Size, init: Init, grad_clip: float, sparse: bool = False) -> Stepper:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = TopKTrainingSAEConfig(
        d_in=size.d_in,
        d_sae=size.n_latents,
        k=size.k,
        dtype="float32",
        device="cpu",
        decoder_init_norm=None,
        use_sparse_activations=sparse,
        # With its default (True) the sparse path fails in backward on CPU
        # ("aten::view ... SparseCPU", sae-lens 6.54.12, torch 2.13).
        rescale_acts_by_decoder_norm=not sparse,
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():  # SAELens stores W_enc as (d, n)
        sae.W_enc.copy_(init.W_enc.T)
        sae.b_enc.copy_(init.b_enc)
        sae.W_dec.copy_(init.W_dec)
        sae.b_dec.copy_(init.b_dec)
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=BIG,
            train_batch_size_samples=size.batch,
            lr=size.lr,
            lr_end=size.lr,
            adam_beta1=0.9,
            adam_beta2=0.999,
            device="cpu",
            dead_feature_window=BIG,
            feature_sampling_window=BIG,
        ),
        sae=sae,
        data_provider=iter(()),
    )

    def step(x: Tensor) -> tuple[Tensor, Tensor]:
        out = trainer.step(x)
        return out.losses["mse_loss"], out.sae_out

    # W_dec is not compared: SAELens neither projects its gradient nor renormalises it.
    return Stepper(
        step,
        {name: getattr(sae, name) for name in vars(init)},
        trainer.optimizer,
        transposed=("W_enc",),
        compare=("W_enc", "b_enc", "b_dec"),
    )


@dataclass(frozen=True)
class Impl:
    name: str
    build: Callable[[Size, Init, float], Stepper]
    package: str | None
    """Distribution that must be importable (None: always available here)."""
    module: str


IMPLS = [
    Impl("raysae", build_raysae, None, "raysae"),
    Impl("raysae loop", lambda s, i, c: build_raysae(s, i, c, loop=True), None, "raysae"),
    Impl("plain torch", build_plain, None, "torch"),
    Impl("sparsify", build_sparsify, "eai-sparsify", "sparsify"),
    Impl("SAELens", build_saelens, "sae-lens", "sae_lens"),
    Impl(
        "SAELens sparse",
        lambda s, i, c: build_saelens(s, i, c, sparse=True),
        "sae-lens",
        "sae_lens",
    ),
]
TESTED_VERSIONS = {"eai-sparsify": "1.3.3", "sae-lens": "6.54.12"}


def available(impl: Impl) -> tuple[bool, str]:
    """(importable, version or the reason it is not)."""
    try:
        __import__(impl.module)
    except ImportError as err:
        return False, (
            f"MISSING ({err}); install it in a separate venv: pip install "
            f"{impl.package}=={TESTED_VERSIONS[impl.package]}"
        )
    if impl.package is None:
        return True, torch.__version__ if impl.module == "torch" else "this checkout"
    return True, importlib.metadata.version(impl.package)


# -- data, check, timing --------------------------------------------------------------------

# Agreement required after one step from the same weights on the same batch, fp32.
LOSS_RTOL = 1e-4
"""|loss − loss_raysae| / loss_raysae."""
XHAT_TOL = 1e-4
"""max |x̂ − x̂_raysae| / max |x̂_raysae|."""
GRAD_TOL = 1e-4
"""‖ĝ − ĝ_raysae‖ with ĝ = g / ‖g‖ per parameter, g the gradient given to Adam (after the
parallel-component removal and clipping). Normalising removes the loss scale (sparsify's FVU is
raysae's loss × B / Σ‖x − μ‖²) and the clip factor, which Adam ignores up to its eps."""
UPDATE_RTOL = 1e-2
"""‖p − p_raysae‖ / ‖p_raysae − p_init‖ after the step (same lr, betas, update rule), taken with
Adam's eps = CHECK_ADAM_EPS. Looser than GRAD_TOL: without eps the first Adam update is
lr · sign(g), so an entry whose true gradient is 0 but whose computed one is rounding noise
(~1e-12) moves by ±lr with the noise's sign; a handful of such entries in millions give ~1e-3."""
CHECK_ADAM_EPS = 1e-30
"""Adam's eps for the checked step only (restored before timing). With the default 1e-8 the
first update g / (|g| + eps) depends on the scale of g where |g| is small, and sparsify's
gradients are B / Σ‖x − μ‖² times raysae's (its loss is an FVU): its first update then differs
from raysae's by ~3 % at d_in=768 — a difference of objective scaling, not of cost."""


def make_batches(size: Size, count: int, seed: int = 0) -> list[Tensor]:
    """Anisotropic activations with a nonzero mean: (mean + z · spectrum) rotated, z ~ N(0, I)."""
    gen = torch.Generator().manual_seed(seed)
    d = size.d_in
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    spectrum = torch.linspace(1.0, 0.05, d) ** 2 * 4.0
    mean = torch.randn(d, generator=gen)
    return [
        ((torch.randn(size.batch, d, generator=gen) * spectrum) @ rotation + mean).contiguous()
        for _ in range(count)
    ]


def make_init(size: Size, batch: Tensor, seed: int = 0) -> Init:
    """raysae's initialisation (W_enc = W_dec, unit rows; b_enc = 0), b_dec = the batch mean."""
    from raysae.config import SAEConfig
    from raysae.saes import build_sae

    torch.manual_seed(seed)
    sae = build_sae(
        SAEConfig(
            d_in=size.d_in,
            n_latents=size.n_latents,
            k=size.k,
            normalize_inputs=False,
            b_dec_init="mean",
        )
    )
    sae.init_from_sample_(batch)
    return Init(
        *(getattr(sae, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    )


def snapshot(stepper: Stepper, of: str) -> dict[str, Tensor]:
    """Parameters (of="param") or Adam's first moments (of="grad") in raysae's layout."""
    stepper.sync()
    out = {}
    for name, p in stepper.parameters.items():
        t = p.detach() if of == "param" else stepper.optimizer.state[p]["exp_avg"]
        out[name] = t.T if name in stepper.transposed else t
    return out


def agreement(stepper: Stepper, result: tuple[Tensor, Tensor], ref: dict, init: Init) -> dict:
    """Disagreements of one implementation's first step with raysae's, by quantity."""
    (loss, x_hat), params, grads = result, snapshot(stepper, "param"), snapshot(stepper, "grad")
    errors = {
        "loss": abs(float(loss.detach()) - ref["loss"]) / ref["loss"],
        "x_hat": float((x_hat.detach() - ref["x_hat"]).abs().max() / ref["x_hat"].abs().max()),
    }
    for p in stepper.compare:
        g, g_ref = grads[p] / grads[p].norm(), ref["grads"][p] / ref["grads"][p].norm()
        errors[f"grad {p}"] = float((g - g_ref).norm())
    for p in stepper.compare:
        moved = (ref["params"][p] - getattr(init, p)).norm()
        errors[f"step {p}"] = float((params[p] - ref["params"][p]).norm() / moved)
    return errors


def check_one_step(steppers: dict[str, Stepper], x: Tensor, init: Init) -> None:
    """Take one step with each implementation; exit non-zero unless all agree with raysae."""
    results = {}
    for name, stepper in steppers.items():
        saved = [group["eps"] for group in stepper.optimizer.param_groups]
        for group in stepper.optimizer.param_groups:
            group["eps"] = CHECK_ADAM_EPS
        results[name] = stepper.step(x)
        for group, eps in zip(stepper.optimizer.param_groups, saved):
            group["eps"] = eps
    loss, x_hat = results["raysae"]
    ref = {
        "loss": float(loss.detach()),
        "x_hat": x_hat.detach(),
        "params": snapshot(steppers["raysae"], "param"),
        "grads": snapshot(steppers["raysae"], "grad"),
    }
    limits = {"loss": LOSS_RTOL, "x_hat": XHAT_TOL, "grad": GRAD_TOL, "step": UPDATE_RTOL}
    failures = []
    for name, stepper in steppers.items():
        if name == "raysae":
            continue
        errors = agreement(stepper, results[name], ref, init)
        bad = [key for key, err in errors.items() if not err <= limits[key.split()[0]]]
        print(
            f"  check {name:<15} "
            + "  ".join(f"{k} {v:.0e}" for k, v in errors.items())
            + ("  FAIL: " + ", ".join(bad) if bad else "  ok")
        )
        failures += [
            f"{name}: {key} differs by {errors[key]:.2e} (limit {limits[key.split()[0]]:.0e})"
            for key in bad
        ]
    print(
        f"  (raysae loss {ref['loss']:.6g}; limits: loss {LOSS_RTOL:.0e} rel, x_hat "
        f"{XHAT_TOL:.0e} of max|x_hat|, grad {GRAD_TOL:.0e} (unit-normalised), step "
        f"{UPDATE_RTOL:.0e} rel with Adam eps {CHECK_ADAM_EPS:.0e})"
    )
    if failures:
        sys.exit(
            "one-step check failed, timings would not compare like with like:\n  "
            + "\n  ".join(failures)
        )


def time_steps(
    steppers: dict[str, Stepper], batches: list[Tensor], rounds: int, steps: int, warmup: int
) -> dict[str, list[list[float]]]:
    """Per-step seconds by round; implementations take turns, the first rotating each round."""
    names = list(steppers)
    counters = dict.fromkeys(names, 0)

    def run(name: str) -> float:
        x = batches[counters[name] % len(batches)]
        counters[name] += 1
        start = time.perf_counter()
        steppers[name].step(x)
        return time.perf_counter() - start

    for _ in range(warmup):
        for name in names:
            run(name)
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append([run(name) for _ in range(steps)])
    return times


# -- report ---------------------------------------------------------------------------------


def print_table(size: Size, times: dict[str, list[list[float]]]) -> dict[str, float]:
    """Per-step median, quartiles and minimum, tokens/s at the median, and raysae's speed-up:
    the ratio of medians, and the median over rounds of the ratio within a round (the steps
    of one round run back to back, so that ratio is less exposed to slow drifts in load)."""
    flat = {name: [t for r in rounds for t in r] for name, rounds in times.items()}
    medians = {name: statistics.median(t) for name, t in flat.items()}
    print(
        "| implementation | ms/step median | p25–p75 | min | tokens/s | raysae speed-up "
        "(ratio of medians) | (median per-round ratio) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, t in flat.items():
        q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0], t[0], t[0]]
        paired = statistics.median(
            statistics.median(mine) / statistics.median(ours)
            for mine, ours in zip(times[name], times["raysae"])
        )
        print(
            f"| {name} | {medians[name] * 1e3:,.0f} | {q[0] * 1e3:,.0f}–{q[2] * 1e3:,.0f} "
            f"| {min(t) * 1e3:,.0f} | {size.batch / medians[name]:,.0f} "
            f"| {medians[name] / medians['raysae']:.2f}× | {paired:.2f}× |"
        )
    return medians


def print_targets(medians: dict[str, float]) -> None:
    """The targets: the step ≥ 2× SAELens and ≥ 1.2× the best of sparsify / plain torch
    (DESIGN.md); the loop's per-batch work ≥ 2.5× SAELens's fastest and ≥ 1.5× sparsify, ≤ 1.10×
    the bare step, and the step ≤ 1.4× its encoder GEMM (issue 13)."""
    for mine, label, names, target in (
        ("raysae", "SAELens (faster row)", ("SAELens", "SAELens sparse"), 2.0),
        ("raysae", "best of sparsify / plain torch", ("sparsify", "plain torch"), 1.2),
        ("raysae loop", "SAELens (faster row)", ("SAELens", "SAELens sparse"), 2.5),
        ("raysae loop", "sparsify", ("sparsify",), 1.5),
    ):
        present = [n for n in names if n in medians]
        if mine not in medians or not present:
            print(f"  target {mine} vs {label}: not measured")
            continue
        best = min(present, key=medians.get)
        ratio = medians[best] / medians[mine]
        verdict = "met" if ratio >= target else "NOT met"
        print(f"  target {mine} vs {label}: {ratio:.2f}× {best} (target ≥ {target}×): {verdict}")
    for over, under, target in (
        ("raysae loop", "raysae", 1.10),
        ("raysae", "encoder GEMM", 1.4),
        ("raysae loop", "encoder GEMM", None),
    ):
        if over in medians and under in medians:
            ratio = medians[over] / medians[under]
            verdict = (
                ""
                if target is None
                else f" (target ≤ {target}×): " + ("met" if ratio <= target else "NOT met")
            )
            print(f"  {over} ÷ {under}: {ratio:.2f}×{verdict}")


def parse_size(text: str) -> Size:
    try:
        d_in, n_latents, k, batch = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"size {text!r}: expected d_in,n_latents,k,batch, e.g. 576,4608,32,4096"
        ) from None
    return Size(d_in, n_latents, k, batch)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [impl.name for impl in IMPLS]
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument(
        "--sizes",
        type=parse_size,
        nargs="+",
        default=[Size(576, 4608, 32, 4096), Size(768, 16384, 64, 2048)],
        metavar="D,N,K,B",
        help="d_in,n_latents,k,batch per configuration "
        "(default: 576,4608,32,4096 768,16384,64,2048)",
    )
    parser.add_argument(
        "--impls",
        type=lambda s: s.split(","),
        default=names,
        help=f"comma-separated subset of: {', '.join(names)} (raysae is always run)",
    )
    parser.add_argument("--rounds", type=int, default=10, help="round-robin rounds timed")
    parser.add_argument("--steps", type=int, default=1, help="steps per implementation per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        help="grad-norm clip of raysae and plain torch (raysae's default; SAELens "
        "always clips at 1.0, sparsify never clips)",
    )
    parser.add_argument(
        "--check-only", action="store_true", help="run the one-step check, no timing"
    )
    args = parser.parse_args(argv)
    unknown = set(args.impls) - set(names)
    if unknown:
        parser.error(
            f"--impls: unknown {', '.join(sorted(unknown))}; choose from {', '.join(names)}"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print("command: " + " ".join([sys.executable, *sys.argv]))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 on CPU, "
        f"AuxK off, grad clip {args.grad_clip} (raysae, plain torch)"
    )
    impls = []
    for impl in IMPLS:
        if impl.name not in args.impls and impl.name != "raysae":
            continue
        ok, note = available(impl)
        print(f"  {impl.name:<15} {note}")
        if ok:
            impls.append(impl)
        elif impl.name == "raysae":
            sys.exit("raysae is not importable: run from the checkout with PYTHONPATH=.")
    for size in args.sizes:
        print(f"\n## {size}  (lr {size.lr:.3g}, Adam betas 0.9, 0.999)")
        batches = make_batches(size, count=4)
        init = make_init(size, batches[0])
        steppers = {impl.name: impl.build(size, init, args.grad_clip) for impl in impls}
        check_one_step(steppers, batches[0], init)
        if args.check_only:
            continue
        steppers["encoder GEMM"] = encoder_gemm(size, init)  # timed in the same rotation
        load_before = os.getloadavg()[0]
        times = time_steps(steppers, batches, args.rounds, args.steps, args.warmup)
        print(
            f"{args.rounds} rounds × {args.steps} steps after {args.warmup} warm-up step(s); "
            f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after "
            f"(this benchmark itself adds up to {args.threads}):"
        )
        print_targets(print_table(size, times))


if __name__ == "__main__":
    main()
