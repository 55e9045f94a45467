import torch

from raysae.config import ToyDataConfig
from raysae.synthetic import ToyData, feature_recovery


def test_expected_active_features_per_token():
    toy = ToyData(ToyDataConfig(n_features=256, active_per_token=5, frequency_decay=0.5), d_in=32)
    _, features = toy.sample(20_000)
    assert abs(float((features > 0).sum(-1).float().mean()) - 5.0) < 0.15
    assert torch.allclose(toy.directions.norm(dim=-1), torch.ones(256))
    freq = (features > 0).float().mean(0)
    assert freq[0] > 3 * freq[-1]  # power-law frequencies


def test_activations_are_the_feature_combination():
    toy = ToyData(ToyDataConfig(n_features=64, active_per_token=3), d_in=16)
    x, features = toy.sample(100)
    torch.testing.assert_close(x, features @ toy.directions)


def test_one_hot_sets_fire_exactly_one_member():
    cfg = ToyDataConfig(n_features=64, n_one_hot_sets=2, one_hot_set_size=8, active_per_token=4)
    toy = ToyData(cfg, d_in=16)
    _, features = toy.sample(2000)
    for members in toy.one_hot_sets:
        assert torch.all((features[:, members] > 0).sum(-1) <= 1)
        # magnitudes can clip to 0, but almost every token has its one member on
        assert float(((features[:, members] > 0).sum(-1) == 1).float().mean()) > 0.99


def test_correlated_groups_fire_together():
    cfg = ToyDataConfig(
        n_features=64,
        n_correlated_groups=2,
        correlated_group_size=4,
        correlation=0.9,
        active_per_token=3,
        magnitude_std=0.0,
    )
    toy = ToyData(cfg, d_in=16)
    _, features = toy.sample(20_000)
    on = features > 0
    leader, follower = toy.groups[0, 0], toy.groups[0, 1]
    p_follow_given_leader = float(on[on[:, leader], follower].float().mean())
    assert p_follow_given_leader > 0.85
    assert float(on[:, follower].float().mean()) < 0.5 * p_follow_given_leader


def test_held_out_stream_differs_but_features_do_not():
    cfg = ToyDataConfig(n_features=32)
    a, b = ToyData(cfg, 8), ToyData(cfg, 8, stream=1)
    assert torch.equal(a.directions, b.directions)
    assert not torch.equal(a.sample(10)[0], b.sample(10)[0])
    assert torch.equal(ToyData(cfg, 8).sample(10)[0], ToyData(cfg, 8).sample(10)[0])


def test_recovery_score():
    toy = ToyData(ToyDataConfig(n_features=50), d_in=10)
    perfect = feature_recovery(toy.directions, 3.0 * toy.directions.flip(0))
    assert perfect["fraction_recovered"] == 1.0 and abs(perfect["mean_max_cos"] - 1) < 1e-6
    random = feature_recovery(toy.directions, torch.randn(50, 10))
    assert random["fraction_recovered"] < 0.2 and random["mean_max_cos"] < 0.9
