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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.ssm.mamba_context_parallel import MambaContextParallel
from torch import Tensor, nn

from megatron_ext.elastic.controller import ElasticController, Shard
from megatron_ext.elastic.layers_base import ElasticMixin
from megatron_ext.elastic.layers_linear import column_linear_on, hidden_cols


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
    group). Masked mode, inference (decoding keeps per-head state caches of the full width)
    and packed sequences run upstream's forward; the masking is then the norm's.
    """

    elastic_fields = ("elastic_heads",)
    elastic_heads: Shard

    def forward(
        self, hidden_states: Tensor, inference_context=None, *, inference_params=None, **kwargs
    ):
        """Upstream's forward, or the narrow one at narrow Mamba widths in a plain forward pass.

        A narrow hidden width alone needs nothing here: ``in_proj`` and ``out_proj`` see it.
        """
        ctrl = self.elastic_ctrl
        narrow = ctrl.is_narrow("mamba_heads") or ctrl.is_narrow("mamba_head_dim")
        plain_call = inference_context is None and inference_params is None
        if narrow and plain_call and kwargs.get("packed_seq_params") is None:
            return self.elastic_narrow_forward(hidden_states)
        return self.elastic_upstream.forward(
            self, hidden_states, inference_context, inference_params=inference_params, **kwargs
        )

    def elastic_narrow_forward(self, hidden_states: Tensor):
        """``in_proj`` rows, upstream's SSM and norm, and ``out_proj`` columns of the active set."""
        mixer: Any = self
        act = mamba_active(self.elastic_ctrl, self.elastic_heads, hidden_states.device)
        d, gn = mixer.d_inner_local_tp, mixer.ngroups_local_tp * mixer.d_state
        bc = torch.arange(2 * gn, device=act.channels.device)
        rows = torch.cat([act.channels, d + act.channels, 2 * d + bc, 2 * d + 2 * gn + act.heads])
        proj = mixer.in_proj
        bias = None if proj.bias is None else proj.bias.index_select(0, rows)
        weight = hidden_cols(self.elastic_ctrl, hidden_states, proj.weight.index_select(0, rows))
        zxbcdt, _ = column_linear_on(proj, hidden_states, weight, bias)
        channels = act.channels
        heads = act.heads
        cp = MambaContextParallel(
            cp_group=mixer.cp.cp_group,
            d_inner_local_tp=channels.numel(),
            nheads_local_tp=heads.numel(),
            ngroups_local_tp=mixer.ngroups_local_tp,
            d_state=mixer.d_state,
            conv1d_cp1=_ConvView(mixer.conv1d, torch.cat([channels, d + bc])),  # type: ignore[arg-type]
            dt_bias_cp1=mixer.dt_bias.index_select(0, heads),
            A_log_cp1=mixer.A_log.index_select(0, heads),
            D_cp1=mixer.D.index_select(0, channels if mixer.D_has_hdim else heads),
            D_has_hdim=mixer.D_has_hdim,
        )
        saved = mixer.cp, mixer.headdim
        mixer.cp, mixer.headdim = cp, act.dims.numel()
        try:
            y = self.elastic_upstream._ssm_prefill(mixer, zxbcdt, conv_state=None, ssm_state=None)
        finally:
            mixer.cp, mixer.headdim = saved
        return mixer.out_proj.elastic_columns_forward(y, channels)


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
        heads = ctrl.soft_mask("mamba_heads", self.elastic_heads, out.device)
        dims = ctrl.soft_mask("mamba_head_dim", device=out.device)
        if heads is not None or dims is not None:
            head_dim = ctrl.model.mamba_head_dim
            heads = heads if heads is not None else out.new_ones(out.shape[-1] // head_dim)
            dims = dims if dims is not None else out.new_ones(head_dim)
            return out * (heads[:, None] * dims[None, :]).reshape(-1).to(out.dtype)
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
        heads = ctrl.soft_mask("mamba_heads", self.elastic_heads, out.device)
        dims = ctrl.soft_mask("mamba_head_dim", device=out.device)
        if heads is None and dims is None:
            return out
        heads = out.new_ones(act.heads.numel()) if heads is None else heads[act.heads]
        dims = out.new_ones(act.dims.numel()) if dims is None else dims[act.dims]
        return out * (heads[:, None] * dims[None, :]).reshape(-1).to(out.dtype)

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
