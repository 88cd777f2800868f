"""The elastic-training curriculum: stages of sequence length, length, budget mix and lr.

The default (``conf/curriculum/star_elastic.yaml``) follows the paper: stage 1 at 8K tokens with
uniform budgets, stage 2 at 49K with p = 0.5 / 0.3 / 0.2, largest budget first.

Which budget a step trains is :func:`sample_budget`, a pure function of (seed, stage, step):
every rank computes the same budget with no communication (docs/design.md invariant 6), and each
decision draws its own random number from its own stream (Flextron reused one number for two
decisions, so its configured probabilities were not honoured).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from megatron_ext.models.config import ConfigError, require

PROB_TOL = 1e-6
"""How far from 1 a stage's ``budget_probs`` may sum."""

_MASK64 = (1 << 64) - 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class Stage:
    """One curriculum stage. Give its length as ``steps`` or as ``tokens`` (exactly one > 0).

    ``budget_probs``: one probability per budget in the elastic config's order (largest
    first); empty means uniform. ``micro_batch_size`` and ``global_batch_size`` 0 inherit the
    training config's (the paper: 1536 sequences at 8K, 512 at 49K).
    """

    name: str
    seq_length: int
    lr: float
    steps: int = 0
    tokens: int = 0
    budget_probs: list[float] = field(default_factory=list)
    micro_batch_size: int = 0
    global_batch_size: int = 0

    def __post_init__(self) -> None:
        require(
            isinstance(self.name, str) and bool(self.name),
            "curriculum.stages[].name",
            f"must be a non-empty string, got {self.name!r}",
        )
        where = f"curriculum.stages[{self.name}]"
        for name in ("seq_length", "steps", "tokens", "micro_batch_size", "global_batch_size"):
            value = getattr(self, name)
            low = 1 if name == "seq_length" else 0
            require(_is_int(value) and value >= low, f"{where}.{name}", f"must be an int >= {low}")
        require(
            (self.steps > 0) != (self.tokens > 0),
            f"{where}.steps",
            f"give exactly one of steps ({self.steps}) and tokens ({self.tokens}) as > 0",
        )
        ok = isinstance(self.lr, (int, float)) and not isinstance(self.lr, bool)
        require(ok and math.isfinite(self.lr) and self.lr > 0, f"{where}.lr", "must be > 0")
        self.lr = float(self.lr)
        self.budget_probs = [float(p) for p in self.budget_probs]
        if self.budget_probs:
            bad = [p for p in self.budget_probs if not (math.isfinite(p) and p >= 0)]
            require(not bad, f"{where}.budget_probs", f"probabilities must be >= 0, got {bad}")
            total = sum(self.budget_probs)
            require(
                abs(total - 1.0) <= PROB_TOL,
                f"{where}.budget_probs",
                f"{self.budget_probs} sum to {total!r}; they must sum to 1 within {PROB_TOL}",
            )


@dataclass
class ResolvedStage:
    """A stage with its length in steps, its first global step and one probability per budget."""

    index: int
    name: str
    seq_length: int
    steps: int
    start_step: int
    budget_probs: list[float]
    lr: float
    micro_batch_size: int
    global_batch_size: int = 0


@dataclass
class CurriculumConfig:
    """The stages in order, and the seed of the per-step budget draws."""

    stages: list[Stage]
    seed: int = 0

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, Stage) else Stage(**s) for s in self.stages]
        require(bool(self.stages), "curriculum.stages", "at least one stage is required")
        names = [s.name for s in self.stages]
        dupes = sorted({n for n in names if names.count(n) > 1})
        require(not dupes, "curriculum.stages", f"stage names must be unique; repeated: {dupes}")
        require(_is_int(self.seed) and self.seed >= 0, "curriculum.seed", "must be an int >= 0")
        self._resolved: list[ResolvedStage] | None = None

    def resolve(self, global_batch: int, num_budgets: int) -> list[ResolvedStage]:
        """Stages with ``tokens`` turned into steps (ceil of tokens / (global_batch ·
        seq_length)) and uniform probabilities filled in. Also kept for :meth:`stage_at`."""
        require(
            _is_int(global_batch) and global_batch >= 1, "train.global_batch_size", "must be >= 1"
        )
        require(_is_int(num_budgets) and num_budgets >= 1, "elastic.budgets", "must be >= 1")
        resolved, start = [], 0
        for i, s in enumerate(self.stages):
            probs = s.budget_probs or [1.0 / num_budgets] * num_budgets
            require(
                len(probs) == num_budgets,
                f"curriculum.stages[{s.name}].budget_probs",
                f"has {len(probs)} entries but there are {num_budgets} budgets (one per "
                "budget, in elastic.budgets order, largest first)",
            )
            batch = s.global_batch_size or global_batch
            steps = s.steps or math.ceil(s.tokens / (batch * s.seq_length))
            resolved.append(
                ResolvedStage(
                    i,
                    s.name,
                    s.seq_length,
                    steps,
                    start,
                    probs,
                    s.lr,
                    s.micro_batch_size,
                    s.global_batch_size,
                )
            )
            start += steps
        self._resolved = resolved
        return resolved

    def _lengths(self) -> list[int]:
        if self._resolved is not None:
            return [s.steps for s in self._resolved]
        token_stages = [s.name for s in self.stages if s.tokens]
        if token_stages:
            raise ConfigError(
                f"curriculum.stages: {token_stages} are given in tokens; call "
                "resolve(global_batch, num_budgets) before asking for steps"
            )
        return [s.steps for s in self.stages]

    @property
    def total_steps(self) -> int:
        """Steps over all stages."""
        return sum(self._lengths())

    def stage_at(self, step: int) -> tuple[int, int]:
        """``(stage_index, step_in_stage)`` of global step ``step``."""
        if not (_is_int(step) and step >= 0):
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        start = 0
        for i, length in enumerate(self._lengths()):
            if step < start + length:
                return i, step - start
            start += length
        raise ValueError(f"step {step} is past the curriculum's last step ({start - 1})")


def mix64(x: int) -> int:
    """The splitmix64 finaliser: a bijection of 64-bit integers that scrambles every bit."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, stage: int, step: int, stream: int = 0) -> int:
    """A 64-bit seed for one decision at (seed, stage, step); ``stream`` separates decisions.

    Chained mixes, so distinct steps of one stage never collide (each mix is a bijection) and
    other triples collide only by 64-bit chance. Stream 0 is the budget draw, 1 the router noise.
    """
    h = mix64(seed)
    for part in (stage, step, stream):
        h = mix64(h ^ (part & _MASK64))
    return h


def step_generator(seed: int, stage: int, step: int, stream: int = 1) -> torch.Generator:
    """A fresh CPU generator for decision ``stream`` at (seed, stage, step).

    The default stream 1 is the one to hand the router's Gumbel noise; stream 0 is reserved for
    :func:`sample_budget`.
    """
    return torch.Generator().manual_seed(step_seed(seed, stage, step, stream))


def sample_budget(probs: Sequence[float], seed: int, stage: int, step: int) -> int:
    """Index of the budget trained at (seed, stage, step), drawn with probabilities ``probs``.

    Pure: one uniform number from a fresh generator seeded by :func:`step_seed` (stream 0),
    mapped through the inverse CDF. A budget with probability 0 is never drawn.
    """
    p = torch.tensor([float(x) for x in probs], dtype=torch.float64)
    if p.numel() == 0 or bool((p < 0).any()) or not float(p.sum()) > 0:
        raise ValueError(f"budget probabilities must be non-negative with a positive sum: {probs}")
    cdf = torch.cumsum(p / p.sum(), dim=0)
    gen = torch.Generator().manual_seed(step_seed(seed, stage, step, stream=0))
    u = torch.rand((), generator=gen, dtype=torch.float64)
    index = int(torch.searchsorted(cdf, u, right=True))
    last = int(torch.nonzero(p > 0)[-1])  # u >= cdf[-1] only by rounding: the last possible one
    return min(index, last)
