"""Mamba heads and head channels: the mixer's gated grouped RMSNorm, made elastic.

Every Mamba head (and every channel of a head) is an independent recurrence: its output
depends on its own rows of ``in_proj`` (z, x, dt), conv channels, ``A_log``, ``dt_bias``
and ``D``, and on its group's shared B and C. Zeroing the SSM output of the inactive heads /
channels before the gated norm, and computing each group's RMS over its active channels,
gives on the active channels exactly what the sliced mixer computes; ``out_proj`` then sees
zeros on its inactive input columns. The norm receives the SSM output ``y`` and the gate
``z`` (``MambaMixer._ssm_prefill``), so masking ``y`` here is masking the SSM output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_ext.elastic.controller import Shard
from megatron_ext.elastic.layers_base import ElasticMixin


class ElasticGatedNormMixin(ElasticMixin):
    """Gated grouped RMSNorm (mamba-ssm's ``RMSNorm`` interface) over active Mamba channels.

    Setting: ``elastic_heads``, the shard of Mamba heads this rank holds (from the mixer's TP
    group). Groups are contiguous blocks of ``group_size`` channels, as upstream's.
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
        ctrl = self.elastic_ctrl
        mask = None
        if ctrl.is_full("mamba_heads") and ctrl.is_full("mamba_head_dim"):
            out = self.elastic_upstream.forward(self, x, z)
        else:
            mask = self.elastic_channel_mask(x.device)
            out = self._active_norm(x, z, mask)
        heads = ctrl.soft_mask("mamba_heads", self.elastic_heads, out.device)
        dims = ctrl.soft_mask("mamba_head_dim", device=out.device)
        if heads is not None or dims is not None:
            head_dim = ctrl.model.mamba_head_dim
            heads = heads if heads is not None else out.new_ones(out.shape[-1] // head_dim)
            dims = dims if dims is not None else out.new_ones(head_dim)
            return out * (heads[:, None] * dims[None, :]).reshape(-1).to(out.dtype)
        return out if mask is None else out * mask.to(out.dtype)

    def _active_norm(self, x: Tensor, z: Tensor | None, mask: Tensor) -> Tensor:
        xf = x.float()
        if z is not None and not self.norm_before_gate:
            xf = xf * F.silu(z.float())
        groups = xf.shape[-1] // self.group_size
        grouped = xf.reshape(*xf.shape[:-1], groups, -1)
        active = mask.reshape(groups, -1)
        mean_sq = (grouped * active).square().sum(dim=-1, keepdim=True) / active.sum(
            dim=-1, keepdim=True
        )
        out = (grouped * torch.rsqrt(mean_sq + self.eps)).reshape(xf.shape)
        out = out * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(x.dtype)
