"""The curriculum: stage resolution, stage lookup, and the pure per-step budget draw.

Sampling tolerance. Over N = 20,000 independent steps the count of budget i is binomial, so its
frequency has standard error sqrt(p_i (1 - p_i) / N) (0.0035 at p = 0.5); a frequency within
3 standard errors fails by chance with probability ~0.3% per budget, and the draw is a pure
function of fixed seeds, so the test is deterministic anyway. Flextron's reused random number
put a budget at 68 / 20,000 where a third was expected: ~190 standard errors off.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megatron_ext.elastic.curriculum import (
    CurriculumConfig,
    Stage,
    sample_budget,
    step_generator,
    step_seed,
)
from megatron_ext.models.config import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf" / "curriculum"
N = 20_000


def load(name: str) -> CurriculumConfig:
    """A curriculum YAML merged into the structured schema, as Hydra's ``curriculum/schema``."""
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    assert list(raw.pop("defaults")) == ["schema", "_self_"]
    merged = OmegaConf.merge(OmegaConf.structured(CurriculumConfig), raw)
    return OmegaConf.to_object(merged)


def two_stage(**second) -> CurriculumConfig:
    return CurriculumConfig(
        stages=[
            Stage(name="a", seq_length=128, lr=1e-3, steps=10),
            Stage(name="b", seq_length=256, lr=1e-3, **(second or {"steps": 5})),
        ]
    )


def test_tokens_become_steps_rounded_up_per_stage():
    cur = two_stage(tokens=256 * 8 * 7 + 1)  # one token past 7 full steps of batch 8
    stages = cur.resolve(global_batch=8, num_budgets=3)
    assert [s.steps for s in stages] == [10, 8]
    assert [s.start_step for s in stages] == [0, 10]
    assert stages[0].budget_probs == pytest.approx([1 / 3] * 3)
    assert cur.total_steps == 18


def test_star_elastic_yaml_resolves_to_the_paper_token_counts():
    cur = load("star_elastic")
    stages = cur.resolve(global_batch=1536, num_budgets=3)
    assert [s.seq_length for s in stages] == [8192, 49152]
    assert stages[0].steps == math.ceil(100e9 / (1536 * 8192))  # 7948
    assert stages[1].steps == math.ceil(60e9 / (1536 * 49152))  # 795
    assert stages[1].budget_probs == [0.5, 0.3, 0.2]
    assert all(s.lr == 1e-4 for s in stages)


def test_tiny_yaml_loads_with_the_paper_shape():
    cur = load("tiny")
    assert [(s.name, s.seq_length, s.steps) for s in cur.stages] == [
        ("stage1_short", 128, 150),
        ("stage2_long", 256, 100),
    ]
    assert cur.stages[0].budget_probs == [] and cur.stages[1].budget_probs == [0.5, 0.3, 0.2]
    assert cur.total_steps == 250  # steps-only stages need no resolve()


def test_stage_at_switches_exactly_at_the_boundary():
    cur = two_stage()
    assert cur.stage_at(0) == (0, 0)
    assert cur.stage_at(9) == (0, 9)
    assert cur.stage_at(10) == (1, 0)
    assert cur.stage_at(14) == (1, 4)
    with pytest.raises(ValueError, match="past the curriculum"):
        cur.stage_at(15)


def test_token_stages_need_resolve_before_stage_at():
    cur = two_stage(tokens=1000)
    with pytest.raises(ConfigError, match="resolve"):
        cur.stage_at(0)
    cur.resolve(global_batch=2, num_budgets=3)
    assert cur.stage_at(10) == (1, 0)


def test_sample_budget_is_a_pure_function_of_seed_stage_step():
    probs = [0.5, 0.3, 0.2]
    first = [sample_budget(probs, 7, 1, s) for s in range(500)]
    again = [sample_budget(probs, 7, 1, s) for s in reversed(range(500))][::-1]
    assert first == again  # order of calls and earlier draws do not matter
    assert first != [sample_budget(probs, 8, 1, s) for s in range(500)]
    assert first != [sample_budget(probs, 7, 2, s) for s in range(500)]


def test_consecutive_steps_are_independent():
    """Pairs (b_t, b_t+1) are uniform over 3 x 3 cells: each ~N/9, 3-sigma binomial band."""
    draws = [sample_budget([1 / 3] * 3, 0, 0, s) for s in range(N + 1)]
    pairs = [0] * 9
    for a, b in zip(draws, draws[1:]):
        pairs[3 * a + b] += 1
    p = 1 / 9
    sigma = math.sqrt(N * p * (1 - p))
    assert all(abs(c - N * p) <= 3 * sigma for c in pairs), pairs


@pytest.mark.parametrize("probs", [[0.5, 0.3, 0.2], [1 / 3] * 3])
def test_sampling_frequencies_match_the_configured_probabilities(probs):
    counts = [0] * len(probs)
    for step in range(N):
        counts[sample_budget(probs, 0, 1, step)] += 1
    for p, c in zip(probs, counts):
        se = math.sqrt(p * (1 - p) / N)
        assert abs(c / N - p) <= 3 * se, (probs, counts)


def test_zero_probability_budget_is_never_drawn():
    assert {sample_budget([0.0, 1.0, 0.0], 3, 0, s) for s in range(2000)} == {1}


def test_router_noise_stream_differs_from_the_budget_stream():
    assert step_seed(0, 0, 5, stream=0) != step_seed(0, 0, 5, stream=1)
    a = step_generator(0, 1, 5).initial_seed()
    assert a == step_generator(0, 1, 5).initial_seed() == step_seed(0, 1, 5, stream=1)
    # distinct steps of one stage never share a seed (each mix is a bijection)
    assert len({step_seed(0, 0, s) for s in range(10_000)}) == 10_000


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(steps=0, tokens=0), "stages[s].steps"),
        (dict(steps=5, tokens=5), "stages[s].steps"),
        (dict(steps=5, budget_probs=[0.5, 0.4]), "stages[s].budget_probs"),
        (dict(steps=5, budget_probs=[1.2, -0.2]), "stages[s].budget_probs"),
        (dict(steps=5, lr=0.0), "stages[s].lr"),
        (dict(steps=5, seq_length=0), "stages[s].seq_length"),
        (dict(steps=5, micro_batch_size=-1), "stages[s].micro_batch_size"),
    ],
)
def test_invalid_stage_names_the_field(kwargs, field):
    args = dict(name="s", seq_length=64, lr=1e-3) | kwargs
    with pytest.raises(ConfigError, match=re.escape(f"curriculum.{field}:")):
        Stage(**args)


def test_probabilities_error_says_they_must_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1 within 1e-06"):
        Stage(name="s", seq_length=64, lr=1e-3, steps=5, budget_probs=[0.5, 0.4])


def test_invalid_curriculum_names_the_field():
    with pytest.raises(ConfigError, match=r"curriculum\.stages: at least one"):
        CurriculumConfig(stages=[])
    stage = Stage(name="s", seq_length=64, lr=1e-3, steps=5)
    with pytest.raises(ConfigError, match=r"curriculum\.stages: stage names must be unique"):
        CurriculumConfig(stages=[stage, stage])
    with pytest.raises(ConfigError, match=r"curriculum\.seed"):
        CurriculumConfig(stages=[stage], seed=-1)
    with pytest.raises(ConfigError, match=r"curriculum\.stages\[s\]\.budget_probs: has 2"):
        CurriculumConfig(stages=[Stage("s", 64, 1e-3, 5, budget_probs=[0.5, 0.5])]).resolve(8, 3)


def test_a_stage_with_its_own_global_batch_resolves_its_tokens_with_it():
    stages = [
        Stage(name="short", seq_length=8, lr=1.0, tokens=64),  # the training config's batch: 2
        Stage(name="long", seq_length=8, lr=1.0, tokens=64, global_batch_size=4),
    ]
    resolved = CurriculumConfig(stages=stages).resolve(2, 1)
    assert [s.steps for s in resolved] == [4, 2]  # ceil(64 / (batch x 8))
    assert [s.global_batch_size for s in resolved] == [0, 4]
