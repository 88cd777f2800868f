"""The generated arithmetic task: correct traces, exact answers, disjoint seeded splits, and
exact-match scoring of generated answers. Everything is exact (integers and strings)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.config.schema import DataConfig
from megatron_ext.data.arithmetic import (
    ArithmeticConfig,
    Problem,
    generate_splits,
    prepare_arithmetic,
    region,
)
from megatron_ext.data.cache import dataset_prefix
from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.generate.config import GenerateConfig
from megatron_ext.generate.evaluate import (
    EvalSet,
    accuracy,
    evaluation_set,
    exact_match,
    extract_answer,
    first_prompts,
    own_budget_accuracy,
    read_references,
    score_pair,
)
from megatron_ext.models.config import ConfigError

STEP = re.compile(r"^(\d)([+*])(\d)(?:\+(\d+))?=(\d+)(?: c(\d+))?$")
SMALL = {"train_examples": 300, "valid_examples": 30, "test_examples": 40}


def _mixed(seed: int = 0, **sizes: int) -> ArithmeticConfig:
    return ArithmeticConfig(
        ops=["+", "*"], min_digits=1, max_digits=4, seed=seed, **(SMALL | sizes)
    )


def _check_trace(p: Problem) -> None:
    """Recompute every step from the operands' digits, with its carry, then the answer."""
    a_digits = [int(c) for c in reversed(str(p.a))]
    b_digits = [int(c) for c in reversed(str(p.b))]
    width = max(len(a_digits), len(b_digits)) if p.op == "+" else len(a_digits)
    steps = p.trace.split(";")
    assert len(steps) == width
    carry, out = 0, []
    for i, step in enumerate(steps):
        m = STEP.match(step)
        assert m is not None, step
        x, op, y, carry_in, result, carry_out = m.groups()
        assert op == p.op
        assert int(x) == (a_digits[i] if i < len(a_digits) else 0)
        if p.op == "+":
            assert int(y) == (b_digits[i] if i < len(b_digits) else 0)
        else:
            assert int(y) == p.b
        assert int(carry_in or 0) == carry
        value = int(x) + int(y) + carry if op == "+" else int(x) * int(y) + carry
        assert int(result) == value
        carry = value // 10
        assert int(carry_out or 0) == carry
        out.append(value % 10)
    written = (str(carry) if carry else "") + "".join(map(str, reversed(out)))
    assert (written.lstrip("0") or "0") == p.answer


def test_every_trace_step_is_correct_arithmetic_and_leads_to_the_answer():
    splits = generate_splits(_mixed())
    problems = [p for split in splits.values() for p in split]
    problems += [Problem(999, "+", 1), Problem(0, "+", 0), Problem(347, "*", 6), Problem(5, "*", 2)]
    assert {p.op for p in problems} == {"+", "*"}
    for p in problems:
        _check_trace(p)


def test_answers_are_exact_and_the_document_has_the_documented_format():
    for p in generate_splits(_mixed())["train"]:
        assert p.answer == str(p.a + p.b if p.op == "+" else p.a * p.b)
    p = Problem(347, "+", 589)
    assert p.text == "Q: 347+589=?\n<think>7+9=16 c1;4+8+1=13 c1;3+5+1=9</think>\nA: 936\n"
    assert Problem(347, "*", 6).text.endswith(
        "<think>7*6=42 c4;4*6+4=28 c2;3*6+2=20 c2</think>\nA: 2082\n"
    )


def test_test_split_is_disjoint_from_train_and_valid_and_has_distinct_problems():
    cfg = _mixed(test_examples=200, train_examples=2000)
    splits = generate_splits(cfg)
    test = set(splits["test"])
    assert len(test) == len(splits["test"]) == 200
    assert not test & set(splits["train"])
    assert not test & set(splits["valid"])
    assert all(region(p, cfg.seed) == split for split, ps in splits.items() for p in ps)


def test_generation_is_deterministic_by_seed():
    assert generate_splits(_mixed(seed=3)) == generate_splits(_mixed(seed=3))
    assert generate_splits(_mixed(seed=3))["test"] != generate_splits(_mixed(seed=4))["test"]


def test_test_split_does_not_move_when_the_train_size_changes():
    small = generate_splits(_mixed(train_examples=100, test_examples=20))
    large = generate_splits(_mixed(train_examples=900, test_examples=40))
    assert large["test"][:20] == small["test"]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"ops": ["-"]}, "data.arithmetic.ops"),
        ({"min_digits": 3, "max_digits": 2}, "data.arithmetic.max_digits"),
        ({"min_digits": 1, "max_digits": 1, "test_examples": 500}, "data.arithmetic.test_examples"),
        ({"train_examples": 0}, "data.arithmetic.train_examples"),
    ],
)
def test_bad_arithmetic_config_names_the_field(fields, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        ArithmeticConfig(**fields)


def test_data_source_must_be_files_or_arithmetic():
    with pytest.raises(ConfigError, match="data.source"):
        DataConfig(source="web")


def test_prepared_corpus_holds_each_document_with_special_think_ids(tmp_path):
    cfg = _mixed(seed=1)
    tok = ByteTokenizer()
    meta = prepare_arithmetic(cfg, tmp_path / "arith", tok)
    splits = generate_splits(cfg)
    train = IndexedDataset(meta["train_prefix"])
    assert len(train) == meta["train_documents"] == cfg.train_examples
    first = train[0].tolist()
    assert first[-1] == tok.eod
    assert tok.think in first and tok.end_think in first
    assert tok.decode(first[:-1]) == splits["train"][0].text
    lines = [json.loads(x) for x in Path(meta["test_file"]).read_text().splitlines()]
    assert [x["prompt"] for x in lines] == [p.prompt for p in splits["test"]]
    assert [x["answer"] for x in lines] == [p.answer for p in splits["test"]]


def test_stdlib_dataset_key_is_unchanged_by_the_arithmetic_fields():
    files = DataConfig()
    assert dataset_prefix(files) == dataset_prefix(DataConfig(arithmetic=_mixed(seed=9)))
    arith = DataConfig(source="arithmetic", name="arithmetic")
    assert dataset_prefix(arith) != dataset_prefix(
        DataConfig(source="arithmetic", name="arithmetic", arithmetic=_mixed())
    )


@pytest.mark.parametrize(
    ("generated", "reference", "correct"),
    [
        ("A: 936\n", "936", True),
        ("A:936", "936", True),
        ("  A: 936  \nQ: 1+1=?", "936", True),
        ("A: 9360\n", "936", False),
        ("A: 93\n", "936", False),
        ("A: 936 \n", " 936", True),
        ("936\n", "936", True),  # no marker: the first line is the answer
        ("\n", "936", False),
        ("A: -12\n", "-12", True),
    ],
)
def test_exact_match_compares_the_written_answer_exactly(generated, reference, correct):
    assert exact_match(generated, reference) is correct


def test_accuracy_counts_exact_matches():
    fig = accuracy(["A: 1\n", "A: 2\n", "A: 4\n"], ["1", "2", "3"])
    assert fig == {"correct": 2, "total": 3, "accuracy": pytest.approx(2 / 3)}
    assert extract_answer("A: 12 \n") == "12"


def test_trace_scoring_separates_a_wrong_trace_from_a_wrong_reading():
    p, q = Problem(347, "+", 589), Problem(12, "+", 30)
    evalset = EvalSet([p.prompt, q.prompt], [p.answer, q.answer], "t", [p.trace, q.trace])
    thoughts = [p.trace + "</think>\n", "2+0=3;1+3=4</think>\n"]  # the second trace is wrong
    figures, verdicts = score_pair(["A: 935\n", "A: 43\n"], thoughts, evalset, "</think>\n")
    assert verdicts == [
        {"correct": False, "trace_correct": True},
        {"correct": False, "trace_correct": False},
    ]
    assert figures["trace_accuracy"] == 0.5 and figures["accuracy_given_correct_trace"] == 0.0
    assert score_pair(["A: 936"], [""], EvalSet(["x"], None, "t"), "</think>") == ({}, [{}])


def test_the_first_prompts_keep_their_own_answers_and_traces_and_unscored_sets_are_refused():
    problems = [Problem(347, "+", 589), Problem(12, "+", 30), Problem(5, "+", 7)]
    full = EvalSet(
        [p.prompt for p in problems],
        [p.answer for p in problems],
        "t",
        [p.trace for p in problems],
    )
    head = first_prompts(full, 2)
    assert head.prompts == full.prompts[:2] and head.references == ["936", "42"]
    assert head.traces == full.traces[:2] and head.origin == "t"
    with pytest.raises(ConfigError, match="no reference answers"):
        own_budget_accuracy(None, None, GenerateConfig(), EvalSet(["x"], None, "t"), ["L"])


def test_references_come_from_jsonl_answers_and_must_be_on_every_line(tmp_path):
    scored = tmp_path / "scored.jsonl"
    scored.write_text('{"prompt": "Q: 1+1=?\\n", "answer": "2"}\n\n{"prompt": "x", "answer": 3}\n')
    assert read_references(scored) == ["2", "3"]
    evalset = evaluation_set(GenerateConfig(prompts_file=str(scored)), DataConfig())
    assert evalset.prompts == ["Q: 1+1=?\n", "x"] and evalset.references == ["2", "3"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "a"}\n')
    assert read_references(plain) is None
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(ConfigError, match="mixed.jsonl:2"):
        read_references(mixed)


def test_arithmetic_data_is_evaluated_on_its_test_split(tmp_path):
    data = DataConfig(
        source="arithmetic", name="arith", cache_dir=str(tmp_path), arithmetic=_mixed()
    )
    evalset = evaluation_set(GenerateConfig(), data)
    test = generate_splits(data.arithmetic)["test"]
    assert evalset.prompts == [p.prompt for p in test]
    assert evalset.references == [p.answer for p in test]


def test_generate_recipe_scores_every_pair_on_the_arithmetic_test_split(tmp_path):
    """Random weights: the figures, not their values, are checked. Runs last in this module:
    the recipe tears the process groups down."""
    from megatron_ext.config.compose import compose_recipe, section
    from megatron_ext.elastic.config import ElasticConfig
    from megatron_ext.elastic.controller import ElasticController
    from megatron_ext.elastic.slicing import save_slice
    from recipes import generate as recipe
    from tests.unit.test_elastic_layers import MODEL, build, make_world

    world = make_world()
    overrides = [
        "data=arithmetic",
        f"data.cache_dir={tmp_path / 'data'}",
        "data.arithmetic.train_examples=20",
        "data.arithmetic.valid_examples=5",
        "data.arithmetic.test_examples=3",
        "generation=arithmetic",
        "generation.max_think_tokens=4",
        "generation.max_answer_tokens=3",
        "generation.warmup=false",
        f"source.dir={tmp_path / 'sliced'}",
        f"run.dir={tmp_path / 'run'}",
    ]
    cfg = compose_recipe("generate", overrides)
    elastic = section(cfg, "elastic", ElasticConfig)
    answers = [
        p.answer for p in generate_splits(section(cfg, "data", DataConfig).arithmetic)["test"]
    ]
    model = build(world, seed=5)
    for name in ("S", "L"):
        widths = elastic.widths_for(name, MODEL)
        path = tmp_path / "sliced" / "slices" / name
        save_slice(model, widths, path, world[1], controller=ElasticController(MODEL))
    summary = recipe.run(compose_recipe("generate", overrides))
    assert summary["scored"] and summary["prompts"] == 3
    assert summary["prompts_from"].endswith("_test.jsonl")
    assert set(summary["pairs"]) == {"S->L", "S->S", "L->S", "L->L"}
    for pair in summary["pairs"].values():
        verdicts = pair["generations"]
        assert pair["total"] == 3 and pair["correct"] == sum(g["correct"] for g in verdicts)
        assert pair["trace_correct"] == sum(g["trace_correct"] for g in verdicts)
        assert [g["reference"] for g in verdicts] == answers
