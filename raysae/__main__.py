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
    from raysae.train import run_single_process, train_distributed

    cfg = load_run_config(args.config, _parse_sets(args.set))
    if args.local or cfg.data.toy is not None:
        run_single_process(cfg, args.out, overwrite=args.overwrite)
        return 0
    import ray

    ray.init(address=args.address, log_to_driver=True)
    train_distributed(cfg, args.out, name=args.name, overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raysae",
        description="Train and sweep sparse autoencoders on language-model activations with Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = sub.add_parser(
        "train", help="train one SAE from a run config (YAML)",
        description="Train one SAE. The config has sections sae:, train:, data: and scaling: "
                    "(see raysae/config.py for every field). With data.uri (a dataset) it runs on "
                    "Ray Train: scaling.num_workers DDP workers on the cluster at --address (a new "
                    "local one by default), checkpoints every scaling.checkpoint_every_tokens, and "
                    "re-running the same command resumes the run. Writes OUT/NAME/sae "
                    "(safetensors + JSON) and OUT/NAME/metrics.json. With data.toy, or --local, it "
                    "trains in this process and writes OUT/sae and OUT/metrics.json.")
    train.add_argument("config", help="run config YAML, e.g. sweeps/toy-train.yaml")
    train.add_argument("--out", required=True,
                       help="output location: a local directory or s3://bucket/prefix")
    train.add_argument("--name", default=None,
                       help="run name under --out (default: architecture, size and a hash of "
                            "the config, so the same config resumes the same run)")
    train.add_argument("--address", default=None,
                       help="Ray cluster address (default: start a local Ray)")
    train.add_argument("--local", action="store_true",
                       help="train in this process without Ray")
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
