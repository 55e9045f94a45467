"""The progress line of raysae.loop: the real loss, and a rate over this session's tokens."""

import re

import pytest
import torch

from raysae.config import SAEConfig, ToyDataConfig, TrainConfig
from raysae.loop import Member, train_pack
from raysae.saes import build_sae
from raysae.synthetic import ToyData


def _member(resumed_tokens: int) -> Member:
    torch.manual_seed(0)
    cfg = TrainConfig(total_tokens=8000, batch_size=500, log_every_tokens=1000, init_tokens=500)
    model = build_sae(SAEConfig(d_in=16, n_latents=64, k=4))
    member = Member.of(model, cfg, reference_mean=torch.zeros(16, dtype=torch.float64))
    member.state.tokens = resumed_tokens  # as restored from a checkpoint at that point
    return member


def test_rate_after_a_resume_counts_only_the_tokens_trained_since():
    member = _member(resumed_tokens=5000)
    batches = ToyData(ToyDataConfig(n_features=32, active_per_token=3), 16).batches(500)
    lines: list[str] = []
    history = train_pack([member], batches, log=lines.append)
    assert [r["tokens"] for r in history] == [6000, 7000, 8000]
    first = history[0]
    assert first["tokens_per_s"] * first["elapsed_s"] == pytest.approx(1000)
    # Each line's loss is the record's reconstruction loss, not a placeholder 0.
    losses = [float(re.search(r"\| loss ([0-9.e+-]+) \|", line).group(1)) for line in lines]
    assert losses == pytest.approx([r["loss/reconstruction"] for r in history], rel=1e-3)
    assert min(losses) > 0
