"""Task accuracy of an elastic model at every budget, unquantized and quantized (``qad``).

With ``qad_train.task_prompts`` N > 0, ``star-elastic qad`` scores the first N prompts of the
evaluation set (:func:`~megatron_ext.generate.evaluate.evaluation_set`: the data config's test
split, or ``generation.prompts_file`` with answers) thinking and answering at each budget,
three times: unquantized, after PTQ and after QAD. The recovery on accuracy is the share of
the accuracy PTQ lost that QAD won back, like the held-out loss's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from megatron_ext.elastic.controller import ElasticController
from megatron_ext.generate.config import GenerateConfig
from megatron_ext.generate.evaluate import (
    EvalSet,
    evaluation_set,
    first_prompts,
    own_budget_accuracy,
)
from megatron_ext.models.config import ConfigError


class TaskAccuracy:
    """Scores an elastic model at every budget on a fixed set of prompts."""

    def __init__(self, gen: GenerateConfig, evalset: EvalSet, tokenizer: Any) -> None:
        self.gen, self.evalset, self.tokenizer = gen, evalset, tokenizer

    @classmethod
    def of(cls, gen: GenerateConfig, data: Any, prompts: int, tokenizer: Any) -> TaskAccuracy:
        """The first ``prompts`` scored prompts of ``data`` (or ``gen.prompts_file``).

        Raises :class:`ConfigError` naming ``qad_train.task_prompts`` when the set has no
        reference answers or fewer prompts than asked, before any work.
        """
        full = evaluation_set(gen, data)
        if full.references is None:
            raise ConfigError(
                f"qad_train.task_prompts: {full.origin} has no reference answers to score; "
                "use data=arithmetic (its test split), a generation.prompts_file whose lines "
                'carry "answer", or set qad_train.task_prompts=0'
            )
        if len(full.prompts) < prompts:
            raise ConfigError(
                f"qad_train.task_prompts: {prompts} asked, {full.origin} has "
                f"{len(full.prompts)}; set at most {len(full.prompts)}"
            )
        return cls(gen, first_prompts(full, prompts), tokenizer)

    def __call__(
        self, model: nn.Module, controller: ElasticController, budgets: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """Each budget's exact-match figures (masked compute, as QAD trains); ``model``'s
        train/eval mode is restored after."""
        from megatron_ext.generate.sources import ElasticBudgets

        training = model.training
        try:
            source = ElasticBudgets(model, controller, budgets, mode="masked")
            return own_budget_accuracy(
                source, self.tokenizer, self.gen, self.evalset, list(budgets)
            )
        finally:
            model.train(training)


def accuracy_recovery(ref: float, ptq: float, qad: float) -> float | None:
    """(QAD − PTQ) / (unquantized − PTQ) accuracy; ``None`` when PTQ lost none."""
    lost = ref - ptq
    return None if lost == 0 else (qad - ptq) / lost


def task_figures(stages: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict]:
    """Per budget: ``{"ref" | "ptq" | "qad": figures, "recovery": ...}`` from each stage's
    per-budget figures (``qad`` absent when QAD did not run)."""
    out: dict[str, dict] = {}
    for stage, by_budget in stages.items():
        for name, figures in by_budget.items():
            out.setdefault(name, {})[stage] = dict(figures)
    for row in out.values():
        if "qad" in row:
            row["recovery"] = accuracy_recovery(
                row["ref"]["accuracy"], row["ptq"]["accuracy"], row["qad"]["accuracy"]
            )
    return out
