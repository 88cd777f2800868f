"""Rank-agreed budgets (docs/design.md invariant 6) at TP=2 and EP=2, in one torchrun launch.

``cases_budget_agreement.py`` runs 200 steps of the tiny curriculum per layout on 2 gloo ranks
whose global RNGs are seeded differently; each rank draws the step's budget and the router's
choice with no communication, and the gathered per-step rows must be identical. Exact integer
comparison: any disagreement would be a hang or a silent divergence in real training.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launch import case, run_cases

SCRIPT = Path(__file__).with_name("cases_budget_agreement.py")
MODES = ("homogeneous", "heterogeneous")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_cases(SCRIPT, tmp_path_factory.mktemp("budget_agreement"))


@pytest.mark.parametrize("name,tp,ep", [("tp2", 2, 1), ("ep2", 1, 2)])
def test_every_rank_picks_the_same_budget_and_widths_each_step(results, name, tp, ep):
    result = case(results, name)
    assert (result["tp"], result["ep"]) == (tp, ep)
    assert result["stages_seen"] == [0, 1]  # the 200 steps cross the stage boundary at 150
    for mode in MODES:
        r = result[mode]
        assert r["steps"] == 200
        assert r["disagreeing_steps"] == 0, (mode, r)
        assert r["router_params_max_diff"] == 0.0, (mode, r)


@pytest.mark.parametrize("name", ["tp2", "ep2"])
def test_agreement_is_not_trivial(results, name):
    """Every budget is drawn and the widths vary, so agreement is not a constant output."""
    result = case(results, name)
    for mode in MODES:
        r = result[mode]
        assert all(c > 0 for c in r["budget_counts"]), r
        assert r["distinct_widths"] > 1, r
    # heterogeneous rows hold one width per layer: more columns than one per axis
    assert result["heterogeneous"]["columns"] > result["homogeneous"]["columns"]
