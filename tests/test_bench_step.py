"""bench/step.py's one-step agreement check at a tiny size (raysae vs plain torch; peers only if
installed): it passes for the real implementations and fails loudly for a wrong one."""

import sys
from pathlib import Path

import pytest
import torch
from bench_scripts import load_bench

SIZE = ["--sizes", "32,256,8,128", "--check-only", "--threads", str(torch.get_num_threads())]


def test_one_step_check_passes(capsys):
    load_bench("step").main(SIZE)
    out = capsys.readouterr().out
    assert "check plain torch" in out and "check raysae loop" in out and "FAIL" not in out


def test_timing_prints_the_loop_and_the_gemm_multiples(capsys):
    """A real (tiny) timed run: the loop's row and raysae's step as a multiple of its GEMM."""
    size = [a for a in SIZE if a != "--check-only"]
    load_bench("step").main([*size, "--impls", "raysae loop", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "| raysae loop |" in out and "| encoder GEMM |" in out
    assert "raysae ÷ encoder GEMM:" in out and "raysae loop ÷ raysae:" in out


def test_one_step_check_fails_for_a_different_k(monkeypatch):
    bench = load_bench("step")
    real_init = bench.PlainTopKSAE.__init__
    monkeypatch.setattr(
        bench.PlainTopKSAE, "__init__", lambda self, init, k: real_init(self, init, k - 1)
    )
    with pytest.raises(SystemExit, match="one-step check failed"):
        bench.main([*SIZE, "--impls", "plain torch"])


def test_loop_step_bench_runs_at_a_tiny_size():
    """bench/loop_step.py: one round of every case in a worker importing this checkout."""
    import subprocess

    root = Path(__file__).parent.parent
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "loop_step.py"), "--sizes", "16,64,4,32"]
        + ["--rounds", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert "| gemm | step | loop |" in out and f"| {root.resolve()} |" in out
