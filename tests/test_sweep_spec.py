import pytest

from raysae.config import ConfigError
from raysae.sweep_spec import SweepSpec, expand, load_sweep_spec, packs

BASE = {
    "sae": {"d_in": 16, "n_latents": 64, "k": 4},
    "train": {"total_tokens": 10_000, "batch_size": 500},
    "data": {"uri": "data/acts"},
}


def spec(**kw):
    return SweepSpec(name="s", output="out", base=BASE, **kw)


def test_grid_with_per_architecture_subspaces():
    points = expand(
        spec(
            space={"sae.n_latents": [64, 128]},
            architectures={
                "topk": {"sae.k": [4, 8]},
                "relu": {"sae.l1_coefficient": [1.0, 5.0, 10.0]},
            },
        )
    )
    assert len(points) == 2 * 2 + 2 * 3
    topk = [p for p in points if p.sae.architecture == "topk"]
    relu = [p for p in points if p.sae.architecture == "relu"]
    assert {(p.sae.n_latents, p.sae.k) for p in topk} == {(64, 4), (64, 8), (128, 4), (128, 8)}
    # relu points keep the base k: k is not part of their sub-space
    assert {p.sae.k for p in relu} == {4}
    assert {p.sae.l1_coefficient for p in relu} == {1.0, 5.0, 10.0}


def test_random_sampling_is_seeded_and_in_range():
    s = spec(
        space={"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.seed": {"randint": [0, 9]}},
        num_samples=20,
        seed=3,
    )
    a, b = expand(s), expand(s)
    assert [p.train.lr for p in a] == [p.train.lr for p in b]
    assert all(1e-4 <= p.train.lr <= 1e-2 for p in a)
    assert all(0 <= p.train.seed <= 9 for p in a) and len({p.train.lr for p in a}) == 20
    other = expand(spec(space=s.space, num_samples=20, seed=4))
    assert [p.train.lr for p in other] != [p.train.lr for p in a]


def test_packs_group_consecutive_points():
    points = expand(spec(space={"sae.n_latents": [32, 64, 128]}, pack=2))
    groups = packs(points, 2)
    assert [len(g) for g in groups] == [2, 1]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"space": {"sae.k": [100]}}, "sae.k=100 is larger than sae.n_latents=64"),
        ({"space": {"sae.nope": [1]}}, "'nope' is not a field of sae"),
        ({"space": {"sae.k": []}}, "empty list"),
        ({"space": {"train.lr": {"loguniform": [0, 1]}}}, "loguniform needs low > 0"),
        ({"space": {"train.lr": {"gaussian": [0, 1]}}}, "give a list (grid) or one of"),
        (
            {"space": {"train.total_tokens": [10_000, 20_000]}, "pack": 2},
            "packed points must share train.total_tokens",
        ),
    ],
)
def test_bad_spaces_are_named(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand(spec(**kw))


def test_empty_architecture_space_still_sweeps_architectures():
    points = expand(spec(architectures={"topk": {}, "relu": None}))
    assert [p.sae.architecture for p in points] == ["topk", "relu"]


def test_load_rejects_unknown_keys(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\noutput: out\nbase: {}\nspaces: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'spaces'"):
        load_sweep_spec(str(path))
