"""Held-out quality of TopK SAEs trained by raysae, EleutherAI sparsify and SAELens on the same
activations: same training rows in the same order, same token budget, same k, each trainer with
its own recipe (initialisation, learning rate and schedule, decoder constraint), and one
evaluator for all of them. With --init shared, sparsify and SAELens start from raysae's initial
parameters instead (input scale folded in; as bench/step.py does), so only training differs.

    PYTHONPATH=. /work/bench-venv/bin/python bench/quality.py --data DATASET --eval-parts 5 \\
        --n-latents 4608 --k 32 --batch 1024
    ... --impls raysae --variant "clip off: train.grad_clip=0" --variant "..."   # ablations

DATASET is a raysae activation dataset (`raysae harvest`); its last --eval-parts parts are held
out and no trainer sees them. The training parts are read once into memory and their rows
shuffled with --seed; every trainer takes the same batches of --batch rows in that order, one
pass (the budget is every whole batch of the training split, or --tokens).

What each trainer does (its defaults, as its own training loop would run them):
- raysae: `raysae.step.train_step` with `TrainConfig` defaults (lr 4e-4/√(n/2¹⁴), linear decay
  over the last 20 %, grad-norm clip 1.0) and its init (`init_from_sample_` on the first
  `train.init_tokens` rows: input scale, geometric-median b_dec; W_enc = W_dec unit rows).
- sparsify: `SparseCoder` with the steps of `sparsify.Trainer.fit` (loss FVU, Adam at its
  default lr 2e-4/√(n/2¹⁴), its linear warm-up over 1,000 steps then linear decay to 0 at the end, b_dec set
  to the first batch's mean, W_dec renormalised and its parallel gradient removed; no clip).
- SAELens: `SAETrainer.step` on a `TopKTrainingSAE` with its defaults (decoder rows at norm 0.1,
  W_enc = W_decᵀ, b_dec 0, activations rescaled by the decoder norms, constant lr 3e-4, clip 1.0).
AuxK: each trainer's own rule (raysae and sparsify: dead after 10M tokens, never reached here;
SAELens: after 1,000 steps without firing).

Evaluator (the same code for every SAE): on the held-out rows, FVU = Σ‖x − x̂‖² / Σ‖x − μ‖² (μ
the held-out mean, float64 sums), L0 = mean latents > 0 per token, dead = fraction of latents
that fire on no held-out token.

--variant "NAME: key=value; key=value" adds a raysae run with settings changed (`sae.*`,
`train.*` fields; see raysae/config.py); with `impl=SAELens` first, a SAELens run with
TopKTrainingSAEConfig (`sae.*`) or SAETrainerConfig (`train.*`) fields changed. Ablation switches that are not settings:
`decoder=free` (no unit-norm renormalisation and no parallel-gradient removal),
`decoder_init_norm=0.1` (rows scaled after init, W_enc as well, SAELens's heuristic).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

BIG = 2**62
Reconstruct = Callable[[Tensor], tuple[Tensor, Tensor]]
"""x (B, d) → (x̂ (B, d) in input units, active (B, k) or (B, n) latents, > 0 where firing)."""


@dataclass
class Trained:
    name: str
    reconstruct: Reconstruct
    n_latents: int
    seconds: float


# -- data ----------------------------------------------------------------------------------------


def load(uri: str, eval_parts: int) -> tuple[Tensor, Tensor]:
    from raysae.data.dataset import open_dataset

    train, held = open_dataset(uri).split(eval_parts)
    read = lambda ds: torch.cat(list(ds.batches(65536, dtype=torch.float32)))  # noqa: E731
    return read(train), read(held)


def batches_of(train: Tensor, batch: int, tokens: int | None, seed: int) -> list[Tensor]:
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    n = (tokens or train.shape[0]) // batch
    if n * batch > train.shape[0]:
        raise SystemExit(f"--tokens {tokens} is more than the {train.shape[0]} training rows")
    return [train[order[i * batch : (i + 1) * batch]] for i in range(n)]


# -- evaluator -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(t: Trained, held: Tensor, chunk: int = 4096) -> dict[str, float]:
    mean = held.double().mean(0)
    err = var = active = 0.0
    fired = torch.zeros(t.n_latents, dtype=torch.bool)
    for x in held.split(chunk):
        x_hat, acts = t.reconstruct(x)
        err += float((x.double() - x_hat.double()).pow(2).sum())
        var += float((x.double() - mean).pow(2).sum())
        active += float((acts > 0).sum())
        fired |= acts_fired(acts, t.n_latents)
    return {"fvu": err / var, "l0": active / held.shape[0], "dead": 1 - float(fired.float().mean())}


def acts_fired(acts: Tensor, n: int) -> Tensor:
    if isinstance(acts, tuple):  # (values, indices) of a top-k
        values, indices = acts
        out = torch.zeros(n, dtype=torch.bool)
        out[indices[values > 0]] = True
        return out
    return (acts > 0).any(0)


class TopKActs(tuple):
    """(values, indices) with the `> 0` and `.sum()` the evaluator applies to dense latents."""

    def __gt__(self, other):
        return self[0] > other


# -- trainers ------------------------------------------------------------------------------------


def apply_switches(model, switches: dict[str, str]) -> None:
    if "decoder_init_norm" in switches:
        norm = float(switches["decoder_init_norm"])
        with torch.no_grad():
            model.W_dec.mul_(norm)
            model.W_enc.mul_(norm)
    if switches.get("decoder") == "free":
        model.normalize_decoder_ = lambda: None
        model.remove_parallel_decoder_grad_ = lambda: None
    elif "decoder" in switches:
        raise SystemExit(f"decoder={switches['decoder']}: only decoder=free is known")


def train_raysae(
    batches: list[Tensor], d: int, n: int, k: int, seed: int, overrides: dict[str, str]
) -> Reconstruct:
    from raysae.config import SAEConfig, TrainConfig
    from raysae.saes import build_sae
    from raysae.settings import from_dict, to_dict
    from raysae.step import TrainState, make_optimizer, train_step

    switches = {
        key: overrides.pop(key) for key in ("decoder", "decoder_init_norm") if key in overrides
    }
    sections = {"sae": {"d_in": d, "n_latents": n, "k": k}, "train": {}}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if section not in sections or not field:
            raise SystemExit(f"--variant key {key!r}: expected sae.FIELD or train.FIELD")
        sections[section][field] = _parse(value)
    tokens = len(batches) * batches[0].shape[0]
    train_fields = {"total_tokens": tokens, "batch_size": batches[0].shape[0], "seed": seed}
    sae_cfg = from_dict(SAEConfig, sections["sae"], "sae")
    train_cfg = from_dict(
        TrainConfig, {**to_dict(TrainConfig())} | train_fields | sections["train"], "train"
    )
    torch.manual_seed(train_cfg.seed)
    model = build_sae(sae_cfg)
    sample = torch.cat(batches)[: train_cfg.init_tokens]
    model.init_from_sample_(sample)
    apply_switches(model, switches)
    optimizer, state = make_optimizer(model, train_cfg), TrainState.fresh(n)
    for x in batches:
        train_step(model, optimizer, x, state, train_cfg)
    model.eval()

    def reconstruct(x: Tensor):
        out = model(x)
        return out.x_hat, TopKActs(
            (out.sparse.values.reshape(x.shape[0], -1), out.sparse.cols.reshape(x.shape[0], -1))
        )

    return reconstruct


def run_cli(
    data: str,
    eval_parts: int,
    d: int,
    n: int,
    k: int,
    batch: int,
    tokens: int,
    seed: int,
    threads: int,
) -> tuple[Reconstruct, float]:
    """`raysae train CONFIG --local` as a researcher types it, in a fresh process (its own
    reader, shuffle, init and final evaluation; OMP_NUM_THREADS=threads): the checkpoint's
    reconstruction and the command's wall time."""
    import subprocess
    import tempfile

    import yaml

    from raysae.checkpoint import load_sae

    cfg = {
        "sae": {"architecture": "topk", "d_in": d, "n_latents": n, "k": k},
        "train": {"total_tokens": tokens, "batch_size": batch, "seed": seed},
        "data": {"uri": data, "eval_parts": eval_parts},
    }
    with tempfile.TemporaryDirectory() as root:
        path = os.path.join(root, "run.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        command = [sys.executable, "-m", "raysae", "train", path, "--local", "--out", root]
        t0 = time.perf_counter()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"raysae train failed:\n{done.stderr[-3000:]}")
        model = load_sae(os.path.join(root, "sae"), "cpu")
    model.eval()

    def reconstruct(x: Tensor):
        out = model(x)
        return out.x_hat, TopKActs(
            (out.sparse.values.reshape(x.shape[0], -1), out.sparse.cols.reshape(x.shape[0], -1))
        )

    return reconstruct, seconds


def _parse(value: str):
    import yaml

    return yaml.safe_load(value)


def train_sparsify(batches: list[Tensor], d: int, n: int, k: int, seed: int, _) -> Reconstruct:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(seed)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k))
    if SHARED:
        with torch.no_grad():  # encoder is an nn.Linear: weight (n, d), like raysae's W_enc
            sae.encoder.weight.copy_(SHARED["W_enc"])
            sae.encoder.bias.copy_(SHARED["b_enc"])
            sae.W_dec.copy_(SHARED["W_dec"])
            sae.b_dec.copy_(SHARED["b_dec"])
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4 / (n / 2**14) ** 0.5)
    schedule = _sparsify_schedule(optimizer, 1000, len(batches))
    for step, x in enumerate(batches):
        if step == 0 and not SHARED:  # sparsify.Trainer.fit: b_dec to the first batch's mean
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)
        (out.fvu + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
    sae.set_decoder_norm_to_unit_norm()

    def reconstruct(x: Tensor):
        out = sae(x=x, y=x, dead_mask=None)
        return out.sae_out, TopKActs((out.latent_acts, out.latent_indices))

    return reconstruct


def _sparsify_schedule(optimizer, warmup: int, total: int):
    try:
        from sparsify.trainer import get_linear_schedule_with_warmup
    except ImportError:
        from transformers import get_linear_schedule_with_warmup
    return get_linear_schedule_with_warmup(optimizer, warmup, total)


def train_saelens(
    batches: list[Tensor], d: int, n: int, k: int, seed: int, overrides: dict[str, str]
) -> Reconstruct:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    sections = {"sae": {}, "train": {}}
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if section not in sections or not field:
            raise SystemExit(f"--variant key {key!r}: expected sae.FIELD or train.FIELD")
        sections[section][field] = _parse(value)
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d, d_sae=n, k=k, dtype="float32", device="cpu", **sections["sae"]
        )
    )
    if SHARED:
        with torch.no_grad():  # SAELens stores W_enc as (d, n)
            sae.W_enc.copy_(SHARED["W_enc"].T)
            sae.b_enc.copy_(SHARED["b_enc"])
            sae.W_dec.copy_(SHARED["W_dec"])
            sae.b_dec.copy_(SHARED["b_dec"])
    tokens = len(batches) * batches[0].shape[0]
    lr = sections["train"].get("lr", SAETrainerConfig.lr)
    trainer = SAETrainer(
        # lr_end as LanguageModelSAERunnerConfig fills it in (lr / 10; the constant schedule
        # ignores it)
        cfg=SAETrainerConfig(
            total_training_samples=tokens,
            train_batch_size_samples=batches[0].shape[0],
            **{"lr_end": lr / 10, **sections["train"]},
        ),
        sae=sae,
        data_provider=iter(()),
    )
    for x in batches:
        trainer.step(x)
        trainer.n_training_steps += 1
    sae.eval()

    def reconstruct(x: Tensor):
        acts = sae.encode(x)
        return sae.decode(acts), acts

    return reconstruct


SHARED: dict[str, Tensor] = {}
"""--init shared: raysae's initial parameters in input units, copied into every peer."""


def shared_init(batches: list[Tensor], d: int, n: int, k: int, seed: int) -> dict[str, Tensor]:
    """raysae's default initial SAE (seed, `init_from_sample_` on the first init_tokens rows)
    with its input scale folded in: the same function of raw activations, unit decoder rows."""
    from raysae.config import SAEConfig, TrainConfig
    from raysae.saes import build_sae

    torch.manual_seed(seed)
    model = build_sae(SAEConfig(d_in=d, n_latents=n, k=k))
    model.init_from_sample_(torch.cat(batches)[: TrainConfig().init_tokens])
    model.fold_input_scale_()
    return {
        name: getattr(model, name).detach().clone() for name in ("W_enc", "b_enc", "W_dec", "b_dec")
    }


TRAINERS = {"raysae": train_raysae, "sparsify": train_sparsify, "SAELens": train_saelens}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, rest = text.partition(":")
    if not sep:
        raise SystemExit(f'--variant {text!r}: expected "NAME: key=value; key=value"')
    pairs = {}
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variant {name}: {item!r} is not key=value")
        pairs[key.strip()] = value.strip()
    return name.strip(), pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a raysae activation dataset (directory)")
    parser.add_argument("--eval-parts", type=int, default=5, help="last parts held out")
    parser.add_argument("--n-latents", type=int, default=4608)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--tokens", type=int, help="training budget (default: every whole batch)")
    parser.add_argument("--seed", type=int, default=0, help="row order and parameter init")
    parser.add_argument("--impls", nargs="+", default=list(TRAINERS), choices=list(TRAINERS))
    parser.add_argument("--variant", action="append", default=[], help="raysae ablation run")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--cli",
        action="store_true",
        help="also run `raysae train --local` on the same dataset, budget and sizes (its own "
        "reader and order), timed end to end and scored by the same evaluator",
    )
    parser.add_argument(
        "--init",
        choices=("own", "shared"),
        default="own",
        help="own: each trainer initialises as it would; shared: raysae's initial parameters "
        "(input scale folded in) copied into sparsify and SAELens, so only training differs",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variant]
    print(f"load average before: {os.getloadavg()}", flush=True)
    train, held = load(args.data, args.eval_parts)
    batches = batches_of(train, args.batch, args.tokens, args.seed)
    d = train.shape[1]
    tokens = len(batches) * args.batch
    print(
        f"{args.data}: d_in={d}, {train.shape[0]:,} training rows ({tokens:,} trained on, "
        f"{len(batches)} batches of {args.batch}), {held.shape[0]:,} held out; "
        f"n_latents={args.n_latents}, k={args.k}, seed {args.seed}",
        flush=True,
    )
    SHARED.clear()
    if args.init == "shared":
        SHARED.update(shared_init(batches, d, args.n_latents, args.k, args.seed))
    print(f"initialisation: {args.init}", flush=True)
    runs = [(impl, impl, {}) for impl in args.impls]
    for name, pairs in variants:
        impl = pairs.pop("impl", "raysae")
        if impl not in TRAINERS or impl == "sparsify":
            raise SystemExit(f"--variant {name}: impl={impl}; variants run raysae or SAELens")
        runs.append((f"{impl}, {name}", impl, pairs))
    rows = []
    for label, impl, overrides in runs:
        t0 = time.perf_counter()
        reconstruct = TRAINERS[impl](batches, d, args.n_latents, args.k, args.seed, dict(overrides))
        seconds = time.perf_counter() - t0
        metrics = evaluate(Trained(label, reconstruct, args.n_latents, seconds), held)
        rows.append((label, overrides, metrics, seconds))
        print(
            f"  {label}: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead "
            f"{metrics['dead']:.3f} ({seconds:.0f} s; load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    if args.cli:
        label = "raysae train --local"
        reconstruct, seconds = run_cli(
            args.data,
            args.eval_parts,
            d,
            args.n_latents,
            args.k,
            args.batch,
            tokens,
            args.seed,
            args.threads,
        )
        metrics = evaluate(Trained(label, reconstruct, args.n_latents, seconds), held)
        rows.append((label, {}, metrics, seconds))
        print(
            f"  {label}: FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}, dead "
            f"{metrics['dead']:.3f} ({seconds:.0f} s for the whole command, "
            f"{tokens / seconds:,.0f} tokens/s; load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    base = next((m["fvu"] for label, _, m, _ in rows if label == "raysae"), None)
    print(
        "\n| trainer | changes | held-out FVU | L0 | dead | train s |"
        + (" FVU ÷ raysae |" if base else "")
    )
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if base else ""))
    for label, overrides, m, seconds in rows:
        changes = "; ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        ratio = f" {m['fvu'] / base:.3f} |" if base else ""
        print(
            f"| {label} | {changes} | {m['fvu']:.4f} | {m['l0']:.1f} | {m['dead']:.3f} | {seconds:.0f} |{ratio}"
        )
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
