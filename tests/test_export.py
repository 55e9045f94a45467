"""`raysae export` and SAELens's format: every architecture written, read by SAELens 6.54.12
itself and computing what raysae computes; SAELens SAEs read by raysae (and `raysae eval`);
round trips bit-exact; a sweep's frontier exported; the refusals.

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
import math
import shutil

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from raysae import saelens
from raysae.__main__ import main
from raysae.checkpoint import load_sae, save_sae, save_training_checkpoint
from raysae.config import RunConfig, SAEConfig, TrainConfig
from raysae.data import write_dataset
from raysae.saes import build_sae
from raysae.settings import from_dict
from raysae.step import TrainState, make_optimizer, train_step
from raysae.train import run_single_process

D, N, K = 16, 64, 4
TOLERANCE = 1e-5
"""Allowed max |SAELens − raysae| over the largest |latent| (latents) or |x| (reconstruction)."""
SAELENS_CLASS = {
    "relu": "StandardSAE",
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "gated": "GatedSAE",
    "matryoshka_batchtopk": "JumpReLUSAE",
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
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        assert float(model.threshold) > 0  # estimated while training
    return model.eval()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


# ------------------------------------------------------------ raysae → SAELens, read by SAELens


@pytest.mark.parametrize("arch", saelens.TO_SAELENS)
def test_saelens_loads_the_export_and_computes_what_raysae_does(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    model = trained_sae(arch)
    checkpoint = save_sae(model, tmp_path / "sae")
    assert main(["export", str(checkpoint), str(tmp_path / "sl"), "--format", "saelens"]) == 0
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


@pytest.mark.parametrize("arch", saelens.TO_SAELENS)
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

    command = ["export", str(tmp_path / "src"), str(tmp_path / "out"), "--format", "saelens"]
    assert main(command) == 0
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


def test_an_architecture_saelens_lacks_names_the_alternatives(tmp_path, monkeypatch, capsys):
    """An architecture SAELens lacks (here one removed from the mapping; the crosscoder is a
    real one: tests/test_crosscoder.py) fails before anything is written, naming what SAELens
    can hold."""
    monkeypatch.delitem(saelens.TO_SAELENS, "gated")
    checkpoint = save_sae(trained_sae("gated"), tmp_path / "sae")
    assert main(["export", str(checkpoint), str(tmp_path / "sl"), "--format", "saelens"]) == 2
    err = capsys.readouterr().err
    assert "'gated' has no SAELens 6.54.12 equivalent" in err
    assert "relu, topk, jumprelu, batchtopk" in err and "--format raysae" in err
    assert not (tmp_path / "sl").exists() and len(list(tmp_path.iterdir())) == 1


def test_export_refuses_a_non_empty_folder_unless_it_is_an_earlier_export(tmp_path, capsys):
    checkpoint = str(save_sae(trained_sae("topk"), tmp_path / "sae"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", checkpoint, str(out), "--format", "saelens"]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "pass --overwrite" in err
    assert main(["export", checkpoint, str(out), "--format", "saelens", "--overwrite"]) == 2
    assert "is not an earlier export" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"  # left alone

    sl = tmp_path / "sl"
    assert main(["export", checkpoint, str(sl), "--format", "saelens"]) == 0
    assert main(["export", checkpoint, str(sl), "--format", "saelens"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["export", checkpoint, str(sl), "--overwrite"]) == 0  # now raysae's format
    assert sorted(p.name for p in sl.iterdir()) == ["config.json", "sae.safetensors"]
    assert main(["export", checkpoint, checkpoint, "--overwrite"]) == 2
    assert "which is being exported" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sae", "sl"]  # no leftovers


def test_cli_usage_errors_name_the_fix(capsys):
    assert main(["export", "--sweep", "x"]) == 2
    assert "--sweep and --frontier go together" in capsys.readouterr().err
    assert main(["export", "a"]) == 2
    assert "raysae export CHECKPOINT OUT" in capsys.readouterr().err
    assert main(["export", "a", "b", "--overall"]) == 2
    assert "--overall picks a sweep's frontier" in capsys.readouterr().err


def test_exporting_and_reading_imports_no_ray(tmp_path):
    """`raysae export` (its --help: tests/test_settings.py) runs without Ray, and reads and
    writes SAELens's files without sae_lens."""
    from test_settings import main_in_fresh_python

    checkpoint = save_sae(trained_sae("jumprelu"), tmp_path / "sae")
    main_in_fresh_python(
        ["export", str(checkpoint), str(tmp_path / "sl"), "--format", "saelens"], absent=("ray",)
    )
    assert (tmp_path / "sl" / "cfg.json").exists()
    main_in_fresh_python(
        ["export", str(tmp_path / "sl"), str(tmp_path / "back")],
        imports="raysae.checkpoint, raysae.saelens, raysae.export",
        absent=("ray", "sae_lens"),
    )
    assert (tmp_path / "back" / "config.json").exists()


# ------------------------------------------------------------ what it was trained on; eval

HARVEST = {  # what raysae harvest records of its TextWindows settings (raysae.harvest._commit)
    "model": "HuggingFaceTB/SmolLM2-135M",
    "corpus": "wikitext",
    "corpus_config": "wikitext-2-raw-v1",
    "corpus_split": "train",
    "context_length": 64,
    "prepend_bos": True,
    "exclude_special_tokens": True,
}


@pytest.fixture
def dataset(tmp_path):
    """A committed dataset (the real writer) whose manifest says it came from block 3 of a
    transformers model, 4 parts of 2048 rows."""
    return write_harvest_like_dataset(tmp_path / "acts")


def write_harvest_like_dataset(uri):
    write_dataset(
        str(uri),
        rows(8192, seed=11),
        dtype="float32",
        rows_per_part=2048,
        model=HARVEST["model"],
        hook="blocks.3.hook_resid_post",
        layer=3,
        harvest=HARVEST,
    )
    return uri


def run_config(uri, **sae) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "sae": {"d_in": D, "n_latents": N, "k": K, **sae},
            "train": {
                "total_tokens": 4096,
                "batch_size": 512,
                "log_every_tokens": 4096,
                "init_tokens": 1024,
                "lr": 3e-3,
            },
            "data": {"uri": str(uri), "eval_parts": 1},
        },
    )


def test_export_records_the_dataset_and_eval_reads_the_saelens_folder(dataset, tmp_path, capsys):
    run_single_process(run_config(dataset), str(tmp_path / "run"), log=lambda line: None)
    sae = tmp_path / "run" / "sae"
    assert main(["export", str(sae), str(tmp_path / "sl"), "--format", "saelens"]) == 0
    meta = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == HARVEST["model"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post"
    assert meta["context_size"] == 64 and meta["prepend_bos"] is True
    assert meta["exclude_special_tokens"] is True
    assert meta["dataset_path"] == "wikitext" and meta["sae_lens_training_version"] is None
    ours = meta["raysae"]
    assert ours["layer"] == 3 and ours["dataset"] == str(dataset) and ours["tokens"] == 4096
    assert ours["corpus_config"] == "wikitext-2-raw-v1" and 0 < ours["eval"]["fvu"] < 1

    # raysae eval on the SAELens folder: the same numbers as on the raysae checkpoint
    reports = []
    for folder in (sae, tmp_path / "sl"):
        out = tmp_path / f"{folder.name}.json"
        command = ["eval", str(folder), "--data", str(dataset), "--eval-parts", "1"]
        assert main([*command, "--kmeans-k", "4", "--tokens", "2048", "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    raysae_sae, saelens_sae = (r["sae"] for r in reports)
    assert saelens_sae["l0"] == raysae_sae["l0"]
    assert math.isclose(saelens_sae["fvu"], raysae_sae["fvu"], rel_tol=1e-5)


def test_an_unreadable_dataset_leaves_its_fields_out_and_data_gives_them(dataset, tmp_path, capsys):
    run_single_process(run_config(dataset), str(tmp_path / "run"), log=lambda line: None)
    moved = tmp_path / "moved"
    dataset.rename(moved)
    sae = str(tmp_path / "run" / "sae")
    assert main(["export", sae, str(tmp_path / "a"), "--format", "saelens"]) == 0
    out = capsys.readouterr().out
    assert f"dataset {dataset}" in out and "cannot be read" in out and "--data DATASET" in out
    meta = json.loads((tmp_path / "a" / "cfg.json").read_text())["metadata"]
    assert "model_name" not in meta and "hook_name" not in meta
    assert meta["raysae"]["dataset"] == str(dataset)  # where it was trained, as recorded
    command = ["export", sae, str(tmp_path / "b"), "--format", "saelens", "--data", str(moved)]
    assert main(command) == 0
    meta = json.loads((tmp_path / "b" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["raysae"]["layer"] == 3
    assert main(["export", sae, str(tmp_path / "c"), "--data", str(tmp_path / "nope")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_default_format_keeps_raysae_s_own_and_folds_the_input_scale(tmp_path):
    model = trained_sae("gated")
    save_sae(model, tmp_path / "sae", metadata={"tokens": 5})
    assert main(["export", str(tmp_path / "sae"), str(tmp_path / "out")]) == 0
    back = load_sae(tmp_path / "out")
    assert float(back.input_scale) == 1.0
    x = rows(256, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, model(x).x_hat, rtol=0, atol=1e-5)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["metadata"] == {"tokens": 5}


# ------------------------------------------------------------ a sweep's frontier


class TuneResult:
    """The attributes of a Ray Tune Result that raysae.sweep.collect reads, for a sweep
    output made without Ray: every file in it is written by raysae's own writers."""

    def __init__(self, config: dict, metrics: dict, path: str):
        self.config, self.metrics, self.path, self.error = config, metrics, path, None


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished sweep's folder, written as `raysae sweep` writes it: each trial's members
    trained (run_single_process → train.finish, the writer of trials/…/{sae, metrics.json}),
    one ASHA-stopped trial with only a training checkpoint, then sweep.collect,
    report.with_frontiers and report.write_results."""
    from raysae import report
    from raysae.settings import to_dict
    from raysae.sweep import collect
    from raysae.sweep_spec import SweepSpec, expand, packs
    from raysae.train import member_dirs

    tmp = tmp_path_factory.mktemp("sweep")
    uri = tmp / "acts"
    write_harvest_like_dataset(uri)
    spec = SweepSpec(
        name="s",
        output=str(tmp / "sweeps"),
        base=run_config(uri),
        architectures={"topk": {"sae.k": [2, 8]}, "relu": {"sae.l1_coefficient": [0.3, 3.0]}},
        pack=2,
    )
    sweep_dir = tmp / "sweeps" / "s"
    groups = packs(expand(spec), spec.pack)
    stopped = run_config(uri, k=1)  # a third trial, stopped by ASHA after one checkpoint
    groups.append([stopped])
    config = {
        "packs": [[to_dict(c) for c in g] for g in groups],
        "trials_dir": str(sweep_dir / "trials"),
    }
    results = []
    for t, group in enumerate(groups):
        trial_id = f"5e1ec_{t:05d}"
        trial_dir = sweep_dir / "trials" / f"trial-{trial_id}"
        metrics = {"trial_id": trial_id}
        if group is groups[-1]:
            model = build_sae(stopped.sae)
            model.init_from_sample_(rows(1024, seed=12))
            optimizer = make_optimizer(model, stopped.train)
            checkpoint = trial_dir / "checkpoint_000000"
            save_training_checkpoint(checkpoint / "m0", model, optimizer, TrainState.fresh(N), {})
            metrics.update({"m0/l0": 0.5, "m0/fvu": 0.97, "checkpoint_path": str(checkpoint)})
        else:
            for cfg, member in zip(group, member_dirs(str(trial_dir), len(group))):
                run_single_process(cfg, member, log=lambda line: None)
        results.append(TuneResult({**config, "pack": t}, metrics, str(trial_dir)))
    table = report.with_frontiers(collect(results, str(sweep_dir)))
    report.write_results(table, str(sweep_dir))
    return sweep_dir, table


def test_frontier_export_writes_the_sweep_s_own_frontier_with_an_index(sweep, tmp_path, capsys):
    sweep_dir, table = sweep
    dest = tmp_path / "frontier"
    assert main(["export", "--sweep", str(sweep_dir), "--frontier", str(dest)]) == 0
    on = table[table["pareto"]].sort_values(["architecture", "l0"])
    assert 2 <= len(on) < len(table)
    index = json.loads((dest / "index.json").read_text())
    assert index["format"] == "saelens" and index["frontier"] == "each architecture"
    saes = index["saes"]
    assert [(e["trial_id"], e["member"]) for e in saes] == list(zip(on["trial_id"], on["member"]))
    assert [e["l0"] for e in saes] == on["l0"].tolist()
    assert [e["fvu"] for e in saes] == on["fvu"].tolist()
    csv = pd.read_csv(dest / "index.csv")
    assert csv["folder"].tolist() == [e["folder"] for e in saes]
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["index.json", "index.csv", *csv["folder"]]
    )
    stopped = [e for e in saes if e["status"] == "early_stopped"]
    assert len(stopped) == 1 and stopped[0]["folder"] == "topk-5e1ec_00002-m0"
    for entry in saes:
        folder = dest / entry["folder"]
        model = load_sae(folder)
        assert model.cfg.architecture == entry["architecture"] and float(model.input_scale) == 1
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]
        if entry["status"] == "finished":  # the dataset from its metrics.json
            assert meta["hook_name"] == "blocks.3.hook_resid_post"
        else:  # a training checkpoint has no metrics.json next to it: left out
            assert "hook_name" not in meta
    assert "pass --data DATASET" in capsys.readouterr().out

    # all architectures' frontier; a sweep folder moved elsewhere (copied from S3, say)
    moved = tmp_path / "moved"
    shutil.copytree(sweep_dir, moved)
    command = ["export", "--sweep", str(moved), "--frontier", str(dest), "--overall"]
    assert main(command) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert main([*command, "--overwrite", "--format", "raysae"]) == 0
    index = json.loads((dest / "index.json").read_text())
    overall = table[table["pareto_all"]]
    assert len(index["saes"]) == len(overall) and index["format"] == "raysae"
    assert all((dest / e["folder"] / "config.json").exists() for e in index["saes"])


def test_saelens_loads_every_frontier_sae(sweep, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sweep_dir, _ = sweep
    dest = tmp_path / "frontier"
    assert main(["export", "--sweep", str(sweep_dir), "--frontier", str(dest)]) == 0
    x = rows(256, seed=9)
    for entry in json.loads((dest / "index.json").read_text())["saes"]:
        theirs = sae_lens.SAE.load_from_disk(str(dest / entry["folder"]))
        assert theirs.cfg.architecture() == entry["saelens_architecture"]
        ours = load_sae(dest / entry["folder"])
        with torch.no_grad():
            assert torch.equal(theirs.encode(x) != 0, ours(x).latents != 0)


def test_frontier_errors_name_the_fix(tmp_path, capsys):
    assert main(["export", "--sweep", str(tmp_path), "--frontier", str(tmp_path / "d")]) == 2
    assert "no results.parquet or results.csv" in capsys.readouterr().err
    assert main(["export", "--sweep", "s3://b/s", "--frontier", str(tmp_path / "d")]) == 2
    assert "aws s3 sync" in capsys.readouterr().err
