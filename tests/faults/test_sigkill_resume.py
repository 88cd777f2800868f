"""SIGKILL at a seeded random step, then resume: the run ends bit-identical to an
uninterrupted one, no rank outlives its launcher, no unfinished or corrupt checkpoint is
deleted. Every run goes through the command line (``python -m recipes.cli``), as a user's.

The kill takes the launcher's whole process group (what a scheduler or ``kill -9 -PGID``
does); torchrun's ranks sit in sessions of their own, so only their parent-death signal and
launcher watchdog can end them.
"""

from __future__ import annotations

import json
import random
import re
import signal
from pathlib import Path
from signal import SIGKILL, SIGTERM

import pytest

from megatron_ext.training.preemption import REQUEUE_EXIT_CODE
from tests.faults.kill_resume import (
    assert_identical,
    final_state,
    interrupt_at_step,
    run_to_end,
    survivors,
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
ELASTIC = [
    "curriculum=smoke",
    "elastic_train.save_interval=1",
    "elastic_train.micro_batch_size=2",
    "elastic_train.eval_batches=1",
    "elastic_train.eval_seq_length=32",
    "elastic_train.eval_interval=4",
    "elastic_train.warmup_steps=2",
    "logger=none",
]
STEPS = 8  # both configurations above train for 8 steps
LAYOUTS = ["single", "tp2", "ep2"]


def _kill_step(recipe: str, layout: str) -> int:
    # seeded per case, never the last step (a finished run has nothing to resume)
    return random.Random(f"{recipe}/{layout}").randint(1, STEPS - 2)


def _case(tmp_path: Path, recipe: str, layout: str, overrides: list[str], sig=SIGKILL) -> dict:
    if recipe != "qad":  # qad runs on one process and has no parallel group
        overrides = [f"parallel={layout}", *overrides]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run_to_end(recipe, whole, overrides)
    step = _kill_step(recipe, layout)
    hit = interrupt_at_step(recipe, split, overrides, step, sig)
    assert hit["code"] != 0
    assert not survivors(split), "processes outlived the launcher"
    run_to_end(recipe, split, overrides)
    # losses (and every metric) of the resumed run equal the uninterrupted run's, bit for bit
    a, b = (json.loads((d / "summary.json").read_text()) for d in (whole, split))
    for key in ("final_train_loss", "val_loss", "val_curve", "budgets", "tokens"):
        assert a.get(key) == b.get(key), key
    # the final checkpoint: weight files, optimizer, RNG, data position and loss history
    final_a, final_b = final_state(whole), final_state(split)
    assert final_a["checkpoint"] == final_b["checkpoint"] == f"iter_{STEPS:07d}"
    assert_identical(final_a["distcp"], final_b["distcp"], "distcp")
    assert_identical(final_a["ranks"], final_b["ranks"], "rank_state")
    # nothing unfinished or corrupt at the kill was deleted: each is kept aside
    names = [p.name for p in (split / "checkpoints").iterdir()]
    for bad in hit["bad"]:
        stem = bad.removeprefix(".tmp_")
        assert any(re.fullmatch(rf"{stem}\.(partial|corrupt)-.*", n) for n in names), bad
    print(
        f"{recipe} {layout} {signal.Signals(sig).name} at step {step} ({hit['where']}): "
        f"exit {hit['code']}, kept aside {hit['bad']}, bit-identical"
    )
    return hit


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


QAD = [
    "quant=nvfp4",
    "qad_train.steps=8",
    "qad_train.save_interval=1",
    "qad_train.warmup_steps=2",
    "qad_train.micro_batch_size=2",
    "qad_train.seq_length=32",
    "qad_train.eval_batches=1",
    "qad_train.eval_seq_length=32",
    "quant.calib_batches=1",
]


@pytest.fixture(scope="module")
def elastic_source(tmp_path_factory, importance_run, data_overrides):
    """A short train-elastic run (in-process) for QAD to quantize."""
    from megatron_ext.config.compose import compose_recipe
    from recipes import train_elastic

    run_dir = tmp_path_factory.mktemp("elastic_for_qad_faults")
    overrides = [f"source.dir={importance_run}", f"run.dir={run_dir}", *ELASTIC, *data_overrides]
    train_elastic.run(compose_recipe("train_elastic", overrides))
    return run_dir


def test_qad_killed_at_a_random_step_resumes_bit_identically(
    tmp_path, elastic_source, data_overrides
):
    _case(tmp_path, "qad", "single", [f"source.dir={elastic_source}", *QAD, *data_overrides])
