"""Elastic input/output projections (megatron's column- and row-parallel linears).

Row-parallel layers (``linear_proj``, ``linear_fc2``, ``mixer.out_proj``, the experts'
``linear_fc2``) take an optional input axis, masked on their input (attention heads, FFN
channels), and optionally zero their output on the inactive hidden channels so the residual
stream stays zero there. Column-parallel MLP inputs (``linear_fc1``) only act in narrow mode.

Narrow compute (``ffn``, ``moe_ffn``): ``linear_fc1`` computes only the active local prefix
of its output rows (both halves with a gated linear unit) and ``linear_fc2`` only reads the
active local prefix of its input columns. Upstream's ``MLP.forward`` runs unchanged between
them, on the narrower tensor. The communication is that of upstream's local linears,
through megatron's mapping functions; the GEMM is ``F.linear`` on a view of the weight, so
the gradient lands in the full parameter. Narrow compute needs the local backend.

The same two functions, :func:`column_linear_on` and :func:`row_linear_on`, serve the
attention and Mamba layers' narrow compute (:mod:`.layers_attention`, :mod:`.layers_mamba`),
whose active rows / columns are an index (the top heads of every group) rather than a prefix.

Narrow hidden width (``embedding``): the residual stream holds only the active hidden
channels. Every linear that reads it (``in_proj``, ``linear_qkv``, ``linear_fc1``, the
shared experts' and the output layer) reads only those columns of its weight, and every
linear that writes it (``out_proj``, ``linear_proj``, ``linear_fc2``, the experts') computes
only those output rows. A linear sees that its input is narrow from its shape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from torch import Tensor

from megatron_ext.dynamic import is_converted
from megatron_ext.elastic.layers_base import ElasticMixin
from megatron_ext.elastic.shard import Shard

Out = tuple[Tensor, Tensor | None]


def _need_local(module: object, kind: type) -> None:
    if is_converted(module, "quant"):
        raise TypeError(
            f"{type(module).__name__}: narrow compute would skip the quantized GEMM; quantized "
            "elastic models compute masked (ElasticController(mode='masked'))"
        )
    if not isinstance(module, kind):
        raise TypeError(
            f"narrow compute needs megatron's local {kind.__name__}, not {type(module).__name__} "
            "(use the local backend, or compute='masked')"
        )


class ElasticRowLinearMixin(ElasticMixin):
    """Row-parallel linear with a masked (or narrow) input axis and a masked hidden output.

    Settings: ``elastic_in`` = ``(axis, shard, unit)`` or ``None`` (each position of ``axis``
    covers ``unit`` input channels, e.g. a head's ``kv_channels``); ``elastic_out`` = whether
    the output (and its returned bias) is masked by the ``embedding`` axis. Every row linear
    writes the hidden stream, so with a narrow ``embedding`` it computes its active rows only.
    """

    elastic_fields = ("elastic_in", "elastic_out")
    elastic_in: tuple[str, Shard, int] | None
    elastic_out: bool

    def forward(self, x: Tensor, *args, **kwargs) -> Out:
        """Mask (or narrow) the input, run the projection, mask (or narrow) the output.

        The input is narrow when its layer computed only the active channels: in narrow mode
        it is narrower than ``weight``'s input dimension (an attention layer that cannot
        narrow, e.g. while decoding, hands over the full width and is masked here).
        """
        ctrl = self.elastic_ctrl
        site = self.elastic_in
        narrow_in = x.shape[-1] != self.weight.shape[1]  # type: ignore[attr-defined]
        narrow_out = ctrl.is_narrow("embedding")
        if site is not None and ctrl.is_narrow(site[0]) and narrow_in:
            x = ctrl.apply_gate(x, *site)
            out, bias = row_linear_on(self, x, *self._weights("in", lambda: self._narrow_cols(x)))
        else:
            if site is not None:
                x = ctrl.mask_last_dim(x, *site)
            if narrow_out:
                out, bias = row_linear_on(self, x, *self._weights("out", lambda: self.weight))  # type: ignore[attr-defined]
            else:
                out, bias = self.elastic_upstream.forward(self, x, *args, **kwargs)
        return self._mask_output(out, bias)

    def _mask_output(self, out: Tensor, bias: Tensor | None) -> Out:
        if self.elastic_out:
            ctrl = self.elastic_ctrl
            out = ctrl.mask_last_dim(out, "embedding")
            if bias is not None:
                bias = ctrl.mask_last_dim(bias, "embedding")
        return out, bias

    def _weights(self, tag: str, cols) -> tuple[Tensor, Tensor | None]:
        """``_rows(cols())``, kept between calls while serving (``ElasticController.frozen``)."""
        layer: Any = self
        params = (layer.weight, layer.bias)
        return self.elastic_ctrl.frozen(self, tag, params, lambda: self._rows(cols()))

    def _rows(self, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """``weight`` and the bias, restricted to the active hidden rows when those are narrow."""
        bias = self.bias  # type: ignore[attr-defined]
        ctrl = self.elastic_ctrl
        if not ctrl.is_narrow("embedding"):
            return weight, bias
        rows = ctrl.local_index("embedding", device=weight.device)
        return weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows)

    def _narrow_cols(self, x: Tensor) -> Tensor:
        """The weight's columns of the input axis's active local channels.

        Ungrouped axes (FFN channels) are the local prefix, read as a view; grouped ones
        (attention heads: the top heads of every query group) by index.
        """
        assert self.elastic_in is not None
        axis, shard, unit = self.elastic_in
        ctrl = self.elastic_ctrl
        if axis in ctrl.group_sizes:
            cols = ctrl.local_index(axis, shard, unit, x.device)
            weight = self.weight.index_select(1, cols)  # type: ignore[attr-defined]
        else:
            weight = self.weight[:, : ctrl.local_prefix_len(axis, shard) * unit]  # type: ignore[attr-defined]
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"narrow {axis}: input has {x.shape[-1]} channels, expected {weight.shape[1]}"
            )
        return weight

    def elastic_columns_forward(self, x: Tensor, cols: Tensor) -> Out:
        """Input holds only the local input channels ``cols`` (an index): read those columns.

        The output is masked (or narrowed) on the hidden channels as :meth:`forward` does.
        """
        weights = self._weights("cols", lambda: self.weight.index_select(1, cols))  # type: ignore[attr-defined]
        return self._mask_output(*row_linear_on(self, x, *weights))


def row_linear_on(layer: object, x: Tensor, weight: Tensor, bias: Tensor | None) -> Out:
    """Megatron's local row-parallel linear with ``weight`` / ``bias`` (narrowed views).

    The GEMM is ``F.linear`` on ``weight``; the output reduction over the TP group (or
    reduce-scatter with sequence parallelism) and the bias handling are upstream's.
    """
    _need_local(layer, RowParallelLinear)
    assert isinstance(layer, RowParallelLinear)
    if not layer.input_is_parallel:
        raise TypeError("narrow compute needs a row-parallel layer with input_is_parallel")
    out = F.linear(x, weight)
    if layer.explicit_expert_comm:
        pass  # experts: the token dispatcher reduces
    elif layer.sequence_parallel:
        out = reduce_scatter_to_sequence_parallel_region(out, group=layer.tp_group)
    else:
        out = reduce_from_tensor_model_parallel_region(out, group=layer.tp_group)
    if layer.skip_bias_add:
        return out, bias
    return (out if bias is None else out + bias), None


def column_linear_on(
    layer: object, x: Tensor, weight: Tensor, bias: Tensor | None, gather: bool = False
) -> Out:
    """Megatron's local column-parallel linear with ``weight`` / ``bias`` (narrowed views).

    The input communication (copy to the TP region, or all-gather with sequence parallelism)
    is upstream's, and so is the output gather over TP with ``gather`` (the layer's
    ``gather_output`` or a ``runtime_gather_output``); the GEMM is ``F.linear``, so the
    gradient lands in the full parameter.
    """
    _need_local(layer, ColumnParallelLinear)
    assert isinstance(layer, ColumnParallelLinear)
    if layer.explicit_expert_comm or layer.disable_grad_reduce:
        pass  # experts: the token dispatcher gathers
    elif layer.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, group=layer.tp_group)
    else:
        x = copy_to_tensor_model_parallel_region(x, group=layer.tp_group)
    out = F.linear(x, weight)
    if layer.skip_bias_add:
        out_bias = bias
    else:
        out, out_bias = (out if bias is None else out + bias), None
    if gather or layer.gather_output:
        out = gather_from_tensor_model_parallel_region(out, group=layer.tp_group)
    return out, out_bias


def hidden_cols(ctrl, x: Tensor, weight: Tensor) -> Tensor:
    """``weight``'s columns of the active hidden channels when ``x`` holds only those."""
    if x.shape[-1] == weight.shape[1]:
        return weight
    cols = ctrl.local_index("embedding", device=weight.device)
    if x.shape[-1] != cols.numel():
        raise ValueError(
            f"input has {x.shape[-1]} channels: neither the full {weight.shape[1]} nor the "
            f"{cols.numel()} active hidden channels"
        )
    return weight.index_select(1, cols)


class ElasticColumnLinearMixin(ElasticMixin):
    """Column-parallel linear reading the hidden stream; MLP inputs also narrow their rows.

    Settings: ``elastic_rows`` = ``(axis, shard)`` or ``None`` (no elastic output axis: Mamba
    ``in_proj``, the shared experts' ``linear_fc1``, the output layer); ``elastic_glu`` =
    whether the local output is ``[gate, up]`` halves (gated linear unit), each narrowed the
    same way. A narrow hidden input reads only the active columns.
    """

    elastic_fields = ("elastic_rows", "elastic_glu")
    elastic_rows: tuple[str, Shard] | None
    elastic_glu: bool

    def forward(self, x: Tensor, weight: Tensor | None = None, **kwargs) -> Out:
        """Upstream's forward, or the active rows / hidden columns only in narrow mode."""
        layer: Any = self
        full = layer.weight if weight is None else weight
        rows = self.elastic_rows
        narrow_rows = rows is not None and self.elastic_ctrl.is_narrow(rows[0])
        if not narrow_rows and x.shape[-1] == full.shape[1]:
            if weight is not None:
                kwargs["weight"] = weight
            return self.elastic_upstream.forward(self, x, **kwargs)
        gather = bool(kwargs.get("runtime_gather_output"))
        weight, bias = self.elastic_ctrl.frozen(
            self, "narrow", (full, layer.bias), lambda: self._narrow(x, full, narrow_rows)
        )
        return column_linear_on(self, x, weight, bias, gather)

    def _narrow(self, x: Tensor, full: Tensor, narrow_rows: bool) -> tuple[Tensor, Tensor | None]:
        """The active rows (narrow output axis) and hidden columns (narrow input) of the weight."""
        bias = self.bias  # type: ignore[attr-defined]
        if narrow_rows:
            assert self.elastic_rows is not None
            k = self.elastic_ctrl.local_prefix_len(*self.elastic_rows)
            full = self._narrow_rows(full, k)
            bias = None if bias is None else self._narrow_rows(bias, k)
        return hidden_cols(self.elastic_ctrl, x, full), bias

    def _narrow_rows(self, t: Tensor, k: int) -> Tensor:
        if not self.elastic_glu:
            return t[:k]
        half = t.shape[0] // 2
        return torch.cat([t[:k], t[half : half + k]])
