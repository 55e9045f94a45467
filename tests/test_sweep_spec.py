import copy
import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import event, example, given
from hypothesis import strategies as st
from strategies import mutated, unknown_keys

from raysae.__main__ import main
from raysae.config import (
    DataConfig,
    MLflowConfig,
    RunConfig,
    SAEConfig,
    ScalingConfig,
    TensorBoardConfig,
    ToyDataConfig,
    TrackingConfig,
    TrainConfig,
    WandbConfig,
)
from raysae.harvest import HarvestConfig
from raysae.settings import ConfigError, from_dict
from raysae.sweep_spec import (
    SchedulerSpec,
    SweepSpec,
    ToyDatasetSpec,
    expand,
    load_sweep_spec,
    packs,
    parse_sweep_spec,
)

BASE = {
    "sae": {"d_in": 16, "n_latents": 64, "k": 4},
    "train": {"total_tokens": 10_000, "batch_size": 500},
    "data": {"uri": "data/acts"},
}


def spec(**kw):
    return SweepSpec(name="s", output="out", base=from_dict(RunConfig, BASE), **kw)


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


# ---------------------------------------------------------------- every key checked at load


def toy_spec(tmp_path) -> dict:
    """A valid spec that writes toy data when it runs, with a scheduler."""
    return {
        "name": "typo",
        "output": str(tmp_path / "out"),
        "base": {**copy.deepcopy(BASE), "data": {"uri": str(tmp_path / "acts")}},
        "space": {"sae.n_latents": [64, 128]},
        "scheduler": {"metric": "fvu", "grace_tokens": 1000},
        "toy_dataset": {"n_tokens": 4096, "rows_per_part": 1024, "features": {"n_features": 32}},
    }


def harvest_spec(tmp_path) -> dict:
    """A valid spec that harvests its data when it runs."""
    spec = toy_spec(tmp_path)
    del spec["toy_dataset"]
    spec["base"]["data"] = {"uri": str(tmp_path / "data" / "layer_3")}
    spec["harvest"] = {"model": "m", "layers": [3], "output": str(tmp_path / "data")}
    return spec


def test_the_example_specs_are_valid(tmp_path):
    for make in (toy_spec, harvest_spec):
        spec = parse_sweep_spec(make(tmp_path))
        assert spec.base.data.uri.startswith(str(tmp_path)) and len(expand(spec)) == 2
    spec = parse_sweep_spec(harvest_spec(tmp_path))
    assert isinstance(spec.harvest, HarvestConfig) and spec.harvest.layers == (3,)
    spec = parse_sweep_spec(toy_spec(tmp_path))
    assert isinstance(spec.toy_dataset, ToyDatasetSpec)
    assert spec.toy_dataset.features == ToyDataConfig(n_features=32)


def misspell(spec: dict, dotted: str, key: str, value=1) -> dict:
    """`spec` with `key: value` added to the section at `dotted` (made if the spec has none)."""
    node = spec
    for part in filter(None, dotted.split(".")):
        node = node.setdefault(part, {})
    node[key] = value
    return spec


TYPOS = [
    (harvest_spec, "harvest", "modle", "harvest: unknown key(s) 'modle'"),
    (toy_spec, "toy_dataset", "rows_per_prt", "toy_dataset: unknown key(s) 'rows_per_prt'"),
    (
        toy_spec,
        "toy_dataset.features",
        "n_featurez",
        "toy_dataset.features: unknown key(s) 'n_featurez'",
    ),
    (toy_spec, "scheduler", "metrc", "scheduler: unknown key(s) 'metrc'"),
    (toy_spec, "base.train", "lrr", "base.train: unknown key(s) 'lrr'"),
    (toy_spec, "space", "sae.kk", "space key 'sae.kk': 'kk' is not a field of sae"),
    (toy_spec, "tracking.mlflow", "uri", "tracking.mlflow: unknown key(s) 'uri'"),
]


@pytest.mark.parametrize("make, section, key, message", TYPOS)
def test_a_typo_anywhere_fails_at_load_and_writes_nothing(
    tmp_path, capsys, make, section, key, message
):
    spec = misspell(make(tmp_path), section, key, [16] if section == "space" else 1)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_sweep_spec(str(path))
    assert main(["sweep", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("out", "acts", "data"))


@pytest.mark.parametrize(
    "tracking, message",
    [
        (
            {"trackers": ["tensorboard", "mlfow"]},
            "tracking.trackers[1]='mlfow' is not one of: tensorboard, mlflow, wandb",
        ),
        ({"wandb": {"mode": "of"}}, "tracking.wandb.mode='of' is not one of"),
    ],
)
def test_an_unknown_tracker_fails_at_load_naming_the_choices(tmp_path, capsys, tracking, message):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**toy_spec(tmp_path), "tracking": tracking}))
    assert main(["sweep", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("out", "acts"))


def test_a_sweeps_trackers_are_its_own_not_each_points():
    with pytest.raises(ConfigError, match="base.tracking: a sweep's trackers are set in its own"):
        parse_sweep_spec({**toy_spec(FUZZ_ROOT), "space": {"tracking.trackers": [["mlflow"]]}})
    base = {**BASE, "tracking": {"trackers": ["mlflow"]}}
    with pytest.raises(ConfigError, match="base.tracking: a sweep's trackers are set in its own"):
        expand(
            SweepSpec(name="s", output="o", base=from_dict(RunConfig, base), space={"sae.k": [2]})
        )
    tracked = parse_sweep_spec({**toy_spec(FUZZ_ROOT), "tracking": {"trackers": ["tensorboard"]}})
    assert tracked.tracking.trackers == ("tensorboard",)
    remote = {**toy_spec(FUZZ_ROOT), "output": "s3://bucket/sweeps"}
    with pytest.raises(ConfigError, match="tracking.tensorboard.logdir: the output s3://bucket"):
        parse_sweep_spec({**remote, "tracking": {"trackers": ["tensorboard"]}})
    given = {"trackers": ["tensorboard"], "tensorboard": {"logdir": "tb"}}
    assert parse_sweep_spec({**remote, "tracking": given}).tracking.tensorboard.logdir == "tb"


def test_a_missing_tracker_library_fails_the_sweep_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    from raysae import tracking

    monkeypatch.setitem(tracking.MODULES, "wandb", "raysae_test_no_such_module")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**toy_spec(tmp_path), "tracking": {"trackers": ["wandb"]}}))
    assert main(["sweep", str(path)]) == 2
    assert "pip install raysae[wandb]" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("out", "acts"))


def test_a_dataset_the_harvest_does_not_make_fails_at_load(tmp_path):
    spec = harvest_spec(tmp_path)
    spec["base"]["data"]["uri"] = str(tmp_path / "data" / "layer_4")
    with pytest.raises(ConfigError, match="is not one of the harvest's outputs"):
        parse_sweep_spec(spec)


SECTIONS = {
    "": SweepSpec,
    "base": RunConfig,
    "base.sae": SAEConfig,
    "base.train": TrainConfig,
    "base.data": DataConfig,
    "base.scaling": ScalingConfig,
    "scheduler": SchedulerSpec,
    "toy_dataset": ToyDatasetSpec,
    "toy_dataset.features": ToyDataConfig,
    "harvest": HarvestConfig,
    "tracking": TrackingConfig,
    "tracking.tensorboard": TensorBoardConfig,
    "tracking.mlflow": MLflowConfig,
    "tracking.wandb": WandbConfig,
}
"""Sections of a spec → the settings they are read into."""


@given(
    section=st.sampled_from([*SECTIONS, "space"]),
    data=st.data(),
)
def test_an_unknown_key_in_any_section_is_refused_naming_it(tmp_path_factory, section, data):
    tmp_path = tmp_path_factory.getbasetemp()
    make = harvest_spec if section == "harvest" else toy_spec
    if section == "space":  # a dotted run-config key whose last part is no field
        sub = data.draw(st.sampled_from(["sae", "train", "data", "scaling"]), label="sub")
        fields = {f.name for f in dataclasses.fields(SECTIONS[f"base.{sub}"])}
        key = f"{sub}." + data.draw(unknown_keys(fields), label="key")
        message = f"space key {key!r}: {key.split('.')[1]!r} is not a field of {sub}"
        spec = misspell(make(tmp_path), "space", key, [1])
    else:
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        key = data.draw(unknown_keys(fields), label="key")
        message = f"{section or 'SweepSpec'}: unknown key(s) {key!r}"
        spec = misspell(make(tmp_path), section, key)
    with pytest.raises(ConfigError) as refused:
        parse_sweep_spec(spec)
    assert message in str(refused.value)


# ---------------------------------------------------------------- any bad input: a ConfigError

FUZZ_ROOT = Path("/nonexistent/raysae-fuzz")  # parsing reads and writes nothing there
VALID = {"toy": toy_spec(FUZZ_ROOT), "harvest": harvest_spec(FUZZ_ROOT)}
"""Valid specs the fuzz test mutates."""


def edited(spec: dict, path: tuple, value) -> dict:
    """A copy of `spec` with the value at key path `path` replaced."""
    spec = copy.deepcopy(spec)
    node = spec
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return spec


@given(
    spec=st.sampled_from(sorted(VALID)).flatmap(lambda name: mutated(VALID[name])),
    via_yaml=st.booleans(),
)
@example(spec=edited(VALID["toy"], ("base", "data", "uri"), -1), via_yaml=False)
@example(spec=edited(VALID["toy"], ("architectures",), {"topk": [1, 2]}), via_yaml=False)
@example(spec=edited(VALID["toy"], ("base", "train", "total_tokens"), math.inf), via_yaml=True)
def test_any_mutated_spec_gives_points_or_a_config_error(tmp_path_factory, spec, via_yaml):
    try:
        if via_yaml:
            path = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
            path.write_text(yaml.safe_dump(spec))
            parsed = load_sweep_spec(str(path))
        else:
            parsed = parse_sweep_spec(spec)
        points = expand(parsed)
    except ConfigError as e:
        assert str(e)  # a message to show
        event("ConfigError")
        return
    assert points and all(isinstance(p, RunConfig) for p in points)
    event("valid")
