"""A command opens its dataset once: one manifest read and one footer check per part, however
many sweep points, packed SAEs, trials, workers or restarts read it (raysae.data.Dataset)."""

import pytest
import torch
import yaml

from raysae import data
from raysae.__main__ import main
from raysae.data import dataset as dataset_module

PARTS = 6
ROWS_PER_PART = 4096


@pytest.fixture
def s3_dataset(s3_prefix: str) -> str:
    uri = f"{s3_prefix}/acts"
    acts = torch.randn(PARTS * ROWS_PER_PART, 16, generator=torch.Generator().manual_seed(0))
    data.write_dataset(uri, acts, rows_per_part=ROWS_PER_PART)
    return uri


@pytest.fixture
def footer_checks(monkeypatch) -> list[str]:
    """Parts whose footer this process checks (open_dataset checks each part's)."""
    checked: list[str] = []
    check = dataset_module._check_footer

    def counting(uri, manifest, part):
        checked.append(part.name)
        return check(uri, manifest, part)

    monkeypatch.setattr(dataset_module, "_check_footer", counting)
    return checked


def manifest_reads(requests: list[tuple[str, str, str]]) -> int:
    return sum(
        1
        for method, path, _ in requests
        if method == "GET" and path.endswith("/acts/manifest.json")
    )


def base_config(uri: str) -> dict:
    return {
        "sae": {"d_in": 16, "n_latents": 32, "k": 4},
        "train": {
            "total_tokens": 8192,
            "batch_size": 1024,
            "log_every_tokens": 4096,
            "init_tokens": 1024,
        },
        "data": {"uri": uri, "eval_parts": 1, "read_cpus": 0.25},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.4, "checkpoint_every_tokens": 4096},
    }


def test_train_local_opens_the_dataset_once(s3_dataset, s3_requests, footer_checks, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base_config(s3_dataset)))
    start = len(s3_requests.requests)
    assert main(["train", str(config), "--out", str(tmp_path / "out"), "--local"]) == 0
    assert manifest_reads(s3_requests.since(start)) == 1
    assert sorted(footer_checks) == sorted(p.name for p in data.read_manifest(s3_dataset).parts)


@pytest.mark.ray
@pytest.mark.timeout(480)
def test_four_point_sweep_opens_the_dataset_once(
    ray_cluster, s3_dataset, s3_requests, footer_checks, tmp_path
):
    spec = {
        "name": "open-once",
        "output": str(tmp_path / "sweeps"),
        "base": base_config(s3_dataset),
        "space": {"sae.k": [2, 4], "train.lr": [1e-3, 3e-3]},  # 4 points
        # One trial of 4 packed SAEs: a dataset opened again per point, per member or per
        # trial would show as a second read as surely as with more trials, at a trial's cost.
        "pack": 4,
        "max_concurrent_trials": 1,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    start = len(s3_requests.requests)
    assert main(["sweep", str(path)]) == 0
    requests = s3_requests.since(start)
    # Every process (driver, trials, Train workers) shares this S3 server: the manifest was
    # read once in all, and each part's footer was checked once, by the driver.
    assert manifest_reads(requests) == 1
    assert len(footer_checks) == PARTS
    table = (tmp_path / "sweeps" / "open-once" / "results.csv").read_text().splitlines()
    assert len(table) == 1 + 4
