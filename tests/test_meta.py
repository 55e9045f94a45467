"""`raysae meta`: a meta-SAE trained on a checkpoint's decoder rows, its FVU on them and
the base latents each meta-latent is used by."""

import json

import pytest
import torch

from raysae.__main__ import main
from raysae.checkpoint import load_sae, save_sae
from raysae.config import SAEConfig
from raysae.meta import decoder_rows, epochs_of
from raysae.saes import build_sae


def test_epochs_visit_every_row_once_in_a_new_order():
    rows = torch.arange(12.0)[:, None]
    batches = epochs_of(rows, 4, seed=0)
    first = torch.cat([next(batches) for _ in range(3)]).flatten()
    second = torch.cat([next(batches) for _ in range(3)]).flatten()
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(12))
    assert not torch.equal(first, second)


@pytest.fixture
def one_thread():
    """Toy-sized matmuls run fastest on one thread (see tests/test_matryoshka.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def composed_checkpoint(tmp_path):
    """A base SAE whose 256 decoder rows are each the sum of 2 of 32 hidden directions: the
    structure a meta-SAE should find."""
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(32, 24, generator=g), dim=-1)
    pairs = torch.stack([torch.randperm(32, generator=g)[:2] for _ in range(256)])
    w = atoms[pairs].sum(1) * (0.5 + torch.rand(256, 1, generator=g))
    base = build_sae(SAEConfig(d_in=24, n_latents=256, k=4))
    with torch.no_grad():
        base.W_dec.copy_(torch.nn.functional.normalize(w, dim=-1))
    return save_sae(base, tmp_path / "base"), pairs


def test_meta_trains_on_the_decoder_rows_and_names_the_base_latents(
    composed_checkpoint, tmp_path, capsys, one_thread
):
    checkpoint, pairs = composed_checkpoint
    args = ["meta", str(checkpoint), str(tmp_path / "meta"), "--n-latents", "32", "--k", "2"]
    assert main([*args, "--epochs", "40", "--batch-size", "128", "--lr", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "meta-SAE on the decoder rows: fvu" in printed and "tokens" in printed  # progress
    result = json.loads((tmp_path / "meta" / "meta.json").read_text())
    # Measured 0.008 (L0 1.99): 2 meta-latents per row against rows built from 2 atoms each.
    assert result["fvu"] < 0.15 and 1.0 <= result["l0"] <= 3.0
    meta = load_sae(tmp_path / "meta" / "sae")
    assert meta.cfg.architecture == "batchtopk" and meta.cfg.n_latents == 32
    listed = [m for m in result["meta_latents"] if m["top_base_latents"]]
    assert len(result["meta_latents"]) == 32 and len(listed) > 16
    # A meta-latent's top base latents share a hidden direction far more often than chance.
    shares = []
    for m in listed:
        top = m["top_base_latents"][:5]
        common = set(pairs[top[0]].tolist())
        shares.append(float(all(common & set(pairs[i].tolist()) for i in top)))
    assert sum(shares) / len(shares) > 0.5
    assert torch.equal(decoder_rows(load_sae(checkpoint)), decoder_rows(load_sae(checkpoint)))
    # A second run into the same folder is refused, naming it.
    assert main([*args, "--epochs", "1"]) == 2
    assert "is not empty" in capsys.readouterr().err
