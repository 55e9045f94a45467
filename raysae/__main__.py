"""The raysae command line. `raysae --help` is the reference; each subcommand lives in its module."""

from __future__ import annotations

import argparse
import sys

import yaml

from raysae.config import ConfigError, load_run_config


def _parse_sets(pairs: list[str]) -> dict:
    """--set key.sub=value pairs; values are parsed as YAML scalars (numbers, true/false, null)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set sae.k=64")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _train(args: argparse.Namespace) -> int:
    from raysae.train import run_single_process

    cfg = load_run_config(args.config, _parse_sets(args.set))
    run_single_process(cfg, args.out, overwrite=args.overwrite)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from raysae.evaluate import eval_command

    eval_command(args.checkpoint, args.data, out=args.out, n_tokens=args.tokens,
                 batch_size=args.batch_size, pca_ks=args.pca_k, kmeans_ks=args.kmeans_k,
                 kmeans_tokens=args.kmeans_tokens, seed=args.seed, device=args.device)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysae",
        description="Train and sweep sparse autoencoders on language-model activations with Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="train one SAE from a run config (YAML)",
        description="Train one SAE. The config has sections sae:, train: and data: "
                    "(see raysae/config.py for every field). Writes OUT/sae (safetensors + JSON) "
                    "and OUT/metrics.json.")
    train.add_argument("config", help="run config YAML, e.g. sweeps/toy-train.yaml")
    train.add_argument("--out", required=True, help="output directory for the checkpoint and metrics")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set sae.k=64 (repeatable)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace results already in --out")
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval", help="evaluate a trained SAE against baselines on activations",
        description="Evaluate an SAE on the first --tokens rows of --data: FVU (and the legacy "
                    "FVU_B), explained variance, MSE, cosine, l2 ratio, relative reconstruction "
                    "bias, L0, L1, dead/dense latents and firing frequencies; the same metrics "
                    "for baselines fitted on the same rows (mean, PCA-k, k-means as an L0=1 "
                    "SAE, nearest-centroid and best-scaled); each decoder row's max cosine to "
                    "another, next to random directions. Prints a table; --out writes all of "
                    "it (with per-latent frequencies) as JSON.")
    ev.add_argument("checkpoint", help="SAE checkpoint directory, e.g. OUT/sae from raysae train")
    ev.add_argument("--data", required=True, metavar="SOURCE",
                    help="toy:RUN.yaml — the held-out toy stream of the data.toy section of a "
                         "run config (the one the SAE was trained with); otherwise a raysae "
                         "dataset: a local directory or s3://bucket/prefix")
    ev.add_argument("--tokens", type=_positive_int, default=65_536,
                    help="rows of the data to evaluate on (default 65536)")
    ev.add_argument("--batch-size", type=_positive_int, default=4096,
                    help="rows per batch (default 4096)")
    ev.add_argument("--pca-k", type=_positive_int, nargs="+", metavar="K",
                    help="PCA baselines with these numbers of components (default: the "
                         "SAE's measured L0, rounded)")
    ev.add_argument("--kmeans-k", type=_positive_int, nargs="+", metavar="K",
                    help="k-means baselines with these numbers of centroids (default: the "
                         "SAE's n_latents, capped at a quarter of --kmeans-tokens)")
    ev.add_argument("--kmeans-tokens", type=_positive_int, default=65_536,
                    help="rows k-means is fitted on, the first of the evaluated (default 65536)")
    ev.add_argument("--seed", type=int, default=0,
                    help="seed of k-means and of the random directions (default 0)")
    ev.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    ev.add_argument("--out", metavar="FILE", help="also write the report as JSON to FILE")
    ev.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"raysae {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
