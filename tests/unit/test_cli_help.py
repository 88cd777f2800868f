"""``star-elastic <recipe> --help`` and ``--cfg job`` answer without running the recipe."""

from __future__ import annotations

import pytest

from recipes.cli import RECIPES, main


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_help_lists_groups_and_the_composed_config(recipe, capsys):
    assert main([recipe, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"star-elastic {recipe}: ")
    assert "composed config" in out and "run:" in out


def test_cfg_job_prints_the_config_with_the_overrides_applied(capsys, tmp_path):
    run_dir = tmp_path / "never"
    assert main(["export", "budget=S", f"run.dir={run_dir}", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "budget: S" in out and f"dir: {run_dir}" in out
    assert not run_dir.exists()  # nothing ran


def test_cfg_with_an_unknown_part_is_a_config_error(capsys):
    assert main(["export", "--cfg", "hydra2"]) == 2
    assert "--cfg" in capsys.readouterr().err


PLAN_CASES = [([], "elastic_train:"), (["train-parent"], "train:")]


@pytest.mark.parametrize(("planned", "section"), PLAN_CASES)
def test_plan_help_shows_the_planned_recipes_composed_config(planned, section, capsys):
    assert main(["plan", *planned, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"star-elastic plan {planned[0] if planned else 'train-elastic'}: ")
    assert "composed config" in out and f"\n{section}" in out


def test_plan_cfg_job_prints_the_config_and_plans_nothing(capsys):
    assert main(["plan", "parallel.nproc=2", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "nproc: 2" in out and "elastic_train:" in out
    assert "peak" not in out  # the plan's table was not printed: nothing was planned
    assert main(["plan", "--cfg", "hydra2"]) == 2
    assert "--cfg" in capsys.readouterr().err
