"""The typed, validated settings of generation with budget control (think small, answer large)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_ext.models.config import ConfigError, require

DEFAULT_PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n",
    "# Return the greatest common divisor of a and b.\ndef gcd(a, b):\n",
)
"""Prompts the tiny byte-level models (trained on Python sources) can continue."""

PAIR_GRIDS = ("all", "same")


@dataclass
class GenerateConfig:
    """What ``star-elastic generate`` decodes, at which budgets, and how it samples.

    Budget control: the ``think_budget`` model generates after ``prompt + think_open`` until
    the text ``think_close`` appears or ``max_think_tokens`` (K) are generated; at K the
    closing marker is appended to the trace. The ``answer_budget`` model then prefills
    ``prompt + think_open + trace`` and decodes until end-of-document, a newline (when
    ``stop_at_newline``) or ``max_answer_tokens``. ``all_pairs`` also runs the other three
    pairings of the two budgets, the paper's four configurations (S→S, S→L, L→S, L→L), or,
    with ``pair_budgets`` (e.g. ``[L, M, S]``), every (think, answer) pair over those
    budgets: nine for three. ``pair_grid="same"`` keeps only the pairs that think and answer
    at one budget (``L->L, M->M, S->S``): each budget's own task accuracy.

    Timing: with ``timing_rounds`` R > 0, after the scored pass every pair is timed again R
    times on the first ``timing_prompts`` prompts, the pairs interleaved (round r runs every
    pair once, the order rotated by r), so a slow spell of a shared machine falls on every
    pair alike; the summary gives each pair's median latency and the rounds' spread.

    Sampling: ``temperature=0`` is greedy; otherwise ``top_k`` (0: the whole vocabulary) and
    a ``torch.Generator`` seeded with ``seed`` make a run reproducible.
    """

    think_budget: str = "S"
    answer_budget: str = "L"
    all_pairs: bool = False
    pair_budgets: list[str] = field(default_factory=list)
    pair_grid: str = "all"  # "all": every think x answer pair; "same": think = answer only
    timing_rounds: int = 0
    timing_prompts: int = 8
    max_think_tokens: int = 64
    max_answer_tokens: int = 64
    think_open: str = "<think>"
    think_close: str = "</think>"
    stop_at_newline: bool = True
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0
    warmup: bool = True  # one untimed generation per budget pair before measuring
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    prompts_file: str = ""  # one prompt per line; used instead of ``prompts`` when set

    def __post_init__(self) -> None:
        for name in ("think_budget", "answer_budget"):
            require(bool(getattr(self, name)), f"generation.{name}", "must name a budget")
        for name in ("max_think_tokens", "max_answer_tokens"):
            require(getattr(self, name) >= 1, f"generation.{name}", "must be >= 1")
        self.pair_budgets = [str(b) for b in self.pair_budgets]
        repeated = sorted({b for b in self.pair_budgets if self.pair_budgets.count(b) > 1})
        require(not repeated, "generation.pair_budgets", f"names a budget twice: {repeated}")
        if self.pair_budgets:
            outside = [
                b for b in (self.think_budget, self.answer_budget) if b not in self.pair_budgets
            ]
            require(
                not outside,
                "generation.pair_budgets",
                f"must include the configured think/answer budgets; add {outside}",
            )
        require(
            self.pair_grid in PAIR_GRIDS,
            "generation.pair_grid",
            f"{self.pair_grid!r} must be one of {PAIR_GRIDS}",
        )
        require(
            self.pair_grid == "all" or self.think_budget == self.answer_budget,
            "generation.pair_grid",
            "'same' runs think = answer pairs only; set generation.answer_budget to "
            f"generation.think_budget ({self.think_budget})",
        )
        require(self.timing_rounds >= 0, "generation.timing_rounds", "must be >= 0 (0: none)")
        require(self.timing_prompts >= 1, "generation.timing_prompts", "must be >= 1")
        require(
            bool(self.think_close),
            "generation.think_close",
            "must be the text that ends the think phase, e.g. '</think>'",
        )
        require(
            self.temperature >= 0.0,
            "generation.temperature",
            "must be >= 0 (0 = greedy decoding)",
        )
        require(self.top_k >= 0, "generation.top_k", "must be >= 0 (0 = the whole vocabulary)")
        require(self.seed >= 0, "generation.seed", "must be >= 0")
        require(
            bool(self.prompts) or bool(self.prompts_file),
            "generation.prompts",
            "give at least one prompt, or generation.prompts_file",
        )

    def pairs(self) -> list[tuple[str, str]]:
        """The (think, answer) budget pairs to run, the configured one first."""
        first = (self.think_budget, self.answer_budget)
        if not self.all_pairs:
            return [first]
        names = self.pair_budgets or [self.think_budget, self.answer_budget]
        if self.pair_grid == "same":
            grid = [(name, name) for name in names]
        else:
            grid = [(think, answer) for think in names for answer in names]
        return [first] + [p for p in dict.fromkeys(grid) if p != first]

    def budgets(self) -> list[str]:
        """Every budget name the pairs use, each once."""
        return list(dict.fromkeys(name for pair in self.pairs() for name in pair))


def load_prompts(cfg: GenerateConfig) -> list[str]:
    """The prompts to answer: ``cfg.prompts``, or the lines of ``cfg.prompts_file``.

    A ``.jsonl`` file holds one JSON string, or object with a ``"prompt"`` key, per line (so a
    prompt may contain newlines); any other file holds one plain prompt per line. Blank lines
    are skipped.
    """
    if not cfg.prompts_file:
        return list(cfg.prompts)
    path = Path(cfg.prompts_file)
    require(path.is_file(), "generation.prompts_file", f"{path} is not a file")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        item = json.loads(line)
        text = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise ConfigError(
                f"generation.prompts_file: {path}:{number} is neither a JSON string nor an "
                "object with a 'prompt' string"
            )
        prompts.append(text)
    require(bool(prompts), "generation.prompts_file", f"{path} holds no prompt")
    return prompts
