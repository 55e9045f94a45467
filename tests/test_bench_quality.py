"""bench/quality.py: its one evaluator gives the known answers, and a raysae run (with an
ablation variant) trains and is judged on held-out parts only."""

import pytest
import torch
from bench_scripts import load_bench

from raysae import data


def test_evaluator_known_answers():
    bench = load_bench("quality")
    held = torch.randn(300, 8) + 2.0
    mean = held.mean(0)

    def trained(reconstruct):
        return bench.Trained("t", reconstruct, n_latents=4, seconds=0.0)

    dense = torch.zeros(300, 4)
    dense[:, 1] = 1.0
    exact = bench.evaluate(trained(lambda x: (x, dense[: x.shape[0]])), held, chunk=128)
    assert exact == {"fvu": 0.0, "l0": 1.0, "dead": 0.75}
    as_mean = bench.evaluate(trained(lambda x: (mean.expand_as(x), dense[: x.shape[0]])), held)
    assert as_mean["fvu"] == pytest.approx(1.0, rel=1e-6)
    # top-k form: two entries per token, one of them clipped to 0 by the ReLU
    values = torch.tensor([[0.5, 0.0]]).expand(300, 2)
    indices = torch.tensor([[2, 3]]).expand(300, 2)
    topk = bench.evaluate(
        trained(lambda x: (x, bench.TopKActs((values[: len(x)], indices[: len(x)])))), held
    )
    assert topk["l0"] == 1.0 and topk["dead"] == 0.75


def test_raysae_run_and_variant_on_a_small_dataset(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(64, 16, generator=g), dim=-1)
    codes = torch.rand(3000, 64, generator=g) * (torch.rand(3000, 64, generator=g) < 0.06)
    data.write_dataset(
        str(tmp_path / "d"), (codes @ features).half(), dtype="float16", rows_per_part=1000
    )
    load_bench("quality").main(
        [
            "--data", str(tmp_path / "d"), "--eval-parts", "1", "--n-latents", "64", "--k", "4",
            "--batch", "100", "--impls", "raysae", "--variant", "no clip: train.grad_clip=0",
            "--threads", "1", "--cli",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "2,000 training rows (2,000 trained on, 20 batches of 100), 1,000 held out" in out
    rows = [line for line in out.splitlines() if line.startswith("| raysae")]
    assert len(rows) == 3 and "train.grad_clip=0" in rows[1]
    assert rows[2].startswith("| raysae train --local |")  # the command, end to end
    fvu = [float(r.split("|")[3]) for r in rows]
    assert all(0 < f < 1 for f in fvu) and fvu[0] != fvu[1]


def test_bad_variant_is_a_clear_error():
    with pytest.raises(SystemExit, match="expected sae.FIELD or train.FIELD"):
        load_bench("quality").train_raysae([torch.zeros(4, 8)], 8, 16, 2, 0, {"lr": "1"})


def test_shared_init_is_raysaes_initial_sae_in_input_units():
    """--init shared hands the peers raysae's initial SAE with its input scale folded in: the
    same reconstruction of raw activations, unit decoder rows."""
    from raysae.config import SAEConfig
    from raysae.saes import build_sae
    from raysae.saes.sparse import sparse_decode, topk_encode

    bench = load_bench("quality")
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(64, 16, generator=g) * 7.0 + 3.0 for _ in range(3)]
    shared = bench.shared_init(batches, 16, 48, 4, seed=5)
    torch.manual_seed(5)
    model = build_sae(SAEConfig(d_in=16, n_latents=48, k=4))
    model.init_from_sample_(torch.cat(batches))
    assert float(model.input_scale) != 1.0  # there was a scale to fold
    x = batches[0]
    values, indices, _ = topk_encode(x - shared["b_dec"], shared["W_enc"], shared["b_enc"], 4)
    x_hat = sparse_decode(indices, values, shared["W_dec"]) + shared["b_dec"]
    torch.testing.assert_close(x_hat, model(x).x_hat.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(shared["W_dec"].norm(dim=-1), torch.ones(48))
