import typing

import pytest

from raysae.config import (
    Architecture,
    RunConfig,
    SAEConfig,
    TrackingConfig,
    TrainConfig,
    load_run_config,
)
from raysae.saes import ARCHITECTURES
from raysae.settings import ConfigError, from_dict, to_dict


def test_architecture_choices_match_registry():
    # SAELens's CLI choices drifted from its registry; ours are checked against each other.
    assert set(typing.get_args(Architecture)) == set(ARCHITECTURES)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"sae: unknown key\(s\) 'n_latent'"):
        from_dict(SAEConfig, {"d_in": 8, "n_latent": 16}, "sae")


def test_missing_required_key():
    with pytest.raises(ConfigError, match="missing required key 'n_latents'"):
        from_dict(SAEConfig, {"d_in": 8}, "sae")


def test_k_larger_than_n_latents():
    with pytest.raises(ConfigError, match=r"sae.k=32 is larger than sae.n_latents=16"):
        SAEConfig(d_in=8, n_latents=16, k=32)
    SAEConfig(d_in=8, n_latents=16, k=32, architecture="relu")  # k is unused there


def test_unknown_architecture_lists_choices():
    with pytest.raises(ConfigError, match="sae.architecture='topkk' is not one of"):
        from_dict(SAEConfig, {"d_in": 8, "n_latents": 16, "architecture": "topkk"}, "sae")


def test_budget_smaller_than_batch():
    with pytest.raises(ConfigError, match="smaller than one batch"):
        TrainConfig(total_tokens=100, batch_size=4096)


def test_numbers_from_yaml_strings_and_whole_floats():
    cfg = from_dict(TrainConfig, {"total_tokens": "1e6", "batch_size": 4096.0, "lr": "3e-4"})
    assert cfg.total_tokens == 1_000_000 and isinstance(cfg.batch_size, int) and cfg.lr == 3e-4
    with pytest.raises(ConfigError, match="train.batch_size=10.5: expected a whole number"):
        from_dict(TrainConfig, {"batch_size": 10.5}, "train")
    with pytest.raises(ConfigError, match="expected true or false"):
        from_dict(SAEConfig, {"d_in": 8, "n_latents": 16, "normalize_inputs": "yes"}, "sae")


def test_derived_values_are_computed_not_stored():
    cfg = SAEConfig(d_in=64, n_latents=128)
    assert cfg.effective_k_aux == 32
    assert TrainConfig().effective_lr(2**16) == pytest.approx(2e-4)  # 4e-4 / sqrt(4)


def test_round_trip_through_dict():
    cfg = from_dict(
        RunConfig,
        {
            "sae": {"d_in": 8, "n_latents": 16, "k": 4},
            "data": {"toy": {"n_features": 32}},
            "train": {"adam_betas": [0.9, 0.99], "total_tokens": 8192},
        },
    )
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


def test_load_run_config_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sae: {d_in: 8, n_latents: 16}\ndata: {toy: {}}\n")
    cfg = load_run_config(
        str(path), {"sae.k": 3, "train.total_tokens": 5000, "train.batch_size": 100}
    )
    assert cfg.sae.k == 3 and cfg.train.total_tokens == 5000
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="exactly one of data.uri"):
        path.write_text("sae: {d_in: 8, n_latents: 16, k: 4}\ndata: {}\n")
        load_run_config(str(path))


def test_trackers_are_choices_named_by_their_dotted_key():
    run = {"sae": {"d_in": 8, "n_latents": 64}, "data": {"toy": {}}}
    cfg = from_dict(RunConfig, {**run, "tracking": {"trackers": ["tensorboard", "mlflow"]}})
    assert cfg.tracking.trackers == ("tensorboard", "mlflow")
    with pytest.raises(
        ConfigError,
        match=r"tracking.trackers\[1\]='mlfow' is not one of: tensorboard, mlflow, wandb",
    ):
        from_dict(RunConfig, {**run, "tracking": {"trackers": ["tensorboard", "mlfow"]}})
    with pytest.raises(ConfigError, match=r"tracking.trackers\[0\]='tb' is not one of"):
        TrackingConfig(trackers=("tb",))  # built in code: the same check
    with pytest.raises(ConfigError, match="tracking.wandb.mode='ofline' is not one of"):
        from_dict(RunConfig, {**run, "tracking": {"wandb": {"mode": "ofline"}}})
    with pytest.raises(ConfigError, match=r"tracking.mlflow: unknown key\(s\) 'uri'"):
        from_dict(RunConfig, {**run, "tracking": {"mlflow": {"uri": "http://x"}}})
    with pytest.raises(ConfigError, match="lists mlflow more than once"):
        TrackingConfig(trackers=("mlflow", "mlflow"))


def test_trackers_are_not_part_of_a_runs_name():
    """Adding a tracker to a run that is resumed (the same command) continues that run."""
    from raysae.train import run_name

    run = {"sae": {"d_in": 8, "n_latents": 64}, "data": {"toy": {}}}
    tracked = from_dict(RunConfig, {**run, "tracking": {"trackers": ["mlflow"]}})
    assert run_name(tracked) == run_name(from_dict(RunConfig, run))
