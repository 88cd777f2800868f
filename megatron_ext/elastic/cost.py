"""The differentiable cost of a choice of widths: parameters, active parameters, memory, latency.

The router loss (docs/design.md, "Router and losses") compares ``cost(widths)`` with a budget's
target fraction of ``cost(full widths)``. Widths come as ints (exact counts) or as 0-dim float
tensors, e.g. the router's expected widths ``sum_i onehot_i * choice_i``; every cost is then a
polynomial (or, with a profile table, piecewise linear) in the widths, so its gradient reaches
the router. Results are float64 0-dim tensors.

The parameter count is derived from the megatron-core modules this project builds
(``megatron_ext.models.builder``), and equals ``count_parameters`` of the sliced model
exactly (``tests/unit/test_cost.py``). With ``H`` the hidden width, ``V`` the vocabulary and
``glu`` = 2 for swiglu (fc1 holds gate and up halves), else 1:

* model: embedding ``V*H``, output layer ``V*H`` (not when tied), final norm ``H``;
* Mamba layer (``h`` heads x ``p`` head dim, ``d = h*p``, ``G`` groups, state ``N``, conv
  kernel ``K = 4``, ``c = d + 2*G*N``): norm ``H``, in_proj ``H*(2d + 2GN + h)``, conv1d
  ``c*K + c``, ``A_log``/``dt_bias``/``D`` ``3h``, gated norm ``d``, out_proj ``d*H``;
* attention layer (``a`` heads, ``g`` query groups, ``k`` kv_channels): norm ``H``,
  linear_qkv ``H*(a + 2g)*k``, linear_proj ``a*k*H``;
* MLP layer (``f`` ffn): norm ``H``, ``glu*H*f + f*H``;
* MoE layer (``E`` experts of ffn ``F``, shared ffn ``S``): norm ``H``, router ``E*H``,
  experts ``E*(glu*H*F + F*H)``, shared expert ``glu*H*S + S*H``.

Active parameters replace the routed experts' ``E*(...)`` by ``top_k*(...)``
(``megatron_ext.models.params``: every token visits ``top_k`` experts).

Depth: every per-layer term counts the *kept* layers of its kind, ``n_kind(depth)``, from the
layer ranking (``layer_order``, most important first); parameters, KV cache and SSM state of a
skipped layer are gone. ``n_kind`` is a step function of the depth; for a tensor depth it is
interpolated linearly between consecutive layer counts (exact at every integer depth), so
the router's expected depth still gets a gradient.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from megatron_ext.elastic.config import BUDGET_KINDS, DEPTH
from megatron_ext.elastic.sites.base import Num
from megatron_ext.elastic.sites.registry import axes as registry_axes
from megatron_ext.elastic.sites.registry import axis as registry_axis
from megatron_ext.elastic.sites.registry import sites
from megatron_ext.models.config import ConfigError, HybridModelConfig, require


@dataclass
class CostSpec:
    """What a budget measures, and the workload that memory and latency assume.

    ``kind`` is one of :data:`megatron_ext.elastic.config.BUDGET_KINDS`. ``batch`` and
    ``seq_length`` size the KV cache, the SSM state and the latency proxy. ``bytes_per_param``,
    ``kv_bytes`` and ``state_bytes`` are the storage widths of weights, KV cache and Mamba state.
    ``latency_table`` is a JSON profile (see :class:`CostModel`); empty = proportional model.
    """

    kind: str
    batch: int = 1
    seq_length: int = 4096
    bytes_per_param: float = 2.0
    kv_bytes: float = 2.0
    state_bytes: float = 4.0
    latency_table: str = ""

    def __post_init__(self) -> None:
        require(
            self.kind in BUDGET_KINDS, "cost.kind", f"{self.kind!r} is not one of {BUDGET_KINDS}"
        )
        for name in ("batch", "seq_length"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                f"cost.{name}",
                f"{value!r} must be a positive integer",
            )
        for name in ("bytes_per_param", "kv_bytes", "state_bytes"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                f"cost.{name}",
                f"{value!r} must be a positive number of bytes",
            )
            setattr(self, name, float(value))
        require(
            isinstance(self.latency_table, str),
            "cost.latency_table",
            f"{self.latency_table!r} must be a path string ('' = the proportional model)",
        )
        require(
            not self.latency_table or Path(self.latency_table).is_file(),
            "cost.latency_table",
            f"no such file {self.latency_table!r}",
        )


def load_latency_table(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """Read a latency profile: ``{axis: [(width, seconds_per_layer), ...]}`` sorted by width.

    The file is JSON ``{"<axis>": {"<width>": <seconds per layer>, ...}, ...}``; see
    :class:`CostModel` for what the numbers mean. Errors name ``cost.latency_table``.
    """
    where = "cost.latency_table"
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{where}: cannot read {str(path)!r}: {err}") from err
    require(isinstance(raw, dict) and bool(raw), where, "must be a non-empty JSON object")
    table: dict[str, list[tuple[float, float]]] = {}
    for axis, points in raw.items():
        known = tuple(a.name for a in registry_axes() if a.width)
        require(axis in known, where, f"unknown axis {axis!r}; known: {known}")
        require(
            isinstance(points, dict) and bool(points),
            f"{where}.{axis}",
            "must map widths to seconds per layer",
        )
        rows = []
        for width, seconds in points.items():
            ok = str(width).isdigit() and int(width) > 0
            require(ok, f"{where}.{axis}", f"width {width!r} must be a positive integer")
            ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
            require(ok and seconds >= 0, f"{where}.{axis}.{width}", f"{seconds!r} is not >= 0")
            rows.append((float(int(width)), float(seconds)))
        table[axis] = sorted(rows)
    return table


def _interpolate(points: list[tuple[float, float]], width: Num) -> Num:
    """Piecewise-linear ``points`` at ``width``; the end segments extend beyond the table."""
    if len(points) == 1:
        return points[0][1]
    xs = [x for x, _ in points]
    at = float(width.detach()) if isinstance(width, Tensor) else float(width)
    i = min(max(bisect.bisect_right(xs, at), 1), len(xs) - 1) - 1
    (x0, y0), (x1, y1) = points[i], points[i + 1]
    return y0 + (width - x0) * ((y1 - y0) / (x1 - x0))


class CostModel:
    """The cost of a choice of widths in ``model``, of the kind ``spec.kind``.

    ``cost(widths)`` takes ``{axis: width}`` for any of :data:`AXES` (an axis left out is at
    full width; an axis whose layer kind the model lacks has no effect), each an int or a
    0-dim float tensor, and returns a float64 0-dim tensor, differentiable w.r.t. the tensors.

    Memory (bytes) = weights + KV cache + Mamba state::

        params * bytes_per_param
        + n_attn  * 2 * batch * seq * groups * kv_channels * kv_bytes
        + n_mamba * batch * (h * p * N + (d + 2*G*N) * (K - 1)) * state_bytes

    (KV heads are the query groups, which the ``attn_heads`` axis does not change.)

    Latency, proportional model (multiply-accumulates per forward, a FLOPs proxy)::

        batch * (active_params * seq + n_attn * 2 * heads * kv_channels * seq**2)

    Latency from a profile (``spec.latency_table``): JSON ``{"<axis>": {"<width>": seconds}}``
    where ``seconds`` is the measured time of one layer of the axis's kind (``embedding``: of
    every layer) with that axis at ``width`` and the others full, attributed to that axis;
    latency = sum over the listed axes of ``layers(axis) * interp(width)``, interpolated
    linearly between the listed widths (and extrapolated along the end segments).

    ``n_attn``, ``n_mamba`` and every other layer count are those kept at ``widths["depth"]``
    under ``layer_order`` (the stripe layout's ranking); without a ranking only the full
    depth is allowed.
    """

    def __init__(
        self, model: HybridModelConfig, spec: CostSpec, layer_order: Sequence[int] = ()
    ) -> None:
        self.model = model
        self.spec = spec
        self.full_widths = {a.name: a.full(model) for a in registry_axes()}
        self.table = load_latency_table(spec.latency_table) if spec.latency_table else None
        self.layer_order = tuple(int(j) for j in layer_order)
        if self.layer_order and sorted(self.layer_order) != list(range(model.num_layers)):
            raise ValueError(
                f"layer_order {list(self.layer_order)} is not a ranking of the "
                f"{model.num_layers} layers of model.pattern {model.pattern!r}"
            )
        # symbol -> [(depth, layers of that kind kept at that depth)], depth 0..num_layers
        self._kept: dict[str, list[tuple[float, float]]] = {}
        for symbol in set(model.pattern):
            kinds = [model.pattern[j] for j in self.layer_order]
            counts = [float(kinds[:d].count(symbol)) for d in range(model.num_layers + 1)]
            self._kept[symbol] = [(float(d), c) for d, c in enumerate(counts)]

    def layers(self, w: Mapping[str, Num], symbol: str | None) -> Num:
        """Layers of kind ``symbol`` (``None``: of every kind) kept at ``w["depth"]``."""
        m = self.model
        depth = w.get(DEPTH, m.num_layers)
        if symbol is None:
            return depth
        at = float(depth.detach()) if isinstance(depth, Tensor) else float(depth)
        if at == m.num_layers and not isinstance(depth, Tensor):
            return m.count(symbol)
        if not self.layer_order:
            if at == m.num_layers:
                return m.count(symbol)
            raise ValueError(
                f"depth {at:g} < {m.num_layers} layers needs the layer ranking: build the "
                "CostModel with layer_order (StripeLayout.layer_order from the importance run)"
            )
        if symbol not in self._kept:
            return 0
        if isinstance(depth, Tensor):
            return _interpolate(self._kept[symbol], depth)
        return int(self._kept[symbol][int(depth)][1])

    def __call__(self, widths: Mapping[str, Tensor | int] | None = None) -> Tensor:
        """The cost of kind ``spec.kind`` at ``widths`` (missing axes: full)."""
        return getattr(self, self.spec.kind)(widths)

    def full(self) -> float:
        """The cost of kind ``spec.kind`` at full width."""
        return float(self(None))

    def params(self, widths: Mapping[str, Tensor | int] | None = None) -> Tensor:
        """Total parameters, exactly those of the model sliced at ``widths``."""
        w = self._widths(widths)
        return _tensor(self._dense(w) + self._routed(w, active=False))

    def active_params(self, widths: Mapping[str, Tensor | int] | None = None) -> Tensor:
        """Parameters a token visits: the routed experts count ``top_k`` experts."""
        w = self._widths(widths)
        return _tensor(self._dense(w) + self._routed(w, active=True))

    def memory(self, widths: Mapping[str, Tensor | int] | None = None) -> Tensor:
        """Bytes of weights, KV cache and Mamba state (formula in the class docstring)."""
        w = self._widths(widths)
        total = self.params(widths) * self.spec.bytes_per_param
        for site in sites():
            total = total + site.cache_bytes(self, w)
        return total

    def latency(self, widths: Mapping[str, Tensor | int] | None = None) -> Tensor:
        """Latency proxy, or profiled seconds with ``spec.latency_table`` (class docstring)."""
        s, w = self.spec, self._widths(widths)
        if self.table is None:
            total = self.active_params(widths) * s.seq_length
            for site in sites():
                total = total + site.sequence_macs(self, w)
            return s.batch * total
        seconds: Num = 0.0
        for axis, points in self.table.items():
            symbol = registry_axis(axis).symbol
            seconds = seconds + self.layers(w, symbol) * _interpolate(points, w[axis])
        return _tensor(seconds)

    def _widths(self, widths: Mapping[str, Tensor | int] | None) -> dict[str, Num]:
        """Every axis's width: exact ints as given, tensors as float64 (keeping the graph)."""
        out: dict[str, Num] = dict(self.full_widths)
        for axis, width in (widths or {}).items():
            if axis not in self.full_widths:
                raise ValueError(f"unknown axis {axis!r}; known: {tuple(self.full_widths)}")
            if isinstance(width, Tensor):
                if width.dim() != 0:
                    raise ValueError(f"width of {axis!r} must be a 0-dim tensor, got {width.shape}")
                out[axis] = width.to(torch.float64)
            elif isinstance(width, int) and not isinstance(width, bool) and width > 0:
                out[axis] = width
            else:
                raise ValueError(f"width of {axis!r} must be a positive int or a tensor: {width!r}")
        return out

    def _dense(self, w: dict[str, Num]) -> Num:
        """Every parameter except the routed experts' (each site's terms)."""
        total: Num = 0
        for site in sites():
            total = total + site.params(self, w)
        return total

    def _routed(self, w: dict[str, Num], active: bool) -> Num:
        """Routed-expert parameters: all of them, or (``active``) those a token visits."""
        total: Num = 0
        for site in sites():
            total = total + site.routed_params(self, w, active)
        return total


def _tensor(value: Num) -> Tensor:
    """``value`` as a float64 0-dim tensor (exact for ints below 2**53)."""
    if isinstance(value, Tensor):
        return value.to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64)
