"""The ``depth`` axis on a hybrid-stack layer: a skipped layer is the identity on the stream.

Every layer of the stack (``MambaLayer``, and ``TransformerLayer`` with its attention, MLP and
MoE forms) is converted; it knows its global layer index, so the ranking means the same
layers at any pipeline stage. At the current depth (``controller.width("depth")``):

* a kept layer runs as upstream's;
* masked compute runs a skipped layer too and returns its input: ``g * layer(x) + (1 - g) * x``
  with ``g`` the layer's 0/1 mask, or, in training, its soft router gate (exactly 0 or 1 in
  the forward pass, so the output is bit-identical; backward, ``layer(x) - x`` tells the router
  what the layer adds);
* narrow compute does not run a skipped layer at all: no FLOPs, no gradient, and under an
  inference context no KV or SSM cache is allocated for it (megatron's layers create their
  cache entries on their first call). A kept layer still mixes with its gate in training.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from megatron_ext.elastic.layers_base import ElasticMixin
from megatron_ext.elastic.sites.base import DEPTH


class ElasticLayerMixin(ElasticMixin):
    """A stack layer that the ``depth`` axis can skip (``elastic_index``: its global index).

    ``elastic_context``: whether upstream's forward returns ``(hidden_states, context)``
    (``TransformerLayer``) rather than the hidden states alone (``MambaLayer``).
    """

    elastic_fields = ("elastic_index", "elastic_context")
    elastic_index: int
    elastic_context: bool

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Upstream's layer, skipped or gated by the ``depth`` axis (module docstring)."""
        ctrl = self.elastic_ctrl
        hidden: Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        kept = ctrl.layer_kept(self.elastic_index)
        if not kept and ctrl.is_narrow(DEPTH):
            return self._identity(hidden)
        out = self.elastic_upstream.forward(self, *args, **kwargs)
        gate = ctrl.layer_gate(self.elastic_index, hidden.device)
        if gate is None:
            return out if kept else self._identity(hidden)
        y = out[0] if self.elastic_context else out
        g = gate.to(y.dtype)
        mixed = g * y + (1 - g) * hidden
        return (mixed, *out[1:]) if self.elastic_context else mixed

    def _identity(self, hidden: Tensor) -> Any:
        return (hidden, None) if self.elastic_context else hidden
