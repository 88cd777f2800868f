"""The residual stream under the ``embedding`` axis: the embedding output and its norms.

The inactive hidden channels are zero in the embedding output and every output projection
zeroes them in what it adds (see :mod:`.layers_linear`, :mod:`.layers_moe`), so the residual
stream is the sliced model's padded with zeros. The norms on it compute their statistics
over the active channels only and zero the inactive outputs (docs/design.md invariant 4), so even
a non-zero value in an inactive channel never reaches a GEMM.

In narrow compute the embedding hands on only the active channels and the norms normalise
what they are given with the active entries of their weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_ext.elastic.layers_base import ElasticMixin


class ElasticEmbeddingMixin(ElasticMixin):
    """``LanguageModelEmbedding`` whose output is zero on the inactive hidden channels."""

    def forward(self, *args, **kwargs) -> Tensor:
        """Upstream's embedding, then the ``embedding`` mask on the hidden channels."""
        out = self.elastic_upstream.forward(self, *args, **kwargs)
        ctrl = self.elastic_ctrl
        if ctrl.is_narrow("embedding"):  # the residual stream holds the active channels only
            out = out.index_select(-1, ctrl.local_index("embedding", device=out.device))
        return ctrl.mask_last_dim(out, "embedding")


class ElasticRMSNormMixin(ElasticMixin):
    """``torch.nn.RMSNorm`` over the hidden channels whose statistics use active ones only.

    ``y = x * m / sqrt(sum(x² m) / k + eps) * weight`` with ``m`` the ``embedding`` mask and
    ``k`` its width: exactly the RMSNorm of the ``k``-channel sliced model on the active
    channels, and zero elsewhere. Computed in fp32, returned in the input dtype. At full
    width it is upstream's forward, unchanged.
    """

    eps: float | None
    weight: torch.nn.Parameter | None

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` over its active hidden channels."""
        ctrl = self.elastic_ctrl
        if self.weight is not None and x.shape[-1] != self.weight.shape[0]:
            out = self._narrow_norm(x)
        elif ctrl.is_full("embedding"):
            out = self.elastic_upstream.forward(self, x)
        else:
            return self._masked_norm(x)
        return ctrl.apply_gate(out, "embedding")

    def _narrow_norm(self, x: Tensor) -> Tensor:
        """``x`` holds the active channels only: the RMSNorm of the sliced model, in fp32."""
        assert self.weight is not None
        weight = self.weight.index_select(
            0, self.elastic_ctrl.local_index("embedding", device=x.device)
        )
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        xf = x.float()
        out = xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)
        return (out * weight.float()).to(x.dtype)

    def _masked_norm(self, x: Tensor) -> Tensor:
        """Statistics over the active channels; the inactive outputs are zero.

        Without router gates the inactive outputs are zeroed by the hard mask. With gates
        (training), the channels are gated where they are written instead: the embedding
        output and every output projection multiply by the soft mask, whose value is exactly
        0 on an inactive channel, so the stream is already zero there. A second zero factor
        here (hard mask or gate) would cut the path by which the router learns what an
        inactive channel would add to the loss.
        """
        ctrl = self.elastic_ctrl
        mask = ctrl.channel_mask("embedding", device=x.device)
        xf = x.float()
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        mean_sq = (xf * mask).square().sum(dim=-1, keepdim=True) / ctrl.width("embedding")
        out = (xf if "embedding" in ctrl.soft else xf * mask) * torch.rsqrt(mean_sq + eps)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.to(x.dtype)
