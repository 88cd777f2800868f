"""SIGKILL at a seeded random step, then resume: the run ends bit-identical to an
uninterrupted one, no rank outlives its launcher, no unfinished or corrupt checkpoint is
deleted. Every run goes through the command line (``python -m recipes.cli``), as a user's.

The kill takes the launcher's whole process group (what a scheduler or ``kill -9 -PGID``
does); torchrun's ranks sit in sessions of their own, so only their parent-death signal and
launcher watchdog can end them.
"""

from __future__ import annotations

from pathlib import Path
from signal import SIGKILL, SIGTERM

import pytest

from megatron_ext.training.preemption import REQUEUE_EXIT_CODE
from tests.faults.kill_resume import (
    ELASTIC,
    QAD,
    kill_and_resume,
)

PARENT = [
    "train.steps=8",
    "train.save_interval=1",
    "train.eval_interval=4",
    "train.eval_batches=1",
    "train.micro_batch_size=2",
    "train.seq_length=32",
    "train.warmup_steps=2",
    "train.log_interval=2",
    "logger=none",
]
STEPS = 8  # both configurations above train for 8 steps
LAYOUTS = ["single", "tp2", "ep2"]


def _case(tmp_path: Path, recipe: str, layout: str, overrides: list[str], sig=SIGKILL) -> dict:
    return kill_and_resume(tmp_path, recipe, layout, overrides, STEPS, sig=sig)


@pytest.mark.parametrize("layout", [*LAYOUTS, "pp2"])
def test_train_parent_killed_at_a_random_step_resumes_bit_identically(
    tmp_path, data_overrides, layout
):
    hit = _case(tmp_path, "train-parent", layout, [*PARENT, *data_overrides])
    if layout != "single":
        assert len(hit["seen"]) >= 4  # launcher, torchrun agent and both ranks: all gone


@pytest.mark.parametrize("layout", LAYOUTS)
def test_train_elastic_killed_at_a_random_step_resumes_bit_identically(
    tmp_path, importance_run, data_overrides, layout
):
    overrides = [f"source.dir={importance_run}", *ELASTIC, *data_overrides]
    _case(tmp_path, "train-elastic", layout, overrides)


@pytest.mark.parametrize("layout", ["single", "tp2"])
def test_sigterm_mid_save_checkpoints_exits_and_resumes_bit_identically(
    tmp_path, data_overrides, layout
):
    # SIGTERM to the launcher only: it forwards it to torchrun, whose ranks checkpoint
    hit = _case(tmp_path, "train-parent", layout, [*PARENT, *data_overrides], sig=SIGTERM)
    if layout == "single":
        assert hit["code"] == REQUEUE_EXIT_CODE


def test_qad_killed_at_a_random_step_resumes_bit_identically(
    tmp_path, elastic_source, data_overrides
):
    _case(tmp_path, "qad", "single", [f"source.dir={elastic_source}", *QAD, *data_overrides])
