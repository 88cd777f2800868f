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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from torch import Tensor

from megatron_ext.elastic.controller import Shard
from megatron_ext.elastic.layers_base import ElasticMixin

Out = tuple[Tensor, Tensor | None]


def _need_local(module: object, kind: type) -> None:
    from megatron_ext.quant.layers import is_quantized_module

    if is_quantized_module(module):
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
    the output (and its returned bias) is masked by the ``embedding`` axis.
    """

    elastic_fields = ("elastic_in", "elastic_out")
    elastic_in: tuple[str, Shard, int] | None
    elastic_out: bool

    def forward(self, x: Tensor, *args, **kwargs) -> Out:
        """Mask (or narrow) the input, run the projection, mask the output channels.

        The input is narrow when its layer computed only the active channels: in narrow mode
        it is narrower than ``weight``'s input dimension (an attention layer that cannot
        narrow, e.g. while decoding, hands over the full width and is masked here).
        """
        ctrl = self.elastic_ctrl
        site = self.elastic_in
        narrow_in = x.shape[-1] != self.weight.shape[1]  # type: ignore[attr-defined]
        if site is not None and ctrl.is_narrow(site[0]) and narrow_in:
            out, bias = self.elastic_narrow_forward(ctrl.apply_gate(x, *site))
        else:
            if site is not None:
                x = ctrl.mask_last_dim(x, *site)
            out, bias = self.elastic_upstream.forward(self, x, *args, **kwargs)
        return self._mask_output(out, bias)

    def _mask_output(self, out: Tensor, bias: Tensor | None) -> Out:
        if self.elastic_out:
            ctrl = self.elastic_ctrl
            out = ctrl.mask_last_dim(out, "embedding")
            if bias is not None:
                bias = ctrl.mask_last_dim(bias, "embedding")
        return out, bias

    def elastic_narrow_forward(self, x: Tensor) -> Out:
        """Input holds only the active local channels of the input axis: read those columns.

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
        return row_linear_on(self, x, weight)

    def elastic_columns_forward(self, x: Tensor, cols: Tensor) -> Out:
        """Input holds only the local input channels ``cols`` (an index): read those columns.

        The output is masked on the inactive hidden channels as :meth:`forward` does.
        """
        weight = self.weight.index_select(1, cols)  # type: ignore[attr-defined]
        return self._mask_output(*row_linear_on(self, x, weight))


def row_linear_on(layer: object, x: Tensor, weight: Tensor) -> Out:
    """Megatron's local row-parallel linear with ``weight`` (a narrowed view of its own).

    The GEMM is ``F.linear`` on ``weight``; the output reduction over the TP group (or
    reduce-scatter with sequence parallelism) and the bias are upstream's.
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
        return out, layer.bias
    return (out if layer.bias is None else out + layer.bias), None


def column_linear_on(layer: object, x: Tensor, weight: Tensor, bias: Tensor | None) -> Out:
    """Megatron's local column-parallel linear with ``weight`` / ``bias`` (narrowed views).

    The input communication (copy to the TP region, or all-gather with sequence parallelism)
    is upstream's; the GEMM is ``F.linear``, so the gradient lands in the full parameter.
    """
    _need_local(layer, ColumnParallelLinear)
    assert isinstance(layer, ColumnParallelLinear)
    if layer.gather_output:
        raise TypeError("narrow compute needs a column-parallel layer without gather_output")
    if layer.explicit_expert_comm or layer.disable_grad_reduce:
        pass  # experts: the token dispatcher gathers
    elif layer.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, group=layer.tp_group)
    else:
        x = copy_to_tensor_model_parallel_region(x, group=layer.tp_group)
    out = F.linear(x, weight)
    if layer.skip_bias_add:
        return out, bias
    return (out if bias is None else out + bias), None


class ElasticColumnLinearMixin(ElasticMixin):
    """Column-parallel MLP input that computes only its active output rows in narrow mode.

    Settings: ``elastic_rows`` = ``(axis, shard)``; ``elastic_glu`` = whether the local
    output is ``[gate, up]`` halves (gated linear unit), each narrowed the same way.
    """

    elastic_fields = ("elastic_rows", "elastic_glu")
    elastic_rows: tuple[str, Shard]
    elastic_glu: bool

    def forward(self, x: Tensor, *args, **kwargs) -> Out:
        """Upstream's forward, or the active output rows only in narrow mode."""
        axis, _ = self.elastic_rows
        if self.elastic_ctrl.is_narrow(axis):
            return self.elastic_narrow_forward(x)
        return self.elastic_upstream.forward(self, x, *args, **kwargs)

    def _narrow_rows(self, t: Tensor, k: int) -> Tensor:
        if not self.elastic_glu:
            return t[:k]
        half = t.shape[0] // 2
        return torch.cat([t[:k], t[half : half + k]])

    def elastic_narrow_forward(self, x: Tensor) -> Out:
        """``F.linear`` on the active local rows, with upstream's input communication."""
        axis, shard = self.elastic_rows
        k = self.elastic_ctrl.local_prefix_len(axis, shard)
        bias = self.bias  # type: ignore[attr-defined]
        bias = None if bias is None else self._narrow_rows(bias, k)
        return column_linear_on(self, x, self._narrow_rows(self.weight, k), bias)  # type: ignore[attr-defined]
