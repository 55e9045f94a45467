"""The Pareto frontier and the results files, on hand-made rows."""

import math

import pandas as pd

from raysae import report


def test_pareto_mask_on_hand_made_points():
    l0 = [10, 20, 5, 20, 30, 10, float("nan")]
    fvu = [0.30, 0.20, 0.50, 0.25, 0.20, 0.30, 0.01]
    # (10, .30) twice: equal points do not dominate each other; (20, .25) is dominated by
    # (20, .20); (30, .20) by (20, .20); NaN is never on the frontier.
    assert report.pareto_mask(l0, fvu) == [True, True, True, False, False, True, False]


def test_frontiers_per_architecture_and_overall(tmp_path):
    table = pd.DataFrame(
        {
            "architecture": ["topk", "topk", "relu", "relu"],
            "l0": [8.0, 16.0, 40.0, 12.0],
            "fvu": [0.3, 0.2, 0.1, 0.35],
            "n_latents": [64] * 4,
            "k": [8, 16, 4, 4],
            "l1_coefficient": [5.0] * 4,
            "lr": [1e-3] * 4,
            "checkpoint": ["a", "b", "c", "d"],
        }
    )
    t = report.with_frontiers(table)
    assert t["pareto"].tolist() == [True, True, True, True]
    # overall: (12, .35) is dominated by (8, .3)
    assert t["pareto_all"].tolist() == [True, True, True, False]
    report.write_results(t, str(tmp_path))
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(pd.read_csv(tmp_path / "results.csv")) == 4
    frontier = pd.read_csv(tmp_path / "pareto.csv")
    assert frontier["l0"].tolist() == [12.0, 40.0, 8.0, 16.0]  # sorted by architecture, then L0
    text = report.summary(t, str(tmp_path))
    assert "topk" in text and "L0     8.00" in text and not math.isnan(t["fvu"].sum())
