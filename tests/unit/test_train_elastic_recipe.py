"""The train-elastic recipe end to end on a real corpus slice, and bit-identical resume."""

from __future__ import annotations

import json

import pytest

from megatron_ext.config.compose import compose_recipe
from recipes import train_elastic

SMOKE = [
    "curriculum=smoke",
    "elastic_train.micro_batch_size=2",
    "elastic_train.eval_batches=2",
    "elastic_train.eval_seq_length=64",
    "elastic_train.eval_interval=4",
    "elastic_train.warmup_steps=2",
    "logger=none",
]


def _run(run_dir, source, data_overrides, *extra: str) -> dict:
    overrides = [f"source.dir={source}", f"run.dir={run_dir}", *data_overrides, *SMOKE, *extra]
    return train_elastic.run(compose_recipe("train_elastic", overrides))


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory, importance_run, data_overrides):
    run_dir = tmp_path_factory.mktemp("elastic")
    return run_dir, _run(run_dir, importance_run, data_overrides)


def test_elastic_run_reports_every_budget_with_router_choice_and_cost_error(elastic_run):
    run_dir, summary = elastic_run
    assert set(summary["budgets"]) == {"L", "M", "S"}
    for figures in summary["budgets"].values():
        for key in ("params", "active_params", "val_loss", "zero_shot_val_loss", "cost_error"):
            assert key in figures
        assert set(figures["router_choice"]) == {
            "embedding",
            "attn_heads",
            "mamba_heads",
            "mamba_head_dim",
            "ffn",
            "moe_experts",
            "moe_ffn",
        }
        # conf/router/default.yaml: every choice is within router.budget_tolerance=0.015
        assert figures["cost_error"] <= 0.015
    assert summary["budget_tolerance"] == 0.015
    assert summary["steps"] == 8
    assert [s["steps"] for s in summary["stages"]] == [4, 4]
    assert (run_dir / "budgets.png").stat().st_size > 1000
    choices = json.loads((run_dir / "budget_choices.json").read_text())
    assert choices.keys() == summary["budgets"].keys()


def test_split_elastic_run_resumes_bit_identically(tmp_path, importance_run, data_overrides):
    whole = _run(tmp_path / "whole", importance_run, data_overrides)
    first = _run(tmp_path / "split", importance_run, data_overrides, "elastic_train.stop_at=5")
    assert first["steps"] == 5
    resumed = _run(tmp_path / "split", importance_run, data_overrides)
    # Same weights, both optimizers, router, RNG, both stages' data positions: exact equality.
    # (The split run also evaluated where it stopped, at step 5; compare the common steps.)
    at_step = {v["step"]: v for v in resumed["val_curve"]}
    assert [at_step[v["step"]] for v in whole["val_curve"]] == whole["val_curve"]
    for name, figures in whole["budgets"].items():
        assert resumed["budgets"][name]["val_loss"] == figures["val_loss"]
        assert resumed["budgets"][name]["router_choice"] == figures["router_choice"]


def test_narrow_compute_run_trains_and_evaluates_like_the_masked_run(
    tmp_path, elastic_run, importance_run, data_overrides
):
    """``elastic.compute=narrow`` runs every axis it narrows through training and evaluation.

    The forward pass is the masked one up to rounding, but the router's soft-mask gradient
    sees only the active channels, so the runs may choose differently; what must hold is a
    trained model at every budget whose losses are those of a run of this length (within
    0.5 nats of the masked run's) and whose cost is still on budget.
    """
    _, masked = elastic_run
    narrow = _run(tmp_path / "narrow", importance_run, data_overrides, "elastic.compute=narrow")
    assert narrow["steps"] == masked["steps"]
    for name, figures in masked["budgets"].items():
        got = narrow["budgets"][name]
        assert abs(got["val_loss"] - figures["val_loss"]) <= 0.5, (name, got, figures)
        assert got["cost_error"] <= 0.015


def test_depth_axis_run_in_narrow_compute_gives_the_small_budget_fewer_layers(
    tmp_path, importance_run, data_overrides
):
    """``elastic=tiny_depth``: the router chooses depth jointly with the widths. S's target
    (0.25 of the parameters) is out of reach at full depth, so S must skip layers; every
    choice stays within router.budget_tolerance, and narrow compute trains through it."""
    layout = json.loads((importance_run / "checkpoints" / "elastic_layout.json").read_text())
    assert sorted(layout["layer_order"]) == list(range(8))
    summary = _run(
        tmp_path / "depth",
        importance_run,
        data_overrides,
        "elastic=tiny_depth",
        "elastic.compute=narrow",
    )
    depths = {name: f["router_choice"]["depth"] for name, f in summary["budgets"].items()}
    assert depths["S"] < 8 and depths["L"] == 8, depths
    for name, figures in summary["budgets"].items():
        assert figures["cost_error"] <= 0.015, name
        assert 0 < figures["val_loss"] < 10, name


def test_parent_dir_alone_is_ranked_first_and_only_once(tmp_path, trained_parent, data_overrides):
    """``source.dir`` that does not exist yet + ``parent.dir``: train-elastic ranks and reorders
    the parent into ``source.dir`` (the importance run's files, an exact reorder), trains from
    it, and a second start finds that ranking and does not redo it."""
    parent_dir, _ = trained_parent
    source = tmp_path / "ranked"
    summary = _run(tmp_path / "elastic", source, data_overrides, f"parent.dir={parent_dir}")
    assert set(summary["budgets"]) == {"L", "M", "S"}
    ranked = json.loads((source / "summary.json").read_text())
    assert ranked["parent"] == str(parent_dir)
    # a permutation of channels, heads and experts changes no logit: fp32 sums reordered only
    assert ranked["reorder_logits_max_abs_diff"] < 1e-4
    layout = source / "checkpoints" / "elastic_layout.json"
    assert json.loads(layout.read_text())["checkpoint"] == ranked["checkpoint"]
    before = layout.stat().st_mtime_ns
    cfg = compose_recipe(
        "train_elastic", [f"source.dir={source}", f"parent.dir={parent_dir}", *data_overrides]
    )
    train_elastic._ensure_importance(cfg, source)
    assert layout.stat().st_mtime_ns == before
