"""The raysae command line. `raysae --help` is the reference; each subcommand lives in its module."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Collection

import yaml

from raysae import interrupt
from raysae.config import load_run_config
from raysae.settings import ConfigError, Options


def _parse_sets(pairs: list[str]) -> dict:
    """--set key.sub=value pairs → {dotted key: value}, for load_run_config to apply
    (raysae.settings.set_dotted); values are parsed as YAML scalars (numbers, true/false, null)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set sae.k=64")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _train(args: argparse.Namespace) -> int:
    from raysae.train import run_single_process, train_distributed

    cfg = load_run_config(args.config, _parse_sets(args.set), what="--set")
    if args.local or cfg.data.toy is not None:
        try:
            run_single_process(cfg, args.out, overwrite=args.overwrite)
        except interrupt.Interrupted as e:
            e.cannot_resume = "a run in one process (--local, toy data) keeps no checkpoints"
            raise
        return 0
    # Ray starts once the output and the dataset are checked. The same command resumes it.
    train_distributed(cfg, args.out, name=args.name, overwrite=args.overwrite, address=args.address)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from raysae.sweep_spec import load_sweep_spec

    spec = load_sweep_spec(args.spec)  # a bad spec fails before Ray is even imported
    from raysae.sweep import SweepFailedError, has_started, run_sweep

    try:
        run_sweep(spec, resume=args.resume, address=args.address)  # Ray starts after pre-flight
    except SweepFailedError as e:  # it ran, and every trial failed: their errors in one message
        return _error(args, e, code=1)
    except interrupt.Interrupted as e:  # Tune saved its state: --resume goes on from there
        if has_started(spec) and not args.resume:
            e.resume_args = ["--resume"]
        elif not has_started(spec):
            e.cannot_resume = "no trial had started"
        raise
    return 0


def _submit(args: argparse.Namespace) -> int:
    from raysae import submit

    if args.status:
        print(submit.status(args.address, args.status, token_file=args.token_file))
    elif args.logs:
        print(submit.logs(args.address, args.logs, token_file=args.token_file))
    elif args.spec:
        job_id = submit.submit(
            args.spec, args.address, resume=args.resume, token_file=args.token_file
        )
        print(
            f"submitted {job_id}\n"
            f"follow it:  raysae submit --address {args.address} --logs {job_id}\n"
            f"status:     raysae submit --address {args.address} --status {job_id}"
        )
    else:
        raise ConfigError("give a sweep spec to submit, or --status JOB / --logs JOB")
    return 0


def _splice_options():
    """`raysae eval`'s options setting raysae.splice_config.SpliceConfig fields, all None (not given)
    by default: resolve_config fills those in from the manifest of --data."""
    from raysae.splice_config import SpliceConfig

    return Options(
        SpliceConfig,
        fields=(
            "n_tokens",
            "model",
            "layer",
            "corpus",
            "corpus_config",
            "context_length",
            "batch_size",
            "mean_ablation",
        ),
        # eval's own --tokens and --batch-size are about the activations
        rename={"n_tokens": "splice_tokens", "batch_size": "splice_batch_size"},
        unset=True,
    )


def _eval(args: argparse.Namespace) -> int:
    from raysae.evaluate import eval_command
    from raysae.scoring import RayPass

    options = _splice_options()
    splice = options.values(args)
    if splice["n_tokens"] is None:
        given = [options.flag(name) for name, value in splice.items() if value is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)} configure the splice evaluation; add "
                f"{options.flag('n_tokens')} N to run it"
            )
        splice = None
    eval_command(
        args.checkpoint,
        args.data,
        out=args.out,
        rows=args.rows,
        eval_parts=args.eval_parts,
        n_tokens=args.tokens,
        batch_size=args.batch_size,
        pca_ks=args.pca_k,
        kmeans_ks=args.kmeans_k,
        kmeans_tokens=args.kmeans_tokens,
        seed=args.seed,
        device=args.device,
        splice=splice,
        by_position=args.by_position,
        report_dir=args.report,
        report_latents=args.report_latents,
        scoring=args.scoring,
        ray_pass=RayPass(args.actors, args.cpus_per_actor),
    )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from raysae.verify import verify_dataset

    return 1 if verify_dataset(args.dataset, threads=args.threads) else 0


def _export(args: argparse.Namespace) -> int:
    from raysae.export import export_command

    export_command(
        args.checkpoint,
        args.out,
        sweep=args.sweep,
        frontier=args.frontier,
        fmt=args.format,
        data=args.data,
        overall=args.overall,
        overwrite=args.overwrite,
    )
    return 0


def _meta(args: argparse.Namespace) -> int:
    from raysae.meta import train_meta

    train_meta(
        args.checkpoint,
        args.out,
        n_latents=args.n_latents,
        k=args.k,
        architecture=args.architecture,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        top=args.top,
        report=args.report,
    )
    return 0


def _meta_options(meta: argparse.ArgumentParser) -> None:
    meta.description = (
        "Train a meta-SAE (Bussmann et al. 2024) on the decoder rows of a trained SAE: many "
        "epochs over its n_latents rows in one process. Writes OUT/sae (the meta-SAE) and "
        "OUT/meta.json: its FVU on the decoder rows, L0, and for each meta-latent the base "
        "latents that use it most. Prints progress as it trains. Imports no Ray."
    )
    meta.add_argument(
        "checkpoint", help="the base SAE: a raysae SAE folder (OUT/sae) or an SAELens one"
    )
    meta.add_argument("out", help="a new (or empty) folder for the meta-SAE and meta.json")
    meta.add_argument(
        "--n-latents",
        type=_positive_int,
        default=None,
        help="meta-latents (default: the base's n_latents / 8)",
    )
    meta.add_argument(
        "--k", type=_positive_int, default=4, help="meta-latents per base latent (default 4)"
    )
    meta.add_argument(
        "--architecture",
        default="batchtopk",
        choices=("batchtopk", "topk", "relu", "jumprelu", "gated", "matryoshka_batchtopk"),
        help="the meta-SAE's architecture (default batchtopk, as the paper's)",
    )
    meta.add_argument(
        "--epochs", type=_positive_int, default=200, help="passes over the rows (default 200)"
    )
    meta.add_argument(
        "--batch-size", type=_positive_int, default=1024, help="rows per step (default 1024)"
    )
    meta.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate (default: raysae's, from n_latents)",
    )
    meta.add_argument("--seed", type=int, default=0, help="initialisation and row-order seed")
    meta.add_argument(
        "--top",
        type=_positive_int,
        default=10,
        help="base latents listed per meta-latent (default 10)",
    )
    meta.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="the base SAE's `raysae eval --report` folder: also write OUT/index.html, each "
        "meta-latent's top base latents linked to their pages in that report's latent browser",
    )
    meta.set_defaults(func=_meta)


def _pages(args: argparse.Namespace) -> int:
    from raysae.pages import pages_command

    pages_command(args.sweep, reports=args.reports, n_tokens=args.tokens)
    return 0


def _pages_options(pages: argparse.ArgumentParser) -> None:
    pages.description = (
        "Write (or refresh) a sweep's page, OUT/NAME/index.html: the Pareto plot with each "
        "point labelled by its k or L1 coefficient, the results table (click a heading to "
        "sort), and a link to each SAE's report where it has one. `raysae sweep` writes it "
        "when it finishes. With --reports, first writes the missing reports (raysae eval "
        "--report on each finished SAE's held-out rows, next to its checkpoint)."
    )
    pages.add_argument("sweep", metavar="OUT/NAME", help="a finished sweep's folder")
    pages.add_argument(
        "--reports", action="store_true", help="write each finished SAE's report first"
    )
    pages.add_argument(
        "--tokens",
        type=_positive_int,
        default=65_536,
        help="with --reports: held-out rows each report scores (default 65536)",
    )
    pages.set_defaults(func=_pages)


def _positive_int(text: str, least: int = 1) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
    return value


def _non_negative_int(text: str) -> int:
    return _positive_int(text, least=0)


def _train_options(train: argparse.ArgumentParser) -> None:
    train.description = (
        "Train one SAE. The config has sections sae:, train:, data: and scaling: "
        "(see raysae/config.py for every field). With data.uri (a dataset) it runs on "
        "Ray Train: scaling.num_workers DDP workers on the cluster at --address (a new "
        "local one by default), checkpoints every scaling.checkpoint_every_tokens, and "
        "re-running the same command resumes the run. Writes OUT/NAME/sae "
        "(safetensors + JSON) and OUT/NAME/metrics.json. With data.toy, or --local, it "
        "trains in this process and writes OUT/sae and OUT/metrics.json."
    )
    train.add_argument("config", help="run config YAML, e.g. sweeps/toy-train.yaml")
    train.add_argument(
        "--out", required=True, help="output location: a local directory or s3://bucket/prefix"
    )
    train.add_argument(
        "--name",
        default=None,
        help="run name under --out (default: architecture, size and a hash of "
        "the config, so the same config resumes the same run)",
    )
    train.add_argument(
        "--address", default=None, help="Ray cluster address (default: start a local Ray)"
    )
    train.add_argument("--local", action="store_true", help="train in this process without Ray")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set sae.k=64 (repeatable)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    train.set_defaults(func=_train)


def _sweep_options(sweep: argparse.ArgumentParser) -> None:
    sweep.description = (
        "Expand the spec's search space, train every point with Ray Train inside "
        "Ray Tune trials (pack: N SAEs share each trial's batches), and write "
        "OUTPUT/NAME/results.{csv,parquet}, pareto.csv and pareto.png. See "
        "raysae/sweep_spec.py for the spec's fields and sweeps/ for examples."
    )
    sweep.add_argument("spec", help="sweep spec YAML, e.g. sweeps/quickstart.yaml")
    sweep.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep: finished trials are kept, "
        "unfinished ones resume from their checkpoints",
    )
    sweep.add_argument(
        "--address", default=None, help="Ray cluster address (default: start a local Ray)"
    )
    sweep.set_defaults(func=_sweep)


def _submit_options(submit: argparse.ArgumentParser) -> None:
    submit.description = (
        "Submit `raysae sweep SPEC` as a Ray Job (this directory is uploaded as the "
        "job's working dir), or ask about a job. Use an s3:// output in the spec: a "
        "relative local path would be written inside the job's working dir."
    )
    submit.add_argument("spec", nargs="?", help="sweep spec YAML (path relative to this directory)")
    submit.add_argument(
        "--address", required=True, help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265"
    )
    submit.add_argument(
        "--token-file",
        metavar="FILE",
        help="file holding the cluster's Ray authentication token (default: where Ray looks: "
        "RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH names, then ~/.ray/auth_token); "
        "docs/cluster.md says how to fetch it from the head",
    )
    submit.add_argument("--resume", action="store_true", help="submit `raysae sweep --resume`")
    submit.add_argument("--status", metavar="JOB", help="print the job's status")
    submit.add_argument("--logs", metavar="JOB", help="print the job's logs so far")
    submit.set_defaults(func=_submit)


def _harvest_options(harvest: argparse.ArgumentParser) -> None:
    from raysae.harvest import add_harvest_arguments, run_harvest_cli

    harvest.description = (
        "Run a causal LM (hub id, local directory or local .gguf file) over a corpus "
        "on Ray Data and write the residual stream after the chosen blocks as "
        "activation datasets (Parquet parts + manifest.json) to a local directory or "
        "s3:// prefix. The default corpus is the Python standard library's "
        "docstrings, which every machine has."
    )
    add_harvest_arguments(harvest)
    harvest.set_defaults(func=run_harvest_cli)


def _eval_options(ev: argparse.ArgumentParser) -> None:
    ev.description = (
        "Evaluate an SAE on the first --tokens held-out rows of --data (those it was "
        "not trained on; --rows all: every row): FVU (and the legacy "
        "FVU_B), explained variance, MSE, cosine, l2 ratio, relative reconstruction "
        "bias, L0, L1, dead/dense latents and firing frequencies; the same metrics "
        "for baselines fitted on the SAE's training rows (mean, PCA-k, k-means as an L0=1 "
        "SAE, nearest-centroid and best-scaled); each decoder row's max cosine to "
        "another, next to random directions. With --splice-tokens N, also splices "
        "the SAE into its language model over N tokens of text: next-token CE loss "
        "clean, with block L's output replaced by the SAE's reconstruction, and "
        "with it zero- and mean-ablated; CE loss recovered and KL(clean ‖ spliced). "
        "Model, layer and text default to those --data was harvested with. Prints "
        "a table; --out writes all of it (with per-latent frequencies) as JSON."
    )
    ev.add_argument("checkpoint", help="SAE checkpoint directory, e.g. OUT/sae from raysae train")
    ev.add_argument(
        "--data",
        required=True,
        metavar="SOURCE",
        help="toy:RUN.yaml — the held-out toy stream of the data.toy section of a "
        "run config (the one the SAE was trained with); otherwise a raysae "
        "dataset: a local directory or s3://bucket/prefix",
    )
    ev.add_argument(
        "--rows",
        choices=("held-out", "all"),  # raysae.evaluate.ROWS (not imported: --help stays fast)
        default="held-out",
        help="held-out: the rows the SAE was not trained on — a dataset's last "
        "data.eval_parts parts (read from the run's metrics.json next to the "
        "checkpoint), a toy config's held-out stream; all: every row of a dataset "
        "(training rows included). Default held-out",
    )
    ev.add_argument(
        "--eval-parts",
        type=_non_negative_int,
        metavar="N",
        help="the last N parts of --data were held out (default: the run's data.eval_parts)",
    )
    ev.add_argument(
        "--tokens",
        type=_positive_int,
        default=65_536,
        help="at most this many rows scored, and at most this many training rows "
        "the baselines are fitted on (default 65536)",
    )
    ev.add_argument(
        "--batch-size", type=_positive_int, default=4096, help="rows per batch (default 4096)"
    )
    ev.add_argument(
        "--pca-k",
        type=_positive_int,
        nargs="+",
        metavar="K",
        help="PCA baselines with these numbers of components (default: the "
        "SAE's measured L0, rounded)",
    )
    ev.add_argument(
        "--kmeans-k",
        type=_positive_int,
        nargs="+",
        metavar="K",
        help="k-means baselines with these numbers of centroids (default: the "
        "SAE's n_latents, capped at a quarter of --kmeans-tokens)",
    )
    ev.add_argument(
        "--kmeans-tokens",
        type=_positive_int,
        default=16_384,
        help="rows k-means is fitted on, the first training rows (default 16384)",
    )
    ev.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of k-means and of the random directions (default 0)",
    )
    ev.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    ev.add_argument("--out", metavar="FILE", help="also write the report as JSON to FILE")
    ev.add_argument(
        "--report",
        metavar="DIR",
        help="also write DIR/index.html, a self-contained page (open it from disk: no network, "
        "no server) with the metric table beside the baselines, the firing-frequency and "
        "decoder-cosine histograms, the per-position curves (--by-position), CE/KL when "
        "spliced, the training curves, and a latent browser (top and random firing contexts, "
        "activation histogram, logit-lens tokens; search by latent id or token), and "
        "DIR/metrics.json",
    )
    ev.add_argument(
        "--report-latents",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="latents the browser details: all when there are at most N, else the N/2 most "
        "frequent and a uniform sample of the rest (default 4096)",
    )
    ev.add_argument(
        "--by-position",
        action="store_true",
        help="also FVU, L0, MSE and cosine by the token's position in its context window (BOS "
        "= 0), in buckets: of the scored rows of a harvested dataset (positions up to its "
        "harvest context length) and, with --splice-tokens, of the LM pass at --context-length "
        "(which may exceed the harvest's), with CE increase, CE recovered and KL by position",
    )
    ev.add_argument(
        "--scoring",
        choices=("auto", "local", "ray"),
        default="auto",
        help="where the passes over the scored rows run (reference mean; SAE, baselines, "
        "views, positions and the latent browser's tables, each chunk encoded once): local = "
        "this process; ray = Ray Data, one read task per part and an actor pool holding the "
        "models (RAY_ADDRESS, else a local Ray instance); auto = ray from 1,048,576 scored rows "
        "of a dataset (default auto)",
    )
    ev.add_argument(
        "--actors",
        type=_positive_int,
        metavar="N",
        help="with --scoring ray: model replicas (default: the cluster's GPUs, else its CPUs "
        "÷ --cpus-per-actor, at most one per part read)",
    )
    ev.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="with --scoring ray: CPUs each actor reserves (torch threads) (default 1)",
    )
    _splice_options().add(
        ev.add_argument_group(
            "SAE spliced into the LM",
            "BOS and other special tokens keep their clean residual and are not scored, as "
            "harvest does not record them (see raysae/splice.py). The model, layer, corpus and "
            "window settings not given are those --data was harvested with (its manifest); the "
            "defaults shown apply where it has none.",
        )
    )
    ev.set_defaults(func=_eval)


def _verify_options(verify: argparse.ArgumentParser) -> None:
    verify.description = (
        "Read every part of a dataset and check it against manifest.json: present, the "
        "listed size and SHA-256 (where recorded), footer, every Parquet page checksum, "
        "rows, and no NaN/Inf. Prints one line per bad part and exits 1 if there is any; "
        "progress goes to stderr. Imports no Ray."
    )
    verify.add_argument("dataset", help="a raysae dataset: a local directory or s3://bucket/prefix")
    verify.add_argument(
        "--threads", type=_positive_int, default=4, help="parts read at once (default 4)"
    )
    verify.set_defaults(func=_verify)


def _export_options(export: argparse.ArgumentParser) -> None:
    export.description = (
        "Write a trained SAE (raysae or SAELens folder) to OUT in raysae's format or "
        "SAELens's (cfg.json + sae_weights.safetensors, for sae_lens.SAE.load_from_disk), "
        "input scaling folded in; with --sweep and --frontier, every SAE on a finished "
        "sweep's Pareto frontier, one sub-folder each, plus index.json and index.csv "
        "(folder, architecture, L0, FVU, trial). The model, hook, context size and corpus "
        "the SAE was trained on go into SAELens's metadata, from the dataset named in the "
        "run's metrics.json or given with --data. SAELens architectures: relu -> standard, "
        "topk -> topk, jumprelu -> jumprelu, gated -> gated, batchtopk -> jumprelu (its "
        "inference threshold). Imports no Ray."
    )
    export.add_argument(
        "checkpoint",
        nargs="?",
        help="SAE folder, e.g. OUT/sae from raysae train, or an SAELens one",
    )
    export.add_argument("out", nargs="?", help="folder to write the SAE into")
    export.add_argument(
        "--format",
        choices=("raysae", "saelens"),  # raysae.export.FORMATS (not imported: --help stays fast)
        default=None,
        help="raysae (sae.safetensors + config.json) or saelens; default raysae for one "
        "checkpoint, saelens for --frontier",
    )
    export.add_argument(
        "--sweep", metavar="OUT/NAME", help="a finished sweep's folder (its results.parquet)"
    )
    export.add_argument(
        "--frontier",
        metavar="DEST",
        help="with --sweep: write the SAEs on the sweep's Pareto frontier to DEST/<folder>/",
    )
    export.add_argument(
        "--overall",
        action="store_true",
        help="with --frontier: the frontier over all architectures (results' pareto_all) "
        "instead of each architecture's",
    )
    export.add_argument(
        "--data",
        metavar="DATASET",
        help="the raysae dataset the SAE(s) were trained on, for SAELens's metadata "
        "(default: data.uri in the run's metrics.json next to the checkpoint)",
    )
    export.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in OUT (a folder holding anything else is never replaced)",
    )
    export.set_defaults(func=_export)


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "train": ("train one SAE from a run config (YAML)", _train_options),
    "sweep": ("run a sweep of SAEs from a spec (YAML) with Ray Tune", _sweep_options),
    "submit": ("submit a sweep to a running Ray cluster as a Ray Job", _submit_options),
    "harvest": ("record a transformers model's activations as Parquet shards", _harvest_options),
    "eval": ("evaluate a trained SAE against baselines on activations", _eval_options),
    "verify": ("check every byte of a dataset against its manifest", _verify_options),
    "export": ("write an SAE, or a sweep's Pareto frontier, in SAELens's format", _export_options),
    "meta": ("train a meta-SAE on the decoder rows of a trained SAE", _meta_options),
    "pages": ("write a sweep's page (Pareto plot, sortable table, report links)", _pages_options),
}
"""Subcommand → (one-line help, the function adding its description and options)."""


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The raysae parser. Every subcommand is listed; only those in `commands` (default: all)
    get their options, so a run builds just the one it needs."""
    parser = argparse.ArgumentParser(
        prog="raysae",
        description="Train and sweep sparse autoencoders on language-model activations with Ray.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_options) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        if commands is None or name in commands:
            add_options(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only the named subcommand's options are built: `raysae sweep` never imports harvest's
    # modules (Ray Data, torch) just to describe options it will not use.
    command = next((arg for arg in argv if arg in COMMANDS), None)
    args = build_parser([command] if command else []).parse_args(argv)
    # train and sweep stop cleanly on SIGINT and SIGTERM (raysae.interrupt); the others simply end.
    stoppable = args.command in ("train", "sweep")
    try:
        with interrupt.handle_signals() if stoppable else contextlib.nullcontext():
            return args.func(args)
    except (ConfigError, OSError, ValueError) as e:  # bad input: named in the message
        return _error(args, e, code=2)
    except interrupt.Interrupted as e:
        return _interrupted(args, argv, e)
    except KeyboardInterrupt:  # Ctrl-C in a command that leaves SIGINT to Python
        return _interrupted(args, argv, interrupt.Interrupted(signal.SIGINT))


def _interrupted(args: argparse.Namespace, argv: list[str], e: interrupt.Interrupted) -> int:
    """Say that the command stopped, and the exact command that goes on; exit 128 + signal."""
    again = shlex.join([*_program(), *argv, *e.resume_args])
    name = signal.Signals(e.signum).name
    if e.cannot_resume:
        print(
            f"raysae {args.command}: interrupted ({name}); {e.cannot_resume}, so it cannot "
            f"resume. Start it again with:\n  {again}",
            file=sys.stderr,
        )
    else:
        print(
            f"raysae {args.command}: interrupted ({name}) and stopped cleanly. Resume with:\n"
            f"  {again}",
            file=sys.stderr,
        )
    return e.exit_code


def _program() -> list[str]:
    """How this command was started: `python -m raysae` (this interpreter), else `raysae`."""
    if sys.argv and sys.argv[0].endswith(os.path.join("raysae", "__main__.py")):
        return [sys.executable, "-m", "raysae"]
    return ["raysae"]


def _error(args: argparse.Namespace, e: BaseException, code: int) -> int:
    """Tell the user what went wrong in one message (RAYSAE_TRACEBACK=1: the traceback too)."""
    if os.environ.get("RAYSAE_TRACEBACK"):
        traceback.print_exception(e)
    print(f"raysae {args.command}: error: {e}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
