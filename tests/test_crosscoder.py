"""Crosscoders: equal to the plain SAE at S = 1, the relative decoder norms separating
source-specific from shared features on planted toy data, and paired datasets."""

import numpy as np
import pytest
import torch

from raysae import data
from raysae.config import SAEConfig, ToyDataConfig, TrainConfig
from raysae.loop import fit
from raysae.saes import build_sae
from raysae.synthetic import PairedToyData
from raysae.views import HISTOGRAM_BINS, decoder_norm_split, histogram_lines


def built(seed=0, **kw):
    torch.manual_seed(seed)
    return build_sae(SAEConfig(d_in=16, n_latents=48, k=4, **kw))


@pytest.mark.parametrize("sparsity, plain", [("topk", "topk"), ("relu", "relu")])
def test_a_one_source_crosscoder_is_the_plain_sae_bit_for_bit(sparsity, plain):
    cross = built(architecture="crosscoder", crosscoder_sparsity=sparsity, n_sources=1)
    sae = built(architecture=plain)
    x = 1.5 + torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    for model in (cross, sae):
        model.init_from_sample_(x)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True  # AuxK on: its loss and gradients must agree too
    outs = []
    for model in (cross, sae):
        assert torch.equal(model.W_enc, sae.W_enc) and torch.equal(model.W_dec, sae.W_dec)
        out = model(x, dead_mask=dead)
        model.total_loss(out.losses, 0.5).backward()
        outs.append(out)
    assert torch.equal(outs[0].x_hat, outs[1].x_hat)
    assert torch.equal(outs[0].latents, outs[1].latents)
    assert outs[0].losses.keys() == outs[1].losses.keys() and len(outs[0].losses) == 2
    for name in outs[0].losses:
        assert torch.equal(outs[0].losses[name], outs[1].losses[name]), name
    for (name, p), q in zip(cross.named_parameters(), sae.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_relative_decoder_norms_separate_source_specific_and_shared_features(one_thread):
    toy = PairedToyData(ToyDataConfig(n_features=48, active_per_token=3, seed=2), d_source=24)
    torch.manual_seed(0)
    cross = build_sae(SAEConfig(d_in=48, n_latents=64, k=3, architecture="crosscoder", n_sources=2))
    train = TrainConfig(
        total_tokens=40_000, batch_size=128, lr=1e-2, log_every_tokens=40_000, dead_tokens=20_000
    )
    history = fit(cross, toy.batches(128), train, log=None)
    assert history[-1]["fvu"] < 0.25  # measured 0.15 (k = 3 against 3 active features on average)
    w = cross.W_dec.detach()
    latent = (toy.directions @ (w / w.norm(dim=-1, keepdim=True)).T).argmax(-1)
    share_b = cross.relative_norms()[latent, 1]  # each feature's closest latent
    by_group = {name: share_b[idx] for name, idx in toy.by_presence().items()}
    # Measured (seeds 0, 1): A only 0.04-0.10, B only 0.92-0.96, shared 0.49-0.52.
    assert by_group["a_only"].max() < 0.25
    assert by_group["b_only"].min() > 0.75
    assert 0.4 < by_group["shared"].min() and by_group["shared"].max() < 0.6
    # The evaluation's summary of the same: a third of the features each, the 16 latents more
    # than features mostly shared (measured: 0.22 specific to A, 0.25 to B, 0.50 shared).
    split = decoder_norm_split(cross)
    assert sum(split["source_1_share_histogram"]) == split["latents"] == 64
    for part in ("source_0_specific", "source_1_specific", "shared"):
        assert 0.15 < split[part] < 0.6, {k: split[k] for k in ("source_0_specific", "shared")}
    lines = histogram_lines(split)
    assert len(lines) == 2 + HISTOGRAM_BINS and "shared (0.3-0.7)" in lines[-1]


def write_pair(tmp_path, n=300, rows_per_part=100, shuffle_b=False):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, 4, generator=g), torch.randn(n, 6, generator=g)
    doc, pos = np.arange(n) // 50, np.arange(n) % 50
    pos_b = pos.copy()
    if shuffle_b:
        pos_b[[150, 151]] = pos_b[[151, 150]]
    kw = dict(dtype="float32", rows_per_part=rows_per_part, doc_id=doc)
    data.write_dataset(str(tmp_path / "a"), a, pos=pos, **kw)
    data.write_dataset(str(tmp_path / "b"), b, pos=pos_b, **kw)
    return a, b


def test_paired_sources_read_as_one_dataset_row_for_row(tmp_path):
    a, b = write_pair(tmp_path)
    paired = data.open_data(f"{tmp_path / 'a'} + {tmp_path / 'b'}")
    assert paired.d_in == 10 and paired.n_tokens == 300 and len(paired.parts) == 3
    np.testing.assert_allclose(paired.manifest.stats.mean[4:], b.double().mean(0), rtol=1e-6)
    torch.testing.assert_close(torch.cat(list(paired.batches(128))), torch.cat([a, b], 1))
    train, held = paired.split(1)
    torch.testing.assert_close(torch.cat(list(held.batches(64))), torch.cat([a, b], 1)[200:])
    assert [p.name for p in train.sources[1].parts] == [p.name for p in paired.sources[1].parts[:2]]


def test_a_misaligned_pair_is_an_error_naming_both_datasets(tmp_path):
    write_pair(tmp_path, shuffle_b=True)
    paired = data.open_data(f"{tmp_path / 'a'} + {tmp_path / 'b'}")
    list(paired.select([paired.parts[0].name]).batches(100))  # part 0 is aligned
    with pytest.raises(data.MisalignedError) as err:
        list(paired.batches(100))
    message = str(err.value)
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message
    assert "row 50 has pos=" in message  # part 1's row 50 is the dataset's row 150
    data.write_dataset(str(tmp_path / "c"), torch.zeros(300, 2), dtype="float32", rows_per_part=150)
    with pytest.raises(data.MisalignedError, match="not aligned: 3 part"):
        data.open_data(f"{tmp_path / 'a'} + {tmp_path / 'c'}")


def test_a_crosscoder_has_no_saelens_export_and_says_what_to_use(tmp_path, capsys):
    from raysae.__main__ import main
    from raysae.checkpoint import save_sae

    checkpoint = save_sae(built(architecture="crosscoder"), tmp_path / "sae")
    assert main(["export", str(checkpoint), str(tmp_path / "sl"), "--format", "saelens"]) == 2
    assert "'crosscoder' has no SAELens 6.54.12 equivalent" in capsys.readouterr().err


def test_eval_of_a_crosscoder_on_its_paired_data_reports_each_source(tmp_path, capsys, one_thread):
    # `raysae eval` on the "A + B" pair: FVU per source equal to the one computed here from the
    # SAE's own reconstruction, the decoder-norm split printed, and both on the report page.
    import json

    from raysae.__main__ import main
    from raysae.checkpoint import save_sae

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 6, generator=g) + 2.0, torch.randn(400, 6, generator=g)
    b[:, :3] += 3 * a[:, :3]  # some structure the two sources share
    kw = dict(dtype="float32", rows_per_part=100, doc_id=np.arange(400) // 50)
    data.write_dataset(str(tmp_path / "a"), a, pos=np.arange(400) % 50, **kw)
    data.write_dataset(str(tmp_path / "b"), b, pos=np.arange(400) % 50, **kw)
    pair = f"{tmp_path / 'a'} + {tmp_path / 'b'}"
    torch.manual_seed(0)
    cross = build_sae(SAEConfig(d_in=12, n_latents=32, k=3, architecture="crosscoder", n_sources=2))
    train = TrainConfig(total_tokens=4000, batch_size=100, lr=1e-2, log_every_tokens=4000)
    fit(cross, data.open_data(pair).batches(100), train, log=None)
    checkpoint = save_sae(cross, tmp_path / "sae")
    argv = ["eval", str(checkpoint), "--data", pair, "--rows", "all", "--kmeans-k", "4"]
    report_dir = tmp_path / "report"
    assert main([*argv, "--out", str(tmp_path / "r.json"), "--report", str(report_dir)]) == 0
    out = capsys.readouterr().out
    views = json.loads((tmp_path / "r.json").read_text())["views"]
    with torch.no_grad(), cross.evaluating():
        x = torch.cat([a, b], 1)
        x_hat = cross(x).x_hat
    for s, part in enumerate((slice(0, 6), slice(6, 12))):
        xs = x[:, part].double()
        fvu = ((xs - x_hat[:, part].double()) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
        assert views[f"source_{s}/fvu"] == pytest.approx(float(fvu), rel=1e-4)
        assert f"source_{s} fvu {views[f'source_{s}/fvu']:.4f}" in out
    assert "relative decoder norm (source 1 share) of 32 latents:" in out
    assert sum(views["decoder_norms/source_1_share_histogram"]) == 32
    page = (report_dir / "index.html").read_text()
    assert "FVU by source" in page and "Relative decoder norms of 32 latents" in page


def test_a_crosscoder_refuses_sources_it_cannot_split_evenly(tmp_path):
    from raysae.config import RunConfig
    from raysae.settings import ConfigError, from_dict
    from raysae.train import training_data

    write_pair(tmp_path)  # sources 4 and 6 wide: d_in 10, which n_sources=2 would cut 5 + 5
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    sae = {"d_in": 10, "n_latents": 8, "k": 2, "architecture": "crosscoder", "n_sources": 2}
    cfg = from_dict(RunConfig, {"sae": sae, "data": {"sources": sources, "eval_parts": 1}})
    with pytest.raises(ConfigError, match=r"have widths \[4, 6\].*sae.n_sources=2"):
        training_data(cfg, data.open_data(cfg.data.dataset))
    plain = from_dict(RunConfig, {"sae": {**sae, "architecture": "topk", "n_sources": 1},
                                  "data": {"sources": sources, "eval_parts": 1}})  # fmt: skip
    assert len(training_data(plain, data.open_data(plain.data.dataset))[1].parts) == 1
