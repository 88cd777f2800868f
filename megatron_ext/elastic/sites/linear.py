"""The linear kind: megatron's column- and row-parallel linears, which every other site uses.

It carries no axis of its own; the sites of the layer kinds make their projections elastic,
reorder and slice them with these pieces:

* conversion: :func:`column` and :func:`row`, the steps giving a linear its elastic mixin
  (:mod:`megatron_ext.elastic.layers_linear`: masked and narrow compute);
* reorder: :func:`permute_rows` / :func:`permute_cols` (a linear's output / input features),
  :func:`permute_norm`, and the index helpers :func:`glu_rows` and :func:`blocks`;
* slicing: :func:`linear_rule`, the kept rows and columns of ``weight [rows, cols]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from megatron_ext.elastic.layers_linear import ElasticColumnLinearMixin, ElasticRowLinearMixin
from megatron_ext.elastic.sites.base import Rule, Step


def column(linear: nn.Module, rows: tuple | None = None, glu: bool = False) -> Step:
    """A column-parallel linear: narrow over ``rows`` (``(axis, shard)``) when given."""
    return linear, ElasticColumnLinearMixin, {"elastic_rows": rows, "elastic_glu": glu}


def row(linear: nn.Module, cols: tuple | None = None, hidden_out: bool = True) -> Step:
    """A row-parallel linear: masked over input ``cols`` (``(axis, shard, unit)``) when given;
    ``hidden_out``: its output is the residual stream (zeroed on inactive hidden channels)."""
    return linear, ElasticRowLinearMixin, {"elastic_in": cols, "elastic_out": hidden_out}


def take(t: Tensor | None, dim: int, idx: Tensor) -> None:
    """Reorder ``t`` in place along ``dim``: position ``q`` gets what was at ``idx[q]``."""
    if t is not None:
        with torch.no_grad():
            t.data.copy_(t.data.index_select(dim, idx.to(t.device)))


def permute_rows(linear: Any, idx: Tensor) -> None:
    """Permute a linear's output features (weight rows and bias)."""
    take(linear.weight, 0, idx)
    take(getattr(linear, "bias", None), 0, idx)


def permute_cols(linear: Any, idx: Tensor) -> None:
    """Permute a linear's input features (weight columns, and a fused pre-norm's weight)."""
    take(linear.weight, 1, idx)
    for name in ("layer_norm_weight", "layer_norm_bias"):
        take(getattr(linear, name, None), 0, idx)


def permute_norm(norm: Any, idx: Tensor | None) -> None:
    """Permute a norm's weight and bias (nothing for ``None`` or a weightless norm)."""
    if idx is not None and norm is not None and getattr(norm, "weight", None) is not None:
        take(norm.weight, 0, idx)
        take(getattr(norm, "bias", None), 0, idx)


def glu_rows(idx: Tensor, width: int, gated: bool) -> Tensor:
    """fc1 row index: the same order on both halves of a gated (GLU) fc1."""
    return torch.cat([idx, idx + width]) if gated else idx


def blocks(order: Tensor, size: int) -> Tensor:
    """Expand a permutation of blocks of ``size`` rows into a row permutation."""
    return (order[:, None] * size + torch.arange(size)).reshape(-1)


def linear_rule(rows: Tensor | None, cols: Tensor | None) -> Rule:
    """A linear layer: ``weight [rows, cols]``; its bias follows the rows."""
    weight = {d: m for d, m in ((0, rows), (1, cols)) if m is not None}
    return {"weight": weight, "bias": {} if rows is None else {0: rows}}
