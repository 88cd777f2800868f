"""The pieces every Hugging Face family mapping is written with, both directions side by side.

* :class:`Pair`: one ``HybridModelConfig`` field and its ``config.json`` key, with the
  conversion each way next to each other;
* :func:`axis_pairs`: the pairs of the elastic axes' fields, under the keys their sites
  declare (``hf_names`` in :mod:`megatron_ext.elastic.sites`), with the family's
  :class:`Convert` where a value is not written as it is;
* :class:`Fixed`: a ``config.json`` value the megatron model always has (written on export,
  required on import, with the reason);
* :func:`split_tensor` / :func:`merge_tensors`: the only two places where one megatron tensor
  is several HF tensors (fused ``linear_qkv``; a gated MLP's ``linear_fc1`` = [gate; up]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from megatron_ext.elastic.sites import registry
from megatron_ext.export import ExportError
from megatron_ext.models.config import HybridModelConfig


def _same(value: Any) -> Any:
    return value


_NO_DEFAULT = object()


@dataclass(frozen=True)
class Pair:
    """``HybridModelConfig.<ours>`` <-> ``config.json[theirs]``.

    ``to_hf`` converts our value to theirs, ``from_hf`` theirs to ours; ``default`` is used
    when ``config.json`` lacks the key (none: the key is required).
    """

    ours: str
    theirs: str
    to_hf: Callable[[Any], Any] = _same
    from_hf: Callable[[Any], Any] = _same
    default: Any = _NO_DEFAULT


@dataclass(frozen=True)
class Convert:
    """How a family writes one axis field whose ``config.json`` key a site names: the
    conversions and ``default`` of a :class:`Pair`."""

    to_hf: Callable[[Any], Any] = _same
    from_hf: Callable[[Any], Any] = _same
    default: Any = _NO_DEFAULT


def axis_pairs(
    family: str, convert: Mapping[str, Convert], symbols: str | None = None
) -> tuple[Pair, ...]:
    """The :class:`Pair` of every axis field the registered sites name in ``family``
    (``symbols``: only the sites of these layer kinds), converted as ``convert`` says."""
    names = registry.hf_names(family, symbols)
    unknown = sorted(set(convert) - set(names))
    if unknown:
        raise ValueError(f"no site names {unknown} in the Hugging Face family {family!r}")
    plain = Convert()
    return tuple(
        Pair(ours, theirs, c.to_hf, c.from_hf, c.default)
        for ours, theirs in names.items()
        for c in (convert.get(ours, plain),)
    )


@dataclass(frozen=True)
class Fixed:
    """``config.json[key] = value`` always; a checkpoint with another value is refused."""

    key: str
    value: Any
    why: str


def config_to_hf(pairs: Sequence[Pair], fixed: Sequence[Fixed], cfg: HybridModelConfig) -> dict:
    """The ``config.json`` entries of ``cfg`` under ``pairs`` and ``fixed``."""
    out = {f.key: f.value for f in fixed}
    out.update({p.theirs: p.to_hf(getattr(cfg, p.ours)) for p in pairs})
    return out


def config_from_hf(pairs: Sequence[Pair], fixed: Sequence[Fixed], hf: dict) -> dict[str, Any]:
    """``HybridModelConfig`` fields of ``hf`` under ``pairs``; refuses a ``fixed`` mismatch."""
    for f in fixed:
        value = hf.get(f.key, f.value)
        if value != f.value:
            raise ExportError(
                f"config.json {f.key}={value!r}: {f.why} (this project builds {f.value!r})"
            )
    fields: dict[str, Any] = {}
    for p in pairs:
        if p.theirs in hf and hf[p.theirs] is not None:
            fields[p.ours] = p.from_hf(hf[p.theirs])
        elif p.default is not _NO_DEFAULT:
            fields[p.ours] = p.default
        else:
            raise ExportError(f"config.json has no {p.theirs!r} (needed for model.{p.ours})")
    return fields


def _qkv_shape(cfg: HybridModelConfig) -> tuple[int, int, int]:
    groups = cfg.num_query_groups
    return groups, cfg.num_attention_heads // groups, cfg.kv_channels


def split_qkv(weight: Tensor, cfg: HybridModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """megatron's per-group interleaved ``linear_qkv`` weight as (q, k, v) projection weights.

    megatron's rows are ``[q_0 .. q_{h/g-1}, k, v]`` for each of the ``g`` groups, each
    ``kv_channels`` rows; ``q_proj`` holds the query heads in group order, which is the order
    in which ``repeat_kv`` pairs query heads with key/value heads, so the split is exact.
    """
    groups, per_group, kv = _qkv_shape(cfg)
    w = weight.view(groups, per_group + 2, kv, weight.shape[-1])
    q = w[:, :per_group].reshape(-1, weight.shape[-1])
    k = w[:, per_group].reshape(-1, weight.shape[-1])
    v = w[:, per_group + 1].reshape(-1, weight.shape[-1])
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: HybridModelConfig) -> Tensor:
    """The inverse of :func:`split_qkv`."""
    groups, per_group, kv = _qkv_shape(cfg)
    hidden = q.shape[-1]
    parts = (
        q.view(groups, per_group, kv, hidden),
        k.view(groups, 1, kv, hidden),
        v.view(groups, 1, kv, hidden),
    )
    return torch.cat(parts, dim=1).reshape(-1, hidden)


def split_tensor(value: Tensor, parts: int, cfg: HybridModelConfig) -> tuple[Tensor, ...]:
    """One megatron tensor as ``parts`` HF tensors: 3 = q/k/v, 2 = gate/up, 1 = itself."""
    if parts == 3:
        return split_qkv(value, cfg)
    if parts == 2:  # megatron's gated linear_fc1 computes act(first half) * second half
        gate, up = value.chunk(2, dim=0)
        return gate.contiguous(), up.contiguous()
    return (value,)


def merge_tensors(values: Sequence[Tensor], cfg: HybridModelConfig) -> Tensor:
    """The inverse of :func:`split_tensor`."""
    if len(values) == 3:
        return merge_qkv(values[0], values[1], values[2], cfg)
    if len(values) == 2:
        return torch.cat(list(values), dim=0)
    return values[0]
