"""Every architecture: shapes, gradients, decoder constraint, checkpoints, scale folding,
and the invariants that define it."""

import pytest
import torch

from raysae.checkpoint import load_sae, save_sae
from raysae.config import SAEConfig, TrainConfig
from raysae.saes import ARCHITECTURES, build_sae
from raysae.saes.base import geometric_median
from raysae.saes.topk import auxk_loss
from raysae.step import TrainState, make_optimizer, train_step

D, N, K = 16, 48, 4


def make(arch: str, **kw):
    torch.manual_seed(0)
    return build_sae(SAEConfig(d_in=D, n_latents=N, k=K, architecture=arch, **kw))


def data(b=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(b, D, generator=g)


def trained(arch, steps=3, **kw):
    model = make(arch, **kw)
    x = data()
    model.init_from_sample_(x)
    cfg = TrainConfig(total_tokens=10_000, batch_size=64, lr=1e-2, dead_tokens=64)
    opt, state = make_optimizer(model, cfg), TrainState.fresh(N)
    for _ in range(steps):
        train_step(model, opt, x, state, cfg)
    return model, x


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_backward_shapes_and_finite_grads(arch):
    model = make(arch)
    x = data()
    out = model(x, dead_mask=torch.ones(N, dtype=torch.bool))
    assert out.x_hat.shape == x.shape and out.latents.shape == (64, N)
    assert "reconstruction" in out.losses
    model.total_loss(out.losses).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.W_dec.grad.abs().sum() > 0 and model.W_enc.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoder_rows_unit_norm_after_a_step(arch):
    model, _ = trained(arch, steps=2)
    torch.testing.assert_close(model.W_dec.norm(dim=-1), torch.ones(N))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_gives_identical_outputs(arch, tmp_path):
    model, x = trained(arch)
    model.eval()
    save_sae(model, tmp_path / "ckpt", metadata={"note": "test"})
    loaded = load_sae(tmp_path / "ckpt").eval()
    assert loaded.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    a, b = model(x), loaded(x)
    assert torch.equal(a.x_hat, b.x_hat) and torch.equal(a.latents, b.latents)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folding_the_input_scale_keeps_the_reconstruction(arch):
    model, x = trained(arch)
    model.eval()
    assert float(model.input_scale) != pytest.approx(1.0)  # the data has E‖x‖² ≫ d_in
    s = float(model.input_scale)
    with torch.no_grad():
        before = model(x)
        model.fold_input_scale_()
        after = model(x)
    assert float(model.input_scale) == 1.0
    torch.testing.assert_close(after.x_hat, before.x_hat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after.latents, before.latents / s, rtol=1e-4, atol=1e-5)


def test_init_scales_inputs_to_d_in_and_sets_b_dec():
    model = make("topk", b_dec_init="mean")
    x = data(512)
    model.init_from_sample_(x)
    x_s = x * model.input_scale
    assert float(x_s.pow(2).sum(-1).mean()) == pytest.approx(D, rel=1e-5)
    torch.testing.assert_close(model.b_dec.detach(), x_s.mean(0))


def test_geometric_median_resists_outliers():
    # 200 points on the unit circle and one far outlier: the mean moves ~5e3 away, the
    # geometric median moves less than ~1/200 · (circle radius) towards it.
    angle = torch.linspace(0, 2 * torch.pi, 201, dtype=torch.float64)[:-1]
    x = torch.cat(
        [
            torch.stack([angle.cos(), angle.sin()], -1),
            torch.tensor([[1e6, 1e6]], dtype=torch.float64),
        ]
    )
    m = geometric_median(x)
    assert m.norm() < 0.02 and x.mean(0).norm() > 1e3


def test_parallel_gradient_component_is_removed():
    model = make("relu")
    model.W_dec.grad = torch.randn(N, D)
    model.remove_parallel_decoder_grad_()
    dots = (model.W_dec.grad * model.W_dec).sum(-1)
    torch.testing.assert_close(dots, torch.zeros(N), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block_rows", [1, 3, N - 1, N])
def test_parallel_gradient_removal_in_row_blocks_is_the_plain_projection(monkeypatch, block_rows):
    # The CPU path works in row blocks; any block size (a ragged last block included) must give
    # g − (g·w) w row by row, as computed here in one piece in float64.
    import raysae.saes.base as base

    monkeypatch.setattr(base, "_DOT_BLOCK_ELEMENTS", block_rows * D)
    model = make("topk")
    grad = torch.randn(N, D, generator=torch.Generator().manual_seed(block_rows))
    model.W_dec.grad = grad.clone()
    model.remove_parallel_decoder_grad_()
    g, w = grad.double(), model.W_dec.detach().double()
    expected = g - (g * w).sum(-1, keepdim=True) * w
    torch.testing.assert_close(model.W_dec.grad.double(), expected, atol=1e-5, rtol=1e-5)


def test_topk_at_most_k_per_token_and_batch_independent():
    model, x = trained("topk")
    latents = model(x).latents
    assert ((latents != 0).sum(-1) <= K).all()
    alone = model(x[:1]).latents
    torch.testing.assert_close(alone, latents[:1])
    torch.testing.assert_close(model.encode(x[5:9]), latents[5:9])


def test_topk_sparse_reconstruction_equals_dense_decode():
    model, x = trained("topk")
    out = model(x)
    torch.testing.assert_close(out.x_hat, model.decode(out.latents), rtol=1e-5, atol=1e-5)


def test_batchtopk_total_nonzeros_at_most_k_times_batch_and_threshold_at_inference():
    model, x = trained("batchtopk")
    model.train()
    latents = model(x).latents
    assert int((latents != 0).sum()) <= K * x.shape[0]
    assert float(model.threshold) > 0
    model.eval()
    inference = model(x).latents
    nonzero = inference[inference != 0]
    assert (nonzero > model.threshold).all()
    # Inference does not depend on the rest of the batch.
    torch.testing.assert_close(model(x[:3]).latents, inference[:3])
    torch.testing.assert_close(model(x).x_hat, model.decode(inference), rtol=1e-5, atol=1e-5)


def test_jumprelu_latents_are_zero_or_above_threshold_and_threshold_learns():
    model, x = trained("jumprelu", jumprelu_init_threshold=0.5, jumprelu_bandwidth=2.0)
    latents = model(x).latents
    theta = model.threshold.detach()
    ok = (latents == 0) | (latents > theta)
    assert ok.all()
    assert (latents != 0).any()
    assert not torch.allclose(theta, torch.full_like(theta, 0.5))  # the STE moved θ


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_latents_are_never_negative(arch):
    """train_step counts a latent as fired when its batch max is > 0: that needs latents ≥ 0."""
    model, x = trained(arch)
    latents = model(x).latents
    assert (latents >= 0).all() and (latents > 0).any()


def test_gated_aux_loss_does_not_train_the_decoder():
    model = make("gated")
    out = model(data())
    grad = torch.autograd.grad(out.losses["gated_aux"], model.W_dec, allow_unused=True)[0]
    assert grad is None or torch.all(grad == 0)
    grad_enc = torch.autograd.grad(model(data()).losses["gated_aux"], model.W_enc)[0]
    assert grad_enc.abs().sum() > 0


def test_auxk_reconstructs_the_residual_without_b_dec():
    torch.manual_seed(0)
    B, n, d = 8, 10, 4
    pre = torch.randn(B, n)
    W = torch.randn(n, d)
    residual = torch.randn(B, d)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[[1, 4, 7]] = True
    loss = auxk_loss(pre, dead, residual, W, k_aux=2)
    vals, idx = pre[:, dead].topk(2, dim=-1)
    e_hat = torch.zeros(B, n).scatter(1, torch.tensor([1, 4, 7])[idx], vals.relu()) @ W
    expected = (e_hat - residual).pow(2).sum(-1).mean() / (residual - residual.mean(0)).pow(2).sum(
        -1
    ).mean()
    torch.testing.assert_close(loss, expected)
    assert auxk_loss(pre, torch.zeros(n, dtype=torch.bool), residual, W, 2) is None


def test_topk_uses_auxk_only_when_latents_are_dead():
    model = make("topk")
    x = data()
    assert "auxk" not in model(x, dead_mask=torch.zeros(N, dtype=torch.bool)).losses
    assert model(x, dead_mask=torch.ones(N, dtype=torch.bool)).losses["auxk"] > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_wrong_width_is_a_clear_error(arch):
    with pytest.raises(ValueError, match=r"shape \(4, 7\), expected \(batch, d_in=16\)"):
        make(arch)(torch.randn(4, 7))


def test_load_rejects_a_checkpoint_of_another_architecture(tmp_path):
    save_sae(make("topk"), tmp_path / "a")
    save_sae(make("gated"), tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    with pytest.raises(ValueError, match="do not match architecture 'topk'"):
        load_sae(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="not a raysae SAE checkpoint"):
        load_sae(tmp_path / "missing")
