"""`raysae eval` end to end, its data sources and errors, and the no-miracle-on-noise bound."""

import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import special, stats

from raysae import data
from raysae.__main__ import main
from raysae.checkpoint import load_sae, save_sae
from raysae.config import SAEConfig, TrainConfig, load_run_config
from raysae.evaluate import DataSourceError, evaluate_with_baselines
from raysae.loop import fit
from raysae.pages import read_js
from raysae.saes import build_sae
from raysae.synthetic import HELD_OUT_STREAM, ToyData

TINY = """
sae: {architecture: topk, d_in: 16, n_latents: 64, k: 4}
train: {total_tokens: 20000, batch_size: 500, log_every_tokens: 10000, init_tokens: 1000}
data: {toy: {n_features: 32, active_per_token: 3}}
"""

RECONSTRUCTION_KEYS = {
    "fvu",
    "fvu_b",
    "explained_variance",
    "mse",
    "cos_sim",
    "l2_ratio",
    "relative_reconstruction_bias",
    "n_tokens",
}
SPARSITY_KEYS = {"l0", "l1", "dead_fraction", "dense_fraction", "frequency_histogram"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny TopK SAE trained on toy data by `raysae train`; returns (run config, checkpoint)."""
    root = tmp_path_factory.mktemp("eval")
    cfg = root / "run.yaml"
    cfg.write_text(TINY)
    assert main(["train", str(cfg), "--out", str(root / "out")]) == 0
    return cfg, root / "out" / "sae"


def test_eval_on_toy_prints_and_writes_every_metric(trained, tmp_path, capsys):
    cfg, ckpt = trained
    out = tmp_path / "report.json"
    assert (
        main(
            [
                "eval",
                str(ckpt),
                "--data",
                f"toy:{cfg}",
                "--tokens",
                "3000",
                "--batch-size",
                "1000",
                "--pca-k",
                "2",
                "4",
                "--kmeans-k",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["n_tokens"] == 3000
    assert RECONSTRUCTION_KEYS | SPARSITY_KEYS <= set(report["sae"])
    assert len(report["sae"]["latent_frequencies"]) == 64
    assert set(report["baselines"]) == {
        "mean",
        "pca_k=2",
        "pca_k=4",
        "kmeans_K=16",
        "kmeans_K=16_scaled",
    }
    for name, metrics in report["baselines"].items():
        assert RECONSTRUCTION_KEYS <= set(metrics), name
        assert name in printed
    assert report["rows"] == "held-out" and report["scored_rows"] == "held-out stream"
    assert report["fit_rows"] == "the training stream" and report["fit_tokens"] == 3000
    b = report["baselines"]
    # The training stream's mean, scored on the held-out stream: just above 1 (1 in-sample).
    assert 1.0 < b["mean"]["fvu"] < 1.01 and b["mean"]["l0"] == 0
    assert b["pca_k=4"]["fvu"] <= b["pca_k=2"]["fvu"] and b["pca_k=4"]["l0"] == 4
    assert b["kmeans_K=16_scaled"]["fvu"] <= b["kmeans_K=16"]["fvu"] + 1e-9
    assert b["kmeans_K=16"]["l0"] == 1
    assert 0 < report["sae"]["fvu"] < b["pca_k=4"]["fvu"]  # the SAE beats PCA at its own L0
    geometry = report["decoder_geometry"]
    assert geometry["decoder"]["count"] == geometry["random_baseline"]["count"] == 64
    assert report["feature_recovery"]["fraction_recovered"] > 0.5
    for text in (
        "fvu_b†",
        "legacy",
        "l1: mean over tokens of Σ_i |f_i|·‖d_i‖",
        "max cos to another latent",
        "random directions",
        "toy features recovered",
        "never fired",
        "3,000 tokens, held-out stream",
        "baselines fitted on 3,000 tokens, the training stream",
    ):
        assert text in printed


def test_default_baselines_follow_the_sae(trained, capsys):
    cfg, ckpt = trained
    assert (
        main(
            [
                "eval",
                str(ckpt),
                "--data",
                f"toy:{cfg}",
                "--tokens",
                "1000",
                "--kmeans-tokens",
                "200",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "pca_k=4" in printed  # the SAE's measured L0 (k = 4)
    assert "kmeans_K=50 " in printed  # n_latents = 64, capped at 200 / 4


PARTS, ROWS_PER_PART, HELD_OUT = 6, 400, 2


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory):
    """A dataset of 6 parts whose last 2 (held out) are shifted, and a ReLU SAE trained on it by
    `raysae train --local` (data.eval_parts: 2); returns (dataset uri, checkpoint, acts)."""
    root = tmp_path_factory.mktemp("eval_dataset")
    g = torch.Generator().manual_seed(0)
    acts = 5.0 * torch.randn(PARTS * ROWS_PER_PART, 16, generator=g) + 2.0
    acts[-HELD_OUT * ROWS_PER_PART :] += 3.0  # held-out rows differ: fitting on them shows
    uri = str(root / "acts")
    data.write_dataset(uri, acts, dtype="float32", rows_per_part=ROWS_PER_PART)
    cfg = root / "run.yaml"
    cfg.write_text(
        "sae: {architecture: relu, d_in: 16, n_latents: 64, l1_coefficient: 2.0}\n"
        "train: {total_tokens: 4800, batch_size: 400, log_every_tokens: 4800, "
        "init_tokens: 400}\n"
        f"data: {{uri: {uri}, eval_parts: {HELD_OUT}}}\n"
    )
    assert main(["train", str(cfg), "--local", "--out", str(root / "out")]) == 0
    return uri, root / "out" / "sae", acts.double().numpy()


def run_eval(ckpt, uri, tmp_path, *args) -> dict:
    out = tmp_path / "r.json"
    argv = ["eval", str(ckpt), "--data", uri, "--batch-size", "300", "--kmeans-k", "8"]
    assert main([*argv, "--pca-k", "3", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_scores_the_held_out_parts_with_baselines_fitted_on_the_training_parts(
    dataset_run, tmp_path, capsys
):
    uri, ckpt, acts = dataset_run
    report = run_eval(ckpt, uri, tmp_path)
    n_train = (PARTS - HELD_OUT) * ROWS_PER_PART
    train, held = acts[:n_train], acts[n_train:]
    assert report["rows"] == "held-out"
    assert report["n_tokens"] == len(held) == report["sae"]["n_tokens"]
    assert report["fit_tokens"] == n_train
    assert report["scored_rows"].startswith(f"held-out: the last {HELD_OUT} of {PARTS} parts")
    printed = capsys.readouterr().out
    assert f"{len(held):,} tokens, held-out: the last 2 of 6 parts (data.eval_parts" in printed
    assert f"baselines fitted on {n_train:,} tokens, training rows: the first 4 of 6" in printed
    # The mean and PCA baselines are exactly those of the training rows, scored on held-out.
    mu_t, mu_h = train.mean(0), held.mean(0)
    tss = ((held - mu_h) ** 2).sum()
    b = report["baselines"]
    assert b["mean"]["fvu"] == pytest.approx(((held - mu_t) ** 2).sum() / tss, rel=1e-9)
    assert b["mean"]["fvu"] > 1.1  # fitted on the scored rows it would be 1
    top = np.linalg.eigh(np.cov(train.T, bias=True))[1][:, ::-1][:, :3]
    pca_hat = mu_t + (held - mu_t) @ top @ top.T
    assert b["pca_k=3"]["fvu"] == pytest.approx(((held - pca_hat) ** 2).sum() / tss, rel=1e-6)
    # The same rows and the same definitions as training's held-out evaluation (metrics.json),
    # on the folded checkpoint: FVU, L0 and l1 agree (l1 differed by the input scale before).
    trained = json.loads((ckpt.parent / "metrics.json").read_text())["eval"]
    assert trained["n_tokens"] == report["n_tokens"]
    for key in ("fvu", "l0", "l1"):
        assert report["sae"][key] == pytest.approx(trained[key], rel=1e-5), key


def test_eval_scores_every_row_on_request_and_says_so(dataset_run, tmp_path, capsys):
    uri, ckpt, acts = dataset_run
    report = run_eval(ckpt, uri, tmp_path, "--rows", "all")
    assert report["rows"] == "all" and report["scored_rows"] == f"all {PARTS} parts"
    assert report["n_tokens"] == len(acts)
    assert report["fit_tokens"] == (PARTS - HELD_OUT) * ROWS_PER_PART  # still training rows
    assert f"{len(acts):,} tokens, all 6 parts" in capsys.readouterr().out


def test_which_rows_were_held_out_must_be_known(dataset_run, tmp_path, capsys):
    uri, ckpt, acts = dataset_run
    moved = tmp_path / "sae"  # a checkpoint without its run's metrics.json
    shutil.copytree(ckpt, moved)
    argv = ["eval", str(moved), "--data", uri, "--kmeans-k", "8"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot tell which rows of {uri}" in err and "--eval-parts N" in err
    assert main([*argv, "--eval-parts", "0"]) == 2
    assert "held out no part" in capsys.readouterr().err
    assert main([*argv, "--eval-parts", "6"]) == 2
    assert "has 6 part(s) but --eval-parts is 6" in capsys.readouterr().err
    report = run_eval(moved, uri, tmp_path, "--eval-parts", "1")
    assert report["n_tokens"] == ROWS_PER_PART and report["fit_tokens"] == 5 * ROWS_PER_PART
    report = run_eval(moved, uri, tmp_path, "--rows", "all")
    assert report["n_tokens"] == report["fit_tokens"] == len(acts)
    assert "in-sample" in report["fit_rows"]


def test_dataset_of_the_wrong_width_is_named(trained, tmp_path, capsys):
    _, ckpt = trained
    uri = str(tmp_path / "acts")
    data.write_dataset(uri, torch.randn(200, 12), rows_per_part=100)
    assert main(["eval", str(ckpt), "--data", uri, "--rows", "all", "--batch-size", "100"]) == 2
    assert re.search(
        r"shape \(100, 12\), but the SAE takes \(B, d_in=16\)", capsys.readouterr().err
    )


def test_toy_data_have_no_all_rows(trained, capsys):
    cfg, ckpt = trained
    assert main(["eval", str(ckpt), "--data", f"toy:{cfg}", "--rows", "all"]) == 2
    assert "toy data are endless streams" in capsys.readouterr().err


def test_toy_data_are_not_scored_on_ray(trained, capsys):
    cfg, ckpt = trained
    assert main(["eval", str(ckpt), "--data", f"toy:{cfg}", "--scoring", "ray"]) == 2
    assert "toy data are scored here: use --scoring local" in capsys.readouterr().err


def test_toy_config_of_another_width_is_named(trained, tmp_path, capsys):
    _, ckpt = trained
    other = tmp_path / "other.yaml"
    other.write_text(TINY.replace("d_in: 16", "d_in: 8"))
    assert main(["eval", str(ckpt), "--data", f"toy:{other}"]) == 2
    assert "sae.d_in=8 there but the checkpoint has d_in=16" in capsys.readouterr().err


def test_a_stream_that_does_not_restart_identically_is_refused():
    torch.manual_seed(0)
    model = build_sae(SAEConfig(d_in=4, n_latents=8, k=2))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DataSourceError, match="different tokens on its second pass"):
        evaluate_with_baselines(
            model,
            lambda: iter([torch.randn(50, 4)]),
            lambda: iter([torch.randn(50, 4, generator=g)]),
            50,
            pca_ks=[1],
            kmeans_ks=[2],
        )


def union_bound_explained_variance(d: int, n: int, k: int) -> float:
    """A ceiling on the explained variance of any TopK SAE (n latents, ≤ k active, any b_dec) on
    held-out isotropic Gaussian data in d dimensions.

    x − x̂ = z − s with z = x − μ and s in span(S ∪ {μ − b_dec}) for the token's active set S,
    so the error is at least z's distance to one of C(n, k) subspaces of dimension k + 1, fixed
    before the held-out data are drawn. For z/‖z‖ uniform on the sphere (independent of ‖z‖)
    the captured fraction in a fixed subspace is Beta((k+1)/2, (d−k−1)/2), and
    E max_S ≤ t + C(n, k) · P(Beta > t) for every t.
    """
    log_subspaces = special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)
    t = np.linspace(0.0, 1.0, 10_001)
    log_tail = log_subspaces + stats.beta.logsf(t, (k + 1) / 2, (d - k - 1) / 2)
    tail = np.exp(np.minimum(0.0, log_tail))
    return float(np.min(t + tail))


def test_no_miracle_on_gaussian_noise():
    # Isotropic N(μ, I) with a large mean (‖μ‖ = 10·√d): no dictionary can explain much of it.
    # Measured (d=64, n=128, k=2, 100k tokens): SAE explained variance 0.177 (0.176–0.182 over
    # lr 3e-3..1.4e-2 and 2 seeds; 1 − FVU_B the same), PCA-2 0.035, PCA-3 0.052, best-scaled
    # k-means with K=128 0.128, union-bound ceiling 0.394. The SAE beats PCA at equal L0 because
    # it picks its 2 directions per token out of 128 (as k-means picks 1), which is real; the
    # bounds below leave ~40 % headroom over the measurement. The variance about zero instead
    # of μ would report 0.993 here.
    d, n, k = 64, 128, 2
    mu = torch.zeros(d)
    mu[0] = 10 * math.sqrt(d)

    def stream(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            yield mu + torch.randn(1024, d, generator=g)

    torch.manual_seed(0)
    model = build_sae(SAEConfig(d_in=d, n_latents=n, k=k))
    fit(
        model,
        stream(0),
        TrainConfig(
            total_tokens=100_000,
            batch_size=1024,
            lr=7e-3,
            log_every_tokens=100_000,
            init_tokens=4096,
            dead_tokens=50_000,
        ),
        log=lambda s: None,
    )
    report = evaluate_with_baselines(
        model, lambda: stream(2), lambda: stream(1), 16_384, pca_ks=[k, k + 1], kmeans_ks=[n]
    )
    sae, pca = report["sae"], report["baselines"][f"pca_k={k}"]
    ceiling = union_bound_explained_variance(d, n, k)
    assert 0.35 < ceiling < 0.45  # 0.394
    assert sae["explained_variance"] <= ceiling and 1 - sae["fvu_b"] <= ceiling
    assert (
        sae["explained_variance"] <= 0.25
        and sae["explained_variance"] - pca["explained_variance"] <= 0.2
    )
    assert abs(pca["explained_variance"] - k / d) < 0.02  # PCA on noise: k of d dimensions
    assert report["baselines"]["mean"]["fvu"] == pytest.approx(1.0, abs=1e-3)  # fitted on stream 2
    # The field's bug, for contrast: variance about zero makes the same SAE look perfect.
    x = next(stream(1))
    x_hat = model(x).x_hat.detach()
    assert 1 - float((x - x_hat).pow(2).sum() / x.pow(2).sum()) > 0.99


def test_eval_of_an_untrained_checkpoint_runs(tmp_path, capsys):
    # A fresh SAE (b_dec = 0, input scale 1) on toy data: metrics are finite, FVU above 1 is fine.
    torch.manual_seed(0)
    save_sae(build_sae(SAEConfig(d_in=16, n_latents=32, k=4, architecture="relu")), tmp_path / "s")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY)
    assert (
        main(
            [
                "eval",
                str(tmp_path / "s"),
                "--data",
                f"toy:{cfg}",
                "--tokens",
                "500",
                "--kmeans-k",
                "4",
                "--out",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert math.isfinite(report["sae"]["fvu"]) and report["sae"]["l0"] > 0


def test_report_top_contexts_of_planted_features_are_where_they_fire(trained, tmp_path):
    # The latent browser's must-show: for each planted toy feature, the latent whose decoder
    # row matches it best has top contexts (read back from the browser's data files) on tokens
    # where that feature was active, far above the feature's base rate.
    cfg, ckpt = trained
    out = tmp_path / "report"
    argv = ["eval", str(ckpt), "--data", f"toy:{cfg}", "--tokens", "3000", "--batch-size", "1000"]
    assert main([*argv, "--kmeans-k", "8", "--report", str(out)]) == 0
    run = load_run_config(cfg)
    toy = ToyData(run.data.toy, 16, stream=HELD_OUT_STREAM)  # the scored stream, regenerated
    active = torch.cat([toy.sample(1000)[1] for _ in range(3)]) > 0  # (rows, features)
    W = load_sae(ckpt).W_dec.detach()
    cos = (
        torch.nn.functional.normalize(toy.directions, dim=1)
        @ torch.nn.functional.normalize(W, dim=1).T
    )
    best_cos, best = cos.max(1)
    latents = read_js(out / "latents" / "shard-00000.js")[1]["latents"]
    fractions, base = [], []
    for feature in range(len(best)):
        if best_cos[feature] < 0.9:
            continue
        rows = [c[1] for c in latents[str(int(best[feature]))]["top"]]
        assert len(rows) == 12
        fractions.append(float(active[rows, feature].float().mean()))
        base.append(float(active[:, feature].float().mean()))
    assert len(fractions) >= 0.8 * len(best)
    # Measured: all 32 features recovered; 29 with 12 of 12 top contexts on active tokens, 3
    # with 11 of 12 (mean 0.992); base rates 8-11 %.
    assert min(fractions) >= 0.75 and np.mean(fractions) >= 0.9, fractions
    assert max(base) < 0.3


def test_pages_reports_writes_each_finished_saes_report_and_links_it(trained, tmp_path):
    cfg, ckpt = trained
    member = tmp_path / "sweep" / "trials" / "trial-a" / "m0"
    shutil.copytree(ckpt.parent, member)  # sae/ and the run's metrics.json (toy data)
    rows = [
        {
            "architecture": "topk",
            "k": 4,
            "l0": 4.0,
            "fvu": 0.2,
            "pareto": True,
            "status": "finished",
            "checkpoint": str(member / "sae"),
        },
        {
            "architecture": "topk",
            "k": 2,
            "l0": None,
            "fvu": None,
            "pareto": False,
            "status": "error",
            "checkpoint": None,
        },
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "sweep" / "results.parquet")
    assert main(["pages", str(tmp_path / "sweep"), "--reports", "--tokens", "1000"]) == 0
    metrics = json.loads((member / "report" / "metrics.json").read_text())
    assert metrics["n_tokens"] == 1000 and metrics["history"]  # the run's training curves
    page = (tmp_path / "sweep" / "index.html").read_text()
    assert "href='trials/trial-a/m0/report/index.html'" in page and "k=4" in page
