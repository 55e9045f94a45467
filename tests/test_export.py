"""SAELens's format (raysae.saelens): every architecture written, read by SAELens 6.54.12
itself and computing what raysae computes; SAELens SAEs read by raysae's load_sae; round trips
bit-exact; the refusals.

Measured agreement (D=16, 64 latents, 2048 rows, float32 on CPU): the active latents are the
same on every row for every architecture, and SAELens's latents and reconstructions differ
from raysae's by at most 2.7e-7 of the largest latent / reconstruction for raysae's exports
(relu 2.2e-7 / 2.3e-7, topk 2.7e-7 / 1.6e-7, batchtopk 2.2e-7 / 1.8e-7, jumprelu 2.3e-7 /
2.1e-7, gated 2.2e-7 / 2.5e-7) and 3.1e-7 for SAELens SAEs read by raysae, converted ones
included (the same sums in another order: F.linear against matmul + add, a sparse decode,
the gate's scaling after the matmul). The tests allow TOLERANCE, 1e-5: float32 rounding on
another machine's kernels, with room to spare.

The tests using the sae_lens package skip where it is not installed (`pip install -e
.[interop]` installs it; CI does); the others read and write the files without it.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from raysae import saelens
from raysae.checkpoint import load_sae
from raysae.config import SAEConfig, TrainConfig
from raysae.saes import ARCHITECTURES, build_sae
from raysae.step import TrainState, make_optimizer, train_step

D, N, K = 16, 64, 4
TOLERANCE = 1e-5
"""Allowed max |SAELens − raysae| over the largest |latent| (latents) or |x| (reconstruction)."""
SAELENS_CLASS = {
    "relu": "StandardSAE",
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "gated": "GatedSAE",
}


def rows(n: int, seed: int) -> torch.Tensor:
    """Activations with a mean and a norm far from those of the scaled space (scale ≈ 0.2)."""
    g = torch.Generator().manual_seed(seed)
    return 4.0 + 3.0 * torch.randn(n, D, generator=g)


def trained_sae(arch: str, seed: int = 0):
    """A tiny SAE after a few real training steps, its input scale not folded, every
    architecture-specific tensor non-trivial (thresholds, gate parameters)."""
    torch.manual_seed(seed)
    model = build_sae(
        SAEConfig(
            d_in=D,
            n_latents=N,
            k=K,
            architecture=arch,
            jumprelu_init_threshold=0.3,
            l1_coefficient=0.5,
        )
    )
    x = rows(512, seed=1)
    model.init_from_sample_(x)
    cfg = TrainConfig(total_tokens=10_000, batch_size=512, lr=1e-2, dead_tokens=512)
    optimizer, state = make_optimizer(model, cfg), TrainState.fresh(N)
    for _ in range(5):
        train_step(model, optimizer, x, state, cfg)
    with torch.no_grad():
        if arch == "jumprelu":  # thresholds spread around where pre-activations are
            model.log_threshold.copy_(torch.empty(N).uniform_(0.05, 1.0).log())
        if arch == "gated":
            model.r_mag.normal_(0.0, 0.3)
            model.b_mag.normal_(0.0, 0.2)
    assert float(model.input_scale) not in (0.0, 1.0)
    if arch == "batchtopk":
        assert float(model.threshold) > 0  # estimated while training
    return model.eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


# ------------------------------------------------------------ raysae → SAELens, read by SAELens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saelens_loads_the_export_and_computes_what_raysae_does(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    model = trained_sae(arch)
    saelens.write_saelens(model, tmp_path / "sl")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert type(theirs).__name__ == SAELENS_CLASS[arch]
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg.keys() == theirs.cfg.to_dict().keys()  # exactly SAELens's fields, no others
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D, N, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg["reshape_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"] == saelens.SAELENS_VERSION
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False

    x = rows(2048, seed=7)
    with torch.no_grad():
        ours = model(x)
        latents = theirs.encode(x)
        x_hat = theirs.decode(latents)
    scale = float(model.input_scale)  # raysae's unfolded latents are in scaled units
    assert torch.equal(ours.latents != 0, latents != 0)  # the same active set on every row
    l0 = float((latents != 0).sum(-1).float().mean())
    assert 0 < l0 < N / 2 and (arch != "topk" or l0 == K)
    assert relative(latents, ours.latents / scale) < TOLERANCE
    assert relative(x_hat, x) < 10 and relative(x_hat, ours.x_hat) < TOLERANCE
    measured = relative(latents, ours.latents / scale), relative(x_hat, ours.x_hat)
    print(f"{arch}: L0 {l0:.2f}; latents {measured[0]:.1e}, reconstruction {measured[1]:.1e}")


def test_batchtopk_is_saelens_jumprelu_with_its_one_threshold():
    model = trained_sae("batchtopk")
    cfg, tensors = saelens.to_saelens(model)
    theta = float(model.threshold) / float(model.input_scale)  # folded into raw units
    assert cfg["architecture"] == "jumprelu"
    assert torch.allclose(tensors["threshold"], torch.full((N,), theta))
    assert cfg["metadata"]["raysae"] == {"architecture": "batchtopk", "k": K}
    assert float(model.input_scale) != 1.0  # exporting folded a copy, not the model


# ------------------------------------------------------------ round trips


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_raysae_saelens_raysae_saelens_round_trip_is_bit_exact(arch, tmp_path):
    model = trained_sae(arch)
    saelens.write_saelens(model, tmp_path / "a", {"model_name": "m"})
    back = load_sae(tmp_path / "a")  # raysae.checkpoint.load_sae reads SAELens's folders
    assert type(back) is type(model) and float(back.input_scale) == 1.0
    metadata = json.loads((tmp_path / "a" / "cfg.json").read_text())["metadata"]
    saelens.write_saelens(back, tmp_path / "b", metadata)
    first, second = (load_file(tmp_path / d / "sae_weights.safetensors") for d in "ab")
    assert first.keys() == second.keys()
    for name in first:  # bit-identical
        assert first[name].dtype == second[name].dtype and torch.equal(first[name], second[name])
    assert (tmp_path / "a" / "cfg.json").read_text() == (tmp_path / "b" / "cfg.json").read_text()
    x = rows(512, seed=3)
    folded = build_sae(model.cfg)
    folded.load_state_dict(model.state_dict())
    folded.fold_input_scale_()
    with torch.no_grad():
        expected, got = folded.eval()(x), back(x)
    assert torch.equal(expected.latents != 0, got.latents != 0)
    torch.testing.assert_close(got.x_hat, expected.x_hat, rtol=0, atol=1e-5)


def random_saelens_sae(sae_lens, architecture: str, seed: int = 0, **cfg):
    """An SAELens inference SAE with random parameters (positive thresholds), d_in=D."""
    classes = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig),
    }
    sae_cls, cfg_cls = classes[architecture]
    if architecture == "topk":
        cfg.setdefault("k", 6)
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="gpt2", hook_name="blocks.3.hook_resid_post", context_size=128)
    sae = sae_cls(cfg_cls(d_in=D, d_sae=N, metadata=meta, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.abs_()
    return sae


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_raysae_saelens_round_trip_is_exact(architecture, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    source = random_saelens_sae(sae_lens, architecture)
    source.save_model(tmp_path / "src")
    model = load_sae(tmp_path / "src")  # what raysae eval runs
    assert model.cfg.architecture == saelens.FROM_SAELENS[architecture]
    x = 2.0 * rows(1024, seed=5)
    with torch.no_grad():
        theirs, ours = source.encode(x), model(x)
    assert torch.equal(theirs != 0, ours.latents != 0)
    assert relative(ours.latents, theirs) < TOLERANCE
    assert relative(ours.x_hat, source.decode(theirs)) < TOLERANCE

    metadata = json.loads((tmp_path / "src" / "cfg.json").read_text())["metadata"]
    saelens.write_saelens(model, tmp_path / "out", metadata)
    before, after = (load_file(tmp_path / d / "sae_weights.safetensors") for d in ("src", "out"))
    assert before.keys() == after.keys()
    for name in before:  # bit-identical
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name])
    cfgs = [json.loads((tmp_path / d / "cfg.json").read_text()) for d in ("src", "out")]
    assert cfgs[0] == cfgs[1]  # metadata kept as it was
    again = sae_lens.SAE.load_from_disk(str(tmp_path / "out"))
    assert again.cfg.to_dict() == source.cfg.to_dict()


@pytest.mark.parametrize(
    "architecture, settings",
    [
        ("standard", {"apply_b_dec_to_input": False}),
        ("topk", {"apply_b_dec_to_input": False}),
        ("jumprelu", {"apply_b_dec_to_input": False}),
        ("gated", {"apply_b_dec_to_input": False}),
        ("topk", {"rescale_acts_by_decoder_norm": True}),
    ],
)
def test_saelens_settings_raysae_lacks_are_converted(architecture, settings, tmp_path):
    """b_dec not subtracted (Gemma Scope's SAEs), TopK rescaled by decoder norms (SAELens's
    training default): folded into the weights, equal up to float rounding."""
    sae_lens = pytest.importorskip("sae_lens")
    source = random_saelens_sae(sae_lens, architecture, seed=2, **settings)
    if settings.get("rescale_acts_by_decoder_norm"):
        with torch.no_grad():
            source.W_dec.mul_(torch.linspace(0.5, 2.0, N)[:, None])  # far from unit norm
    source.save_model(tmp_path / "src")
    model = load_sae(tmp_path / "src")
    x = 2.0 * rows(1024, seed=6)
    with torch.no_grad():
        theirs, ours = source.encode(x), model(x)
    assert torch.equal(theirs != 0, ours.latents != 0)
    assert relative(ours.latents, theirs) < TOLERANCE
    assert relative(ours.x_hat, source.decode(theirs)) < TOLERANCE


def test_saelens_own_batchtopk_reads_as_a_jumprelu(tmp_path):
    """SAELens saves a trained BatchTopK SAE as a JumpReLU with one threshold everywhere."""
    sae_lens = pytest.importorskip("sae_lens")
    cfg = sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=4)
    sae = sae_lens.BatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.1)
        sae.topk_threshold.fill_(0.05)
    sae.save_inference_model(tmp_path / "btk")
    model = load_sae(tmp_path / "btk")
    inference = sae_lens.SAE.load_from_disk(str(tmp_path / "btk"))
    x = rows(512, seed=8)
    with torch.no_grad():
        theirs, ours = inference.encode(x), model(x)
    assert model.cfg.architecture == "jumprelu"
    assert torch.equal(theirs != 0, ours.latents != 0)
    assert relative(ours.latents, theirs) < TOLERANCE


# ------------------------------------------------------------ refusals


def saelens_folder(path, cfg: dict, tensors: dict):
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def test_unreadable_saelens_folders_are_clear_errors(tmp_path):
    _, tensors = saelens.to_saelens(trained_sae("relu"))
    version = {"sae_lens_version": "6.54.12"}
    good = {"architecture": "standard", "d_in": D, "d_sae": N, "metadata": version}
    cases = [
        ({**good, "architecture": "jumprelu_transcoder"}, "raysae reads standard, topk"),
        ({**good, "metadata": {}}, "written before SAELens 6.0"),
        ({**good, "normalize_activations": "layer_norm"}, "cannot be folded"),
        ({**good, "architecture": "gated"}, "missing \\['b_gate', 'b_mag', 'r_mag'\\]"),
        ({**good, "d_in": D + 1}, "W_enc has shape \\(16, 64\\), expected \\(17, 64\\)"),
    ]
    for i, (cfg, message) in enumerate(cases):
        folder = saelens_folder(tmp_path / str(i), cfg, tensors)
        with pytest.raises(saelens.SAELensFormatError, match=message):
            load_sae(folder)
