"""The budget router: one small MLP per elastic axis that picks that axis's width for a budget.

Each :class:`AxisRouter` is FC → LeakyReLU → FC (Nemotron Elastic). Its input describes the
budget (a one-hot over the configured budgets, its target fraction, or both), its output is
logits over the axis's width choices, once (homogeneous) or per layer (heterogeneous).

Training (:meth:`ElasticRouter.forward`): the logits are scaled by a ramp (1 → 10), Gumbel
noise drawn **only** from the caller's generator is added (so ranks seeded alike choose alike,
docs/design.md invariant 6), a softmax at an annealed τ (1.0 → 0.05) gives ``probs``, and the hard
straight-through one-hot ``hard + (probs - probs.detach())`` picks one width exactly while its
gradient flows to the router. Evaluation and slicing (:meth:`ElasticRouter.select`) take the
argmax of the logits with no noise at all (a Flextron pitfall).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from megatron_ext.elastic.config import ElasticConfig
from megatron_ext.elastic.sites import registry
from megatron_ext.models.config import ConfigError, HybridModelConfig, require

if TYPE_CHECKING:  # feasible -> cost -> the config registry, which imports this module
    from megatron_ext.elastic.feasible import FeasibleSet

INPUTS: tuple[str, ...] = ("onehot", "continuous", "both")
"""Router input: one-hot over the budgets, the budget's target fraction, or both concatenated."""

MODES: tuple[str, ...] = ("homogeneous", "heterogeneous")
"""One choice per axis, or one per layer of that axis (``embedding`` and ``depth``, which are
model-wide, are always homogeneous)."""


def _model_wide(axis: str) -> bool:
    """Whether ``axis`` has one width for the whole model, whatever the router mode (its
    site's axis lives in no one layer kind: ``embedding``, ``depth``)."""
    return registry.axis(axis).symbol is None


@dataclass
class RouterConfig:
    """Router shape, input, mode, schedules (τ decays exponentially, logit scale ramps linearly
    over ``anneal_steps``, then both stay constant), optimiser lr and init seed.

    ``budget_tolerance`` > 0 restricts every hard choice to the width combinations whose cost
    is within that relative distance of the budget's target (see
    :mod:`megatron_ext.elastic.feasible`); 0 is the paper's plain per-axis argmax.
    """

    hidden: int = 256
    input: str = "onehot"
    mode: str = "homogeneous"
    tau_start: float = 1.0
    tau_end: float = 0.05
    scale_start: float = 1.0
    scale_end: float = 10.0
    anneal_steps: int = 1000
    leaky_slope: float = 0.1
    lr: float = 1e-2
    seed: int = 0
    budget_tolerance: float = 0.0

    def __post_init__(self) -> None:
        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        require(is_int(self.hidden) and self.hidden >= 1, "router.hidden", "must be an int >= 1")
        require(self.input in INPUTS, "router.input", f"{self.input!r} is not one of {INPUTS}")
        require(self.mode in MODES, "router.mode", f"{self.mode!r} is not one of {MODES}")
        for name in ("tau_start", "tau_end", "scale_start", "scale_end", "lr"):
            value = getattr(self, name)
            require(is_num(value) and value > 0, f"router.{name}", f"{value!r} must be > 0")
            setattr(self, name, float(value))
        require(
            self.tau_end <= self.tau_start,
            "router.tau_end",
            f"{self.tau_end} must be <= router.tau_start={self.tau_start} (τ anneals down)",
        )
        require(
            is_int(self.anneal_steps) and self.anneal_steps >= 0,
            "router.anneal_steps",
            f"{self.anneal_steps!r} must be an int >= 0 (0 = end values from the first step)",
        )
        require(
            is_num(self.leaky_slope) and self.leaky_slope >= 0,
            "router.leaky_slope",
            f"{self.leaky_slope!r} must be >= 0",
        )
        self.leaky_slope = float(self.leaky_slope)
        require(is_int(self.seed) and self.seed >= 0, "router.seed", "must be an int >= 0")
        require(
            is_num(self.budget_tolerance) and 0 <= self.budget_tolerance < 1,
            "router.budget_tolerance",
            f"{self.budget_tolerance!r} must be in [0, 1) (0 = plain per-axis argmax)",
        )
        self.budget_tolerance = float(self.budget_tolerance)
        require(
            self.budget_tolerance == 0 or self.mode == "homogeneous",
            "router.budget_tolerance",
            "budget-feasible choices need router.mode=homogeneous (one width per axis)",
        )


class AxisRouter(nn.Module):
    """FC(in → hidden) → LeakyReLU → FC(hidden → n_choices × n_layers) for one axis."""

    def __init__(self, n_in: int, hidden: int, n_choices: int, n_layers: int, slope: float):
        super().__init__()
        self.n_choices, self.n_layers = n_choices, n_layers
        self.fc1 = nn.Linear(n_in, hidden)
        self.act = nn.LeakyReLU(slope)
        self.fc2 = nn.Linear(hidden, n_choices * n_layers)

    def forward(self, features: Tensor) -> Tensor:
        """Logits of shape ``(n_layers, n_choices)`` for one budget's feature vector."""
        return self.fc2(self.act(self.fc1(features))).view(self.n_layers, self.n_choices)


@dataclass
class AxisChoice:
    """One axis's choice. Homogeneous: ``probs``/``onehot`` ``(n_choices,)``, ``index``/``width``
    ints, ``gate``/``expected_width`` 0-dim. Heterogeneous: one row / entry per layer."""

    probs: Tensor
    onehot: Tensor
    index: int | list[int]
    width: int | list[int]
    gate: Tensor
    expected_width: Tensor


@dataclass
class RouterOutput:
    """The router's choice for one budget and step, per axis (``out[axis]`` or ``out.axes``)."""

    axes: dict[str, AxisChoice] = field(default_factory=dict)
    tau: float = 1.0
    scale: float = 1.0

    def __getitem__(self, axis: str) -> AxisChoice:
        return self.axes[axis]

    def widths(self) -> dict[str, int | list[int]]:
        """Chosen width per axis (a list per layer for heterogeneous axes)."""
        return {axis: c.width for axis, c in self.axes.items()}

    def gates(self) -> dict[str, Tensor]:
        """Straight-through gate per axis: exactly 1.0 forward, gradient to the router."""
        return {axis: c.gate for axis, c in self.axes.items()}

    def expected_widths(self) -> dict[str, Tensor]:
        """Σ_i onehot_i · choice_i per axis: the chosen width, differentiable."""
        return {axis: c.expected_width for axis, c in self.axes.items()}


def layer_counts(elastic: ElasticConfig, model: HybridModelConfig) -> dict[str, int]:
    """How many layers of ``model`` carry each elastic axis (``embedding``, ``depth``: 1, they
    are model-wide)."""
    counts = {}
    for axis in elastic.axes:
        symbol = registry.axis(axis).symbol
        counts[axis] = 1 if symbol is None else model.count(symbol)
    return counts


class ElasticRouter(nn.Module):
    """One :class:`AxisRouter` per elastic axis of ``elastic``, keyed by axis.

    ``layers`` (required in heterogeneous mode, see :func:`layer_counts`) says how many layers
    carry each axis. Weights are initialised from ``cfg.seed`` with a private generator, so
    every rank builds the same router whatever its global RNG state.
    """

    def __init__(
        self,
        elastic: ElasticConfig,
        cfg: RouterConfig | None = None,
        layers: dict[str, int] | None = None,
    ):
        super().__init__()
        self.cfg = cfg if cfg is not None else RouterConfig(hidden=elastic.router_hidden)
        self.budget_names = [b.name for b in elastic.budgets]
        self.targets = [b.target for b in elastic.budgets]
        self.choices = {axis: list(c) for axis, c in elastic.axes.items()}
        self.layers = {axis: 1 for axis in self.choices}
        if self.cfg.mode == "heterogeneous":
            layers = dict(layers or {})
            missing = [a for a in self.choices if not _model_wide(a) and a not in layers]
            require(
                not missing,
                "router.mode",
                f"heterogeneous mode needs layer counts for {missing} (see layer_counts)",
            )
            for axis in self.choices:
                if not _model_wide(axis):
                    require(layers[axis] >= 1, f"layers.{axis}", "must be >= 1")
                    self.layers[axis] = int(layers[axis])
        n_in = (len(self.budget_names) if self.cfg.input != "continuous" else 0) + (
            1 if self.cfg.input != "onehot" else 0
        )
        self.routers = nn.ModuleDict(
            {
                axis: AxisRouter(
                    n_in, self.cfg.hidden, len(c), self.layers[axis], self.cfg.leaky_slope
                )
                for axis, c in self.choices.items()
            }
        )
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """PyTorch's default Linear init, U(±1/√fan_in), drawn from a ``cfg.seed`` generator."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for router in self.routers.values():
            layers: tuple[nn.Linear, nn.Linear] = (router.fc1, router.fc2)  # type: ignore[assignment]
            for linear in layers:
                bound = 1.0 / math.sqrt(linear.in_features)
                for p in (linear.weight, linear.bias):
                    p.copy_((torch.rand(p.shape, generator=gen, dtype=p.dtype) * 2 - 1) * bound)

    def budget_features(self, budget: str | float) -> Tensor:
        """The router input for a budget name, or (continuous input) a target fraction."""
        device = next(self.parameters()).device
        if isinstance(budget, str):
            if budget not in self.budget_names:
                raise ConfigError(
                    f"elastic.budgets: no budget named {budget!r}; known: {self.budget_names}"
                )
            index = self.budget_names.index(budget)
            target = self.targets[index]
        else:
            if self.cfg.input == "onehot":
                raise ValueError(
                    f"budget {budget!r}: a target fraction needs router.input='continuous' or "
                    f"'both'; with 'onehot' pass one of the budget names {self.budget_names}"
                )
            target = float(budget)
            if not 0.0 < target <= 1.0:
                raise ValueError(f"budget {budget!r}: a target fraction must be in (0, 1]")
            index = None
        parts = []
        if self.cfg.input != "continuous":
            onehot = torch.zeros(len(self.budget_names))
            if index is not None:
                onehot[index] = 1.0
            parts.append(onehot)
        if self.cfg.input != "onehot":
            parts.append(torch.tensor([target]))
        return torch.cat(parts).to(device)

    def tau(self, step: int) -> float:
        """Gumbel-softmax temperature: exponential decay tau_start → tau_end, then constant."""
        c = self.cfg
        return c.tau_start * (c.tau_end / c.tau_start) ** _progress(step, c.anneal_steps)

    def scale(self, step: int) -> float:
        """Logit scale: linear ramp scale_start → scale_end, then constant."""
        c = self.cfg
        return c.scale_start + (c.scale_end - c.scale_start) * _progress(step, c.anneal_steps)

    def logits(self, budget: str | float) -> dict[str, Tensor]:
        """Raw (unscaled, noise-free) logits per axis, shape ``(n_layers, n_choices)``."""
        x = self.budget_features(budget)
        return {axis: router(x) for axis, router in self.routers.items()}

    def forward(
        self,
        budget: str | float,
        step: int,
        *,
        generator: torch.Generator,
        feasible: FeasibleSet | None = None,
    ) -> RouterOutput:
        """Hard straight-through Gumbel-softmax choice per axis; noise only from ``generator``.

        Noise is drawn axis by axis in config order, so equal generators give equal choices.
        With ``feasible`` (homogeneous mode) the hard choice is the feasible combination with
        the highest sum of noised, scaled logits instead of each axis's own argmax.
        """
        tau, scale = self.tau(step), self.scale(step)
        out = RouterOutput(tau=tau, scale=scale)
        scores = {}
        for axis, logits in self.logits(budget).items():
            u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
            gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-12)))
            scores[axis] = (logits * scale + gumbel.to(logits)) / tau
        picked = self._feasible_pick(scores, feasible)
        for axis, y in scores.items():
            probs = torch.softmax(y, dim=-1)
            index = y.argmax(dim=-1) if picked is None else torch.tensor([picked[axis]])
            hard = nn.functional.one_hot(index, y.shape[-1]).to(probs)
            onehot = hard + (probs - probs.detach())  # exactly `hard` forward, ST gradient
            choices = torch.tensor(self.choices[axis], dtype=probs.dtype, device=probs.device)
            out.axes[axis] = self._pack(axis, probs, onehot, index.to(probs.device), choices)
        return out

    def _feasible_pick(
        self, scores: dict[str, Tensor], feasible: FeasibleSet | None
    ) -> dict[str, int] | None:
        """Per-axis choice indices of the best feasible combination, or ``None`` without one."""
        if feasible is None:
            return None
        if self.cfg.mode != "homogeneous":
            raise ValueError("budget-feasible choices need router.mode=homogeneous")
        return feasible.best({axis: y[0] for axis, y in scores.items()})

    def _pack(self, axis: str, probs, onehot, index, choices) -> AxisChoice:
        """Squeeze the layer dimension away for homogeneous axes."""
        gate = onehot.gather(-1, index[:, None])[:, 0]
        expected = (onehot * choices).sum(-1)
        idx = index.tolist()
        widths = [self.choices[axis][i] for i in idx]
        if self._per_layer(axis):
            return AxisChoice(probs, onehot, idx, widths, gate, expected)
        return AxisChoice(probs[0], onehot[0], idx[0], widths[0], gate[0], expected[0])

    def _per_layer(self, axis: str) -> bool:
        return self.cfg.mode == "heterogeneous" and not _model_wide(axis)

    def select_homogeneous(
        self, budget: str | float, feasible: FeasibleSet | None = None
    ) -> dict[str, int]:
        """:meth:`select` when every axis has one width (homogeneous mode); else ``ValueError``."""
        widths = self.select(budget, feasible)
        per_layer = sorted(a for a, w in widths.items() if isinstance(w, list))
        if per_layer:
            raise ValueError(f"per-layer widths for {per_layer}: use router.mode=homogeneous")
        return widths  # type: ignore[return-value]

    @torch.no_grad()
    def select(
        self, budget: str | float, feasible: FeasibleSet | None = None
    ) -> dict[str, int | list[int]]:
        """Deterministic widths for evaluation and slicing: argmax of the logits, no noise.

        With ``feasible``: the feasible combination of highest summed logits (homogeneous).
        """
        all_logits = self.logits(budget)
        picked = self._feasible_pick(all_logits, feasible)
        if picked is not None:
            return {axis: self.choices[axis][i] for axis, i in picked.items()}
        widths: dict[str, int | list[int]] = {}
        for axis, logits in all_logits.items():
            chosen = [self.choices[axis][i] for i in logits.argmax(dim=-1).tolist()]
            widths[axis] = chosen if self._per_layer(axis) else chosen[0]
        return widths


def _progress(step: int, anneal_steps: int) -> float:
    """Fraction of the annealing done at ``step``: 0 at step 0, 1 from ``anneal_steps`` on."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return 1.0 if anneal_steps == 0 else min(step, anneal_steps) / anneal_steps
