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


@pytest.fixture
def one_thread():
    """Toy-sized matmuls run fastest on one thread: with more, OpenMP's synchronisation costs
    more than the work, many times more on a loaded machine (measured here: 0.2 s against
    6 ms per step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
