"""Matryoshka BatchTopK: nested prefixes that reconstruct on their own, the loss over them,
its groups' settings, and the planted hierarchy it recovers better than BatchTopK."""

import pytest
import torch

from raysae.config import SAEConfig, ToyDataConfig, TrainConfig
from raysae.loop import fit
from raysae.saes import build_sae
from raysae.settings import ConfigError
from raysae.synthetic import ToyData, parent_recall
from raysae.views import view_metrics


def matryoshka(**kw):
    torch.manual_seed(0)
    cfg = dict(d_in=8, n_latents=24, k=4, architecture="matryoshka_batchtopk")
    return build_sae(SAEConfig(**{**cfg, **kw}))


def test_each_prefix_decodes_only_its_latents_and_the_loss_weighs_every_prefix():
    model = matryoshka(matryoshka_groups=(4, 8, 12), matryoshka_weights=(0.5, 2.0, 3.0))
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    model.init_from_sample_(x)
    out = model(x)
    dense, x_s = out.latents, x * model.input_scale
    prefixes = model.prefix_reconstructions(x_s, model._select(model._pre(x_s)))
    for end, x_hat in zip((4, 12, 24), prefixes):
        expected = dense[:, :end] @ model.W_dec[:end] + model.b_dec
        torch.testing.assert_close(x_hat, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prefixes[-1] / model.input_scale, out.x_hat)
    inner = [(p - x_s).pow(2).sum(-1).mean() for p in prefixes[:2]]
    torch.testing.assert_close(out.losses["prefix_1"], inner[1])
    torch.testing.assert_close(out.losses["matryoshka"], 0.5 * inner[0] + 2.0 * inner[1])
    total = model.total_loss(out.losses)
    torch.testing.assert_close(total, out.losses["matryoshka"] + 3.0 * out.losses["reconstruction"])
    # Training: the inner prefixes' losses reach the first group's decoder rows.
    total.backward()
    assert model.W_dec.grad[:4].abs().sum() > 0


def test_groups_are_fractions_or_counts_and_bad_ones_name_the_fix():
    assert SAEConfig(d_in=4, n_latents=64, architecture="matryoshka_batchtopk").group_bounds == (
        4,
        12,
        28,
        64,
    )
    cfg = SAEConfig(
        d_in=4, n_latents=10, architecture="matryoshka_batchtopk", k=2, matryoshka_groups=(3, 7)
    )
    assert cfg.group_bounds == (3, 10)
    with pytest.raises(ConfigError, match="sums to 0.9: give fractions summing to 1"):
        SAEConfig(
            d_in=4,
            n_latents=10,
            k=2,
            architecture="matryoshka_batchtopk",
            matryoshka_groups=(0.5, 0.4),
        )
    with pytest.raises(ConfigError, match="one weight ≥ 0 per group"):
        SAEConfig(
            d_in=4,
            n_latents=10,
            k=2,
            architecture="matryoshka_batchtopk",
            matryoshka_groups=(3, 7),
            matryoshka_weights=(1.0,),
        )
    with pytest.raises(ConfigError, match="empty group"):
        SAEConfig(
            d_in=4,
            n_latents=10,
            k=2,
            architecture="matryoshka_batchtopk",
            matryoshka_groups=(0.01, 0.99),
        )


HIERARCHY = ToyDataConfig(
    n_features=64, active_per_token=3, n_hierarchies=8, children_per_parent=4, child_probability=0.6
)


def trained_on_hierarchy(architecture: str, seed: int = 0):
    toy = ToyData(HIERARCHY, d_in=32)
    torch.manual_seed(seed)
    sae = build_sae(
        SAEConfig(d_in=32, n_latents=64, k=4, architecture=architecture, matryoshka_groups=(8, 56))
    )
    train = TrainConfig(
        total_tokens=50_000, batch_size=128, lr=1e-2, log_every_tokens=50_000, dead_tokens=20_000
    )
    fit(sae, toy.batches(128), train, log=None)
    return toy, sae


def test_matryoshka_recovers_planted_parents_that_batchtopk_absorbs(one_thread):
    toy = ToyData(HIERARCHY, d_in=32)
    _, features = toy.sample(4096)
    children_on = (features[:, toy.children] > 0).any(-1)  # (N, parents)
    assert not ((features[:, toy.children] > 0).any(-1) & (features[:, toy.parents] == 0)).any()
    assert children_on.float().mean() > 0.05

    # Over three initialisations: one init can favour either architecture, so the claim is
    # about the mean. Measured (child_probability 0.6, 50k tokens), init seeds 0-5: BatchTopK
    # 0.15 0.38 0.78 0.51 0.51 0.60 (mean 0.49), Matryoshka 0.87 0.86 0.67 0.66 0.85 0.53
    # (0.74): ahead at 5 of 6; the BatchTopK SAE's parent latent stays off on many tokens where
    # a child fires (absorbed). At child_probability 0.3 the gap appeared at seed 0 only.
    recall = {"batchtopk": [], "matryoshka_batchtopk": []}
    for seed in range(3):
        for arch in recall:
            toy, sae = trained_on_hierarchy(arch, seed)
            recall[arch].append(float(parent_recall(toy, sae).mean()))
            if arch == "matryoshka_batchtopk" and seed == 0:
                held_out = ToyData(HIERARCHY, d_in=32, stream=1).batches(4096)
                views = view_metrics(sae, held_out, 8192)
    mean = {arch: sum(r) / len(r) for arch, r in recall.items()}
    assert mean["matryoshka_batchtopk"] > mean["batchtopk"] + 0.15, recall
    # The first group alone (8 latents for 8 parents and 24 other frequent features) explains
    # part of the variance; measured ≈ 0.6.
    assert 0.2 < views["prefix_0/fvu"] < 0.95, views
