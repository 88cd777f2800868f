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
from typing import Union

import torch
from torch import Tensor

from megatron_ext.elastic.config import AXES, AXIS_SOURCE, BUDGET_KINDS, DEPTH, ELASTIC_AXES
from megatron_ext.models.config import ConfigError, HybridModelConfig, require

MAMBA_CONV_KERNEL = 4
"""megatron-core ``MambaMixer``'s default ``d_conv``, which the builder keeps."""

Num = Union[int, float, Tensor]
"""An exact Python number, or a float64 tensor that carries the gradient."""


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
        require(axis in AXES, where, f"unknown axis {axis!r}; known: {AXES}")
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
        self.full_widths = {axis: getattr(model, attr) for axis, (attr, _) in AXIS_SOURCE.items()}
        self.full_widths[DEPTH] = model.num_layers
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
        return _tensor(self._dense(w) + self._routed(w, w["moe_experts"]))

    def active_params(self, widths: Mapping[str, Tensor | int] | None = None) -> Tensor:
        """Parameters a token visits: the routed experts count ``top_k`` experts."""
        w = self._widths(widths)
        return _tensor(self._dense(w) + self._routed(w, self.model.moe_router_topk))

    def memory(self, widths: Mapping[str, Tensor | int] | None = None) -> Tensor:
        """Bytes of weights, KV cache and Mamba state (formula in the class docstring)."""
        m, s, w = self.model, self.spec, self._widths(widths)
        weights = self.params(widths) * s.bytes_per_param
        kv = 2 * s.batch * s.seq_length * m.num_query_groups * m.kv_channels * s.kv_bytes
        d = w["mamba_heads"] * w["mamba_head_dim"]
        conv = (d + 2 * m.mamba_num_groups * m.mamba_state_dim) * (MAMBA_CONV_KERNEL - 1)
        state = s.batch * (d * m.mamba_state_dim + conv) * s.state_bytes
        return weights + self.layers(w, "*") * kv + self.layers(w, "M") * state

    def latency(self, widths: Mapping[str, Tensor | int] | None = None) -> Tensor:
        """Latency proxy, or profiled seconds with ``spec.latency_table`` (class docstring)."""
        m, s, w = self.model, self.spec, self._widths(widths)
        if self.table is None:
            attn = 2 * w["attn_heads"] * m.kv_channels * s.seq_length**2
            tokens = self.active_params(widths) * s.seq_length
            return s.batch * (tokens + self.layers(w, "*") * attn)
        total: Num = 0.0
        for axis, points in self.table.items():
            symbol = AXIS_SOURCE[axis][1]
            total = total + self.layers(w, symbol) * _interpolate(points, w[axis])
        return _tensor(total)

    def _widths(self, widths: Mapping[str, Tensor | int] | None) -> dict[str, Num]:
        """Every axis's width: exact ints as given, tensors as float64 (keeping the graph)."""
        out: dict[str, Num] = dict(self.full_widths)
        for axis, width in (widths or {}).items():
            if axis not in ELASTIC_AXES:
                raise ValueError(f"unknown axis {axis!r}; known: {ELASTIC_AXES}")
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
        """Every parameter except the routed experts'."""
        m = self.model
        h = w["embedding"]
        glu = 2 if m.activation == "swiglu" else 1
        total = m.vocab_size * h * (1 if m.tie_embeddings else 2) + h  # + final norm
        if m.has("M"):
            heads, d = w["mamba_heads"], w["mamba_heads"] * w["mamba_head_dim"]
            bc = 2 * m.mamba_num_groups * m.mamba_state_dim
            conv = (d + bc) * (MAMBA_CONV_KERNEL + 1)  # weight [c, 1, K] and bias [c]
            mamba = h + h * (2 * d + bc + heads) + conv + 3 * heads + d + d * h
            total = total + self.layers(w, "M") * mamba
        if m.has("*"):
            q = w["attn_heads"] * m.kv_channels
            attn = h + h * (q + 2 * m.num_query_groups * m.kv_channels) + q * h
            total = total + self.layers(w, "*") * attn
        if m.has("-"):
            total = total + self.layers(w, "-") * (h + (glu + 1) * h * w["ffn"])
        if m.has("E"):
            shared = (glu + 1) * h * m.moe_shared_expert_ffn_hidden_size
            total = total + self.layers(w, "E") * (h + w["moe_experts"] * h + shared)
        return total

    def _routed(self, w: dict[str, Num], experts: Num) -> Num:
        """Routed-expert parameters with ``experts`` experts in every MoE layer."""
        m = self.model
        if not m.has("E"):
            return 0
        glu = 2 if m.activation == "swiglu" else 1
        return self.layers(w, "E") * experts * (glu + 1) * w["embedding"] * w["moe_ffn"]


def _tensor(value: Num) -> Tensor:
    """``value`` as a float64 0-dim tensor (exact for ints below 2**53)."""
    if isinstance(value, Tensor):
        return value.to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64)
