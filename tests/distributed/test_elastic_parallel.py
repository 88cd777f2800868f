"""Elastic layers at TP=2 / EP=2 equal TP=1 (docs/design.md invariants 1, 3), one torchrun launch.

``cases_elastic_parallel.py`` runs every case in a single 2-rank launch (gloo, CPU) and
writes the measured max abs logit differences (worst over ranks) to JSON.

Tolerance. fp32. TP splits heads, channels and the vocab, so row-parallel layers sum their
partial products in another order (rounding, ~1e-7 relative per operation; measured <= 6.6e-7
over eight layers on logits of order 1); EP only moves whole experts (measured 0). A wrong
local mask (a shard that keeps the wrong heads, channels or experts) gives order one. So:
max abs diff <= 1e-5 for masked and narrow compute at every budget, and for the TP=1 slice
loaded at TP=2 / EP=2 against the elastic TP=1 logits. At PP=2 nothing is split inside a
layer (the stages pass whole activations), so the same bound is loose there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launch import run_cases

SCRIPT = Path(__file__).with_name("cases_elastic_parallel.py")
ATOL = 1e-5
BUDGETS = (
    "full",
    "embedding",
    "attn_heads",
    "mamba_heads",
    "mamba_head_dim",
    "ffn",
    "moe_experts",
    "moe_ffn",
    "all",
    "depth",
    "all_depth",
    "all_depth4",
)
NARROW = ("embedding", "ffn", "moe_ffn", "attn_heads", "mamba_heads", "mamba_head_dim", "all")
NARROW += ("depth", "all_depth")  # depth 5 of 8 layers, alone and with every width small
NARROW += ("all_depth4",)  # depth 4 of 8 layers with every width small


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_cases(SCRIPT, tmp_path_factory.mktemp("elastic_parallel"))["cases"]


def case(results: dict, name: str) -> dict:
    assert "error" not in results.get("reference", {}), results["reference"]["error"]
    result = results[name]
    assert "error" not in result, result["error"]
    return result


@pytest.mark.parametrize("name,tp,ep", [("tp2", 2, 1), ("ep2", 1, 2)])
def test_elastic_masked_logits_at_every_budget_equal_tp1(results, name, tp, ep):
    result = case(results, name)
    assert (result["tp"], result["ep"]) == (tp, ep)
    assert set(result["masked"]) == set(BUDGETS)
    for budget, diff in result["masked"].items():
        assert diff <= ATOL, (budget, diff)


@pytest.mark.parametrize("name", ["tp2", "ep2"])
def test_elastic_narrow_logits_equal_tp1_masked(results, name):
    result = case(results, name)
    assert set(result["narrow"]) == set(NARROW)
    for budget, diff in result["narrow"].items():
        assert diff <= ATOL, (budget, diff)


@pytest.mark.parametrize("name", ["tp2", "ep2"])
def test_elastic_narrow_gradients_equal_masked_gradients_at_tp2_and_ep2(results, name):
    """Every axis narrow at once (the ``all`` budget), backward through TP / SP / EP comms.

    Relative to the largest gradient on the rank; rounding only, <= 1e-5 (as at TP=1).
    """
    gap = case(results, name)["narrow_grad_gap"]
    assert 0 <= gap <= 1e-5, gap
    gap = case(results, name)["narrow_grad_gap_depth"]  # three layers skipped, not run
    assert 0 <= gap <= 1e-5, gap


@pytest.mark.parametrize("name", ["tp2", "ep2"])
def test_tp1_slice_loaded_at_another_layout_equals_elastic_logits(results, name):
    result = case(results, name)
    assert result["slice_vs_masked"] <= ATOL, result["slice_vs_masked"]


@pytest.mark.parametrize("name", ["tp2", "ep2"])
def test_tp1_depth_slice_loaded_at_another_layout_equals_elastic_logits(results, name):
    """The slice drops the 3 skipped layers (8 -> 5, renumbered) and keeps the logits."""
    result = case(results, name)
    assert result["slice_layers_depth"] == 5
    assert result["slice_vs_masked_depth"] <= ATOL, result["slice_vs_masked_depth"]


def test_pp2_elastic_logits_with_skipped_layers_on_both_stages_equal_one_process(results):
    result = case(results, "pp2")
    assert result["pp"] == 2
    for mode in ("masked", "narrow"):
        assert set(result[mode]) == {"full", "depth", "all_depth", "all_depth4"}
        for budget, diff in result[mode].items():
            assert 0.0 <= diff <= ATOL, (mode, budget, diff)  # -1: no stage gave logits


def test_depth_slice_at_pp2_equals_elastic_logits_though_its_layers_change_stage(results):
    """Depth 4 keeps layers 0, 1, 3, 4: 3 + 1 on the elastic model's stages, 2 + 2 on the
    slice's (renumbered 0-3), so layer 3 runs on the other stage."""
    result = case(results, "pp2")
    assert result["slice_stage_layers"] == [2, 2]
    assert 0.0 <= result["slice_vs_elastic_depth4"] <= ATOL, result["slice_vs_elastic_depth4"]
