"""raysae.positions: metrics by token position, merged exactly; `raysae eval --by-position`."""

import json

import numpy as np
import pytest
import torch

from raysae import data, text
from raysae.__main__ import main
from raysae.checkpoint import save_sae
from raysae.config import SAEConfig
from raysae.lm import load_model, load_tokenizer
from raysae.positions import PositionStats, bucket_edges, l0_per_row, window_positions
from raysae.saes import build_sae
from raysae.splice import evaluate_splice


def test_bucket_edges_cover_the_context_finely_early_and_coarsely_late():
    assert bucket_edges(64) == [0, 1, 2, 4, 8, 16, 32, 48]
    edges = bucket_edges(256)
    assert edges[:10] == [0, 1, 2, 4, 8, 16, 32, 48, 64, 96] and edges[-1] == 224
    assert bucket_edges(1) == [0]


def test_window_positions_are_the_column_in_harvests_windows():
    # raysae.text cuts a document into windows of BOS + (context − 1) tokens; the position in
    # the window is the column, whatever the document position.
    excluded = np.asarray([0], dtype=np.int64)
    for bos in (7, None):
        windows = list(
            text._document_windows(3, list(range(1, 40)), length=8, bos=bos, excluded=excluded)
        )
        for w in windows:
            got = window_positions(torch.from_numpy(w.pos).long(), 8, bos is not None)
            assert got.tolist() == list(range(len(w.pos)))


def _reference(x, x_hat, pos, lo, hi):
    rows = (pos >= lo) & (pos < hi)
    xb, hb = x[rows], x_hat[rows]
    return ((xb - hb) ** 2).sum() / ((xb - xb.mean(0)) ** 2).sum()


def test_split_then_merge_equals_one_pass_and_the_definition():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g, dtype=torch.float64) + 3.0
    x_hat = x + 0.3 * torch.randn(600, 5, generator=g, dtype=torch.float64)
    latents = torch.relu(torch.randn(600, 12, generator=g))
    pos = torch.randint(0, 70, (600,), generator=g)
    edges = bucket_edges(70)
    whole = PositionStats(5, edges)
    whole.update(x, x_hat, latents, pos)
    parts = [PositionStats(5, edges) for _ in range(3)]
    for i, p in enumerate(parts):
        sl = slice(200 * i, 200 * (i + 1))
        p.update(x[sl], x_hat[sl], latents[sl], pos[sl])
    merged = parts[2].merge(parts[0]).merge(parts[1])
    for a, b in zip(whole.compute(), merged.compute()):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == (b[key] if b[key] is None else pytest.approx(b[key], rel=1e-12)), key
    rows = whole.compute()
    assert sum(r["n_tokens"] for r in rows) == 600 and rows[-1]["hi"] is None
    for r in rows:
        hi = 10**9 if r["hi"] is None else r["hi"]
        assert r["fvu"] == pytest.approx(float(_reference(x, x_hat, pos, r["lo"], hi)), rel=1e-9)
        in_bucket = (pos >= r["lo"]) & (pos < hi)
        assert r["l0"] == pytest.approx(float((latents[in_bucket] != 0).sum(-1).double().mean()))


def test_l0_of_sparse_latents_equals_dense():
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=8, n_latents=32, k=3))
    out = sae(torch.randn(50, 8))
    assert torch.equal(l0_per_row(out.sparse), l0_per_row(out.sparse.dense()))


def test_splice_by_position_adds_up_to_the_whole(tiny_model_dir):
    # Every prediction and every replaced row lands in exactly one bucket: the buckets' sums
    # are the whole run's, and positions past the training windows are reached (context 48).
    model = load_model(tiny_model_dir)
    tokenizer = load_tokenizer(tiny_model_dir)
    excluded = np.asarray(tokenizer.all_special_ids, dtype=np.int64)
    windows = text.build_windows(
        text.iter_documents("stdlib"),
        tokenizer,
        n_tokens=300,
        context_length=48,
        prepend_bos=True,
        excluded=excluded,
    )
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=32, n_latents=64, k=4))
    stats = PositionStats(32, bucket_edges(48), splice=True, end=48)
    whole = evaluate_splice(
        model, 1, sae, windows, excluded=excluded, batch_size=4, by_position=stats
    ).compute()
    rows = stats.compute()
    assert rows[0]["lo"] == 1  # BOS (position 0) stays clean: not replaced, not scored
    assert sum(r["n_tokens"] for r in rows) == 300
    assert sum(r["n_predictions"] for r in rows) == whole["n_tokens"]
    ce = sum(r["ce_spliced"] * r["n_predictions"] for r in rows) / whole["n_tokens"]
    assert ce == pytest.approx(whole["ce_spliced"], rel=1e-9)
    assert (rows[-1]["lo"], rows[-1]["hi"]) == (32, 48)  # the last bucket reached


def test_eval_by_position_on_a_harvested_dataset(tmp_path, capsys):
    # Rows as harvest writes them (document positions, windows of 8 with BOS, shuffled), an SAE
    # that reconstructs late positions worse: FVU by bucket is the definition's, per bucket.
    g = torch.Generator().manual_seed(0)
    n = 1400
    pos = torch.randint(0, 40, (n,), generator=g)
    window_pos = pos % 7 + 1
    acts = torch.randn(n, 6, generator=g)
    uri = str(tmp_path / "acts")
    data.write_dataset(
        uri,
        acts,
        dtype="float32",
        pos=pos.int(),
        token_id=torch.zeros(n, dtype=torch.int32),
        doc_id=torch.arange(n),
        rows_per_part=200,
        model="m",
        hook="h",
        layer=0,
        harvest={"context_length": 8, "prepend_bos": True},
    )
    torch.manual_seed(0)
    sae = build_sae(SAEConfig(d_in=6, n_latents=12, k=2))
    save_sae(sae, tmp_path / "sae")
    out = tmp_path / "r.json"
    argv = ["eval", str(tmp_path / "sae"), "--data", uri, "--rows", "all", "--kmeans-k", "4"]
    assert main([*argv, "--batch-size", "300", "--by-position", "--out", str(out)]) == 0
    section = json.loads(out.read_text())["by_position"]
    assert section["context_length"] == 8
    rows = section["buckets"]
    assert [(r["lo"], r["hi"]) for r in rows] == [(1, 2), (2, 4), (4, 8)]
    x = acts.double()
    with torch.no_grad():
        x_hat = sae(acts).x_hat.double()
    for r in rows:
        expected = _reference(x, x_hat, window_pos, r["lo"], r["hi"])
        assert r["fvu"] == pytest.approx(float(expected), rel=1e-6)
    assert "by token position in the window" in capsys.readouterr().out
    # Data without positions: named, with what to do.
    toy = str(tmp_path / "plain")
    data.write_dataset(toy, acts, dtype="float32", rows_per_part=700)
    argv[3] = toy
    assert main([*argv, "--by-position"]) == 2
    assert "records no token positions" in capsys.readouterr().err
    assert main([*argv, "--report", "s3://bucket/report"]) == 2
    assert "the report is a local folder" in capsys.readouterr().err
