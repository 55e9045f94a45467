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
