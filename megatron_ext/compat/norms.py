"""A plain-PyTorch norm for the local spec that also works under sequence parallelism.

megatron-core's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``; TE and Apex norms
instead mark their parameters ``sequence_parallel`` so ``finalize_model_grads`` sums their
gradients over the TP group (each TP rank sees only its slice of the sequence). This class
does the same for ``torch.nn.RMSNorm`` / ``torch.nn.LayerNorm``. MoE layers with TP > 1
require sequence parallelism in megatron-core, so CPU runs at TP = 2 need it.
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig


class TorchNorm:
    """Build ``torch.nn.RMSNorm`` or ``LayerNorm`` as upstream's norm specs are built."""

    def __new__(  # type: ignore[misc]
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> torch.nn.Module:  # type: ignore[misc]  # a factory, as upstream WrappedTorchNorm
        """Return the norm module, its parameters marked for sequence-parallel reduction."""
        kind = normalization or config.normalization
        if kind == "RMSNorm":
            norm: torch.nn.Module = torch.nn.RMSNorm(
                hidden_size, eps=eps, dtype=config.params_dtype
            )
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization {kind!r} is not RMSNorm or LayerNorm")
        if zero_centered_gamma or config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma needs Transformer Engine")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]
        return norm
