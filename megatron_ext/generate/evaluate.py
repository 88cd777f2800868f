"""Exact-match accuracy of budget-controlled generation against reference answers.

The evaluation set is, in this order of preference:

1. ``generation.prompts_file`` when set: a ``.jsonl`` file whose objects carry ``"answer"``
   next to ``"prompt"`` is scored (every line must have one); a file without answers is
   generated from but not scored;
2. the held-out test split of the data config when it has one (``data.source=arithmetic``);
3. ``generation.prompts``, not scored.

A generation is correct when the answer it writes (the text after ``A:`` on the answer
line, see :func:`extract_answer`) equals the reference exactly, after stripping whitespace.
When the evaluation set also holds reference traces (``"trace"``, as the arithmetic test split
does), the think phase is scored too: its trace up to the closing marker must equal the
reference exactly. That separates a wrong trace from a wrong reading of a right one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_ext.generate.config import GenerateConfig, load_prompts
from megatron_ext.models.config import ConfigError

ANSWER_MARKER = "A:"


@dataclass
class EvalSet:
    """Prompts to generate from, and their reference answers (``None``: not scored)."""

    prompts: list[str]
    references: list[str] | None
    origin: str  # where the prompts came from, for the summary
    traces: list[str] | None = None  # reference think traces, when the set has them

    def __post_init__(self) -> None:
        for name in ("references", "traces"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.prompts):
                raise ValueError(
                    f"{len(values)} {name} for {len(self.prompts)} prompts ({self.origin})"
                )


def read_references(path: str | Path, key: str = "answer") -> list[str] | None:
    """The ``key`` of every line of a ``.jsonl`` prompts file, or ``None`` if no line has one.

    Blank lines are skipped, as :func:`~megatron_ext.generate.config.load_prompts` does; a file
    where only some lines carry the key is an error naming the first line without it.
    """
    path = Path(path)
    if path.suffix != ".jsonl":
        return None
    values: list[str | None] = []
    lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    for _, line in lines:
        item = json.loads(line)
        values.append(str(item[key]) if isinstance(item, dict) and key in item else None)
    if all(v is None for v in values):
        return None
    missing = [n for (n, _), v in zip(lines, values) if v is None]
    if missing:
        raise ConfigError(
            f"generation.prompts_file: {path}:{missing[0]} has no {key!r} while other lines do"
        )
    return [v for v in values if v is not None]


def evaluation_set(gen: GenerateConfig, data) -> EvalSet:
    """The prompts and references to run (see the module docstring for the order)."""
    if gen.prompts_file:
        path = gen.prompts_file
        refs, traces = read_references(path), read_references(path, "trace")
        return EvalSet(load_prompts(gen), refs, path, traces)
    if data.source == "arithmetic":
        from megatron_ext.data.cache import ensure_prepared

        test = Path(ensure_prepared(data, progress=False)["test_file"])
        refs, traces = read_references(test), read_references(test, "trace")
        return EvalSet(load_prompts_file(test), refs, str(test), traces)
    return EvalSet(list(gen.prompts), None, "generation.prompts")


def load_prompts_file(path: Path) -> list[str]:
    """The prompts of a ``.jsonl`` file (objects with ``"prompt"``)."""
    return load_prompts(GenerateConfig(prompts=[], prompts_file=str(path)))


def extract_answer(text: str, marker: str = ANSWER_MARKER) -> str:
    """The answer written in ``text``: after the first ``marker`` on its line, else line one.

    ``"A: 936\\n"`` → ``"936"``; ``" 936"`` → ``"936"``.
    """
    at = text.find(marker)
    if at >= 0:
        text = text[at + len(marker) :]
    return text.strip().split("\n", 1)[0].strip()


def exact_match(generated: str, reference: str) -> bool:
    """Whether the answer in ``generated`` is exactly ``reference`` (whitespace stripped)."""
    return extract_answer(generated) == reference.strip()


def accuracy(answers: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Exact-match figures of ``answers`` against ``references``: correct, total, accuracy."""
    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    correct = sum(exact_match(a, r) for a, r in zip(answers, references))
    total = len(references)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 0.0}


def trace_of(think_text: str, think_close: str) -> str:
    """The trace in a think phase's text: everything before the closing marker, stripped."""
    return think_text.split(think_close.strip() or think_close, 1)[0].strip()


def score_pair(
    answers: Sequence[str], think_texts: Sequence[str], evalset: EvalSet, think_close: str
) -> tuple[dict[str, Any], list[dict[str, bool]]]:
    """Figures of one budget pair, and each generation's verdicts.

    Figures: :func:`accuracy`; with reference traces also ``trace_correct`` /
    ``trace_accuracy`` (the think phase wrote the reference trace exactly) and
    ``accuracy_given_correct_trace`` (how often the answer phase reads a right trace right).
    """
    if evalset.references is None:
        return {}, [{} for _ in answers]
    figures = accuracy(answers, evalset.references)
    verdicts = [{"correct": exact_match(a, r)} for a, r in zip(answers, evalset.references)]
    if evalset.traces is not None:
        for verdict, text, trace in zip(verdicts, think_texts, evalset.traces):
            verdict["trace_correct"] = trace_of(text, think_close) == trace.strip()
        good = [v for v in verdicts if v["trace_correct"]]
        figures["trace_correct"] = len(good)
        figures["trace_accuracy"] = len(good) / len(verdicts) if verdicts else 0.0
        figures["accuracy_given_correct_trace"] = (
            sum(v["correct"] for v in good) / len(good) if good else None
        )
    return figures, verdicts


def score_report(report, evalset: EvalSet, think_close: str):
    """:func:`score_pair` of a :class:`~megatron_ext.generate.budget.PairReport`'s answers."""
    answers = [a.answer_text for a in report.answers]
    thoughts = [a.think_text for a in report.answers]
    return score_pair(answers, thoughts, evalset, think_close)


def first_prompts(evalset: EvalSet, count: int) -> EvalSet:
    """The first ``count`` prompts of ``evalset`` with their references and traces."""

    def head(values: list[str] | None) -> list[str] | None:
        return None if values is None else values[:count]

    return EvalSet(
        evalset.prompts[:count], head(evalset.references), evalset.origin, head(evalset.traces)
    )


def own_budget_accuracy(
    models, codec, gen: GenerateConfig, evalset: EvalSet, budgets: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Each budget's exact-match figures thinking and answering at itself (``L->L``, ...).

    ``models`` hands out a decoder per budget (:class:`~megatron_ext.generate.budget.BudgetModels`);
    ``gen`` gives the markers, token limits and sampling (its own pairs are ignored).
    """
    import dataclasses

    from megatron_ext.generate.budget import run_pairs

    if evalset.references is None:
        raise ConfigError(f"task accuracy: {evalset.origin} has no reference answers")
    first = budgets[0]
    own = dataclasses.replace(
        gen,
        think_budget=first,
        answer_budget=first,
        all_pairs=True,
        pair_budgets=list(budgets),
        pair_grid="same",
        timing_rounds=0,
        warmup=False,
        prompts=list(evalset.prompts),  # valid even when gen.prompts is empty
    )
    out = {}
    for report in run_pairs(models, codec, own, evalset.prompts, progress=False):
        out[report.think_budget] = score_report(report, evalset, gen.think_close)[0]
    return out
