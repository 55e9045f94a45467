"""`raysae train`: build the data stream and the SAE from a RunConfig, train, write the results.

Output directory layout:
    OUT/sae/            the trained SAE, input scale folded in (safetensors + config.json)
    OUT/metrics.json    the config, the training log, held-out evaluation, toy-feature recovery
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from raysae.checkpoint import save_sae
from raysae.config import RunConfig, to_dict
from raysae.evaluate import data_mean, evaluate
from raysae.metrics import scalars
from raysae.saes import build_sae
from raysae.synthetic import HELD_OUT_STREAM, ToyData, feature_recovery
from raysae.trainer import fit

EVAL_TOKENS = 65_536
"""Held-out tokens evaluated at the end of a run."""


class OutputExistsError(FileExistsError):
    """The output directory already holds results."""


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier run's results unless told to."""
    if (out / "metrics.json").exists() and not overwrite:
        raise OutputExistsError(f"{out} already holds a finished run (metrics.json); "
                                "choose another --out or pass --overwrite")


def run_single_process(cfg: RunConfig, out: str | Path, overwrite: bool = False,
                       log: Callable[[str], None] = print) -> dict:
    """Train one SAE in this process; write OUT/sae and OUT/metrics.json; return the metrics."""
    out = Path(out)
    check_output_dir(out, overwrite)
    if cfg.data.toy is None:
        raise NotImplementedError(
            "data.uri: reading activation shards needs raysae.shards (the data-plane issue); "
            "use data.toy for now")
    toy = ToyData(cfg.data.toy, cfg.sae.d_in)
    torch.manual_seed(cfg.train.seed)
    model = build_sae(cfg.sae)
    log(f"training {cfg.sae.architecture} SAE d_in={cfg.sae.d_in} n_latents={cfg.sae.n_latents} "
        f"on toy data for {cfg.train.total_tokens:,} tokens")
    t0 = time.perf_counter()
    history = fit(model, toy.batches(cfg.train.batch_size), cfg.train, log=log)
    wall = time.perf_counter() - t0

    # Held out: another token stream over the same features, read twice: its mean first, so
    # the legacy FVU_B is measured about the held-out data's own mean.
    def held_out():
        return ToyData(cfg.data.toy, cfg.sae.d_in, stream=HELD_OUT_STREAM).batches(
            cfg.train.batch_size)
    metrics = evaluate(model, held_out(), EVAL_TOKENS,
                       reference_mean=data_mean(held_out(), EVAL_TOKENS, cfg.sae.d_in))
    recovery = feature_recovery(toy.directions, model.W_dec)
    model.fold_input_scale_()
    result = {
        "config": to_dict(cfg),
        "wall_s": wall,
        "tokens": history[-1]["tokens"] if history else 0,
        "eval": metrics,
        "feature_recovery": {k: v for k, v in recovery.items() if k != "max_cos"},
        "history": history,
    }
    save_sae(model, out / "sae", metadata={"tokens": result["tokens"], "eval": scalars(metrics)})
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    log(summary(result))
    return result


def summary(result: dict) -> str:
    """A few lines for the console at the end of a run."""
    e = result["eval"]
    lines = [f"done: {result['tokens']:,} tokens in {result['wall_s']:.1f} s",
             f"held-out: fvu {e['fvu']:.4f} (explained variance {e['explained_variance']:.4f}) "
             f"l0 {e['l0']:.2f} dead {e['dead_fraction']:.3f} dense {e['dense_fraction']:.3f}"]
    rec = result.get("feature_recovery")
    if rec:
        lines.append(f"toy features recovered (max cos ≥ {rec['threshold']}): "
                     f"{rec['fraction_recovered']:.1%}, mean max cos {rec['mean_max_cos']:.3f}")
    return "\n".join(lines)
