"""SIGKILL at a seeded random step, then resume: the run ends bit-identical to an
uninterrupted one, no rank outlives its launcher, no unfinished or corrupt checkpoint is
deleted. The killed run and its resume go through the command line (``python -m
recipes.cli``), as a user's; the uninterrupted runs they are compared with are the recipes'
``run`` (the 2-rank ones in one torchrun launch, :func:`whole_runs`), which the command line
calls on every rank.

The kill takes the launcher's whole process group (what a scheduler or ``kill -9 -PGID``
does); torchrun's ranks sit in sessions of their own, so only their parent-death signal and
launcher watchdog can end them.
"""

from __future__ import annotations

from pathlib import Path
from signal import SIGKILL, SIGTERM

import pytest

from megatron_ext.training.preemption import REQUEUE_EXIT_CODE
from tests.faults.kill_resume import ELASTIC, QAD, kill_and_resume, whole_runs

PARENT_STEPS = 6
PARENT = [
    f"train.steps={PARENT_STEPS}",
    "train.save_interval=1",
    "train.eval_interval=4",
    "train.eval_batches=1",
    "train.micro_batch_size=2",
    "train.seq_length=32",
    "train.warmup_steps=2",
    "train.log_interval=2",
    "logger=none",
]
ELASTIC_STEPS = 8  # the smoke curriculum's (ELASTIC), and QAD's
PARENT_LAYOUTS = ELASTIC_LAYOUTS = ["single", "tp2", "ep2", "pp2"]  # qad's: test_qad_parallel


def _parent(data_overrides: list[str]) -> list[str]:
    return [*PARENT, *data_overrides]


def _elastic(importance_run: Path, data_overrides: list[str]) -> list[str]:
    return [f"source.dir={importance_run}", *ELASTIC, *data_overrides]


def _qad(elastic_source: Path, data_overrides: list[str]) -> list[str]:
    return [f"source.dir={elastic_source}", *QAD, *data_overrides]


@pytest.fixture(scope="module")
def wholes(tmp_path_factory, importance_run, elastic_source, data_overrides) -> dict:
    """Every case's uninterrupted run, ``(recipe, layout) -> run dir``: the 2-rank ones in one
    torchrun launch (what each case would otherwise start from the command line first), the
    single-process ones in this process. The SIGTERM cases share the SIGKILL cases' runs."""
    runs = {}
    for layout in PARENT_LAYOUTS:
        runs[f"parent_{layout}"] = ("train-parent", _parent(data_overrides), layout)
    for layout in ELASTIC_LAYOUTS:
        runs[f"elastic_{layout}"] = (
            "train-elastic",
            _elastic(importance_run, data_overrides),
            layout,
        )
    runs["qad_single"] = ("qad", _qad(elastic_source, data_overrides), "single")
    specs = {n: (r, [f"parallel={layout}", *o]) for n, (r, o, layout) in runs.items()}
    dirs = whole_runs(tmp_path_factory.mktemp("whole_runs"), specs)
    return {(r, layout): dirs[n] for n, (r, _, layout) in runs.items()}


def _case(tmp_path, wholes, recipe, layout, overrides, sig=SIGKILL) -> dict:
    steps = PARENT_STEPS if recipe == "train-parent" else ELASTIC_STEPS
    whole = wholes[(recipe, layout)]
    return kill_and_resume(tmp_path, recipe, layout, overrides, steps, sig=sig, whole=whole)


@pytest.mark.parametrize("layout", PARENT_LAYOUTS)
def test_train_parent_killed_at_a_random_step_resumes_bit_identically(
    tmp_path, wholes, data_overrides, layout
):
    hit = _case(tmp_path, wholes, "train-parent", layout, _parent(data_overrides))
    if layout != "single":
        assert len(hit["seen"]) >= 4  # launcher, torchrun agent and both ranks: all gone


@pytest.mark.parametrize("layout", ELASTIC_LAYOUTS)
def test_train_elastic_killed_at_a_random_step_resumes_bit_identically(
    tmp_path, wholes, importance_run, data_overrides, layout
):
    hit = _case(tmp_path, wholes, "train-elastic", layout, _elastic(importance_run, data_overrides))
    if layout != "single":
        assert len(hit["seen"]) >= 4


@pytest.mark.parametrize("layout", ["single", "tp2"])
def test_sigterm_mid_save_checkpoints_exits_and_resumes_bit_identically(
    tmp_path, wholes, data_overrides, layout
):
    # SIGTERM to the launcher only: it forwards it to torchrun, whose ranks checkpoint
    overrides = _parent(data_overrides)
    hit = _case(tmp_path, wholes, "train-parent", layout, overrides, sig=SIGTERM)
    if layout == "single":
        assert hit["code"] == REQUEUE_EXIT_CODE


def test_qad_killed_at_a_random_step_resumes_bit_identically(
    tmp_path, wholes, elastic_source, data_overrides
):
    _case(tmp_path, wholes, "qad", "single", _qad(elastic_source, data_overrides))
