"""The GPU path's mixed precision (`train.autocast`), checked on CPU at a small size (torch
autocasts to bfloat16 on CPU too) and again on CUDA when the machine has a device; the CUDA
cases skip cleanly without one. bench/gpu.py's own bf16-vs-fp32 check runs at its --small size."""

import copy

import pytest
import torch
import torch.nn.functional as F
from bench_scripts import load_bench

from raysae.config import SAEConfig, TrainConfig
from raysae.saes import build_sae
from raysae.saes.sparse import topk_encode
from raysae.settings import ConfigError
from raysae.step import TrainState, autocast, make_optimizer, train_step

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
BF16 = TrainConfig(total_tokens=10**6, batch_size=64, autocast="bfloat16", dead_tokens=10**9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16", [False, True])
def test_sparse_topk_backward_under_autocast_matches_dense_autograd(device, bf16):
    """The sparse encoder backward, run under the forward's autocast, gives plain autograd's
    gradients for the same bfloat16 GEMM (the same top-k chosen), AuxK's dense term included;
    and in float32 without autocast, to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    x, W, b = (torch.randn(*s, generator=g) for s in [(48, 32), (256, 32), (256,)])
    w_vals, w_pre = torch.randn(48, 8, generator=g), torch.randn(48, 256, generator=g)

    def grads(encode):
        leaves = [t.clone().to(device).requires_grad_() for t in (x, W, b)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            values, indices, pre = encode(*leaves)
            loss = (values * w_vals.to(device)).sum() + (pre * w_pre.to(device)).sum() / 100
        loss.backward()
        return pre.dtype, indices, [t.grad for t in leaves]

    def dense(x, W, b):
        pre = F.linear(x, W, b)
        values, indices = pre.topk(8, dim=-1, sorted=False)
        return values.relu(), indices, pre

    dtype, idx, fast = grads(lambda x, W, b: topk_encode(x, W, b, 8))
    _, idx_ref, ref = grads(dense)
    assert dtype == (torch.bfloat16 if bf16 else torch.float32)  # the GEMM's dtype
    assert torch.equal(idx.sort(-1).values, idx_ref.sort(-1).values)
    for name, a, r in zip(("x", "W_enc", "b_enc"), fast, ref):
        assert a.dtype == torch.float32, name
        rel = float((a.float() - r.float()).norm() / r.float().norm())
        assert rel < (1e-2 if bf16 else 1e-5), (name, rel)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_bf16_training_tracks_fp32(device, arch):
    """30 steps in bfloat16 autocast from the fp32 run's initial weights and batches: the same
    reconstruction loss to within 5 %, float32 parameters and Adam state, and not a no-op."""
    g = torch.Generator().manual_seed(1)
    features = F.normalize(torch.randn(128, 32, generator=g), dim=-1)
    codes = torch.rand(30, 64, 128, generator=g) * (torch.rand(30, 64, 128, generator=g) < 0.04)
    batches = (codes @ features).to(device)
    cfg = SAEConfig(d_in=32, n_latents=256, k=8, architecture=arch)
    torch.manual_seed(0)
    init = build_sae(cfg)
    init.init_from_sample_(batches.reshape(-1, 32).cpu())
    losses = {}
    for mode in ("off", "bfloat16"):
        train = TrainConfig(**{**vars(BF16), "autocast": mode, "lr": 3e-3})
        model = copy.deepcopy(init).to(device)
        opt, state = make_optimizer(model, train), TrainState.fresh(cfg.n_latents)
        losses[mode] = [
            float(train_step(model, opt, x, state, train).losses["reconstruction"].detach())
            for x in batches
        ]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(
            v.dtype == torch.float32 for s in opt.state.values() for v in s.values() if v.ndim
        )
    assert losses["off"][-1] < 0.75 * losses["off"][0]  # it learned something to compare
    assert losses["bfloat16"] != losses["off"]  # autocast changed the arithmetic
    rel = abs(losses["bfloat16"][-1] - losses["off"][-1]) / losses["off"][-1]
    assert rel < 0.05, (losses["off"][-1], losses["bfloat16"][-1])


def test_auto_means_bf16_on_cuda_only_and_never_for_jumprelu():
    auto = TrainConfig()
    assert auto.autocast == "auto"
    assert auto.autocast_dtype("cuda") == "bfloat16" and auto.autocast_dtype("cpu") is None
    assert TrainConfig(autocast="off").autocast_dtype("cuda") is None
    assert BF16.autocast_dtype("cpu") == "bfloat16"
    cuda = torch.device("cuda")
    jumprelu = build_sae(SAEConfig(d_in=8, n_latents=16, architecture="jumprelu"))
    topk = build_sae(SAEConfig(d_in=8, n_latents=16, k=2))
    # Constructing torch.autocast("cuda") needs no device, so these run on any machine.
    assert isinstance(autocast(auto, cuda, topk), torch.autocast)
    assert not isinstance(autocast(auto, cuda, jumprelu), torch.autocast)
    assert isinstance(autocast(BF16, cuda, jumprelu), torch.autocast)  # asked for explicitly
    with pytest.raises(ConfigError, match=r"train\.autocast"):
        TrainConfig(autocast="fp8")


def test_gpu_bench_runs_small_on_cpu(capsys):
    """bench/gpu.py end to end at its --small size: check, timings, memory lines."""
    load_bench("gpu").main(["--device", "cpu", "--small", "--steps", "2"])
    out = capsys.readouterr().out
    assert "bf16 vs fp32 check passed" in out
    for case in ("| step |", "| loop |"):
        assert case in out, out


def test_gpu_bench_check_fails_loudly_when_bf16_diverges(monkeypatch):
    bench = load_bench("gpu")
    monkeypatch.setattr(bench, "CHECK_TOLERANCE", 1e-9)
    with pytest.raises(SystemExit, match="bf16 vs fp32 check failed"):
        bench.main(["--device", "cpu", "--small", "--check-only"])
