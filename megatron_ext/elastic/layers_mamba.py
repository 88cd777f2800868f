"""Mamba heads and head channels: the mixer and its gated grouped RMSNorm, made elastic.

Every Mamba head (and every channel of a head) is an independent recurrence: its output
depends on its own rows of ``in_proj`` (z, x, dt), conv channels, ``A_log``, ``dt_bias``
and ``D``, and on its group's shared B and C.

Masked compute: zeroing the SSM output of the inactive heads / channels before the gated
norm, and computing each group's RMS over its active channels, gives on the active channels
exactly what the sliced mixer computes; ``out_proj`` then sees zeros on its inactive input
columns. The norm receives the SSM output ``y`` and the gate ``z``
(``MambaMixer._ssm_prefill``), so masking ``y`` here is masking the SSM output.

Narrow compute: the mixer runs upstream's ``_ssm_prefill`` on the active heads and channels
only. ``in_proj`` computes the active rows of z, x and dt (B and C whole), and the mixer's
context-parallel helper (upstream's ``MambaContextParallel``, the object through which
``_ssm_prefill`` reads the conv, ``A_log``, ``D`` and ``dt_bias``) is built for the call
from views of the active entries, with the narrow head count and head dim. Every group
keeps the same number of heads (the grouped layout, :mod:`megatron_ext.elastic.layout`), so
upstream's head-to-group mapping holds. The norm sees the narrow channels and ``out_proj``
reads only their columns. The parameters are indexed inside the forward pass, so the
gradient lands in the full parameters. With a narrow hidden width ``in_proj`` reads and
``out_proj`` writes only the active hidden channels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_context_parallel import MambaContextParallel
from torch import Tensor, nn

from megatron_ext.elastic.layers_base import ElasticMixin
from megatron_ext.elastic.layers_linear import column_linear_on, hidden_cols
from megatron_ext.elastic.shard import Shard

if TYPE_CHECKING:
    from megatron_ext.elastic.controller import ElasticController


@dataclass(frozen=True)
class MambaActive:
    """Indices of this rank's active Mamba heads, head channels and ``d_inner`` channels."""

    heads: Tensor
    dims: Tensor
    channels: Tensor


def mamba_active(ctrl: ElasticController, shard: Shard, device) -> MambaActive:
    """The active heads of ``shard`` and the active channels of each (cached per widths).

    Raises ``ValueError`` when the local groups keep different numbers of heads, which the
    grouped layout never produces.
    """

    def build() -> MambaActive:
        heads = ctrl.local_mask("mamba_heads", shard, device)
        dims = ctrl.local_mask("mamba_head_dim", device=device)
        groups = ctrl.model.mamba_num_groups // shard.count
        per_group = heads.view(groups, -1).sum(dim=1)
        if not bool((per_group == per_group[0]).all()):
            raise ValueError(f"mamba_heads: local groups keep unequal head counts {per_group}")
        head_idx = heads.nonzero().flatten()
        dim_idx = dims.nonzero().flatten()
        channels = (head_idx[:, None] * dims.numel() + dim_idx[None, :]).flatten()
        return MambaActive(head_idx, dim_idx, channels)

    return ctrl.memo(("mamba_active", shard, str(device)), build)


class _ConvView:
    """The mixer's depthwise ``conv1d`` restricted to channels ``rows`` (same padding)."""

    def __init__(self, conv: nn.Conv1d, rows: Tensor) -> None:
        self.weight = conv.weight.index_select(0, rows)
        self.bias = None if conv.bias is None else conv.bias.index_select(0, rows)
        self.padding = conv.padding
        self.stride, self.dilation = conv.stride, conv.dilation

    def __call__(self, x: Tensor) -> Tensor:
        """``F.conv1d`` with the selected channels, one group per channel."""
        return F.conv1d(
            x, self.weight, self.bias, self.stride, self.padding, self.dilation, x.shape[1]
        )


class ElasticMambaMixerMixin(ElasticMixin):
    """The Mamba mixer; in narrow mode it computes only the active heads and head channels.

    Setting: ``elastic_heads``, the shard of Mamba heads this rank holds (the mixer's TP
    group). A narrow call runs upstream's forward while the mixer's head counts, head dim and
    context-parallel helper are narrow and its ``in_proj``, ``conv1d``, ``A_log``, ``dt_bias``,
    ``D`` and ``out_proj`` read as narrow views (ModelOpt's dynamic attributes: looked up
    through ``__getattr__`` for the length of the call). That covers training, prefill and
    one-token decoding with a static inference context: the conv and SSM state caches are
    allocated at the narrow size. Dynamic batching and packed sequences run upstream's full
    forward, masked by the norm.
    """

    elastic_fields = ("elastic_heads",)
    elastic_heads: Shard

    def __getattr__(self, name: str):
        views = self.__dict__.get("elastic_views")
        if views is not None and name in views:
            return views[name]
        return nn.Module.__getattr__(self, name)  # type: ignore[arg-type]

    def forward(
        self, hidden_states: Tensor, inference_context=None, *, inference_params=None, **kwargs
    ):
        """Upstream's forward, narrow at narrow Mamba widths (see the class docstring).

        A narrow hidden width alone needs nothing here: ``in_proj`` and ``out_proj`` see it.
        """
        ctrl = self.elastic_ctrl
        narrow = ctrl.is_narrow("mamba_heads") or ctrl.is_narrow("mamba_head_dim")
        context = inference_context if inference_context is not None else inference_params
        dynamic = context is not None and context.is_dynamic_batching()
        if not narrow or dynamic or kwargs.get("packed_seq_params") is not None:
            return self.elastic_upstream.forward(
                self, hidden_states, inference_context, inference_params=inference_params, **kwargs
            )
        with self.elastic_narrow_views(hidden_states.device):
            return self.elastic_upstream.forward(
                self, hidden_states, inference_context, inference_params=inference_params, **kwargs
            )

    @contextmanager
    def elastic_narrow_views(self, device) -> Iterator[None]:
        """For the block: the mixer's sizes, helper, parameters and projections, narrowed."""
        mixer: Any = self
        ctrl = self.elastic_ctrl
        act = mamba_active(ctrl, self.elastic_heads, device)
        params = (
            mixer.in_proj.weight,
            mixer.in_proj.bias,
            mixer.conv1d.weight,
            mixer.conv1d.bias,
            mixer.A_log,
            mixer.dt_bias,
            mixer.D,
        )
        views, cp = ctrl.frozen(self, "views", params, lambda: self._narrow_parts(act))
        sizes = {
            "cp": cp,
            "headdim": act.dims.numel(),
            "d_inner_local_tp": act.channels.numel(),
            "nheads_local_tp": act.heads.numel(),
        }
        saved = {name: getattr(mixer, name) for name in sizes}
        self.__dict__.update(sizes, elastic_views=views)
        try:
            yield
        finally:
            self.__dict__.pop("elastic_views", None)
            self.__dict__.update(saved)

    def _narrow_parts(self, act: MambaActive) -> tuple[dict[str, Any], MambaContextParallel]:
        """The narrow views :meth:`elastic_narrow_views` installs, and the narrow helper."""
        mixer: Any = self
        d, gn = mixer.d_inner_local_tp, mixer.ngroups_local_tp * mixer.d_state
        bc = torch.arange(2 * gn, device=act.channels.device)
        rows = torch.cat([act.channels, d + act.channels, 2 * d + bc, 2 * d + 2 * gn + act.heads])
        heads = act.heads
        views = {
            "in_proj": _RowsView(self.elastic_ctrl, mixer.in_proj, rows),
            "conv1d": _ConvView(mixer.conv1d, torch.cat([act.channels, d + bc])),
            "A_log": mixer.A_log.index_select(0, heads),
            "dt_bias": mixer.dt_bias.index_select(0, heads),
            "D": mixer.D.index_select(0, act.channels if mixer.D_has_hdim else heads),
            "out_proj": partial(mixer.out_proj.elastic_columns_forward, cols=act.channels),
        }
        cp = MambaContextParallel(
            cp_group=mixer.cp.cp_group,
            d_inner_local_tp=act.channels.numel(),
            nheads_local_tp=heads.numel(),
            ngroups_local_tp=mixer.ngroups_local_tp,
            d_state=mixer.d_state,
            conv1d_cp1=views["conv1d"],
            dt_bias_cp1=views["dt_bias"],
            A_log_cp1=views["A_log"],
            D_cp1=views["D"],
            D_has_hdim=mixer.D_has_hdim,
        )
        return views, cp


class _RowsView:
    """A column-parallel linear restricted to output ``rows`` (and the active hidden columns)."""

    def __init__(self, ctrl: ElasticController, layer: Any, rows: Tensor) -> None:
        self.ctrl, self.layer = ctrl, layer
        self.weight = layer.weight.index_select(0, rows)
        self.bias = None if layer.bias is None else layer.bias.index_select(0, rows)
        self.narrow: dict[int, Tensor] = {}  # the weight by input width

    def __call__(self, x: Tensor):
        """``(output, bias)`` like the layer's own forward."""
        weight = self.narrow.get(x.shape[-1])
        if weight is None:
            weight = hidden_cols(self.ctrl, x, self.weight)
            if not torch.is_grad_enabled():
                self.narrow[x.shape[-1]] = weight
        return column_linear_on(self.layer, x, weight, self.bias)


class ElasticGatedNormMixin(ElasticMixin):
    """Gated grouped RMSNorm (mamba-ssm's ``RMSNorm`` interface) over active Mamba channels.

    Setting: ``elastic_heads``, the shard of Mamba heads this rank holds (from the mixer's TP
    group). Groups are contiguous blocks of ``group_size`` channels, as upstream's. An input
    narrower than the weight holds only the active channels (the mixer's narrow compute).
    """

    elastic_fields = ("elastic_heads",)
    elastic_heads: Shard
    eps: float
    group_size: int
    norm_before_gate: bool
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None

    def elastic_channel_mask(self, device) -> Tensor:
        """Bool mask over this rank's ``d_inner`` channels: active head AND active head channel."""
        ctrl = self.elastic_ctrl
        heads = ctrl.local_mask("mamba_heads", self.elastic_heads, device)
        dims = ctrl.local_mask("mamba_head_dim", device=device)
        return (heads[:, None] & dims[None, :]).reshape(-1)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """Gate ``x`` by ``z``, normalise each group over its active channels, mask the rest.

        Inactive channels are normalised with their group's statistics too and only then
        zeroed, so a soft mask (training) sees their values and passes a gradient to them.
        """
        if x.shape[-1] != self.weight.shape[0]:
            return self._narrow_forward(x, z)
        ctrl = self.elastic_ctrl
        mask = None
        groups = self.weight.shape[0] // self.group_size
        if ctrl.is_full("mamba_heads") and ctrl.is_full("mamba_head_dim"):
            out = self.elastic_upstream.forward(self, x, z)
        else:
            mask = self.elastic_channel_mask(x.device)
            out = self._active_norm(x, z, self.weight, self.bias, groups, mask)
        gate = self._soft_gate(out)
        if gate is not None:
            return out * gate
        return out if mask is None else out * mask.to(out.dtype)

    def _narrow_forward(self, x: Tensor, z: Tensor | None) -> Tensor:
        """``x`` holds the active channels only; the groups keep equal shares of them."""
        ctrl = self.elastic_ctrl
        act = mamba_active(ctrl, self.elastic_heads, x.device)
        if x.shape[-1] != act.channels.numel():
            raise ValueError(
                f"narrow Mamba norm: input has {x.shape[-1]} channels, the active set "
                f"{act.channels.numel()}"
            )
        bias = None if self.bias is None else self.bias.index_select(0, act.channels)
        weight = self.weight.index_select(0, act.channels)
        out = self._active_norm(x, z, weight, bias, self.weight.shape[0] // self.group_size)
        gate = self._soft_gate(out, act)
        return out if gate is None else out * gate

    def _soft_gate(self, out: Tensor, act: MambaActive | None = None) -> Tensor | None:
        """The router's soft mask over the channels of ``out`` (head x head channel), or
        ``None`` when unset; with ``act``, ``out`` holds only those active channels."""
        ctrl = self.elastic_ctrl
        heads = ctrl.soft_mask("mamba_heads", self.elastic_heads, out.device)
        dims = ctrl.soft_mask("mamba_head_dim", device=out.device)
        if heads is None and dims is None:
            return None
        head_dim = ctrl.model.mamba_head_dim
        if act is not None:
            heads = None if heads is None else heads[act.heads]
            dims = None if dims is None else dims[act.dims]
            head_dim = act.dims.numel()
        heads = heads if heads is not None else out.new_ones(out.shape[-1] // head_dim)
        dims = dims if dims is not None else out.new_ones(head_dim)
        return (heads[:, None] * dims[None, :]).reshape(-1).to(out.dtype)

    def _active_norm(
        self,
        x: Tensor,
        z: Tensor | None,
        weight: Tensor,
        bias: Tensor | None,
        groups: int,
        mask: Tensor | None = None,
    ) -> Tensor:
        xf = x.float()
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.float())
        grouped = xf.reshape(*xf.shape[:-1], groups, -1)
        if mask is None:
            mean_sq = grouped.square().mean(dim=-1, keepdim=True)
        else:
            active = mask.reshape(groups, -1)
            mean_sq = (grouped * active).square().sum(dim=-1, keepdim=True) / active.sum(
                dim=-1, keepdim=True
            )
        out = (grouped * torch.rsqrt(mean_sq + self.eps)).reshape(xf.shape)
        out = out * weight.float()
        if bias is not None:
            out = out + bias.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(x.dtype)
