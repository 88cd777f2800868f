"""The decoder stack of one pipeline stage under narrow hidden width.

Between pipeline stages megatron-core sends a tensor of ``hidden_size`` channels (the
schedules build the receive buffers from ``config.hidden_size``). With narrow compute of the
``embedding`` axis the residual stream holds only the active channels, so a stage that does
not end the model widens its output back to ``hidden_size`` (zeros on the inactive channels,
the masked stream's values) and a stage that does not start it narrows what it received.
Both are exact copies, so each stage computes what the unpipelined model computes; the
gradient sent back is the narrow gradient widened the same way. Masked compute and full
width pass the stream through unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from megatron_ext.elastic.layers_base import ElasticMixin


class ElasticStackMixin(ElasticMixin):
    """``MambaStack`` of a pipeline stage: full-width tensors at its stage boundaries."""

    pre_process: bool
    post_process: bool
    input_tensor: Tensor | None
    config: Any

    def forward(self, hidden_states: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Upstream's stack forward, narrowing the received input and widening the output."""
        ctrl = self.elastic_ctrl
        narrow = ctrl.is_narrow("embedding")
        received = self.input_tensor
        if narrow and not self.pre_process and received is not None:
            index = ctrl.local_index("embedding", device=received.device)
            self.input_tensor = received.index_select(-1, index)
        try:
            out = self.elastic_upstream.forward(self, hidden_states, *args, **kwargs)
        finally:
            self.input_tensor = received
        if narrow and not self.post_process and out.shape[-1] != self.config.hidden_size:
            index = ctrl.local_index("embedding", device=out.device)
            full = out.new_zeros(*out.shape[:-1], self.config.hidden_size)
            out = full.index_copy(-1, index, out)
        return out
