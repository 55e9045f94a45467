"""cluster.yaml, checked offline: Ray's own schema and config validation, boto3's RunInstances
parameter shapes, and raysae's invariants (head trains nothing, GPUs declared, spot where meant,
Ray pinned once, every node started with token authentication and given the head's token).

What runs here, none of it calling AWS (the `offline` fixture refuses any network connection):
- `ray/autoscaler/ray-schema.json` (draft-07) through jsonschema, as `ray up` does;
- `prepare_config` (merges the wheel's `ray/autoscaler/aws/defaults.yaml`, prepends
  `setup_commands`, checks docker, fills per-type worker bounds), then `validate_config`
  (the schema again, head type, min_workers ≤ max_workers);
- botocore's `RunInstances` input shape for every `node_config`, which Ray's schema leaves
  free-form (a misspelt `InstanceMarketOptions` would otherwise launch on-demand, silently).
Not checked, because `ray up` does it by calling AWS: resources filled from DescribeInstanceTypes
(we declare them instead) and `bootstrap_aws` (IAM profile, key pair, subnets, security groups, AMI).
"""

import copy
import functools
import json
import re
import socket
from pathlib import Path

import botocore.session
import jsonschema
import pytest
import ray.autoscaler
import yaml
from botocore.validate import ParamValidator
from ray.autoscaler._private.util import prepare_config, validate_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
GPU_FAMILY = re.compile(r"^(g\d|p\d)")  # EC2 accelerated-computing families with NVIDIA GPUs
GPUS_PER_INSTANCE = {
    "g5.12xlarge": 4,
    "g5.48xlarge": 8,
    "p4d.24xlarge": 8,
    "p4de.24xlarge": 8,
    "p5.48xlarge": 8,
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any AWS (or other) call fails the test instead of hanging or succeeding by luck."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster.yaml checks must stay offline; tried to connect: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def load() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def schema_errors(cfg: dict) -> list[str]:
    """Every schema violation as 'json.path: message' (jsonschema.validate stops at the first)."""
    errors = jsonschema.Draft7Validator(SCHEMA).iter_errors(cfg)
    return sorted(f"{e.json_path}: {e.message}" for e in errors)


def ray_validate(cfg: dict) -> dict:
    """What `ray up` runs before it first talks to AWS."""
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


@functools.cache
def run_instances_shape():
    """The RunInstances input shape from botocore's bundled EC2 model (a local file, ~1 s)."""
    return (
        botocore.session.get_session()
        .get_service_model("ec2")
        .operation_model("RunInstances")
        .input_shape
    )


def run_instances_errors(node_config: dict) -> str:
    """botocore's report on node_config as RunInstances parameters ('' when valid)."""
    params = {**node_config, "MinCount": 1, "MaxCount": 1}
    report = ParamValidator().validate(params, run_instances_shape())
    return report.generate_report() if report.has_errors() else ""


def workers(cfg: dict) -> dict:
    return {
        name: nt
        for name, nt in cfg["available_node_types"].items()
        if name != cfg["head_node_type"]
    }


def is_gpu(nt: dict) -> bool:
    return bool(GPU_FAMILY.match(nt["node_config"]["InstanceType"]))


def is_spot(nt: dict) -> bool:
    return nt["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"


def first_spot(cfg: dict) -> tuple[str, dict]:
    return next((name, nt) for name, nt in workers(cfg).items() if is_spot(nt))


# --- Ray's and boto3's validation ---------------------------------------------------------


def test_schema_accepts_cluster_yaml():
    assert SCHEMA["$schema"].startswith("http://json-schema.org/draft-07/")
    assert schema_errors(load()) == []


def test_ray_validation_accepts_cluster_yaml():
    cfg = load()
    prepared = ray_validate(cfg)
    assert prepared["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0
    n = len(cfg["setup_commands"])
    assert prepared["worker_setup_commands"][:n] == cfg["setup_commands"]


def test_node_configs_are_valid_run_instances_parameters():
    for name, nt in load()["available_node_types"].items():
        assert run_instances_errors(nt["node_config"]) == "", name


# --- raysae's invariants --------------------------------------------------------------------


def test_head_runs_no_training():
    cfg = load()
    head = cfg["available_node_types"][cfg["head_node_type"]]
    # CPU must be explicit: left out, the head would advertise all its cores and take trials.
    assert head["resources"].get("CPU") == 0, head["resources"]
    assert head["resources"].get("GPU", 0) == 0, head["resources"]
    assert not is_gpu(head) and not is_spot(head), "the head must be a plain on-demand node"


def test_gpu_types_declare_whole_gpus_and_scale_from_zero():
    gpu_types = {name: nt for name, nt in workers(load()).items() if is_gpu(nt)}
    assert gpu_types
    for name, nt in gpu_types.items():
        res, instance = nt["resources"], nt["node_config"]["InstanceType"]
        assert isinstance(res.get("GPU"), int) and res["GPU"] >= 1, f"{name}: GPU not declared"
        assert res["GPU"] == GPUS_PER_INSTANCE.get(instance, res["GPU"]), f"{name}: {instance}"
        assert res.get("CPU", 0) >= res["GPU"], f"{name}: a Train worker needs a CPU per GPU"
        assert nt["min_workers"] == 0 and nt["max_workers"] >= 1, name


def test_spot_and_on_demand_gpu_fleets():
    types = workers(load())
    spot = [nt for nt in types.values() if is_spot(nt)]
    assert spot and all(is_gpu(nt) for nt in spot), "spot is for the preemptible GPU fleet"
    for nt in spot:
        behaviour = nt["node_config"]["InstanceMarketOptions"].get("SpotOptions", {})
        assert behaviour.get("InstanceInterruptionBehavior", "terminate") == "terminate"
    assert any(
        is_gpu(nt) and not is_spot(nt) and nt["resources"]["GPU"] >= 8 for nt in types.values()
    ), "an on-demand 8-GPU type"
    assert any(not is_gpu(nt) for nt in types.values()), "a CPU type for Ray Data readers"


def test_worker_caps_and_idle_timeout():
    cfg = load()
    assert sum(nt["max_workers"] for nt in workers(cfg).values()) <= cfg["max_workers"]
    assert 0 < cfg["idle_timeout_minutes"] <= 30


def test_every_worker_sizes_shm_and_derives_object_store_from_it():
    cfg = load()
    for name, nt in workers(cfg).items():
        assert any(o.startswith("--shm-size=") for o in nt["docker"]["worker_run_options"]), name
    start = " ".join(cfg["worker_start_ray_commands"])
    assert "--object-store-memory=" in start and "/dev/shm" in start


def test_ray_version_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [
        m[1]
        for d in deps
        if (m := re.fullmatch(r"ray(?:\[[^\]]*\])?==([\w.]+)", d.replace(" ", "")))
    ]
    assert len(pins) == 1, deps
    text, pin = CLUSTER_YAML.read_text(), pins[0]
    found = re.findall(r"rayproject/ray(?:-ml)?:(\d[\w.]*?)(?:-|\s|$)", text) + re.findall(
        r"\bray(?:\[[^\]]*\])?==([\w.]+)", text
    )
    assert found and set(found) == {pin}, f"pyproject pins ray=={pin}; cluster.yaml has {found}"
    docker = load()["docker"]
    for key in ("image", "head_image", "worker_image"):
        assert docker.get(key, docker["image"]).startswith(f"rayproject/ray:{pin}-"), key


def test_no_credentials_only_instance_profiles():
    text, cfg = CLUSTER_YAML.read_text(), load()
    assert not re.search(
        r"AKIA[0-9A-Z]{16}|aws_(secret_access_key|access_key_id|session_token)", text, re.IGNORECASE
    )
    assert "aws_credentials" not in cfg["provider"]
    for name, nt in cfg["available_node_types"].items():
        arn = nt["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::[^:]+:instance-profile/[\w+=,.@-]+", arn), name


# --- broken copies fail with the bad key or value named ---------------------------------------


def test_misspelt_node_type_key_is_named():
    cfg = load()
    name, nt = first_spot(cfg)
    nt["max_worker"] = nt.pop("max_workers")
    assert schema_errors(cfg) == [
        f"$.available_node_types.{name}: Additional properties are not allowed "
        "('max_worker' was unexpected)"
    ]
    with pytest.raises(jsonschema.ValidationError, match=r"'max_worker' was unexpected"):
        ray_validate(cfg)


def test_misspelt_top_level_key_is_named():
    # Without the schema this would be silent: prepare_config fills max_workers=2 from defaults.
    cfg = load()
    cfg["max_worker"] = cfg.pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match=r"'max_worker' was unexpected"):
        ray_validate(cfg)


def test_fractional_gpu_is_named():
    cfg = load()
    name, nt = first_spot(cfg)
    nt["resources"]["GPU"] = 0.5
    assert schema_errors(cfg) == [
        f"$.available_node_types.{name}.resources.GPU: 0.5 is not of type 'integer'"
    ]
    with pytest.raises(jsonschema.ValidationError, match=r"0\.5 is not of type 'integer'") as err:
        ray_validate(cfg)
    assert "['resources']['GPU']" in str(err.value)


def test_misspelt_node_config_key_is_caught_by_boto3_shape_not_ray_schema():
    cfg = load()
    name, nt = first_spot(cfg)
    nt["node_config"]["InstanceMarketOption"] = nt["node_config"].pop("InstanceMarketOptions")
    assert schema_errors(cfg) == []  # node_config is free-form to Ray
    assert 'Unknown parameter in input: "InstanceMarketOption"' in run_instances_errors(
        nt["node_config"]
    )


# --- token authentication (issue 17: only the owner can run code on the cluster) --------------

AUTH_ON = re.compile(r"(?:^|[;&|]\s*|\s)RAY_AUTH_MODE=token\s+ray start\b")
"""A `ray start` with token authentication switched on for that very command."""


def start_commands(cfg: dict) -> dict[str, list[str]]:
    """Every `ray start` of every node, after Ray's own preparation: node type → commands."""
    prepared = ray_validate(cfg)
    head = prepared["head_node_type"]
    return {
        name: [
            command
            for command in prepared[
                "head_start_ray_commands" if name == head else "worker_start_ray_commands"
            ]
            if "ray start" in command
        ]
        for name in prepared["available_node_types"]
    }


def starts_without_auth(cfg: dict) -> list[str]:
    """'node type: command' for each `ray start` that does not turn token auth on."""
    return [
        f"{name}: {command}"
        for name, commands in start_commands(cfg).items()
        for command in commands
        if not AUTH_ON.search(command)
    ]


def test_every_node_starts_ray_with_token_auth():
    cfg = load()
    commands = start_commands(cfg)
    assert set(commands) == set(cfg["available_node_types"])
    assert all(len(c) == 1 for c in commands.values()), commands
    assert starts_without_auth(cfg) == []
    # Everything else in the containers (job drivers, `ray status` through `ray exec`) too.
    assert "--env=RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()


def test_a_start_without_token_auth_is_named():
    cfg = load()
    cfg["worker_start_ray_commands"] = [
        c.replace("RAY_AUTH_MODE=token ", "") for c in cfg["worker_start_ray_commands"]
    ]
    missing = starts_without_auth(cfg)
    assert len(missing) == len(workers(cfg)) and all("ray start --address" in m for m in missing)
    cfg = load()
    cfg["head_start_ray_commands"] = [
        c.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled")
        for c in cfg["head_start_ray_commands"]
    ]
    assert [m.split(":")[0] for m in starts_without_auth(cfg)] == [cfg["head_node_type"]]


def test_the_head_makes_the_token_and_every_node_gets_it():
    cfg = load()
    # Made on the head, printed to nowhere (the command prints the token), readable by its owner.
    make = [c for c in cfg["head_setup_commands"] if "get-auth-token" in c]
    assert len(make) == 1 and re.search(r"ray get-auth-token --generate\s*>\s*/dev/null", make[0])
    assert "chmod 600 ~/.ray/auth_token" in make[0]
    # ~/.ray of the container (the image's user is ray) is a file mount: Ray syncs it from the head
    # to each worker before its setup and `ray start`, and bind-mounts it in the worker's container.
    local = cfg["file_mounts"]["/home/ray/.ray"]
    folder = ROOT / local
    assert folder.is_dir() and not (folder / "auth_token").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["README.md"], "keep it empty of secrets"
    assert f"/{local}/auth_token" in (ROOT / ".gitignore").read_text().splitlines()
    # A worker without the token stops at once, with the reason, instead of failing to join.
    assert all("test -s ~/.ray/auth_token" in c for c in cfg["worker_start_ray_commands"][1:])


def test_no_token_in_the_file():
    text = CLUSTER_YAML.read_text()
    assert "RAY_AUTH_TOKEN" not in text  # no token in the environment of the containers
    assert not re.search(r"\b[0-9a-f]{32,}\b", text)  # Ray's tokens are 64 hex digits
