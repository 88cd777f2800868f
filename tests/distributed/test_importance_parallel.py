"""Importance scores agree at TP=1, TP=2 and EP=2 (2 ranks, gloo, CPU), one torchrun launch.

``cases_importance.py`` loads the same TP=1 weights into each layout, feeds the same tokens
in total, and writes the scores to JSON. Tolerance: every score is a token sum accumulated
in fp64 from fp32 activations; TP changes the summation order of the row-parallel layers
(and EP the order tokens meet their expert), i.e. rounding of ~1e-7 relative. A wrong shard
order, a missing or doubled reduction, or a mis-attributed expert gives errors of order one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_ext.elastic.config import AXES
from tests.distributed.launch import case, run_cases

SCRIPT = Path(__file__).with_name("cases_importance.py")
RTOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_cases(SCRIPT, tmp_path_factory.mktemp("importance_parallel"))


def test_tp1_reference_scores_every_axis_identically_on_both_ranks(results):
    ref = case(results, "tp1")
    assert ref["ranks_identical"]
    assert set(ref["axes"]) == {*AXES, "depth"}  # depth: s_j of every layer
    assert ref["tokens"] == 4 * 2 * 64


@pytest.mark.parametrize("name", ["tp2", "ep2"])
def test_scores_at_another_layout_equal_tp1(results, name):
    got = case(results, name)
    assert got["ranks_identical"], "every rank must end with the same global scores"
    assert got["tokens"] == case(results, "tp1")["tokens"]
    assert got["expert_tokens_equal"], "the router must send the same tokens to each expert"
    assert set(got["per_axis_max_rel_diff"]) >= set(AXES)
    for axis, diff in got["per_axis_max_rel_diff"].items():
        assert diff <= RTOL, (name, axis, diff)


def test_recipe_scores_at_tp2_and_saves_the_reordered_parent_at_tp1(results):
    got = case(results, "recipe_tp2")
    assert got["scored_at"] == {"nproc": 2, "tp": 2, "ep": 1}
    assert got["tokens"] == 2 * 2 * 64  # DP=1 at TP=2: one replica's batches
    assert got["reorder_logits_max_abs_diff"] <= 1e-5
    assert got["saved_layout"]["tp"] == 1 and got["saved_layout"]["dp"] == 2
    assert got["stripe"] == [2, 1]
    assert set(got["layout_axes"]) == set(AXES)
    assert sorted(got["layer_order"]) == list(range(8))  # the depth ranking, every layer
    assert got["layer_order"] == got["depth_ranking"]
    for name in ("scores.pt", "permutations.json", "summary.json", "checkpoints"):
        assert name in got["files"], name
