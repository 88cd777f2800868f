"""Pure-PyTorch Mamba kernels for megatron-core's stock ``MambaMixer``.

Upstream site: ``megatron/core/ssm/mamba_mixer.py``. Without mamba-ssm the module sets
``HAVE_MAMBA_SSM = False`` (so ``MambaMixer.__init__`` raises), leaves the kernel names
``mamba_chunk_scan_combined`` / ``selective_state_update`` unset, and derives
``ExtendedRMSNorm`` from a ``MagicMock`` (so the class itself is a mock, methods and all).
This module points those globals at the kernels in :mod:`megatron_ext.compat.mamba_kernels`,
so the stock class (with upstream's parameter names and ``sharded_state_dict``) runs with
``use_mamba_mem_eff_path=False``. The causal conv falls back to the mixer's own
``nn.Conv1d`` path when ``causal_conv1d_fn`` is ``None``.

One-token decoding (``MambaMixer._ssm_decode``, reached with a static inference context) needs
no shim of its own: the SSM step calls the ``selective_state_update`` global pointed at the
torch kernel here, and with ``causal_conv1d_update`` unset the conv step takes upstream's own
torch path (roll the conv state, one dot product per channel).

Upstream site: ``megatron/core/ssm/mamba_block.py`` builds ``MambaStack.final_norm`` with
``TENorm`` unconditionally; without Transformer Engine it is pointed at
:class:`~megatron_ext.compat.norms.TorchNorm` (a torch RMSNorm that supports sequence
parallelism).
"""

from __future__ import annotations

import logging


def install_torch_mamba_kernels() -> None:
    """Point ``MambaMixer``'s kernel globals at the pure-PyTorch implementations."""
    from megatron.core import parallel_state
    from megatron.core.ssm import mamba_mixer
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    from megatron_ext.compat import mamba_kernels

    class TorchExtendedRMSNorm(mamba_kernels.RMSNormGated):
        """Gated grouped RMSNorm, sharded along its weight's axis 0 like upstream's."""

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            """Shard ``weight`` over TP on axis 0 (upstream ``ExtendedRMSNorm``'s layout)."""
            tp_group = getattr(self, "tp_group", None)
            if tp_group is None:
                tp_group = parallel_state.get_tensor_model_parallel_group()
            return make_sharded_tensors_for_checkpoint(
                self.state_dict(prefix="", keep_vars=True),
                prefix,
                {"weight": 0},
                sharded_offsets,
                tp_group=tp_group,
                dp_cp_group=(metadata or {}).get("dp_cp_group"),
            )

    mamba_mixer.ExtendedRMSNorm = TorchExtendedRMSNorm
    mamba_mixer.RMSNormGated = mamba_kernels.RMSNormGated
    mamba_mixer.mamba_chunk_scan_combined = mamba_kernels.mamba_chunk_scan_combined
    mamba_mixer.selective_state_update = mamba_kernels.selective_state_update
    mamba_mixer.HAVE_MAMBA_SSM = True
    # The torch path is use_mamba_mem_eff_path=False by design; upstream warns once per layer.
    logging.getLogger(mamba_mixer.__name__).setLevel(logging.ERROR)


def torch_final_norm() -> None:
    """Build ``MambaStack.final_norm`` with a torch norm instead of ``TENorm``."""
    from megatron.core.ssm import mamba_block

    from megatron_ext.compat.norms import TorchNorm

    mamba_block.TENorm = TorchNorm
