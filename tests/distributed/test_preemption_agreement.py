"""Ranks agree on a preemption: a signal on one rank stops every rank after the same step.

``cases_preemption.py`` runs the cases in one 2-rank torchrun launch (gloo) with real
``SIGUSR1``/``SIGTERM`` sent by one rank to itself; the flag is all-reduced (MAX) per poll.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.distributed.launch import case, run_cases

SCRIPT = Path(__file__).with_name("cases_preemption.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_cases(SCRIPT, tmp_path_factory.mktemp("preemption"))


def test_without_a_signal_no_rank_stops(results):
    assert case(results, "no_signal") == {"stopped": [None, None], "signum": [0, 0]}


@pytest.mark.parametrize(
    ("name", "step", "signum"),
    [
        ("usr1_on_rank1_only", 4, signal.SIGUSR1),
        ("term_on_rank0_only", 7, signal.SIGTERM),
        ("both_same_step", 2, signal.SIGTERM),  # the larger signal number is agreed
    ],
)
def test_a_signal_on_any_rank_stops_every_rank_after_the_same_step(results, name, step, signum):
    got = case(results, name)
    assert got["stopped"] == [step, step]
    assert got["signum"] == [int(signum), int(signum)]
