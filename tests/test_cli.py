import json
import subprocess
import sys

import pytest

from raysae.__main__ import main
from raysae.checkpoint import load_sae

TINY = """
sae: {architecture: topk, d_in: 16, n_latents: 64, k: 4}
train: {total_tokens: 20000, batch_size: 500, log_every_tokens: 10000, init_tokens: 1000}
data: {toy: {n_features: 32, active_per_token: 3}}
"""


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "raysae", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "eval" in out.stdout


def test_train_writes_checkpoint_and_metrics(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY)
    assert main(["train", str(cfg), "--out", str(tmp_path / "out"), "--set", "sae.k=3"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["tokens"] == 20000 and metrics["config"]["sae"]["k"] == 3
    assert 0 <= metrics["eval"]["fvu"] < 1 and metrics["eval"]["l0"] <= 3
    assert "feature_recovery" in metrics
    model = load_sae(tmp_path / "out" / "sae")
    assert float(model.input_scale) == 1.0  # exported with the scale folded in
    assert "held-out: fvu" in capsys.readouterr().out


def test_train_refuses_to_overwrite(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"keep": true}')
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text()) == {"keep": True}


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        (TINY.replace("k: 4", "k: 4, bogus: 1"), "unknown key(s) 'bogus'"),
        (TINY.replace("topk", "nope"), "sae.architecture='nope' is not one of"),
        (TINY.replace("k: 4", "k: 100"), "sae.k=100 is larger than sae.n_latents=64"),
        (TINY.replace("total_tokens: 20000", "total_tokens: 10"), "smaller than one batch"),
    ],
)
def test_bad_config_exits_2_with_named_error(tmp_path, capsys, yaml_text, message):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml_text)
    assert main(["train", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_checks_its_output_before_training(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY)
    (tmp_path / "file").write_text("")
    assert main(["train", str(cfg), "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr()
    assert "is a file, not a folder" in err.err and "training" not in err.out
